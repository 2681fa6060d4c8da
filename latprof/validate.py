"""`latprof validate`: does the table's prediction hold end to end?

For K random token schedules (seeded; every unit's N inside the table's measured range), the whole
pruned model is built (timm DeiT + SPViT selectors, tokens really removed by top-k at the pruning
locations, a package token appended per stage: `latprof.train.spvit.StaticSPViT`, static shapes),
exported to ONNX, compiled by the SAME engine with the SAME tuning state as the table (for TVM the
workdir's tuning database; unit graphs at the schedule's token counts are prepared first, so the whole
model's tasks find their schedules by workload, as the table's units did), measured end to end on the
device and compared with `latprof.predict.predict`.

Around each whole model the reference units (the first block of each stage, at its dense N) are
measured again, right before and right after it: their ratios to the table's figures, weighted by each
stage's share of the schedule's predicted time, are the machine's drift since the table was measured
(other jobs, frequency, heat), reported next to each result and used to give a drift-corrected
comparison as well (and to fit the calibration, which should describe the model, not the moment).

Each whole model's samples are taken in `measure.rounds` visits (3) spread through the pass, every
round starting a rounds-th further into the list, so a slow stretch of a shared host (seconds to a
minute here) lands on a share of every model's samples instead of all of one model's.

Per-visit results are appended to `<workdir>/validate/<device>-<model>-<engine>.jsonl` as they come,
keyed by (table, engine, tuning, kept) and the pass (`run`): a rerun skips what is there and finishes
a pass that was cut off (resumable).

Non-additivity (see `latprof.predict.Overhead`): `calibrate=True` measures the engine's per-call cost
with a trivial graph on the device (one [1, 17, D] tensor plus a constant: nothing to compute),
interleaved with the calibration schedules, fits a scale and a constant to the call-corrected sums
(`latprof.predict.fit_overhead`) and writes them into the table's sidecar for the model,
`<table>.<model>.overhead.json`, which `predict` applies from then on. Calibrate and validate with
different seeds so the reported fidelity is out of sample.

`stat` reads the table and the end-to-end samples with the same statistic: ``median`` (default), or a
low quantile (``min``, ``q10``, ``q25``) on a shared host where other jobs only ever add time.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from latprof.errors import LutError, UsageError
from latprof.measure.samples import append_line
from latprof.predict import (Overhead, fit_overhead, parse_stat, predict, read_overhead, sample_stat, schedule_of,
                             table_statistic, unit_tokens, write_overhead)
from latprof.schedule import TokenSchedule

CALL_PROBE_TOKENS = 17


@dataclass
class ConfigResult:
    index: int
    kept: list[int]
    block_tokens: list[int]
    sum_ms: float            # plain sum of unit medians
    predicted_ms: float      # with the overhead correction in force (== sum_ms without a sidecar)
    measured_ms: float       # median of the end-to-end samples
    measured_q1_ms: float
    measured_q3_ms: float
    ci_low_ms: float
    ci_high_ms: float
    samples_ms: list[float] = field(repr=False, default_factory=list)
    drift: float | None = None  # reference units now / in the table (1.0: the machine as when the table was made)
    recorded: dict = field(repr=False, default_factory=dict)  # its line in the results file
    ref_weights: dict = field(repr=False, default_factory=dict)  # each reference unit's weight in `drift`
    machine: float = 1.0     # the calibration's machine drift, in predicted_ms (Overhead.drift)
    pi_low_ms: float = 0.0   # 95% prediction interval (the CI where the calibration knows no scatter)
    pi_high_ms: float = 0.0

    @property
    def error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1

    @property
    def at_table_ms(self) -> float:
        """The prediction at the table's machine state (without the calibration's drift)."""
        return self.predicted_ms / self.machine

    @property
    def corrected_error(self) -> float:
        """Both sides at the table's machine state: the prediction without the calibration's drift against the
        end to end corrected by its own references."""
        return self.at_table_ms / self.corrected_ms - 1

    @property
    def corrected_ms(self) -> float:
        """End to end scaled back to the table's machine state by the interleaved reference units."""
        return self.measured_ms / self.drift if self.drift else self.measured_ms


@dataclass
class Retest:
    """The same compiled whole model measured end to end again: how far the ground truth itself moves."""
    kept: list[int]
    minutes: float              # since the earlier measurement
    error: float                # now / earlier - 1 (the validation's statistic)
    drift_error: float | None   # the same with each divided by the reference units measured beside it


