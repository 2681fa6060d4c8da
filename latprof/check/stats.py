"""Statistics of `latprof check`: is a candidate's latency different from the baseline's?

Pure numpy (scipy is not a runtime dependency). The decision for one (unit, token count) point:

1. **Significance.** Mann-Whitney U (exact distribution for small samples without ties, tie-corrected
   normal approximation with continuity correction otherwise) when the samples are large enough for the
   test to reach the (multiplicity-adjusted) level at all; below that, asv's fallback: the two medians'
   bootstrap confidence intervals must not overlap.
2. **Magnitude.** The ratio candidate/baseline of the statistic the tolerance names (``median:5%``) must
   lie beyond the tolerance. A difference can be significant yet small (the machine drifted 2%):
   that is not a regression. The tolerance is what absorbs global drift between two runs measured at
   different times.
3. **Multiple comparisons.** A check run tests many points at once; Holm's step-down procedure keeps the
   family-wise false-alarm probability of the significance step at ``alpha`` over all of them, and the
   confidence intervals of the ratio are simultaneous (Bonferroni) at the same level.
4. **Noisy.** Not significant, but the ratio's confidence interval reaches beyond the tolerance: the data
   can neither show nor rule out a regression. The verdict then carries a power-style estimate of the
   repeats per side that would decide a change of the tolerance's size.
5. **Paired samples.** When the two builds were measured in alternation (``--interleave``), sample i of
   each side comes from the same round, moments apart, and shares that moment's machine state. Comparing
   them pair by pair removes the load that drifts from round to round: the sign test on the per-pair
   ratios, and the median of those ratios as the change. On this machine that caught 5% slowdowns as
   often as the unpaired test or more, with no more false alarms (benchmarks/regress.py; figures in
   docs/ci.md). Used for ``median:`` tolerances when both sides have the same number of samples;
   otherwise the unpaired test above.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

from latprof.errors import UsageError

REGRESSION = "regression"
IMPROVEMENT = "improvement"
UNCHANGED = "unchanged"
NOISY = "noisy"
STATUSES = (REGRESSION, IMPROVEMENT, UNCHANGED, NOISY)

DEFAULT_ALPHA = 0.01
BOOTSTRAP_RESAMPLES = 1000
POWER = 0.8  # power of the "how many repeats would decide it" estimate
_NORMAL = NormalDist()


# -- tolerance -----------------------------------------------------------------------------------------
_STATS = {
    "median": np.median,
    "mean": np.mean,
    "min": np.min,
    "max": np.max,
}
_UNIT_MS = {"ms": 1.0, "us": 1e-3, "s": 1e3}
_TOL_RE = re.compile(r"^\s*([a-z]+)\s*:\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(%|ms|us|s)?\s*$", re.I)


@dataclass(frozen=True)
class Tolerance:
    """How much slower a point may get before it counts as a regression.

    ``stat`` names the statistic compared (median, mean, min, max); the limit is either relative
    (``median:5%`` -> ``relative=0.05``) or absolute in milliseconds (``median:0.2ms``)."""

    stat: str = "median"
    relative: float | None = 0.05
    absolute_ms: float | None = None

    def statistic(self, samples: np.ndarray) -> float:
        return float(_STATS[self.stat](samples))

    def upper_ratio(self, baseline_value: float) -> float:
        """Candidate/baseline ratio above which the change is beyond the tolerance (slower)."""
        if self.relative is not None:
            return 1.0 + self.relative
        return 1.0 + self.absolute_ms / baseline_value

    def lower_ratio(self, baseline_value: float) -> float:
        """Ratio below which the change is beyond the tolerance (faster)."""
        if self.relative is not None:
            return max(1.0 - self.relative, 1e-12)
        return max(1.0 - self.absolute_ms / baseline_value, 1e-12)

    def __str__(self) -> str:
        if self.relative is not None:
            return f"{self.stat}:{self.relative * 100:g}%"
        return f"{self.stat}:{self.absolute_ms:g}ms"


def parse_tolerance(text: str | Tolerance) -> Tolerance:
    """Parse ``median:5%``, ``mean:10%``, ``min:0.3ms``, ``median:250us`` into a :class:`Tolerance`.

    A bare number without a unit is refused: ``median:5`` could mean 5% or 5 ms."""
    if isinstance(text, Tolerance):
        return text
    fix = "write STAT:NUMBER% or STAT:NUMBER(ms|us|s) with STAT one of " + ", ".join(_STATS) + ", e.g. median:5%"
    m = _TOL_RE.match(str(text))
    if not m:
        raise UsageError(f"bad tolerance expression '{text}'", fix)
    stat, number, unit = m.group(1).lower(), float(m.group(2)), (m.group(3) or "").lower()
    if stat not in _STATS:
        raise UsageError(f"bad tolerance expression '{text}': unknown statistic '{stat}'", fix)
    if not unit:
        raise UsageError(f"bad tolerance expression '{text}': '{number:g}' has no unit (% or ms)", fix)
    if unit == "%":
        if not 0 < number < 100:
            raise UsageError(f"bad tolerance expression '{text}': a relative tolerance must lie in (0%, 100%)", fix)
        return Tolerance(stat, relative=number / 100.0, absolute_ms=None)
    if number <= 0:
        raise UsageError(f"bad tolerance expression '{text}': the tolerance must be positive", fix)
    return Tolerance(stat, relative=None, absolute_ms=number * _UNIT_MS[unit])


# -- Mann-Whitney U ------------------------------------------------------------------------------------
def _rank(values: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_v = values[order]
    ranks = np.empty(len(values), dtype=float)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], len(values)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1..end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _exact_u_counts(n1: int, n2: int) -> np.ndarray:
    """Number of arrangements giving each U = 0..n1*n2 (no ties), by the standard recursion."""
    # f[i][j] is the count array for sizes (i, j); f(i, j, u) = f(i-1, j, u-j) + f(i, j-1, u)
    table = {}
    for i in range(n1 + 1):
        for j in range(n2 + 1):
            if i == 0 or j == 0:
                table[i, j] = np.ones(1, dtype=float)
                continue
            a = table[i - 1, j]
            b = table[i, j - 1]
            out = np.zeros(i * j + 1)
            out[j:j + len(a)] += a
            out[:len(b)] += b
            table[i, j] = out
    return table[n1, n2]


EXACT_MAX_N = 8  # exact distribution when both samples are at most this size and nothing ties


def mann_whitney_u(x, y, method: str = "auto") -> tuple[float, float]:
    """Two-sided Mann-Whitney U test. Returns ``(U_x, p)`` where ``U_x`` counts pairs with x > y
    (ties count one half).

    ``method``: ``exact`` (no ties allowed), ``asymptotic`` (normal approximation, tie-corrected, with
    continuity correction), ``auto`` (exact when both samples have at most 8 values and nothing ties)."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_u needs two non-empty samples")
    both = np.concatenate([x, y])
    ranks = _rank(both)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    has_ties = len(np.unique(both)) < len(both)
    if method == "auto":
        method = "exact" if (max(n1, n2) <= EXACT_MAX_N and not has_ties) else "asymptotic"
    if method == "exact":
        if has_ties:
            raise ValueError("the exact Mann-Whitney distribution assumes no ties")
        counts = _exact_u_counts(n1, n2)
        total = counts.sum()
        k = int(round(min(u1, n1 * n2 - u1)))
        p = float(min(1.0, 2.0 * counts[: k + 1].sum() / total))
        return u1, p
    if method != "asymptotic":
        raise ValueError(f"unknown method {method!r}")
    n = n1 + n2
    mu = n1 * n2 / 2.0
    _, tie_counts = np.unique(both, return_counts=True)
    tie_term = float((tie_counts ** 3 - tie_counts).sum())
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return u1, 1.0
    z = (abs(u1 - mu) - 0.5) / math.sqrt(var)
    z = max(z, 0.0)
    p = math.erfc(z / math.sqrt(2.0))
    return u1, float(min(1.0, p))


