"""Statistics of `latprof check`: U test against scipy, tolerance expressions, verdicts."""

import numpy as np
import pytest

from latprof.check import stats
from latprof.errors import UsageError

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n1,n2", [(4, 6), (8, 8), (12, 9), (40, 55)])
def test_mwu_matches_scipy(seed, n1, n2):
    rng = np.random.default_rng(seed)
    x, y = rng.lognormal(0, 0.1, n1), rng.lognormal(0.05, 0.1, n2)
    u, p = stats.mann_whitney_u(x, y, method="asymptotic")
    ref = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert u == pytest.approx(ref.statistic)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    if max(n1, n2) <= 8:
        u, p = stats.mann_whitney_u(x, y, method="exact")
        ref = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method="exact")
        assert p == pytest.approx(ref.pvalue, rel=1e-9)


def test_mwu_with_ties_matches_scipy():
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(10, 1, 30), 1)
    y = np.round(rng.normal(10.4, 1, 25), 1)
    u, p = stats.mann_whitney_u(x, y)
    ref = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
    assert (u, p) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue, rel=1e-9))
    with pytest.raises(ValueError):
        stats.mann_whitney_u([1, 1, 2], [1, 3], method="exact")


def test_holm_matches_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> monotone .06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])


@pytest.mark.parametrize("text,stat,rel,abs_ms", [
    ("median:5%", "median", 0.05, None), ("mean:10%", "mean", 0.10, None), (" min : 2.5 % ", "min", 0.025, None),
    ("median:0.2ms", "median", None, 0.2), ("median:250us", "median", None, 0.25), ("MAX:1s", "max", None, 1000.0),
])
def test_tolerance_parses(text, stat, rel, abs_ms):
    tol = stats.parse_tolerance(text)
    assert tol.stat == stat
    assert tol.relative == (pytest.approx(rel) if rel is not None else None)
    assert tol.absolute_ms == (pytest.approx(abs_ms) if abs_ms is not None else None)
    assert stats.parse_tolerance(str(tol)) == tol


@pytest.mark.parametrize("bad", ["median", "median:5", "p99:5%", "median:-5%", "median:0%", "median:150%",
                                 "median:5kg", "", "5%", "median:0ms"])
def test_tolerance_refuses_bad_expressions(bad):
    with pytest.raises(UsageError) as err:
        stats.parse_tolerance(bad)
    assert err.value.fix and "median:5%" in err.value.fix


def test_absolute_tolerance_limits():
    tol = stats.parse_tolerance("median:0.5ms")
    assert tol.upper_ratio(10.0) == pytest.approx(1.05)
    assert tol.lower_ratio(10.0) == pytest.approx(0.95)


def _lognormal(seed, n, scale=1.0, sigma=0.03):
    return scale * np.random.default_rng(seed).lognormal(0, sigma, n)


def test_clear_regression():
    v = stats.compare(_lognormal(1, 40), _lognormal(2, 40, 1.15), "median:5%")
    assert v.status == stats.REGRESSION
    assert v.significant and v.method == "mann-whitney"
    assert 1.10 < v.ratio < 1.20 and v.ci_low > 1.05
    assert v.p_value < 1e-6


def test_clear_improvement():
    v = stats.compare(_lognormal(1, 40), _lognormal(2, 40, 0.85), "median:5%")
    assert v.status == stats.IMPROVEMENT and v.ratio < 0.9


def test_identical_distributions_unchanged():
    v = stats.compare(_lognormal(1, 40), _lognormal(2, 40), "median:5%")
    assert v.status == stats.UNCHANGED
    assert v.repeats_needed is None


def test_significant_but_within_tolerance_is_unchanged():
    # a global drift of 2% with tight samples: significant, but inside the tolerance
    v = stats.compare(_lognormal(1, 200, sigma=0.005), _lognormal(2, 200, 1.02, sigma=0.005), "median:5%")
    assert v.significant and v.status == stats.UNCHANGED


def test_huge_spread_few_samples_is_noisy():
    v = stats.compare(_lognormal(1, 4, sigma=0.5), _lognormal(2, 4, 1.3, sigma=0.5), "median:5%")
    assert v.status == stats.NOISY
    assert v.method == "ci-overlap"  # 4 vs 4 samples cannot reach p <= 0.01
    assert v.repeats_needed > 4
    assert "repeats" in v.reason


def test_noisy_repeats_estimate_decides():
    """Measuring as many repeats as the noisy verdict asks for settles the question."""
    base, cand = _lognormal(1, 10, sigma=0.15), _lognormal(2, 10, 1.12, sigma=0.15)
    v = stats.compare(base, cand, "median:5%")
    assert v.status == stats.NOISY
    n = v.repeats_needed
    v2 = stats.compare(_lognormal(3, n, sigma=0.15), _lognormal(4, n, 1.12, sigma=0.15), "median:5%")
    assert v2.status == stats.REGRESSION


def test_few_samples_without_overlap_are_significant():
    v = stats.compare([1.0, 1.01, 0.99], [1.5, 1.52, 1.49], "median:5%")
    assert v.method == "ci-overlap" and v.status == stats.REGRESSION


