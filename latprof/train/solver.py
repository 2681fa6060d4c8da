"""Keep-ratio solver: the token schedule that keeps the most information within a latency budget.

Information kept = sum over pruning stages of (kept patch tokens x blocks that run at that stage's
token count). Kept counts are non-increasing through the network. Predicted latency is the table's sum
over units (`latprof.train.latency.LatencyModel`); it is separable by stage (a unit's N depends on one
stage's kept count only), so a dynamic program over (stage, kept count, information) is exact over the
candidate grid: for every information value it keeps the least latency, and a suffix minimum over the
previous stage's counts enforces monotonicity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from latprof.errors import InfeasibleError, LutError
from latprof.schedule import TokenSchedule
from latprof.train.latency import LatencyModel


@dataclass(frozen=True)
class SolverResult:
    kept: tuple[int, ...]
    latency_ms: float      # predicted latency of the chosen schedule
    information: int       # sum of kept x blocks per stage
    fastest_ms: float      # fastest schedule on the grid
    dense_ms: float | None  # the schedule that prunes nothing (None if off the grid)
    schedule: TokenSchedule

    def ratios(self, patches: int) -> tuple[float, ...]:
        return tuple(k / patches for k in self.kept)


def candidates(lm: LatencyModel, every_count: bool = False) -> list[np.ndarray]:
    """Kept counts to consider per stage: the table's grid (default) or every count 1..P, keeping only
    those whose token counts all lie inside the measured range."""
    out = []
    for s in range(1, lm.stages + 1):
        ks = np.arange(1, lm.patches + 1) if every_count else lm.grid(s)
        ks = ks[~np.isnan(lm.stage_cost(s, ks))]
        if ks.size == 0:
            raise LutError(f"{lm.model}: no measured token count fits pruning stage {s}",
                           f"measure blocks at token counts between {2 + s} and {1 + lm.patches + s}")
        out.append(ks.astype(int))
    return out


def solve(lm: LatencyModel, budget_ms: float, every_count: bool = False) -> SolverResult:
    """Non-increasing kept counts maximizing information with predicted latency <= budget_ms.
    Ties in information go to the lower latency. Raises InfeasibleError naming the fastest latency."""
    base = lm.fixed_ms + float(lm.stage_cost(0, np.array([0]))[0])
    if np.isnan(base):
        raise LutError(f"{lm.model}: the dense token count {1 + lm.patches} is outside the measured range",
                       f"measure the blocks at {1 + lm.patches} tokens")
    cands = candidates(lm, every_count)
    weights = lm.blocks_per_stage()[1:]
    vmax = sum(w * lm.patches for w in weights)
    inf = np.inf
    best = None          # [len(K_{s}), vmax+1] least latency of stages 1..s with information v
    parents = []         # per stage s>=2: [len(K_s), vmax+1] index into K_{s-1}
    for s, ks in enumerate(cands, start=1):
        cost = lm.stage_cost(s, ks)
        w = weights[s - 1]
        cur = np.full((len(ks), vmax + 1), inf)
        if s == 1:
            for j, k in enumerate(ks):
                cur[j, w * k] = cost[j]
            parents.append(None)
        else:
            prev_k = cands[s - 2]
            # suffix minimum over previous counts (ascending), with its argmin
            suf = best.copy()
            arg = np.tile(np.arange(len(prev_k))[:, None], (1, vmax + 1))
            for j in range(len(prev_k) - 2, -1, -1):
                better = suf[j + 1] < suf[j]
                suf[j] = np.where(better, suf[j + 1], suf[j])
                arg[j] = np.where(better, arg[j + 1], arg[j])
            par = np.zeros((len(ks), vmax + 1), dtype=int)
            for j, k in enumerate(ks):
                start = int(np.searchsorted(prev_k, k, side="left"))  # first previous count >= k
                if start >= len(prev_k):
                    continue
                shift = w * k
                cur[j, shift:] = suf[start, : vmax + 1 - shift] + cost[j]
                par[j, shift:] = arg[start, : vmax + 1 - shift]
            parents.append(par)
        best = cur
    total = best + base
    fastest = float(np.min(total))
    by_value = total.min(axis=0)
    ok = np.nonzero(by_value <= budget_ms + 1e-9)[0]
    if ok.size == 0:
        raise InfeasibleError(f"budget {budget_ms:g} ms is below the fastest schedule on the table ({fastest:.4g} ms)",
                              f"raise --budget to at least {fastest:.4g} ms or measure a faster device")
    v = int(ok[-1])
    j = int(np.argmin(total[:, v]))
    latency = float(total[j, v])
    kept = []
    for s in range(len(cands), 0, -1):
        k = int(cands[s - 1][j])
        kept.append(k)
        if s > 1:
            j_prev = int(parents[s - 1][j, v])
            v -= weights[s - 1] * k
            j = j_prev
    kept = tuple(reversed(kept))
    dense = None
    if all(lm.patches in c for c in cands):
        dense = lm.predict_ms([lm.patches] * lm.stages)
    schedule = TokenSchedule(lm.patches, lm.locations, kept, lm.depth)
    info = sum(w * k for w, k in zip(weights, kept))
    return SolverResult(kept, latency, info, fastest, dense, schedule)


def solve_calibrated(solver, budget_ms: float, overhead, calls: int, model: str) -> SolverResult:
    """`solver(budget on the sum of units)` for a budget on the corrected prediction (the table's overhead
    sidecar; none: the plain sum). An infeasible budget is reported in the same corrected terms."""
    from latprof.predict import budget_on_sum

    if overhead is not None:
        fastest = overhead.apply(solver(math.inf).fastest_ms, calls)
        if budget_ms < fastest:
            raise InfeasibleError(f"budget {budget_ms:g} ms is below the fastest {model} schedule on the table "
                                  f"({fastest:.4g} ms with the overhead correction)",
                                  f"raise --budget to at least {fastest:.4g} ms")
    return solver(budget_on_sum(budget_ms, overhead, calls))


def solve_table(table, model: str, budget_ms: float, patches: int, locations, depth: int,
                every_count: bool = False) -> SolverResult:
    """Convenience: LatencyModel from a LutTable, then `solve`."""
    return solve(LatencyModel.from_table(table, model, patches, locations, depth), budget_ms, every_count)


# -- hierarchical models (latprof.models.staged) ------------------------------------------------------
def solve_staged(table, spec, budget_ms: float, every_count: bool = False) -> SolverResult:
    """The keep-ratio solver for PiT and Swin: kept counts per location (non-increasing within a stage,
    every stage starting dense) that process the most tokens (kept x windows x blocks they run through)
    within `budget_ms` of predicted latency (the table's sum over units, as `latprof predict`).

    Exact over the candidates (each location's block graph's measured counts, or every count): the
    predicted latency is separable by location (a unit's N depends on one location's kept count, see
    `StagedLayout.unit_location`), so a dynamic program over locations keeps, per last kept count where
    the next location shares its stage, the Pareto front of (latency, information)."""
    lay, model = spec.layout, spec.name
    lm = LatencyModel.from_staged(table, spec)  # the same latency model the training loss reads
    L = len(lay.locations)
    base = lm.fixed_ms
    blocks = [sum(1 for c in lm.curves if c.stage == s + 1 and c.unit.startswith("blocks.")) for s in range(L)]

    cands = []  # per location: (kept, predicted ms of the units it sets, tokens its blocks process)
    for s, ks in enumerate(_staged_candidates(lm, spec, every_count)):
        tokens = lay.stages[lay.location_stage(s)].windows * blocks[s]
        cands.append([(k, float(ms), k * tokens) for k, ms in zip(ks, lm.stage_cost(s + 1, np.array(ks)))])

    def run(limit: float):
        fronts = {None: [(base, 0, ())]}
        for s, options in enumerate(cands):
            same_prev = s and lay.location_stage(s - 1) == lay.location_stage(s)
            shares_next = s + 1 < len(cands) and lay.location_stage(s + 1) == lay.location_stage(s)
            grown: dict = {}
            for key, front in fronts.items():
                for k, ms, info in options:
                    if same_prev and k > key:
                        continue  # non-increasing within a stage
                    for lat, inf_, kept in front:
                        if lat + ms <= limit:
                            grown.setdefault(k if shares_next else None, []).append((lat + ms, inf_ + info, kept + (k,)))
            fronts = {key: _pareto(v) for key, v in grown.items()}
        return [p for front in fronts.values() for p in front]

    everything = run(math.inf)
    fastest = min(p[0] for p in everything)
    ok = [p for p in everything if p[0] <= budget_ms]
    if not ok:
        raise InfeasibleError(f"budget {budget_ms:g} ms is below the fastest {model} schedule on the table ({fastest:.4g} ms)",
                              f"raise --budget to at least {fastest:.4g} ms or measure a faster device")
    lat, info, kept = max(ok, key=lambda p: (p[1], -p[0]))
    dense_kept = [lay.limit(s) for s in range(len(cands))]
    dense = next((p[0] for p in everything if list(p[2]) == dense_kept), None)
    return SolverResult(tuple(kept), lat, info, fastest, dense, lay.schedule(kept))


def _staged_candidates(lm: LatencyModel, spec, every_count: bool = False) -> list[list[int]]:
    """Per pruning location of a PiT or Swin, the kept counts to consider: those at which the location's
    first block runs at one of its measured token counts (default) or every count, keeping only those
    whose token counts all lie inside the measured range."""
    lay = spec.layout
    out = []
    for s in range(len(lay.locations)):
        if every_count:
            ks = range(1, lay.limit(s) + 1)
        else:
            first_block = next(c for c in lm.curves if c.stage == s + 1 and c.unit.startswith("blocks."))
            ks = sorted({lay.kept_for(s, int(n)) for n in first_block.tokens})
        ks = [k for k in ks if 1 <= k <= lay.limit(s)]
        ks = [k for k, ms in zip(ks, lm.stage_cost(s + 1, np.array(ks, dtype=float))) if not np.isnan(ms)]
        if not ks:
            raise LutError(f"{spec.name}: no measured token count fits pruning location {s + 1} (before block "
                           f"{lay.locations[s]})", f"measure {spec.name} on its default grid")
        out.append(ks)
    return out


def grid_candidates(table, spec, every_count: bool = False) -> list[list[int]]:
    """The kept counts per pruning location that `solve` and `train` choose among: by default those
    whose blocks run at token counts the table measured, so no latency is interpolated."""
    if spec.layout is not None:
        return _staged_candidates(LatencyModel.from_staged(table, spec), spec, every_count)
    from latprof.predict import _depth

    lm = LatencyModel.from_table(table, spec.name, spec.max_tokens - 1, spec.pruning_locations, _depth(spec))
    return [ks.tolist() for ks in candidates(lm, every_count)]


def _pareto(points: list[tuple]) -> list[tuple]:
    """(latency, information, kept) points not beaten on both: less or equal latency with more information."""
    out, best = [], -1
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            out.append(p)
            best = p[1]
    return out