def sign_test(d) -> float:
    """Two-sided p of the sign test that the paired differences ``d`` have median 0: exact binomial over
    the non-zero differences (normal approximation with continuity correction past 1000 of them).

    Chosen over Wilcoxon's signed-rank test for interleaved timings: a sample stalled by another process
    gives a huge |difference| of either sign, and signed ranks weigh exactly those most (on this machine,
    under bursty contention, the signed-rank test caught 66-70% of 5% slowdowns, the sign test 87-91%)."""
    d = np.asarray(d, dtype=float).ravel()
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 1.0
    k = int(min((d > 0).sum(), (d < 0).sum()))
    if n <= 1000:
        return float(min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n))
    z = max((n / 2.0 - k - 0.5) / math.sqrt(n / 4.0), 0.0)
    return float(min(1.0, math.erfc(z / math.sqrt(2.0))))


def min_attainable_p(n1: int, n2: int) -> float:
    """Smallest two-sided p-value the exact U test can give for these sample sizes."""
    if n1 + n2 > 1000:  # the binomial coefficient would not fit a float: the p-value can be anything
        return 0.0
    return 2.0 / math.comb(n1 + n2, n1)


def holm(p_values) -> np.ndarray:
    """Holm step-down adjusted p-values (monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


# -- effect size and its uncertainty ------------------------------------------------------------------
def hodges_lehmann_ratio(baseline, candidate) -> float:
    """Hodges-Lehmann estimate of the candidate/baseline ratio: exp of the median of all pairwise
    differences of log samples. Robust companion of the ratio of medians."""
    b = np.log(np.asarray(baseline, dtype=float))
    c = np.log(np.asarray(candidate, dtype=float))
    if len(b) * len(c) > 4_000_000:  # keep memory bounded: a deterministic thinning of both samples
        b, c = np.sort(b)[:: max(1, len(b) // 2000)], np.sort(c)[:: max(1, len(c) // 2000)]
    return float(np.exp(np.median(c[:, None] - b[None, :])))


def _bootstrap_stats(samples: np.ndarray, stat: str, rng: np.random.Generator, resamples: int) -> np.ndarray:
    idx = rng.integers(0, len(samples), size=(resamples, len(samples)))
    values = samples[idx]
    if stat == "median":
        return np.median(values, axis=1)
    return _STATS[stat](values, axis=1)


@dataclass
class Verdict:
    """The outcome for one compared point."""

    status: str                 # regression | improvement | unchanged | noisy
    ratio: float                # candidate / baseline of the tolerance's statistic (paired: median per-pair ratio)
    ci_low: float               # simultaneous confidence interval of that ratio
    ci_high: float
    p_value: float              # raw two-sided Mann-Whitney p (nan when the CI-overlap test decided)
    p_adjusted: float           # Holm-adjusted over the check run
    method: str                 # mann-whitney | ci-overlap | sign-test (paired)
    significant: bool
    baseline_ms: float          # the statistic on each side
    candidate_ms: float
    n_baseline: int
    n_candidate: int
    limit_high: float           # ratio limits of the tolerance
    limit_low: float
    hl_ratio: float             # Hodges-Lehmann ratio, for the reader
    repeats_needed: int | None = None  # per side, only for noisy
    reason: str = ""

    @property
    def change_pct(self) -> float:
        return (self.ratio - 1.0) * 100.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["change_pct"] = self.change_pct
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class _Point:
    base: np.ndarray
    cand: np.ndarray
    p: float
    method: str
    base_stat: float
    cand_stat: float
    log_ratio: float
    log_se: float
    base_boot: np.ndarray = field(repr=False)
    cand_boot: np.ndarray = field(repr=False)
    diffs: np.ndarray | None = field(default=None, repr=False)  # per-pair log ratios (paired points)


def _check_samples(baseline, candidate) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(baseline, dtype=float).ravel()
    c = np.asarray(candidate, dtype=float).ravel()
    if len(b) == 0 or len(c) == 0:
        raise UsageError("a compared point has no samples", "re-measure it with more repeats")
    if (b <= 0).any() or (c <= 0).any() or not (np.isfinite(b).all() and np.isfinite(c).all()):
        raise UsageError("latency samples must be positive and finite", "rebuild the table from its raw samples")
    return b, c


def _pairable(b: np.ndarray, c: np.ndarray, tolerance: Tolerance, alpha_point: float) -> bool:
    """Can this point be compared pair by pair: same count on both sides, the median's tolerance, and
    enough pairs for the sign test to reach the point's level at all (2 / 2^n <= alpha)."""
    return (len(b) == len(c) and tolerance.stat == "median"
            and len(b) * math.log(2) >= math.log(2 / alpha_point))


