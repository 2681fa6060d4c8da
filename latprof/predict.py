"""Model-level latency prediction from a lookup table: the sum over a model's units at a token schedule.

A schedule (`latprof.schedule.TokenSchedule`: N = 1 + k_s + s for a block in stage s) gives every unit
its N: ``patch_embed`` is fixed, ``blocks.i`` sees its stage's N, ``selector.s`` and ``merge.s`` see the
N of stage s-1 (the tokens arriving at pruning location s), ``head`` sees the last stage's N. A unit's
latency is the table's median, linearly interpolated between measured token counts (outside the
measured range is a LutError, never an extrapolation).

Uncertainty (two figures, both reported):
- ``ci``: a 95% interval of the predicted sum from the table's 95% order-statistic CIs of the medians.
  Units that share one measured graph at one N (DeiT's blocks of a stage) share their error, so their
  half-widths add linearly; different graphs are independent, so their group half-widths add in
  quadrature (lower and upper side separately; the CIs are asymmetric).
  A unit at a count the table did not measure adds, to both sides of its CI, the interpolation error
  its own curve shows (`interpolation_error`, leave one out), shared like the rest within its group.
- ``pi``: a 95% prediction interval for one end-to-end measurement, with a calibration: the CI and the
  calibration's own scatter (`Overhead.rel_sd`, the relative residual of the calibration schedules as
  measured, machine and all) added in quadrature, that scatter taken as Student's t with the fit's
  degrees of freedom (`t975`) and widened by sqrt(1 + 1/n) for a new schedule. Without a calibration it
  is the CI. What no calibration sees (the host an hour later) is in neither.
- ``iqr``: the sum of the interpolated quartiles (q1, q3) of every unit: a deliberately pessimistic
  band (fully correlated run-to-run spread) of what one end-to-end sample may read.

End to end is not exactly the sum of units measured one call each: every unit measurement carries the
engine's own per-call cost (VM or session entry, argument handling), the token removal (top-k, gather,
concat) at the pruning locations belongs to no unit, and caches/fusion differ across unit boundaries.
An `Overhead` (a sidecar next to the table, written by `latprof validate --calibrate`) corrects the sum:
    predicted = drift * (scale * (sum(units) - (calls - 1) * per_call_ms) + residual_ms)
per_call_ms is measured on the device with a trivial graph (interleaved with the calibration runs);
scale and residual_ms are fitted over calibration schedules (`fit_overhead`), on their end to end scaled
back to the table's machine state by the reference units timed beside them; drift is how much slower
the device ran during the calibration than during the table (those references' median ratio), so the
prediction is of the device as the calibration found it, its latest end-to-end state, not as the table
found it minutes or hours before (docs/measurements.md, "Calibrating on the table's moment or the
device's"). `at_table` leaves the drift out. Two costs make the gap,
and they are why there are two terms: a unit timed alone runs with its weights and activations hot in
cache, while in the whole model every block's weights are evicted by the other blocks' (a cost per
block that pruning tokens does not shrink: the constant), and activations and the token removal
(top-k, gather, concat) grow with the tokens (the scale). Which dominates depends on the model and
the engine: DeiT-T with tuned TVM here is about the sum plus 1 ms, Swin-S with onnxruntime 1.22 x
the sum. See `latprof.validate` and `benchmarks/overhead_fit.py`.

MACs are counted analytically (multiply-accumulates, batch 1), next to the prediction.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from latprof.errors import LutError, UsageError
from latprof.models.staged import selector_macs
from latprof.schedule import TokenSchedule

OVERHEAD_SCHEMA = 1


# -- schedules ----------------------------------------------------------------------------------------
def parse_keep(text: str, spec) -> TokenSchedule:
    """`0.7,0.49,0.343` (cumulative keep ratios, one per pruning location) -> a TokenSchedule."""
    locations = tuple(spec.pruning_locations)
    example = "--keep " + ",".join(f"{0.7 ** (i + 1):.3g}" for i in range(len(locations)))  # one per location
    try:
        ratios = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"bad keep ratios '{text}'", f"give comma-separated numbers, e.g. {example}") from None
    if len(ratios) != len(locations):
        raise UsageError(f"{len(ratios)} keep ratios for {len(locations)} pruning locations (before blocks "
                         f"{', '.join(map(str, locations))}) of {spec.name}", f"give one ratio per location, e.g. {example}")
    for r in ratios:
        if not (0 < r <= 1) or math.isnan(r):
            raise UsageError(f"keep ratio {r:g} is outside (0, 1]", "ratios are cumulative shares of the patch tokens, e.g. 0.7,0.49,0.343")
    if spec.layout is not None:  # hierarchical: ratios restart in every stage (latprof.models.staged)
        return spec.layout.from_ratios(ratios)
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise UsageError(f"keep ratios {ratios} increase; a pruned token never comes back",
                         "give non-increasing ratios, e.g. 0.7,0.49,0.343")
    return TokenSchedule.from_ratios(spec.max_tokens - 1, locations, ratios, _depth(spec))


def parse_tokens(text: str, spec) -> TokenSchedule:
    """Explicit per-block token counts (`197,197,197,139,...`, one per block, N counting class and
    package tokens) -> a TokenSchedule at the model's pruning locations."""
    depth, locations = _depth(spec), tuple(spec.pruning_locations)
    try:
        ns = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"bad token counts '{text}'", f"give {depth} comma-separated integers, one per block") from None
    if len(ns) != depth:
        raise UsageError(f"{len(ns)} token counts for the {depth} blocks of {spec.name}",
                         "give one N per block (N counts class and package tokens), e.g. 197 x3, 139 x3, 99 x3, 70 x3")
    if spec.layout is not None:
        return spec.layout.from_block_tokens(ns)
    bounds = [0, *locations, depth]
    kept = []
    for s in range(len(bounds) - 1):
        stage = set(ns[bounds[s]:bounds[s + 1]])
        if len(stage) != 1:
            raise UsageError(f"blocks {bounds[s]}..{bounds[s + 1] - 1} have different token counts {sorted(stage)}",
                             f"tokens change only at the pruning locations {list(locations)}")
        n = stage.pop()
        if s == 0:
            if n != spec.max_tokens:
                raise UsageError(f"blocks before the first pruning location see all {spec.max_tokens} tokens, not {n}",
                                 f"start with {spec.max_tokens}")
        else:
            kept.append(n - 1 - s)  # N = 1 (class) + kept + s (package tokens)
    if any(k < 1 for k in kept):
        raise UsageError(f"token counts {ns} leave no patch token in some stage",
                         "stage s needs N >= 2 + s (class, one patch, s package tokens)")
    return schedule_of(spec, kept)