def retests(configs: list[ConfigResult], history: list[dict], stat: str) -> list[Retest]:
    """Pair each schedule's measurement with the latest earlier one of the same graph, engine and tuning
    in the results file (another table's validation, a --remeasure pass, an earlier session)."""
    out = []
    for c in configs:
        now = c.recorded
        if not now:
            continue
        key = (now.get("graph"), now.get("tuning"), now.get("engine"))
        earlier = [r for r in history if (r.get("graph"), r.get("tuning"), r.get("engine")) == key
                   and r.get("time", "") < now.get("time", "")]
        if not earlier:
            continue
        then = max(earlier, key=lambda r: r["time"])
        ratio = sample_stat(now["samples_ms"], stat) / sample_stat(then["samples_ms"], stat)
        ref_now, ref_then = record_refs(now), record_refs(then)
        moved = weighted_drift({u: sample_stat(xs, stat) / sample_stat(ref_then[u], stat)
                                for u, xs in ref_now.items() if u in ref_then}, c.ref_weights)
        drift = ratio / moved - 1 if moved else None
        gap = _dt.datetime.fromisoformat(now["time"]) - _dt.datetime.fromisoformat(then["time"])
        out.append(Retest(list(c.kept), gap.total_seconds() / 60, ratio - 1, drift))
    return out


@dataclass
class ValidationResult:
    device: str
    model: str
    engine: str
    tuning: str
    configs: list[ConfigResult]
    overhead: Overhead | None
    results_path: Path
    plot_path: Path | None = None
    per_call_ms: float | None = None
    statistic: str = "median"
    retest: list[Retest] = field(default_factory=list)

    def within(self, tol: float, raw: bool = False, drift: bool = False) -> float:
        """Share of schedules predicted within ±tol: `raw` compares the plain sum of units, `drift`
        the end-to-end figure corrected by the interleaved reference units."""
        if not self.configs:
            return 0.0
        if drift:
            return _share([(c.sum_ms / c.corrected_ms - 1) if raw else c.corrected_error for c in self.configs], tol)
        return _share([(c.sum_ms if raw else c.predicted_ms) / c.measured_ms - 1 for c in self.configs], tol)

    def inside_interval(self) -> int:
        """Schedules whose measured end to end lies inside their prediction's 95% interval: that interval
        holds the table's noise and its interpolation, not the machine's or the calibration's."""
        return sum(c.ci_low_ms <= c.measured_ms <= c.ci_high_ms for c in self.configs)

    def inside_prediction_interval(self) -> int:
        """The same for the prediction interval, which adds the calibration's scatter as measured."""
        return sum(c.pi_low_ms <= c.measured_ms <= c.pi_high_ms for c in self.configs)

    @property
    def has_drift(self) -> bool:
        return bool(self.configs) and all(c.drift for c in self.configs)

    def summary(self) -> str:
        errs = sorted(abs(c.error) for c in self.configs)
        med = statistics.median(errs) if errs else float("nan")
        return (f"{len(self.configs)} schedules, {self.engine} ({self.tuning}) on {self.device}: "
                f"{self.within(0.05):.0%} within ±5%, {self.within(0.10):.0%} within ±10%, median |error| {med:.1%}"
                + ("" if self.overhead else " (no overhead sidecar: plain sum of units)"))


# -- schedules ---------------------------------------------------------------------------------------
def random_schedules(table, spec, count: int, seed: int = 0, on_grid: bool = False) -> list[TokenSchedule]:
    """`count` distinct random non-increasing schedules whose every unit's N the table covers.

    Kept counts are drawn as three sorted uniform ratios over the feasible range, so schedules span
    light to heavy pruning. `on_grid`: drawn among the kept counts `solve` and `train` choose from,
    whose blocks run at measured token counts (nothing interpolated; with tuned TVM, nothing to
    transfer to new counts)."""
    if on_grid:
        return _grid_schedules(table, spec, count, seed)
    if spec.layout is not None:
        return _random_staged(table, spec, count, seed)
    stages, patches = len(spec.pruning_locations), spec.max_tokens - 1
    lo_n = max(table.token_range(spec.name, u)[0] for u in table.units(spec.name) if table.kind(spec.name, u) == "tokens")
    hi_n = min(table.token_range(spec.name, u)[1] for u in table.units(spec.name) if table.kind(spec.name, u) == "tokens")
    if hi_n < spec.max_tokens:
        raise LutError(f"table covers N up to {hi_n} but the dense stage of {spec.name} needs {spec.max_tokens}",
                       f"measure --tokens ...,{spec.max_tokens}")
    rng = random.Random(seed)
    out, seen, tries = [], set(), 0
    k_min = max(1, lo_n - 1)  # stage s needs 1 + k + s >= lo_n; checked per stage below
    while len(out) < count:
        tries += 1
        if tries > 1000 * count:
            raise UsageError(f"the table's token range {lo_n}..{hi_n} allows fewer than {count} distinct schedules",
                             "measure a wider token grid or ask for fewer --configs")
        ratios = sorted((rng.uniform(k_min / patches, 1.0) for _ in range(stages)), reverse=True)
        kept = [max(1, round(patches * r)) for r in ratios]
        if any(not lo_n <= 1 + k + s <= hi_n for s, k in enumerate(kept, start=1)) or tuple(kept) in seen:
            continue
        seen.add(tuple(kept))
        out.append(schedule_of(spec, kept))
    return out