def _prepare_paired(b: np.ndarray, c: np.ndarray, tolerance: Tolerance, rng, resamples: int) -> _Point:
    d = np.log(c) - np.log(b)
    boot = np.median(d[rng.integers(0, len(d), size=(resamples, len(d)))], axis=1)  # pairs resampled together
    log_se = float(np.std(boot, ddof=1)) if resamples > 1 else 0.0
    return _Point(b, c, sign_test(d), "sign-test", tolerance.statistic(b), tolerance.statistic(c),
                  float(np.median(d)), log_se, np.empty(0), np.empty(0), diffs=d)


def _prepare(baseline, candidate, tolerance: Tolerance, alpha_point: float, rng, resamples: int,
             paired: bool = False) -> _Point:
    b, c = _check_samples(baseline, candidate)
    if paired and _pairable(b, c, tolerance, alpha_point):
        return _prepare_paired(b, c, tolerance, rng, resamples)
    base_stat, cand_stat = tolerance.statistic(b), tolerance.statistic(c)
    bb = _bootstrap_stats(b, tolerance.stat, rng, resamples)
    cb = _bootstrap_stats(c, tolerance.stat, rng, resamples)
    log_ratio = math.log(cand_stat / base_stat)
    log_se = float(np.std(np.log(cb) - np.log(bb), ddof=1)) if resamples > 1 else 0.0
    if len(b) >= 2 and len(c) >= 2 and min_attainable_p(len(b), len(c)) <= alpha_point:
        _, p = mann_whitney_u(b, c)
        method = "mann-whitney"
    else:
        p = float("nan")
        method = "ci-overlap"
    return _Point(b, c, p, method, base_stat, cand_stat, log_ratio, log_se, bb, cb)