def schedule_of(spec, kept, locations=None) -> TokenSchedule:
    """The token schedule of explicit kept counts per pruning location (what training records)."""
    if spec.layout is not None:
        return spec.layout.schedule(tuple(kept))
    return TokenSchedule(spec.max_tokens - 1, tuple(locations or spec.pruning_locations), tuple(kept), _depth(spec))


def _depth(spec) -> int:
    return sum(1 for u in spec.units if u.name.startswith("blocks."))


def unit_tokens(spec, schedule: TokenSchedule) -> dict[str, int]:
    """N seen by every unit of `spec` under `schedule` (fixed units at their own N)."""
    if spec.layout is not None:
        return spec.layout.unit_tokens(spec, schedule)
    blocks = schedule.block_tokens()
    out = {}
    for u in spec.units:
        kind, _, idx = u.name.partition(".")
        if u.kind == "fixed":
            out[u.name] = int(u.fixed_tokens)
        elif kind == "blocks":
            out[u.name] = blocks[int(idx)]
        elif kind in ("selector", "merge"):
            out[u.name] = schedule.stage_tokens(int(idx) - 1)
        elif u.name == "head":
            out[u.name] = schedule.final_tokens()
        else:
            raise LutError(f"unit '{u.name}' of {spec.name} has no place in a token schedule",
                           "extend latprof.predict.unit_tokens for this unit")
    return out