def _grid_schedules(table, spec, count: int, seed: int):
    """Uniform draws among the solver's candidates per pruning location, non-increasing where the
    family requires it (through the network for DeiT, within a stage for PiT and Swin)."""
    from latprof.train.solver import grid_candidates

    cands = grid_candidates(table, spec)
    lay = spec.layout
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(1000 * count):
        kept = []
        for s, ks in enumerate(cands):
            bound = kept[-1] if s and (lay is None or lay.location_stage(s - 1) == lay.location_stage(s)) else None
            fits = [k for k in ks if bound is None or k <= bound]
            if not fits:
                break
            kept.append(rng.choice(fits))
        if len(kept) < len(cands) or tuple(kept) in seen:
            continue
        seen.add(tuple(kept))
        out.append(schedule_of(spec, kept))
        if len(out) == count:
            return out
    raise UsageError(f"the table's grid allows fewer than {count} distinct {spec.name} schedules",
                     "ask for fewer --configs, drop --on-grid, or measure more token counts")


def _random_staged(table, spec, count: int, seed: int):
    """Hierarchical models (latprof.models.staged): per stage, sorted uniform shares of what each location
    may keep; only schedules whose every unit's N the table covers."""
    lay = spec.layout
    ranges = {u: table.token_range(spec.name, u) for u in table.units(spec.name) if table.kind(spec.name, u) == "tokens"}
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(1000 * count):
        kept, ratios = [], {}
        for s in range(len(lay.locations)):
            ratios.setdefault(lay.location_stage(s), []).append(rng.uniform(0.02, 1.0))
        for st in ratios:
            ratios[st].sort(reverse=True)
        for s in range(len(lay.locations)):
            kept.append(max(1, round(lay.limit(s) * ratios[lay.location_stage(s)].pop(0))))
        if tuple(kept) in seen:
            continue
        sched = lay.schedule(kept)
        if all(ranges[u][0] <= n <= ranges[u][1] for u, n in unit_tokens(spec, sched).items() if u in ranges):
            seen.add(tuple(kept))
            out.append(sched)
            if len(out) == count:
                return out
    raise UsageError(f"the table's token ranges allow fewer than {count} distinct {spec.name} schedules",
                     "measure a wider token grid (down to small N in every unit) or ask for fewer --configs")


# -- the pruned model ----------------------------------------------------------------------------------
def pruned_model(spec, kept):
    """The whole model pruned with static kept counts: StaticSPViT over the registry's timm model for
    DeiT (seeded weights, fused attention off), the family's own static model otherwise."""
    if spec.pruned is not None:
        return spec.pruned(spec, kept)
    from latprof.train.spvit import SPViT, StaticSPViT

    vit, _ = spec.builder(spec)
    import torch

    torch.manual_seed(1)
    sp = SPViT(vit, spec.pruning_locations).eval()
    with torch.no_grad():  # well-separated keep scores: no near-ties at the top-k boundary, so every
        for sel in sp.selectors:  # runtime removes the same tokens and outputs compare (latency is unchanged)
            for w in (sel.w_in, sel.w1, sel.w2, sel.w3):
                w.normal_(0.0, 1.0)
    return StaticSPViT(sp, kept).eval()


def _export_model(spec, kept, graph_dir: Path):
    """The whole pruned model as ONNX (content-addressed like the units). onnxruntime is checked
    against torch as for units, on the logits."""
    from latprof.export import export_unit

    return export_unit(pruned_model(spec, kept), (1, 3, 224, 224), graph_dir, spec.name,
                       "e2e-" + "-".join(map(str, kept)), 1 + kept[-1] + len(kept))