def test_multiple_comparisons_keep_false_alarms_down():
    """60 points, nothing changed, 0% tolerance: Holm keeps 'any significant' at <= alpha per run."""
    rng = np.random.default_rng(7)
    runs, alarms = 30, 0
    for _ in range(runs):
        pairs = [(rng.lognormal(0, 0.05, 20), rng.lognormal(0, 0.05, 20)) for _ in range(60)]
        verdicts = stats.compare_many(pairs, "median:0.001%", alpha=0.05, resamples=50)
        alarms += any(v.status == stats.REGRESSION for v in verdicts)
    assert alarms <= 3  # expected <= 0.05 * 30 = 1.5


def test_bad_samples_are_usage_errors():
    with pytest.raises(UsageError):
        stats.compare([], [1.0])
    with pytest.raises(UsageError):
        stats.compare([1.0, -1.0], [1.0, 2.0])
    with pytest.raises(UsageError):
        stats.compare([1.0], [1.0], alpha=2)


def test_hodges_lehmann_ratio_of_scaled_samples():
    x = _lognormal(5, 30)
    assert stats.hodges_lehmann_ratio(x, 1.1 * x) == pytest.approx(1.1)


def test_large_samples_stay_cheap():
    rng = np.random.default_rng(11)
    v = stats.compare(rng.lognormal(0, 0.05, 3000), rng.lognormal(0.1, 0.05, 3000), "median:5%")
    assert v.status == stats.REGRESSION and v.hl_ratio == pytest.approx(np.exp(0.1), rel=0.01)
    assert stats.min_attainable_p(600, 600) == 0.0


# -- paired comparisons (interleaved measurement) ------------------------------------------------------
@pytest.mark.parametrize("n,k", [(6, 0), (12, 3), (25, 10), (60, 22), (1500, 700)])
def test_sign_test_matches_scipy(n, k):
    d = np.r_[-np.ones(k), np.ones(n - k), np.zeros(3)]  # zero differences carry no sign: dropped
    ref = scipy_stats.binomtest(k, n, 0.5).pvalue
    assert stats.sign_test(d) == pytest.approx(ref, rel=1e-9 if n <= 1000 else 0.05)


def test_sign_test_all_one_sign_is_the_smallest_p():
    assert stats.sign_test(np.arange(1, 6) * 0.1) == pytest.approx(2 / 2 ** 5)


def _drifting_rounds(n, slowdown, seed, drift=0.25, noise=0.01):
    """Each round's machine state (load, clock) scales both builds alike; within a round little noise."""
    rng = np.random.default_rng(seed)
    state = rng.lognormal(0, drift, n)
    base = state * rng.lognormal(0, noise, n)
    cand = state * slowdown * rng.lognormal(0, noise, n)
    return base, cand


def test_pairing_sees_a_slowdown_that_round_to_round_drift_hides():
    base, cand = _drifting_rounds(30, 1.08, seed=1)
    paired = stats.compare(base, cand, "median:3%", paired=True)
    assert paired.method == "sign-test" and paired.status == stats.REGRESSION
    assert paired.ratio == pytest.approx(1.08, rel=0.01)
    unpaired = stats.compare(base, cand, "median:3%")
    assert unpaired.method == "mann-whitney" and unpaired.status != stats.REGRESSION


def test_pairing_with_nothing_changed_raises_no_alarm():
    alarms = sum(stats.compare(*_drifting_rounds(30, 1.0, seed=s), "median:3%", paired=True).status == stats.REGRESSION
                 for s in range(40))
    assert alarms == 0


def test_pairing_falls_back_when_samples_do_not_pair():
    base, cand = _drifting_rounds(30, 1.08, seed=2)
    assert stats.compare(base, cand[:-1], "median:3%", paired=True).method == "mann-whitney"  # unequal counts
    assert stats.compare(base, cand, "min:3%", paired=True).method == "mann-whitney"  # not the median's ratio
    assert stats.compare(base[:4], cand[:4], "median:3%", paired=True).method != "sign-test"  # 2/2^4 > alpha


def test_paired_noisy_point_estimates_repeats_from_the_pair_differences():
    rng = np.random.default_rng(5)
    base = rng.lognormal(0, 0.01, 12)
    cand = base * rng.lognormal(0.02, 0.08, 12)  # pairs disagree a lot: cannot decide a 3% tolerance
    v = stats.compare(base, cand, "median:3%", paired=True)
    assert v.method == "sign-test" and v.status == stats.NOISY
    assert v.repeats_needed > 12


def test_pairing_shrugs_off_stalled_samples():
    """Another process stalls a few samples on either side by 30-150%: the pairs those hit vote once each,
    whatever the size of the stall, so a 6% slowdown in the rest still shows."""
    base, cand = _drifting_rounds(40, 1.06, seed=3, drift=0.05)
    rng = np.random.default_rng(4)
    for side in (base, cand):
        hit = rng.choice(40, 5, replace=False)
        side[hit] *= rng.uniform(1.3, 2.5, 5)
    v = stats.compare(base, cand, "median:3%", paired=True)
    assert v.method == "sign-test" and v.status == stats.REGRESSION
    assert v.ratio == pytest.approx(1.06, abs=0.015)