# -- MACs -----------------------------------------------------------------------------------------------
def _dims(spec) -> tuple[int, int]:
    from latprof.models.deit import _DEIT

    if spec.name not in _DEIT:
        raise UsageError(f"no analytic MAC count for model '{spec.name}'", "MACs are counted for the DeiT family only")
    _, dim, heads = _DEIT[spec.name]
    return dim, heads


def unit_macs(spec, unit: str, n: int, mlp_ratio: float = 4.0, classes: int = 1000, patch: int = 16) -> int:
    """Multiply-accumulates of one unit at N tokens (batch 1). Layer norms, softmax, GELU and adds are
    not MACs and are left out, as is usual for the published DeiT figures."""
    if spec.layout is not None:
        return spec.layout.unit_macs(unit, n)
    d, h = _dims(spec)
    kind = unit.partition(".")[0]
    if kind == "blocks":
        # qkv 3ND^2, q@k^T and attn@v 2N^2D, proj ND^2, MLP 2*N*D*(rD)
        return int(3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * int(mlp_ratio * d))
    if kind == "selector":
        return selector_macs(n, d, h)
    if kind == "merge":
        return int((n - 1) * d)                         # score-weighted sum of the N-1 non-class tokens
    if unit == "patch_embed":
        patches = spec.max_tokens - 1
        return int(patches * 3 * patch * patch * d)
    if unit == "head":
        return int(d * classes)                         # class token only
    raise UsageError(f"no MAC count for unit '{unit}'", "MACs are counted for DeiT units only")


def model_macs(spec, schedule: TokenSchedule | None = None) -> int:
    """MACs of the whole model under `schedule` (selectors and merges included), or of the dense model
    (no pruning, no selectors) when `schedule` is None."""
    if schedule is None and spec.layout is not None:
        return sum(unit_macs(spec, u, n) for u, n in spec.layout.dense_unit_tokens(spec).items())
    if schedule is None:
        n = spec.max_tokens
        return sum(unit_macs(spec, u.name, n) for u in spec.units if not u.name.startswith(("selector.", "merge.")))
    return sum(unit_macs(spec, u, n) for u, n in unit_tokens(spec, schedule).items())