def _export_probe(dim: int, graph_dir: Path, model: str):
    """The per-call probe: one small tensor in, one out, nothing to compute."""
    from torch import nn

    from latprof.export import export_unit

    class Probe(nn.Module):
        def forward(self, x):
            return x + 0.5

    return export_unit(Probe(), (1, CALL_PROBE_TOKENS, dim), graph_dir, model, "call-probe", CALL_PROBE_TOKENS)


# -- engine with the table's tuning state ----------------------------------------------------------------
def _table_trials(tuning: str) -> int:
    if tuning in ("none", "untuned", ""):
        return 0
    if tuning.startswith("metaschedule:"):
        try:
            return int(tuning.split(":", 1)[1].split("@", 1)[0])
        except ValueError:
            pass
    raise LutError(f"unknown tuning label '{tuning}' in the table", "rebuild the table with this latprof")


def table_engine(table, cfg, spec, workdir: Path):
    """An engine in the table's engine and tuning state; refuses a mismatch it cannot reproduce."""
    from latprof.measure import runner

    engine = table.engine
    tuning = str(table.provenance.get("tuning") or table.frame["tuning"].iloc[0])
    trials = _table_trials(tuning)
    if hasattr(runner, "make_engine"):
        eng = runner.make_engine(engine, cfg, spec, workdir, trials)
    else:  # pragma: no cover - older runner
        from latprof.measure.engines import get_engine

        eng = get_engine(engine, cfg, workdir, trials)
    if eng.tuning_label() != tuning:
        raise LutError(f"the table was measured with tuning '{tuning}', the device config gives '{eng.tuning_label()}'",
                       "validate with the device config and workdir the table was measured with, or re-measure the table")
    return eng


def _prepare(eng, spec, graphs, workdir: Path, bars, schedules, session=None) -> dict[str, str]:
    """Compile `graphs` (whole models, probe) in the table's tuning state. For tuned TVM the units at the
    schedules' token counts are prepared first (schedules transferred from the anchors into the tuning
    database), so the whole models' tasks find them by workload instead of being tuned afresh."""
    from latprof.measure import runner

    if eng.name == "tvm" and getattr(eng, "trials", 0) > 0:
        ns = sorted({n for s in schedules for u, n in unit_tokens(spec, s).items()
                     if spec.unit(u).kind == "tokens"})
        units = runner.export_graphs(spec, ns, workdir, bars)
        runner.compile_graphs(eng, spec, units, workdir, bars, session)
        return eng.prepare(graphs, bars, anchors=[], session=session)
    return eng.prepare(graphs, bars, session=session)


# -- the drift reference -------------------------------------------------------------------------------
# One unit per stage, the stage's first block at its dense N, is measured again around every whole model.
# One block stood for the whole model before; on this host PiT-S's first block (730 tokens) once ran 12-15%
# slower than in its table while the whole model did not (docs/measurements.md), so a hierarchical model
# is followed stage by stage, each stage weighted by its blocks' share of the schedule's prediction.
def _block_stage(spec, unit: str) -> int | None:
    """The stage of a block unit (DeiT: 0); None for every other unit."""
    kind, _, idx = unit.partition(".")
    if kind != "blocks":
        return None
    return spec.layout.stage_index(int(idx)) if spec.layout is not None else 0


def reference_units(spec) -> dict[int, str]:
    """{stage: its reference unit}: the first block of each stage (DeiT: blocks.0)."""
    out = {}
    for u in spec.units:
        st = _block_stage(spec, u.name)
        if st is not None:
            out.setdefault(st, u.name)
    return out


def reference_figures(spec, table) -> dict[str, tuple[int, float]]:
    """Each reference unit's dense N and its figure in the table."""
    return {name: (spec.unit_max(spec.unit(name)), table.latency_ms(spec.name, name, spec.unit_max(spec.unit(name))))
            for name in reference_units(spec).values()}


def reference_graphs(spec, workdir: Path, bars) -> dict[str, object]:
    """The reference units' graphs at their dense N, by unit name."""
    from latprof.measure.runner import export_graphs

    units = [spec.unit(name) for name in reference_units(spec).values()]
    graphs = {g.shared: g for g in export_graphs(spec, lambda u: [spec.unit_max(u)], workdir, bars,
                                                 {u.shared for u in units})}
    return {u.name: graphs[u.shared] for u in units}


