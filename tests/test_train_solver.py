import itertools

import numpy as np
import pytest

from latprof.errors import InfeasibleError, LutError
from latprof.lut.table import read_lut, write_lut
from latprof.train.latency import LatencyModel
from latprof.train.solver import solve
from latprof.train.synthetic import synthetic_table


def brute_force(table, model, budget, patches, locations, depth, grids):
    """Independent reference: every non-increasing schedule, latency summed with LutTable.latency_ms."""
    weights = LatencyModel.from_table(table, model, patches, locations, depth).blocks_per_stage()[1:]
    cache = {}

    def lat_of(unit, n):  # LutTable.latency_ms, memoised (it raises LutError outside the range)
        if (unit, n) not in cache:
            try:
                cache[unit, n] = table.latency_ms(model, unit, n)
            except LutError:
                cache[unit, n] = None
        if cache[unit, n] is None:
            raise LutError("outside")
        return cache[unit, n]

    units = [(u, table.kind(model, u)) for u in table.units(model)]
    best = None
    for kept in itertools.product(*grids):
        if any(b > a for a, b in zip((patches,) + kept, kept)):
            continue
        n = [1 + patches] + [1 + k + s for s, k in enumerate(kept, start=1)]
        lat = 0.0
        try:
            for unit, kind in units:
                if kind == "fixed":
                    lat += lat_of(unit, 0)
                elif unit.startswith("blocks."):
                    i = int(unit.split(".")[1])
                    lat += lat_of(unit, n[sum(1 for loc in locations if loc <= i)])
                elif unit.startswith(("selector.", "merge.")):
                    lat += lat_of(unit, n[int(unit.split(".")[1]) - 1])
                else:
                    lat += lat_of(unit, n[-1])
        except LutError:
            continue
        info = sum(w * k for w, k in zip(weights, kept))
        if lat <= budget + 1e-9 and (best is None or (info, -lat) > (best[0], -best[1])):
            best = (info, lat, kept)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_solver_matches_brute_force(seed, tmp_path):
    rng = np.random.default_rng(seed)
    patches, depth, locations = 10, 6, (1, 3, 5)
    grid = sorted(set(rng.choice(np.arange(2, 15), size=8, replace=False).tolist()) | {11})
    table = synthetic_table("tiny", depth, patches, tokens=grid, selectors=bool(seed % 2), seed=seed,
                            jitter=0.03)
    table = read_lut(write_lut(table, tmp_path / "t.csv"))  # through the file, as users get it
    lm = LatencyModel.from_table(table, "tiny", patches, locations, depth)
    grids = [lm.grid(s).tolist() for s in (1, 2, 3)]
    fastest = min(lm.predict_ms(k) for k in itertools.product(*grids)
                  if all(b <= a for a, b in zip((patches,) + k, k))
                  and not np.isnan(sum(lm.stage_cost(s, np.array([v]))[0] for s, v in enumerate(k, 1))))
    dense = lm.predict_ms([max(g) for g in grids])
    for budget in np.linspace(fastest, dense + 0.01, 7):
        ref = brute_force(table, "tiny", budget, patches, locations, depth, grids)
        got = solve(lm, budget)
        assert ref is not None
        assert got.information == ref[0], (budget, got, ref)
        assert got.latency_ms == pytest.approx(ref[1], abs=1e-9)
        assert got.latency_ms <= budget + 1e-9
        assert list(got.kept) == sorted(got.kept, reverse=True)


def test_solver_every_count_matches_brute_force():
    patches, depth, locations = 8, 4, (1, 2, 3)
    table = synthetic_table("tiny", depth, patches, tokens=[2, 5, 9, 12], jitter=0.01, seed=3)
    lm = LatencyModel.from_table(table, "tiny", patches, locations, depth)
    grids = [list(range(1, patches + 1))] * 3
    for budget in (0.08, 0.09, 0.1, 0.12):
        ref = brute_force(table, "tiny", budget, patches, locations, depth, grids)
        if ref is None:
            with pytest.raises(InfeasibleError):
                solve(lm, budget, every_count=True)
            continue
        got = solve(lm, budget, every_count=True)
        assert (got.information, got.latency_ms) == (ref[0], pytest.approx(ref[1]))


def test_infeasible_budget_names_fastest():
    table = synthetic_table("deit_t", 12, 196, tokens=range(2, 200, 5))
    lm = LatencyModel.from_table(table, "deit_t", 196, (3, 6, 9), 12)
    with pytest.raises(InfeasibleError) as info:
        solve(lm, 0.01)
    fastest = solve(lm, 1e9).fastest_ms
    assert f"{fastest:.4g} ms" in str(info.value)
    assert solve(lm, fastest).latency_ms == pytest.approx(fastest)


def test_generous_budget_keeps_everything_on_grid():
    table = synthetic_table("deit_t", 12, 196)
    lm = LatencyModel.from_table(table, "deit_t", 196, (3, 6, 9), 12)
    res = solve(lm, 1e9)
    assert res.kept == (196, 196, 196)
    assert res.dense_ms == pytest.approx(res.latency_ms)
    tight = solve(lm, (res.latency_ms + res.fastest_ms) / 2)
    assert tight.latency_ms <= (res.latency_ms + res.fastest_ms) / 2
    assert tight.kept[0] >= tight.kept[1] >= tight.kept[2]
    assert tight.information < res.information


def test_missing_blocks_in_table():
    table = synthetic_table("deit_t", 4, 196)
    with pytest.raises(LutError, match="blocks.4"):
        LatencyModel.from_table(table, "deit_t", 196, (3, 6, 9), 12)