# -- overhead (non-additivity) ---------------------------------------------------------------------------
@dataclass
class Overhead:
    """How end to end differs from the sum of units, for one model on one table (engine, tuning, device,
    statistic). Per model: the whole model's cost over its units' differs by family (DeiT-T 1.13, PiT-S 1.22,
    Swin-S 1.13-1.17 with tuned TVM here), and one device's table holds every model measured on it."""

    per_call_ms: float = 0.0        # engine call cost measured with a trivial graph on the device
    scale: float = 1.0              # fitted by `fit_overhead`
    residual_ms: float = 0.0        # fitted by `fit_overhead`: a cost per model that pruning does not shrink
    spread: float = 0.0             # median |measured / predicted - 1| over calibration: the fit's own noise
    n_configs: int = 0
    statistic: str = "median"       # the sample statistic the table and the calibration were read with
    model: str = ""
    device: str = ""
    engine: str = ""
    tuning: str = ""
    table: str = ""
    created: str = ""
    drift: float = 1.0              # reference units during the calibration / in the table (1.0: unknown or none)
    rel_sd: float = 0.0             # relative residual sd of the calibration as measured (`calibration_scatter`)
    dof: int = 0                    # its degrees of freedom: schedules - fitted terms (0: no scatter known)
    method: str = "predicted = drift * (scale * (sum(units) - (calls - 1) * per_call_ms) + residual_ms)"
    schema: int = OVERHEAD_SCHEMA

    def apply(self, sum_ms: float, calls: int) -> float:
        """The end to end predicted on the device as the calibration found it."""
        return self.drift * self.at_table(sum_ms, calls)

    def at_table(self, sum_ms: float, calls: int) -> float:
        """The same at the table's machine state (what end to end corrected by its references is compared with)."""
        return self.scale * (sum_ms - (calls - 1) * self.per_call_ms) + self.residual_ms

    def correction_ms(self, sum_ms: float, calls: int) -> float:
        return self.apply(sum_ms, calls) - sum_ms

    def describe(self) -> str:
        return (f"scale {self.scale:.3f} {self.residual_ms:+.3f} ms (fit within ±{self.spread:.1%} in sample), "
                f"{self.per_call_ms * 1e3:.1f} us per engine call, machine drift {self.drift:.3f}"
                + (f", scatter {self.rel_sd:.1%} ({self.dof} dof)" if self.dof else ""))

    def scatter_half(self) -> float:
        """Relative half-width that the calibration's scatter adds to a new schedule's 95% interval."""
        if self.dof < 1 or self.n_configs < 1:
            return 0.0
        return t975(self.dof) * self.rel_sd * math.sqrt(1 + 1 / self.n_configs)

    def measured_scatter(self, sums_ms, measured_ms, calls: int) -> float:
        """`calibration_scatter` of what this overhead predicts from the sums against the end to end as
        measured: the machine's moves around the calibration's drift included."""
        return calibration_scatter([self.apply(x, calls) for x in sums_ms], measured_ms, self.dof)


# Student's t, two-sided 95%, by degrees of freedom (scipy is not a dependency); past 10 the
# Cornish-Fisher expansion around the normal quantile is within 0.05% of it.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(dof: int) -> float:
    if dof < 1:
        raise ValueError("t needs at least one degree of freedom")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z, v = 1.959964, float(dof)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def calibration_scatter(predicted_ms, measured_ms, dof: int) -> float:
    """Relative residual sd, sqrt(sum((predicted / measured - 1)^2) / dof): how far one schedule's end
    to end strays from the calibration that fitted it (0 when no degree of freedom is left)."""
    if dof < 1:
        return 0.0
    return math.sqrt(sum((p / m - 1) ** 2 for p, m in zip(predicted_ms, measured_ms)) / dof)


def fit_overhead(sums_ms, measured_ms, calls: int, per_call_ms: float = 0.0, **meta) -> Overhead:
    """Fit `Overhead.apply` to calibration schedules: least squares in relative error over
    measured ~ scale * (sum - (calls - 1) * per_call) + residual, with residual >= 0 and scale >= 1
    whenever residual > 0. Unconstrained, a line through a few noisy points over a narrow range of
    sums extrapolates badly (a negative constant, or a scale near 0 and the constant doing all the
    work); constrained, the fit is the better of the free line where it is physical, the pure scale
    (residual 0) and the pure constant (scale 1), and so never fits worse than a scale alone."""
    xs = [s - (calls - 1) * per_call_ms for s in sums_ms]
    ys = list(measured_ms)
    if not xs or len(xs) != len(ys) or min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("calibration needs positive sums and measurements, one each per schedule")
    w = [1 / y ** 2 for y in ys]  # relative error: (pred - y) / y
    sw, swx, swy = sum(w), sum(a * x for a, x in zip(w, xs)), sum(a * y for a, y in zip(w, ys))
    swxx, swxy = sum(a * x * x for a, x in zip(w, xs)), sum(a * x * y for a, x, y in zip(w, xs, ys))
    fits = [(swxy / swxx, 0.0, 1), (1.0, max(0.0, (swy - swx) / sw), 1)]  # pure scale, pure constant: one term each
    det = sw * swxx - swx * swx
    if det > 1e-12 * sw * swxx:  # the sums differ: a free line is defined
        scale = (sw * swxy - swx * swy) / det
        residual = (swy - scale * swx) / sw
        if residual >= 0 and scale >= 1:
            fits.append((scale, residual, 2))

    def sse(f):
        return sum((f[0] * x + f[1] - y) ** 2 * a for a, x, y in zip(w, xs, ys))

    scale, residual, terms = min(fits, key=sse)
    spread = statistics.median(abs((scale * x + residual) / y - 1) for x, y in zip(xs, ys))
    dof = max(0, len(xs) - terms)
    meta.setdefault("rel_sd", calibration_scatter([scale * x + residual for x in xs], ys, dof))
    return Overhead(per_call_ms=per_call_ms, scale=scale, residual_ms=residual, spread=spread,
                    n_configs=len(xs), dof=dof, **meta)