def _repeats_needed(point: _Point, tolerance: Tolerance, alpha_point: float) -> int:
    """Repeats per side so that a change the size of the tolerance would be detected with POWER:
    the standard error of the log ratio shrinks as 1/sqrt(n)."""
    n_now = 2.0 / (1.0 / len(point.base) + 1.0 / len(point.cand))  # harmonic mean of the two sizes
    delta = math.log(tolerance.upper_ratio(point.base_stat))
    z = _NORMAL.inv_cdf(1 - alpha_point / 2) + _NORMAL.inv_cdf(POWER)
    # the bootstrap underestimates the spread of a median of few samples: take the larger of its
    # estimate and the large-sample one (var of a median ~ pi/2 * sigma^2 / n, sigma from each side's MAD;
    # paired: from the MAD of the per-pair differences)
    sides = [point.diffs] if point.diffs is not None else [np.log(point.base), np.log(point.cand)]
    sig = [1.4826 * float(np.median(np.abs(v - np.median(v)))) for v in sides]
    analytic = math.pi / 2 * sum(x ** 2 for x in sig) * (z / delta) ** 2
    needed = max(n_now * (z * point.log_se / delta) ** 2, analytic)
    return int(max(math.ceil(needed), math.ceil(n_now) + 1))


def _decide(point: _Point, p_adj: float, tolerance: Tolerance, alpha: float, alpha_point: float) -> Verdict:
    ratio = math.exp(point.log_ratio)
    z = _NORMAL.inv_cdf(1 - alpha_point / 2)
    ci_low = math.exp(point.log_ratio - z * point.log_se)
    ci_high = math.exp(point.log_ratio + z * point.log_se)
    hi_lim, lo_lim = tolerance.upper_ratio(point.base_stat), tolerance.lower_ratio(point.base_stat)
    if point.method in ("mann-whitney", "sign-test"):
        significant = bool(p_adj <= alpha)
    else:
        # asv's fallback for few samples: the statistics' own confidence intervals must not overlap
        q = (alpha_point / 2, 1 - alpha_point / 2)
        b_lo, b_hi = np.quantile(point.base_boot, q)
        c_lo, c_hi = np.quantile(point.cand_boot, q)
        # with few samples the bootstrap can't reach extreme quantiles: use the sample range as well
        b_lo, b_hi = min(b_lo, point.base.min()), max(b_hi, point.base.max())
        c_lo, c_hi = min(c_lo, point.cand.min()), max(c_hi, point.cand.max())
        significant = bool(c_lo > b_hi or c_hi < b_lo)
    direction = 1 if ratio > 1 else -1
    repeats = None
    if significant and direction > 0 and ratio > hi_lim:
        status, reason = REGRESSION, f"slower by {(ratio - 1) * 100:.1f}% (beyond {tolerance})"
    elif significant and direction < 0 and ratio < lo_lim:
        status, reason = IMPROVEMENT, f"faster by {(1 - ratio) * 100:.1f}% (beyond {tolerance})"
    elif not significant and ci_high > hi_lim:
        status = NOISY
        repeats = _repeats_needed(point, tolerance, alpha_point)
        reason = (f"spread too large to decide: ratio CI {ci_low:.3f}..{ci_high:.3f} reaches beyond "
                  f"{hi_lim:.3f}; about {repeats} repeats per side would decide it")
    elif significant:
        status, reason = UNCHANGED, f"significant but within {tolerance} ({(ratio - 1) * 100:+.1f}%)"
    else:
        status, reason = UNCHANGED, f"no significant difference ({(ratio - 1) * 100:+.1f}%)"
    return Verdict(
        status=status, ratio=ratio, ci_low=ci_low, ci_high=ci_high, p_value=point.p, p_adjusted=p_adj,
        method=point.method, significant=significant, baseline_ms=point.base_stat,
        candidate_ms=point.cand_stat, n_baseline=len(point.base), n_candidate=len(point.cand),
        limit_high=hi_lim, limit_low=lo_lim, hl_ratio=hodges_lehmann_ratio(point.base, point.cand),
        repeats_needed=repeats, reason=reason,
    )