def reference_weights(spec, prediction) -> dict[str, float]:
    """Each reference unit's weight in a schedule's drift: the predicted time of its stage's blocks."""
    refs = reference_units(spec)
    out = dict.fromkeys(refs.values(), 0.0)
    for up in prediction.units:
        st = _block_stage(spec, up.unit)
        if st is not None:
            out[refs[st]] += up.median_ms
    return out


def record_refs(rec: dict) -> dict[str, list[float]]:
    """A results line's reference samples by unit, before and after the model together (lines written
    before the per-stage reference hold one unit, measured before only)."""
    if "refs" in rec:
        return {r["unit"]: r["samples_ms"] + r.get("after_ms", []) for r in rec["refs"]}
    if rec.get("ref_samples_ms"):
        return {rec.get("ref_unit", "blocks.0"): rec["ref_samples_ms"]}
    return {}


def weighted_drift(ratios: dict[str, float], weights: dict[str, float]) -> float | None:
    """The weighted mean of the reference units' ratios (units without a ratio left out; no weights: equal)."""
    ws = {u: w for u, w in (weights or dict.fromkeys(ratios, 1.0)).items() if u in ratios and w > 0}
    if not ws:
        return None
    return sum(ratios[u] * w for u, w in ws.items()) / sum(ws.values())


def reference_drift(refs: dict[str, list[float]], figures: dict[str, tuple[int, float]], weights: dict[str, float],
                    stat: str) -> float | None:
    """A schedule's drift: each reference unit's samples (by `stat`) over its table figure, weighted."""
    return weighted_drift({u: sample_stat(xs, stat) / figures[u][1] for u, xs in refs.items() if u in figures}, weights)


def measure_references(eng, session, graphs: dict, artifacts: dict, repeats: int | None = None) -> dict[str, list[float]]:
    return {name: eng.measure(session, g, artifacts[g.digest], repeats=repeats)[0] for name, g in graphs.items()}


# -- visits ---------------------------------------------------------------------------------------------
def _run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")


def plan_visits(todo: list, cut: dict, rounds: int, run: str) -> dict[tuple, tuple[str, int]]:
    """kept -> (pass id, rounds) for each schedule to measure: a pass cut off is finished under its own id
    and round count, the rest start this pass."""
    return {tuple(s.kept): (cut[tuple(s.kept)]["run"], cut[tuple(s.kept)]["rounds"]) if tuple(s.kept) in cut
            else (run, rounds) for s in todo}


def _visit_due(partial: dict | None, r: int, rounds: int) -> bool:
    """Whether round `r` of a schedule's `rounds` is still to be taken (`partial`: its visits so far)."""
    return (partial["visits"] if partial else 0) <= r < rounds


def measurements(lines: list[dict]) -> list[dict]:
    """Results lines merged into one record per measurement: the visits of one schedule in one pass
    (samples and references in visit order; `visits`, and `complete` once all its rounds are there).
    A line written before rounds is a whole measurement of its own."""
    groups: dict[tuple, list[dict]] = {}
    for i, line in enumerate(lines):
        key = (line["run"], tuple(line["kept"]), line.get("table"), line.get("tuning")) if "run" in line else (i,)
        groups.setdefault(key, []).append(line)
    out = []
    for visits in groups.values():
        refs: dict[str, dict] = {}
        for line in visits:
            for r in line.get("refs", []):
                acc = refs.setdefault(r["unit"], {"unit": r["unit"], "tokens": r["tokens"], "samples_ms": [], "after_ms": []})
                acc["samples_ms"] += r["samples_ms"]
                acc["after_ms"] += r.get("after_ms", [])
        rec = {**visits[-1], "samples_ms": [x for line in visits for x in line["samples_ms"]], "visits": len(visits),
               "complete": len(visits) >= visits[0].get("rounds", 1)}
        if refs:
            rec["refs"] = list(refs.values())
        out.append(rec)
    return out