def overhead_path(lut_path: str | Path, model: str) -> Path:
    """Where `latprof validate --calibrate` keeps a table's calibration for one model."""
    p = Path(lut_path)
    return p.with_name(f"{p.stem}.{model}.overhead.json")


def _unkeyed_path(lut_path: str | Path) -> Path:  # written before calibrations were kept per model
    p = Path(lut_path)
    return p.with_name(p.stem + ".overhead.json")


def read_overhead(lut_path: str | Path, model: str, table=None, statistic: str | None = None) -> Overhead | None:
    """The table's calibration for `model`, or None. An older sidecar without a model is taken only for
    a table that holds that one model (it can only have been calibrated on it)."""
    path = overhead_path(lut_path, model)
    if not path.exists():
        path = _unkeyed_path(lut_path)
        if not path.exists():
            return None
        models = table.models if table is not None else [model]
        if models != [model]:
            raise LutError(f"{path} is a calibration of one of {', '.join(models)} (written before they were "
                           f"kept per model)", f"delete it and recalibrate: `latprof validate --calibrate --model {model}`")
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != OVERHEAD_SCHEMA:
            raise ValueError(f"schema {data.get('schema')}")
        oh = Overhead(**{k: v for k, v in data.items() if k in Overhead.__dataclass_fields__})
        oh.model = oh.model or model
    except (ValueError, TypeError) as exc:
        raise LutError(f"{path}: unreadable overhead sidecar ({exc})",
                       "delete it and recalibrate with `latprof validate --calibrate`") from None
    if table is not None:
        engine, tuning = _table_engine(table)
        if (oh.engine, oh.tuning) != (engine, tuning):
            raise LutError(f"{path} was calibrated for {oh.engine}/{oh.tuning}, the table is {engine}/{tuning}",
                           "recalibrate with `latprof validate --calibrate`, or pass --no-overhead")
    if statistic is not None and statistic != oh.statistic:
        raise LutError(f"{path} was calibrated with --stat {oh.statistic}, not {statistic}",
                       f"use --stat {oh.statistic}, recalibrate with --stat {statistic}, or pass --no-overhead")
    return oh


def calibrated(lut_path: str | Path, table, model: str):
    """The table read with its calibration's statistic, and the model's calibration (None without one):
    what a budget on the corrected prediction is checked against."""
    oh = read_overhead(lut_path, model, table)
    return (table_statistic(table, oh.statistic) if oh else table), oh


def budget_on_sum(budget_ms: float, overhead: Overhead | None, calls: int) -> float:
    """The budget on the plain sum of units whose corrected prediction is `budget_ms` (Overhead.apply
    inverted: the correction grows with the sum the solver adds up)."""
    if overhead is None:
        return budget_ms
    return (budget_ms / overhead.drift - overhead.residual_ms) / overhead.scale + (calls - 1) * overhead.per_call_ms


def write_overhead(lut_path: str | Path, oh: Overhead) -> Path:
    from latprof.lut.table import atomic_write_text

    if not oh.model:
        raise ValueError("a calibration names its model")
    oh.created = oh.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path = overhead_path(lut_path, oh.model)
    atomic_write_text(path, json.dumps(asdict(oh), indent=1, sort_keys=True) + "\n")
    return path


