"""Predicted latency of a token schedule from a lookup table, shared by the keep-ratio solver (numpy,
exact) and the latency-sparsity loss (torch, differentiable).

Every unit of the model in the table is assigned the pruning stage whose token count it sees
(`latprof.schedule.TokenSchedule` convention: stage 0 = 1 + P tokens, stage s = 1 + k_s + s):
- ``blocks.i``: the stage of block i (number of pruning locations <= i);
- ``selector.s`` and ``merge.s`` (1-based s, optional): the tokens the selector sees, stage s - 1;
- ``head``: the last stage;
- kind ``fixed`` units (patch embedding): a constant.
The latency of a schedule is the sum over units of the table's median, linearly interpolated at the
unit's N (the table's own convention; outside the measured range is an error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from latprof.errors import LutError, UsageError

_BLOCK = re.compile(r"^blocks\.(\d+)$")
_SELECTOR = re.compile(r"^(selector|merge)\.(\d+)$")


@dataclass
class UnitCurve:
    unit: str
    stage: int
    tokens: np.ndarray   # ascending N
    median: np.ndarray   # ms
    offset: float | None = None  # hierarchical models: N = offset + kept of the stage (DeiT: 1 + k + stage)


@dataclass
class LatencyModel:
    """Per-unit latency curves of one model, grouped by the stage whose token count they see."""

    model: str
    patches: int
    locations: tuple[int, ...]
    depth: int
    fixed_ms: float
    curves: list[UnitCurve] = field(default_factory=list)
    # hierarchical models (from_staged): per pruning location, what a kept count is a share of (the
    # stage's patches, or a window's tokens) and how many windows share it (keep decisions per token)
    whole: tuple[int, ...] | None = None
    windows: tuple[int, ...] | None = None

    @classmethod
    def from_staged(cls, table, spec) -> "LatencyModel":
        """PiT and Swin (`latprof.models.staged`): a "stage" here is a pruning location; every unit whose
        N a location's kept count sets has N = offset + k, the others are constant."""
        lay, model = spec.layout, spec.name
        have = set(table.units(model))
        missing = [u.name for u in spec.units if u.name not in have]
        if missing:
            raise LutError(f"table has no rows for {model} units {missing[:4]}",
                           f"measure them first (latprof measure --model {model})")
        L = len(lay.locations)
        base_n = lay.unit_tokens(spec, lay.schedule([1] * L))  # every location keeping 1
        fixed, curves = 0.0, []
        for u in spec.units:
            tokens, median, _, _ = table.curve(model, u.name)
            s = lay.unit_location(u.name)
            if s is None:
                fixed += float(table.latency_ms(model, u.name, base_n[u.name])) if table.kind(model, u.name) == "tokens" \
                    else float(median[0])
                continue
            offset = base_n[u.name] - 1  # N at k = 1, minus 1
            curves.append(UnitCurve(u.name, s + 1, tokens.astype(float), median.astype(float), float(offset)))
        whole = tuple(lay.whole(s) for s in range(L))
        windows = tuple(lay.stages[lay.location_stage(s)].windows for s in range(L))
        return cls(model, max(whole), tuple(lay.locations), lay.depth, fixed, curves, whole, windows)

    @classmethod
    def from_table(cls, table, model: str, patches: int, locations, depth: int) -> "LatencyModel":
        locations = tuple(int(v) for v in locations)
        if list(locations) != sorted(set(locations)) or not locations or locations[0] < 1 or locations[-1] >= depth:
            raise UsageError(f"pruning locations {list(locations)} must be increasing block indices in 1..{depth - 1}",
                             "pass --locations like 3,6,9 for a 12-block model")
        fixed, curves = 0.0, []
        for unit in table.units(model):
            kind = table.kind(model, unit)
            tokens, median, _, _ = table.curve(model, unit)
            if kind == "fixed":
                fixed += float(median[0])
                continue
            stage = _stage_of(unit, locations, depth, model)
            curves.append(UnitCurve(unit, stage, tokens.astype(float), median.astype(float)))
        blocks = {c.unit for c in curves if c.unit.startswith("blocks.")}
        missing = [f"blocks.{i}" for i in range(depth) if f"blocks.{i}" not in blocks]
        if missing:
            raise LutError(f"table has no rows for {model} units {missing}",
                           f"measure them first (latprof measure --model {model})")
        return cls(model, patches, locations, depth, fixed, curves)

    @property
    def stages(self) -> int:
        return len(self.locations)

    def blocks_per_stage(self) -> list[int]:
        """How many blocks run at each stage's token count (index 0 = before any pruning)."""
        out = [0] * (self.stages + 1)
        for i in range(self.depth):
            out[sum(1 for loc in self.locations if loc <= i)] += 1
        return out

    def stage_tokens(self, stage: int, k):
        return 1 + self.patches if stage == 0 else 1 + k + stage

    def stage_cost(self, stage: int, kept: np.ndarray) -> np.ndarray:
        """Latency (ms) of the units at `stage` for each candidate kept count; NaN where a unit's N lies
        outside its measured range."""
        kept = np.asarray(kept, dtype=float)
        n = np.full_like(kept, 1 + self.patches) if stage == 0 else 1 + kept + stage
        total = np.zeros_like(n)
        for c in self.curves:
            if c.stage != stage:
                continue
            nc = n if c.offset is None else c.offset + kept
            inside = (nc >= c.tokens[0]) & (nc <= c.tokens[-1])
            total = total + np.where(inside, np.interp(nc, c.tokens, c.median), np.nan)
        return total

    def grid(self, stage: int) -> np.ndarray:
        """Kept counts of `stage` whose N is a measured token count of one of the stage's units."""
        ns = set()
        for c in self.curves:
            if c.stage == stage:
                ns.update(int(t) for t in c.tokens)
        ks = np.array(sorted(n - 1 - stage for n in ns), dtype=int)
        return ks[(ks >= 1) & (ks <= self.patches)]

    def predict_ms(self, kept) -> float:
        """Predicted latency of a schedule with kept patch counts `kept` (one per stage)."""
        if len(kept) != self.stages:
            raise UsageError(f"{len(kept)} kept counts for {self.stages} pruning stages", "give one per location")
        total = self.fixed_ms + float(self.stage_cost(0, np.array([0]))[0])
        for s, k in enumerate(kept, start=1):
            total += float(self.stage_cost(s, np.array([k]))[0])
        if np.isnan(total):
            raise LutError(f"{self.model}: schedule {list(kept)} needs token counts outside the measured range",
                           "measure the missing token counts (latprof measure --tokens ...)")
        return total

    # -- torch, differentiable ------------------------------------------------------------------------
    def torch_predictor(self, device=None, dtype=None) -> "TorchLatency":
        return TorchLatency(self, device=device, dtype=dtype)


