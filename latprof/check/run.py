"""Compare a freshly measured table with a baseline table, point by point.

A point is one (model, unit, token count). Units that share a graph (DeiT's twelve identical blocks are
measured once and written as twelve rows with the same samples) are one statistical test, reported
once with every unit it covers: counting them twelve times would only dilute the multiplicity
correction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from latprof.check import stats
from latprof.check.compat import check_comparable
from latprof.errors import UsageError


@dataclass
class PointResult:
    model: str
    units: list[str]
    tokens: int
    verdict: stats.Verdict

    @property
    def label(self) -> str:
        if len(self.units) == 1:
            return self.units[0]
        return f"{self.units[0]} (+{len(self.units) - 1} same graph)"

    def to_dict(self) -> dict:
        return {"model": self.model, "units": self.units, "tokens": self.tokens, **self.verdict.to_dict()}


@dataclass
class CheckResult:
    points: list[PointResult]
    tolerance: stats.Tolerance
    alpha: float
    baseline: dict = field(default_factory=dict)   # provenance
    candidate: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # points in the baseline the candidate lacks
    strict: bool = False  # noisy points fail the check too

    def by_status(self, status: str) -> list[PointResult]:
        return [p for p in self.points if p.verdict.status == status]

    @property
    def regressions(self) -> list[PointResult]:
        return self.by_status(stats.REGRESSION)

    @property
    def failed(self) -> bool:
        return bool(self.regressions) or (self.strict and bool(self.by_status(stats.NOISY)))

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> str:
        counts = {s: len(self.by_status(s)) for s in stats.STATUSES}
        parts = [f"{counts[s]} {s}" for s in stats.STATUSES if counts[s]]
        head = "FAIL" if self.failed else "OK"
        text = f"{head}: {len(self.points)} points compared ({', '.join(parts) or 'none'}); tolerance {self.tolerance}, alpha {self.alpha:g}"
        if self.missing:
            text += f"; {len(self.missing)} baseline points not in the candidate"
        return text

    def to_dict(self) -> dict:
        return {
            "ok": not self.failed, "exit_code": self.exit_code, "summary": self.summary(),
            "tolerance": str(self.tolerance), "alpha": self.alpha, "strict": self.strict,
            "counts": {s: len(self.by_status(s)) for s in stats.STATUSES},
            "points": [p.to_dict() for p in self.points], "missing": self.missing, "warnings": self.warnings,
            "baseline": self.baseline, "candidate": self.candidate,
        }


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    out = []
    for v in value:
        out += [s.strip() for s in str(v).split(",") if s.strip()]
    return out


def run_check(baseline, candidate, tolerance="median:5%", alpha: float = stats.DEFAULT_ALPHA,
              units: Sequence[str] | str | None = None, models: Sequence[str] | str | None = None,
              tokens: Sequence[int] | None = None, strict: bool = False, seed: int = 0,
              paired: bool = False) -> CheckResult:
    """Compare ``candidate`` (freshly measured :class:`LutTable`) with ``baseline``. ``paired``: the two
    tables' samples were measured in alternation, sample i of each in the same round (``--interleave``).

    Raises :class:`LutError` when the tables are not comparable and :class:`UsageError` when the
    selection matches nothing."""
    tolerance = stats.parse_tolerance(tolerance)
    bf, cf = baseline.frame, candidate.frame
    want_models, want_units = _split(models), _split(units)
    if want_models:
        unknown = [m for m in want_models if m not in set(bf["model"])]
        if unknown:
            raise UsageError(f"model(s) {unknown} are not in the baseline table", f"baseline models: {sorted(set(bf['model']))}")
        bf = bf[bf["model"].isin(want_models)]
    if want_units:
        unknown = [u for u in want_units if u not in set(bf["unit"])]
        if unknown:
            raise UsageError(f"unit(s) {unknown} are not in the baseline table",
                             f"baseline units: {sorted(set(bf['unit']))}")
        bf = bf[bf["unit"].isin(want_units)]
    if tokens:
        bf = bf[bf["tokens"].isin([int(t) for t in tokens])]
    if bf.empty:
        raise UsageError("the selection matches no row of the baseline table", "check --model, --units and --tokens")
    keys = ["model", "unit", "tokens", "engine"]
    merged = bf.merge(cf, on=keys, how="left", suffixes=("_b", "_c"), indicator=True)
    missing_rows = merged[merged["_merge"] != "both"]
    missing = [f"{r.model}/{r.unit}@{int(r.tokens)}" for r in missing_rows.itertuples()]
    both = merged[merged["_merge"] == "both"]
    if both.empty:
        raise UsageError("the candidate table has none of the selected baseline points",
                         "measure the same model, units and token counts as the baseline")
    rows_c = cf.merge(bf[keys], on=keys)
    warnings = check_comparable(baseline, candidate, rows_baseline=bf, rows_candidate=rows_c)
    if missing:
        warnings.append(f"{len(missing)} baseline points were not measured in the candidate: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))

    # one test per distinct (model, tokens, graphs, samples): identical rows of shared graphs collapse
    groups: dict[tuple, list] = {}
    for r in both.sort_values(["model", "position_b", "tokens"]).itertuples():
        key = (r.model, int(r.tokens), r.engine, str(r.graph_b), str(r.graph_c), str(r.samples_ms_b), str(r.samples_ms_c))
        groups.setdefault(key, []).append(r.unit)
    pairs, meta = [], []
    for key, unit_names in groups.items():
        pairs.append((_samples(key[5]), _samples(key[6])))
        meta.append((key[0], unit_names, key[1]))
    verdicts = stats.compare_many(pairs, tolerance, alpha, seed=seed, paired=paired)
    points = [PointResult(m, u, t, v) for (m, u, t), v in zip(meta, verdicts)]
    shift = _global_shift(verdicts)
    if shift is not None:
        warnings.append(f"every compared point moved the same way (median ratio {shift:.3f}): the machine drifted "
                        "between the two runs, or the change affects everything; --interleave tells them apart")
    return CheckResult(points, tolerance, alpha, _prov(baseline), _prov(candidate), warnings, missing, strict)


def _global_shift(verdicts) -> float | None:
    """The median ratio when at least three points all moved significantly in the same direction."""
    if len(verdicts) < 3 or not all(v.significant for v in verdicts):
        return None
    ups = [v.ratio > 1 for v in verdicts]
    if all(ups) or not any(ups):
        import numpy as np

        return float(np.median([v.ratio for v in verdicts]))
    return None


def _samples(text: str):
    import numpy as np

    return np.array([float(v) for v in text.split()])


def _prov(table) -> dict:
    p = dict(table.provenance or {})
    p["path"] = getattr(table, "path", None)
    return p


def interleave(measure_a: Callable[[], list[float]], measure_b: Callable[[], list[float]], rounds: int,
               on_round: Callable[[int], None] | None = None) -> tuple[list[float], list[float]]:
    """Measure two builds in alternation: ``rounds`` calls of each, in the order A B, B A, A B, ...

    Each callable returns a list of samples (one short burst of repeats). Alternating spreads slow
    drift (heat, frequency scaling, other load) evenly over both builds; swapping the order every
    round cancels a linear drift within the pair as well as between pairs."""
    if rounds < 1:
        raise UsageError(f"interleave needs at least one round, got {rounds}", "use --rounds 10 or more")
    a: list[float] = []
    b: list[float] = []
    for i in range(rounds):
        order = ((measure_a, a), (measure_b, b)) if i % 2 == 0 else ((measure_b, b), (measure_a, a))
        for fn, out in order:
            out.extend(float(s) for s in fn())
        if on_round:
            on_round(i)
    return a, b