def _table_engine(table) -> tuple[str, str]:
    engine = table.engine
    tunings = sorted(set(table.frame["tuning"].astype(str)))
    return engine, table.provenance.get("tuning") or (tunings[0] if len(tunings) == 1 else ",".join(tunings))


# -- statistics -----------------------------------------------------------------------------------------
STATS = ("median", "min", "q10", "q25")


def parse_stat(text: str) -> str:
    if text not in STATS:
        raise UsageError(f"unknown statistic '{text}'", f"use one of {', '.join(STATS)}")
    return text


def sample_stat(samples, stat: str) -> float:
    import numpy as np

    x = np.asarray(samples, dtype=float)
    if stat == "min":
        return float(x.min())
    return float(np.percentile(x, {"median": 50, "q10": 10, "q25": 25}[parse_stat(stat)]))


def table_statistic(table, stat: str):
    """The table read with another statistic of its raw samples (``min``, ``q10``, ``q25``): low
    quantiles are robust to other jobs on a shared host, which only ever slow a run down. The CI of the
    median is shifted along with it (an approximation; the spread of a low quantile is not wider)."""
    from latprof.lut.table import LutTable

    if parse_stat(stat) == "median":
        return table
    f = table.frame.copy()
    value = f["samples_ms"].map(lambda v: sample_stat([float(x) for x in str(v).split()], stat))
    shift = value - f["median_ms"]
    f["ci_low_ms"] = f["ci_low_ms"] + shift
    f["ci_high_ms"] = f["ci_high_ms"] + shift
    f["median_ms"] = value
    f["q1_ms"] = f[["q1_ms", "median_ms"]].min(axis=1)
    f["q3_ms"] = f[["q3_ms", "median_ms"]].max(axis=1)
    return LutTable(f, {**table.provenance, "statistic": stat}, table.path)


# -- prediction ------------------------------------------------------------------------------------------
@dataclass
class UnitPrediction:
    unit: str
    tokens: int
    median_ms: float
    ci_low_ms: float
    ci_high_ms: float
    q1_ms: float
    q3_ms: float
    macs: int
    graph: str          # the measured graph at the nearest measured N (shared error group)
    measured: bool = True  # N is a measured count (False: interpolated between two)


@dataclass
class Prediction:
    model: str
    engine: str
    tuning: str
    kept: tuple[int, ...]
    block_tokens: list[int]
    units: list[UnitPrediction]
    sum_ms: float           # plain sum of the unit medians
    overhead_ms: float      # correction from the Overhead sidecar (0 without one)
    ci_low_ms: float        # 95% CI of the prediction (see module docstring)
    ci_high_ms: float
    q1_ms: float            # summed quartiles (pessimistic spread band)
    q3_ms: float
    macs: int
    overhead: Overhead | None = field(default=None, repr=False)
    pi_low_ms: float = 0.0  # 95% prediction interval of one measurement (the CI without a calibration)
    pi_high_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.sum_ms + self.overhead_ms


def interpolation_error(tokens, medians, n: float) -> float:
    """Relative error to expect from interpolating a curve at an unmeasured `n`: each interior measured
    count predicted from its two neighbours alone (leave one out), and the larger of those errors at the
    two counts that bracket `n` (an end count takes its neighbour's). Tuned TVM is not linear in N (a tile
    boundary can cost 10-20% from one count to the next), and this is the table's own evidence of how far
    off the line it runs; 0 for a curve of fewer than three counts, which holds no such evidence."""
    import numpy as np

    xs, ys = np.asarray(tokens, float), np.asarray(medians, float)
    if len(xs) < 3:
        return 0.0
    loo = np.abs(ys[:-2] + (ys[2:] - ys[:-2]) * (xs[1:-1] - xs[:-2]) / (xs[2:] - xs[:-2]) - ys[1:-1]) / ys[1:-1]
    loo = np.concatenate([loo[:1], loo, loo[-1:]])  # the end counts borrow their neighbour's
    j = int(np.clip(np.searchsorted(xs, n) - 1, 0, len(xs) - 2))
    return float(max(loo[j], loo[j + 1]))