def _stage_of(unit: str, locations, depth: int, model: str) -> int:
    m = _BLOCK.match(unit)
    if m:
        i = int(m.group(1))
        if i >= depth:
            raise LutError(f"table unit {unit} does not exist in a {depth}-block {model}",
                           "use the table measured for this model configuration")
        return sum(1 for loc in locations if loc <= i)
    m = _SELECTOR.match(unit)
    if m:
        s = int(m.group(2))
        if not 1 <= s <= len(locations):
            raise LutError(f"table unit {unit} has no pruning stage (stages are 1..{len(locations)})",
                           "match --locations to the table")
        return s - 1
    if unit == "head":
        return len(locations)
    raise LutError(f"table unit '{unit}' of {model} has kind 'tokens' but no known place in the network",
                   "only patch_embed, blocks.i, selector.s, merge.s and head are understood")


class TorchLatency:
    """Expected latency as a differentiable function of the (soft, real-valued) kept counts."""

    def __init__(self, lm: LatencyModel, device=None, dtype=None):
        import torch

        self.lm = lm
        dtype = dtype or torch.float32
        self.curves = [(c.stage, torch.as_tensor(c.tokens, dtype=dtype, device=device),
                        torch.as_tensor(c.median, dtype=dtype, device=device), c.offset) for c in lm.curves]
        self.fixed = float(lm.fixed_ms)

    def __call__(self, kept):
        """kept: one scalar (or batch [B]) tensor per stage of expected kept patches -> latency (ms)."""
        import torch

        total = torch.zeros_like(kept[0]) + self.fixed
        for stage, xs, ys, offset in self.curves:
            if offset is not None:
                n = offset + kept[stage - 1]
            else:
                n = torch.full_like(kept[0], 1.0 + self.lm.patches) if stage == 0 else 1.0 + kept[stage - 1] + stage
            total = total + interp(n, xs.to(n.dtype), ys.to(n.dtype))
        return total


def interp(x, xs, ys):
    """Piecewise-linear interpolation in torch (clamped to the measured range; gradient 0 outside)."""
    import torch

    if xs.numel() == 1:
        return torch.zeros_like(x) + ys[0]
    x = x.clamp(xs[0], xs[-1])
    i = (torch.searchsorted(xs, x.detach().contiguous(), right=True) - 1).clamp(0, xs.numel() - 2)
    # take(), not xs[i]: indexing with a 0-d tensor reads it on the host (a GPU sync every step)
    x0, x1, y0, y1 = xs.take(i), xs.take(i + 1), ys.take(i), ys.take(i + 1)
    return y0 + (x - x0) / (x1 - x0) * (y1 - y0)