def compare_many(pairs, tolerance="median:5%", alpha: float = DEFAULT_ALPHA, seed: int = 0,
                 resamples: int = BOOTSTRAP_RESAMPLES, paired: bool = False) -> list[Verdict]:
    """Compare many (baseline_samples, candidate_samples) pairs tested together in one check run.

    Significance is Holm-adjusted over all pairs; confidence intervals are Bonferroni-simultaneous, so
    the probability that a run with nothing changed reports any significant difference is at most
    ``alpha``, however many points it checks. ``paired``: sample i of both sides was measured in the same
    round (interleaved), so points with equal counts are compared pair by pair."""
    tolerance = parse_tolerance(tolerance)
    if not 0 < alpha < 1:
        raise UsageError(f"alpha must lie in (0, 1), got {alpha}", "use e.g. --alpha 0.01")
    pairs = list(pairs)
    if not pairs:
        return []
    alpha_point = alpha / len(pairs)
    rng = np.random.default_rng(seed)
    points = [_prepare(b, c, tolerance, alpha_point, rng, resamples, paired) for b, c in pairs]
    raw = np.array([pt.p for pt in points])
    tested = ~np.isnan(raw)
    adj = np.full(len(points), float("nan"))
    if tested.any():
        # Holm over every compared point: points decided by CI overlap use their Bonferroni level
        full = np.where(tested, raw, 1.0)
        adj = np.where(tested, holm(full), np.nan)
    return [_decide(pt, float(a), tolerance, alpha, alpha_point) for pt, a in zip(points, adj)]


def compare(baseline_samples, candidate_samples, tolerance="median:5%", alpha: float = DEFAULT_ALPHA,
            seed: int = 0, paired: bool = False) -> Verdict:
    """Compare one point: a :class:`Verdict` (regression / improvement / unchanged / noisy)."""
    return compare_many([(baseline_samples, candidate_samples)], tolerance, alpha, seed, paired=paired)[0]