def predict(table, model: str, schedule: TokenSchedule, overhead: Overhead | None = None) -> Prediction:
    """Predicted end-to-end latency of `model` under `schedule` from `table` (one engine)."""
    import numpy as np

    from latprof.models import get_model

    spec = get_model(model)
    engine, tuning = _table_engine(table)
    if tuple(schedule.locations) != tuple(spec.pruning_locations) or (
            spec.layout is None and schedule.patches != spec.max_tokens - 1):
        raise UsageError(f"schedule for {getattr(schedule, 'patches', '?')} patches at {list(schedule.locations)} does not fit {model}",
                         f"{model} has {spec.max_tokens - 1} patches, pruning before blocks {list(spec.pruning_locations)}")
    table_units = set(table.units(model))
    ns = unit_tokens(spec, schedule)
    missing = [u for u in ns if u not in table_units]
    if missing:
        raise LutError(f"table {table.path} has no rows for {model} units {missing[:4]}{' ...' if len(missing) > 4 else ''}",
                       f"measure them (latprof measure --model {model}) and rebuild the table")
    out: list[UnitPrediction] = []
    for unit, n in ns.items():
        tokens, med, q1, q3 = table.curve(model, unit)
        rows = table._unit_rows(model, unit).sort_values("tokens")
        lo_c, hi_c = rows["ci_low_ms"].to_numpy(float), rows["ci_high_ms"].to_numpy(float)
        graphs = rows["graph"].astype(str).to_numpy()
        if table.kind(model, unit) == "fixed":
            vals = (med[0], lo_c[0], hi_c[0], q1[0], q3[0])
            g, measured = graphs[0], True
        else:
            if n < tokens[0] or n > tokens[-1]:
                raise LutError(f"{model}/{unit}: {n} tokens is outside the table's measured range {tokens[0]}..{tokens[-1]}",
                               f"measure that count (latprof measure --tokens ...,{n}) or keep more tokens")
            vals = tuple(float(np.interp(n, tokens, ys)) for ys in (med, lo_c, hi_c, q1, q3))
            g, measured = graphs[int(np.argmin(np.abs(tokens - n)))], int(n) in tokens.tolist()
            if not measured:  # widen the CI by how far the curve strays from a line between its counts
                h = interpolation_error(tokens, med, n) * vals[0]
                vals = (vals[0], vals[1] - h, vals[2] + h, vals[3], vals[4])
        out.append(UnitPrediction(unit, int(n), *[float(v) for v in vals], macs=unit_macs(spec, unit, n), graph=str(g),
                                  measured=measured))
    total = sum(u.median_ms for u in out)
    # CI: linear within a (graph, N) group, quadrature across groups
    groups: dict[tuple, list[float]] = {}
    for u in out:
        acc = groups.setdefault((u.graph, u.tokens), [0.0, 0.0])
        acc[0] += u.median_ms - u.ci_low_ms
        acc[1] += u.ci_high_ms - u.median_ms
    lo = math.sqrt(sum(a * a for a, _ in groups.values()))
    hi = math.sqrt(sum(b * b for _, b in groups.values()))
    calls = len(out)
    fix = overhead.apply if overhead else (lambda v, c: v)
    value = fix(total, calls)
    corr = value - total
    k = overhead.scale * overhead.drift if overhead else 1.0
    scatter = overhead.scatter_half() * value if overhead else 0.0
    return Prediction(model, engine, tuning, tuple(schedule.kept), schedule.block_tokens(), out, total, corr,
                      value - k * lo, value + k * hi, fix(sum(u.q1_ms for u in out), calls),
                      fix(sum(u.q3_ms for u in out), calls), sum(u.macs for u in out), overhead,
                      value - math.hypot(k * lo, scatter), value + math.hypot(k * hi, scatter))