def append_record(path: Path, before: dict[str, list[float]], after: dict[str, list[float]], ref_tokens: dict[str, int],
                  samples, **fields) -> dict:
    """One end-to-end measurement appended to a results file: its samples, the reference units' right
    before and right after them, what was measured (`fields`) and when."""
    rec = {"refs": [{"unit": u, "tokens": ref_tokens[u], "samples_ms": [round(x, 6) for x in xs],
                     "after_ms": [round(x, 6) for x in after[u]]} for u, xs in before.items()], **fields,
           "samples_ms": [round(x, 6) for x in samples],
           "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    append_line(path, json.dumps(rec))
    return rec


def read_results(path: Path) -> list[dict]:
    """A results file's lines (a line cut by a crash left out)."""
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# -- validate ------------------------------------------------------------------------------------------
def results_path(workdir: Path, device: str, model: str, engine: str) -> Path:
    return Path(workdir) / "validate" / f"{device}-{model}-{engine}.jsonl"


def _table_id(table) -> str:
    """Content id of the rows a prediction reads (so results of another table are not reused)."""
    cols = ["model", "unit", "tokens", "median_ms", "engine", "tuning"]
    text = table.frame[cols].to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def interleaved(a: list, b: list) -> list:
    """`a` and `b` in one order, the shorter spread evenly through the longer (`a` on a tie)."""
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    if not shorter:
        return list(longer)
    at = {int((i + 0.5) * len(longer) / len(shorter)): x for i, x in enumerate(shorter)}  # distinct, < len(longer)
    out = []
    for i, x in enumerate(longer):
        if i in at:
            out.append(at[i])
        out.append(x)
    return out


def validate(device, model: str, lut, configs: int = 20, seed: int = 0, workdir=None, calibrate: bool = False,
             plot: str | Path | None = None, progress: bool = True, echo=print, use_overhead: bool = True,
             stat: str = "median", on_grid: bool = False, alongside: int = 0, alongside_seed: int = 0,
             rounds: int | None = None, again: bool = False) -> ValidationResult:
    """`alongside`: also measure, interleaved with this call's own schedules in the same pass, the ones
    `validate(configs=alongside, seed=alongside_seed)` draws (recorded, not reported; that call then
    resumes them). With `calibrate`, the calibration then sees the machine in the same state as the
    schedules it will be judged on, instead of minutes before them. `rounds`: visits per whole model
    (default the device config's `measure.rounds`). `again`: measure every schedule in a new pass even
    where the results file has it (the earlier measurements stay, and the repeatability against them is
    reported)."""
    from latprof.devices import load_config, open_session
    from latprof.devices.config import DeviceConfig
    from latprof.lut.table import read_lut
    from latprof.measure.runner import default_workdir, rotated
    from latprof.models import get_model
    from latprof.progress import bar_factory

    if configs < 1:
        raise UsageError(f"--configs {configs}", "validate at least one schedule")
    parse_stat(stat)
    cfg = device if isinstance(device, DeviceConfig) else load_config(device)
    spec = get_model(model)
    table = read_lut(lut) if not hasattr(lut, "frame") else lut
    lut_path = Path(table.path) if table.path else None
    table.units(model)  # unknown model in the table -> LutError with the fix
    tdev = table.provenance.get("device")
    if tdev and tdev != cfg.name:
        echo(f"warning: the table was measured on '{tdev}', validating on '{cfg.name}'")
    workdir = Path(workdir or default_workdir())
    bars = bar_factory(progress)
    eng = table_engine(table, cfg, spec, workdir)
    tuning = eng.tuning_label()
    overhead = read_overhead(lut_path, model, table, parse_stat(stat)) if (lut_path and use_overhead and not calibrate) else None
    measured_table = table
    table = table_statistic(table, stat)

    schedules = random_schedules(table, spec, configs, seed, on_grid)
    rpath = results_path(workdir, cfg.name, model, eng.name)
    tid = _table_id(measured_table)
    rounds = cfg.measure.get("rounds", 3) if rounds is None else rounds
    if rounds < 1:
        raise UsageError(f"rounds {rounds}", "measure each model in at least one visit")
    lines = read_results(rpath)
    merged = measurements(lines)
    history = [r for r in merged if r["complete"]]
    done, cut = {}, {}  # kept -> its latest complete measurement / a pass cut off before its last visit
    ours = [r for r in merged if r.get("table") == tid and r.get("tuning") == tuning]
    if again:  # a new pass; or, where the last one of these schedules was cut off, that one finished first
        wanted = {tuple(s.kept) for s in schedules}
        open_runs = sorted(r["run"] for r in ours if not r["complete"] and "run" in r and tuple(r["kept"]) in wanted)
        ours = [r for r in ours if open_runs and r.get("run") == open_runs[-1]]
        if ours:
            echo(f"finishing the pass {open_runs[-1]}, cut off before its end (--again once more starts a new one)")
    for r in ours:
        (done if r["complete"] else cut)[tuple(r["kept"])] = r
    todo = [s for s in schedules if tuple(s.kept) not in done]
    if len(todo) < len(schedules) or any(tuple(s.kept) in cut for s in todo):
        echo(f"resuming: {len(schedules) - len(todo)} of {len(schedules)} schedules already measured in {rpath}"
             + (f", {sum(tuple(s.kept) in cut for s in todo)} part-way" if cut else ""))
    if alongside:
        own = {tuple(s.kept) for s in schedules}
        also = [s for s in random_schedules(table, spec, alongside, alongside_seed, on_grid)
                if tuple(s.kept) not in done and tuple(s.kept) not in own]
        todo = interleaved(todo, also)

    per_call = None
    graph_dir = workdir / "graphs"
    probe = _export_probe(int(_dim(spec)), graph_dir, model) if calibrate else None
    ref_figures = reference_figures(spec, table)
    if todo or probe:
        bar = bars(total=len(todo), desc="export whole models", unit="model")
        graphs = {}
        for s in todo:
            graphs[tuple(s.kept)] = _export_model(spec, s.kept, graph_dir)
            bar.update(1)
        bar.close()
        refs = reference_graphs(spec, workdir, bars)
        session_cm = open_session(cfg) if eng.needs_session else None
        session = session_cm.__enter__() if session_cm else None
        try:
            artifacts = _prepare(eng, spec, [*graphs.values(), *refs.values()] + ([probe] if probe else []), workdir, bars,
                                 todo, session)
            visits = plan_visits(todo, cut, rounds, _run_id())
            per_visit = {k: -(-cfg.measure["repeats"] // n) for k, (_, n) in visits.items()}  # ceil: no fewer samples in all
            order = [s for r in range(max((n for _, n in visits.values()), default=0))
                     for s in rotated(todo, r, rounds) if _visit_due(cut.get(tuple(s.kept)), r, visits[tuple(s.kept)][1])]
            bar = bars(total=len(order), desc=f"measure end to end on {cfg.name}", unit="visit")
            probe_medians = []
            # the machine's state around each visit: the references right before and right after it (the
            # after of one visit is the before of the next)
            before = measure_references(eng, session, refs, artifacts, per_visit[tuple(order[0].kept)]) if order else {}
            for s in order:
                key = tuple(s.kept)
                if probe is not None:  # before every visit, so the per-call cost sees the same machine state
                    probe_medians.append(statistics.median(
                        eng.measure(session, probe, artifacts[probe.digest], repeats=per_visit[key])[0]))
                g = graphs[key]
                samples, _ = eng.measure(session, g, artifacts[g.digest], repeats=per_visit[key])
                after = measure_references(eng, session, refs, artifacts, per_visit[key])
                run, n = visits[key]
                append_record(rpath, before, after, {u: n for u, (n, _) in ref_figures.items()}, samples,
                              table=tid, tuning=tuning, engine=eng.name, device=cfg.name, model=model, kept=list(s.kept),
                              block_tokens=s.block_tokens(), graph=g.digest, run=run, rounds=n)
                before = after
                bar.update(1)
            if order:  # the merged records of this pass (and of the passes it finished)
                ours = {run for run, _ in visits.values()}
                for r in measurements(read_results(rpath)):
                    if r["complete"] and r.get("run") in ours and r.get("table") == tid and r.get("tuning") == tuning:
                        done[tuple(r["kept"])] = r
            if probe is not None:
                probe_medians.append(statistics.median(
                    eng.measure(session, probe, artifacts[probe.digest], repeats=per_visit[tuple(order[-1].kept)] if order else None)[0]))
                per_call = statistics.median(probe_medians)
            bar.close()
        finally:
            if session_cm:
                session_cm.__exit__(None, None, None)

    results = []
    for i, s in enumerate(schedules):
        rec = done[tuple(s.kept)]
        p = predict(table, model, s, overhead)
        xs = sorted(rec["samples_ms"])
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        weights = reference_weights(spec, p)
        drift = reference_drift(record_refs(rec), ref_figures, weights, stat)
        results.append(ConfigResult(i, list(s.kept), s.block_tokens(), p.sum_ms, p.total_ms, sample_stat(xs, stat),
                                    q[0], q[2], p.ci_low_ms, p.ci_high_ms, xs, drift, rec, weights,
                                    overhead.drift if overhead else 1.0, p.pi_low_ms, p.pi_high_ms))
    if calibrate:
        calls = len(unit_tokens(spec, schedules[0]))
        if per_call is None:
            per_call = 0.0
        # fitted on drift-corrected figures, so that scale and constant are the model's, not the moment's; the
        # moment's own drift (the device end to end now against the table) is kept beside them as one factor
        overhead = fit_overhead([c.sum_ms for c in results], [c.corrected_ms for c in results], calls, per_call,
                                statistic=stat, model=model, device=cfg.name, engine=eng.name, tuning=tuning,
                                table=str(lut_path or ""),
                                drift=statistics.median(c.drift for c in results) if all(c.drift for c in results) else 1.0)
        # the scatter a new schedule's interval carries is that of the end to end as measured, the machine's
        # moves around the calibration's drift included, not that of the drift-corrected figures it was fitted on
        overhead.rel_sd = overhead.measured_scatter([c.sum_ms for c in results], [c.measured_ms for c in results], calls)
        if lut_path:
            write_overhead(lut_path, overhead)
        for c, s in zip(results, schedules):  # in-sample: what the new sidecar predicts for the calibration schedules
            p = predict(table, model, s, overhead)
            c.predicted_ms, c.machine, c.ci_low_ms, c.ci_high_ms = p.total_ms, overhead.drift, p.ci_low_ms, p.ci_high_ms
            c.pi_low_ms, c.pi_high_ms = p.pi_low_ms, p.pi_high_ms
    out = ValidationResult(cfg.name, model, eng.name, tuning, results, overhead, rpath, per_call_ms=per_call,
                           statistic=stat, retest=retests(results, history, stat))
    if plot:
        from latprof.plot import plot_validation

        out.plot_path = plot_validation(out, plot)
    return out


def _dim(spec) -> int:
    if spec.layout is not None:
        return spec.layout.stages[0].dim
    from latprof.predict import _dims

    return _dims(spec)[0]


def format_validation(v: ValidationResult) -> str:
    from latprof.models import get_model

    kept = getattr(get_model(v.model).layout, "kept_label", "kept patches")
    w = max(16, len(kept))
    lines = [f"  {'#':>3s} {kept:{w}s} {'predicted':>10s} {'measured':>10s} {'error':>7s}  {'sum of units':>12s}"
             f"  {'drift':>6s} {'error vs drift-corrected':>24s}"]
    for c in v.configs:
        d = f"{c.drift:6.3f} {c.corrected_error:+24.1%}" if c.drift else f"{'-':>6s} {'-':>24s}"
        lines.append(f"  {c.index:3d} {str(c.kept):{w}s} {c.predicted_ms:10.3f} {c.measured_ms:10.3f} {c.error:+7.1%}  "
                     f"{c.sum_ms:12.3f}  {d}")
    lines.append(v.summary())
    if v.configs:
        lines.append(f"measured inside the prediction's 95% CI (the table's noise and interpolation): "
                     f"{v.inside_interval()} of {len(v.configs)}")
        if v.overhead is not None and v.overhead.dof:
            lines.append(f"measured inside the 95% prediction interval (the CI and the calibration's scatter, "
                         f"{v.overhead.rel_sd:.1%}, {v.overhead.dof} dof): {v.inside_prediction_interval()} of {len(v.configs)}")
    if v.has_drift:
        lines.append(f"against end to end corrected for machine drift (reference units re-measured before and after each schedule): "
                     f"{v.within(0.05, drift=True):.0%} within ±5%, {v.within(0.10, drift=True):.0%} within ±10%")
    if v.overhead is not None:
        oh = v.overhead
        lines.append(f"overhead model: {oh.describe()} (from {oh.n_configs} calibration schedules, statistic "
                     f"{oh.statistic}); plain sum of units: "
                     f"{v.within(0.05, raw=True):.0%} within ±5%, {v.within(0.10, raw=True):.0%} within ±10%")
    if v.retest:
        lines.append(format_retest(v.retest))
    return "\n".join(lines)


def _share(errs: list[float], tol: float) -> float:
    return sum(abs(e) <= tol for e in errs) / len(errs)


def format_retest(rs: list[Retest]) -> str:
    """A ceiling on the shares above: a table measured at one moment cannot be expected to predict the
    end to end at another better than two end-to-end measurements of one compiled model agree."""
    errs = [r.error for r in rs]
    gaps = sorted(r.minutes for r in rs)
    line = (f"repeatability: {len(rs)} of these compiled models were measured end to end before "
            f"({gaps[0]:.0f}-{gaps[-1]:.0f} min earlier); now against then: {_share(errs, 0.05):.0%} within ±5%, "
            f"{_share(errs, 0.10):.0%} within ±10%, median |change| {statistics.median(abs(e) for e in errs):.1%}")
    drift = [r.drift_error for r in rs if r.drift_error is not None]
    if len(drift) == len(rs):
        line += f"; each divided by its reference units: {_share(drift, 0.05):.0%} within ±5%"
    return line