# Older than this, a calibration's drift is a guess: on our shared host, DeiT-T with tuned TVM was predicted
# within ±5% for 75-85% of schedules from a fresh table and 45-55% from one 75 minutes old
# (docs/measurements.md, "How the trust table got here").
STALE_CALIBRATION = _dt.timedelta(hours=1)


def calibration_age(oh: Overhead, now: _dt.datetime | None = None) -> _dt.timedelta | None:
    """How long ago the calibration was written (None when it carries no readable time)."""
    try:
        created = _dt.datetime.fromisoformat(oh.created)
    except (TypeError, ValueError):
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=_dt.timezone.utc)
    return (now or _dt.datetime.now(_dt.timezone.utc)) - created


def _age_line(oh: Overhead, now: _dt.datetime | None) -> str | None:
    age = calibration_age(oh, now)
    if age is None:
        return None
    hours = age.total_seconds() / 3600
    text = f"  calibrated {oh.created} ({hours:.1f} h ago)"
    if age > STALE_CALIBRATION:
        text += (f"; the prediction is of the device as it ran then: if it must hold now, recalibrate with "
                 f"`latprof validate --calibrate --model {oh.model or 'MODEL'}`")
    return text


def format_prediction(p: Prediction, breakdown: bool = True, now: _dt.datetime | None = None) -> str:
    """`now` is for tests: the calibration's age is reckoned from it."""
    from latprof.models import get_model

    kept = getattr(get_model(p.model).layout, "kept_label", "kept patches")
    lines = [f"{p.model} on {p.engine} ({p.tuning}), {kept} {list(p.kept)}, block N {p.block_tokens}",
             f"predicted latency {p.total_ms:.3f} ms  (95% CI {p.ci_low_ms:.3f}..{p.ci_high_ms:.3f}; "
             f"summed quartiles {p.q1_ms:.3f}..{p.q3_ms:.3f})  {p.macs / 1e9:.3f} GMACs"]
    if p.overhead is not None and p.overhead.dof:
        lines.append(f"  one measurement of it: 95% prediction interval {p.pi_low_ms:.3f}..{p.pi_high_ms:.3f} ms "
                     f"(the CI and the calibration's {p.overhead.rel_sd:.1%} scatter, {p.overhead.dof} dof)")
    if p.overhead is not None:
        oh = p.overhead
        lines.append(f"  sum of units {p.sum_ms:.3f} ms, overhead correction {p.overhead_ms:+.3f} ms "
                     f"(scale {oh.scale:.3f} x (sum - {len(p.units) - 1} x {oh.per_call_ms:.4f} ms per call) "
                     f"{oh.residual_ms:+.4f} ms, x {oh.drift:.3f} machine drift during the calibration; from "
                     f"{oh.n_configs} calibration schedules, statistic {oh.statistic})")
        age = _age_line(oh, now)
        if age:
            lines.append(age)
    if breakdown:
        lines.append(f"  {'unit':12s} {'N':>4s} {'median ms':>10s} {'95% CI':>19s} {'share':>6s} {'MMACs':>9s}")
        for u in p.units:
            lines.append(f"  {u.unit:12s} {u.tokens:4d}{' ' if u.measured else '*'}{u.median_ms:10.4f} "
                         f"{u.ci_low_ms:9.4f}..{u.ci_high_ms:<8.4f} {u.median_ms / p.sum_ms:6.1%} {u.macs / 1e6:9.2f}")
        if not all(u.measured for u in p.units):
            lines.append("  * interpolated between measured counts (tuned TVM is not linear in N: measure the counts "
                         "you use, e.g. --tokens 1-197)")
    return "\n".join(lines)
