"""Prediction math on small synthetic tables: sum, interpolation, uncertainty, MACs, parsing, errors."""

import datetime as _dt
import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

from latprof.errors import LutError, UsageError
from latprof.lut.table import read_lut, write_lut
from latprof.models import get_model
from latprof.predict import (Overhead, calibration_age, calibration_scatter, t975, interpolation_error, fit_overhead, format_prediction, model_macs, overhead_path, parse_keep, parse_tokens,
                             budget_on_sum, predict, read_overhead, unit_macs, unit_tokens, write_overhead)
from latprof.schedule import TokenSchedule
from latprof.train.synthetic import synthetic_table

SPEC = get_model("deit_t")
GRID = [17, 50, 99, 150, 197]


def table(grid=GRID, **kw):
    t = synthetic_table(tokens=grid, selectors=True, **kw)
    t.path = "synthetic.csv"
    return t


def expected(unit, n):
    """synthetic_table's own cost model (base + slope x N)."""
    base, slope = {"patch_embed": (0.05, 0.0), "blocks": (0.01, 0.002), "selector": (0.002, 0.0002),
                   "merge": (0.001, 0.0001), "head": (0.003, 0.00005)}[unit.split(".")[0]]
    return base + slope * n


def test_deit_units_have_selectors_and_merges_between_blocks():
    names = [u.name for u in SPEC.units]
    assert names.index("selector.1") == names.index("blocks.2") + 1
    assert names.index("merge.1") == names.index("selector.1") + 1
    assert names.index("blocks.3") == names.index("merge.1") + 1
    assert [u.position for u in SPEC.units] == list(range(len(names)))
    assert {u.shared for u in SPEC.units if u.name.startswith("selector")} == {"selector"}
    assert len(names) == 1 + 12 + 3 + 3 + 1


def test_unit_tokens_follow_the_schedule_convention():
    s = parse_keep("0.7,0.49,0.343", SPEC)
    assert s.kept == (137, 96, 67)
    ns = unit_tokens(SPEC, s)
    assert ns["blocks.2"] == 197 and ns["selector.1"] == 197 and ns["merge.1"] == 197
    assert ns["blocks.3"] == 1 + 137 + 1 and ns["selector.2"] == ns["blocks.5"] == 139
    assert ns["blocks.11"] == ns["head"] == 1 + 67 + 3
    assert ns["patch_embed"] == 197


def test_sum_over_units_at_measured_counts():
    t = table()
    s = TokenSchedule(196, (3, 6, 9), (149, 98, 47), 12)  # blocks at 197, 151, 101, 51: between grid points
    p = predict(t, "deit_t", s)
    want = sum(expected(u, n) for u, n in unit_tokens(SPEC, s).items())
    assert p.sum_ms == pytest.approx(want, rel=1e-6)  # linear costs: interpolation is exact
    assert p.total_ms == p.sum_ms and p.overhead_ms == 0
    assert [u.unit for u in p.units] == [u.name for u in SPEC.units]
    assert len(p.units) == 20


def test_interpolation_is_linear_between_measured_counts():
    t = table()
    # make block latency convex: interpolation must follow the chord, not the true curve
    rows = t.frame["unit"].str.startswith("blocks.")
    t.frame.loc[rows, "median_ms"] = t.frame.loc[rows, "tokens"] ** 2 / 1e4
    t.frame.loc[rows, "q1_ms"] = t.frame.loc[rows, "median_ms"] * 0.9
    t.frame.loc[rows, "q3_ms"] = t.frame.loc[rows, "median_ms"] * 1.1
    s = parse_tokens(",".join(["197"] * 3 + ["120"] * 3 + ["120"] * 3 + ["120"] * 3), SPEC)
    p = predict(t, "deit_t", s)
    b = next(u for u in p.units if u.unit == "blocks.5")
    chord = 99 ** 2 / 1e4 + (120 - 99) / (150 - 99) * (150 ** 2 - 99 ** 2) / 1e4
    assert b.tokens == 120 and b.median_ms == pytest.approx(chord)
    assert b.median_ms > 120 ** 2 / 1e4  # the chord lies above a convex curve
    assert b.q1_ms == pytest.approx(chord * 0.9) and b.q3_ms == pytest.approx(chord * 1.1)
    # interpolated entries are marked as such; measured counts and fixed units are not
    marks = {u.unit: u.measured for u in p.units}
    assert not marks["blocks.5"] and marks["blocks.0"] and marks["patch_embed"]
    text = format_prediction(p)
    assert re.search(r"blocks\.5 +120\*", text) and re.search(r"blocks\.0 +197 ", text) and "* interpolated" in text


def test_uncertainty_shared_graphs_add_linearly_groups_in_quadrature():
    t = table()
    f = t.frame
    f["ci_low_ms"] = f["median_ms"] - 0.01
    f["ci_high_ms"] = f["median_ms"] + 0.03
    f.loc[f["unit"].str.startswith("blocks."), "graph"] = "block-graph"  # one graph for all 12 blocks
    s = parse_keep("0.7,0.49,0.343", SPEC)
    p = predict(t, "deit_t", s)
    # groups: blocks at 4 stage Ns (3 units each) + 8 single units (patch_embed, 3 sel, 3 merge, head)
    lo = math.sqrt(4 * (3 * 0.01) ** 2 + 8 * 0.01 ** 2)
    hi = math.sqrt(4 * (3 * 0.03) ** 2 + 8 * 0.03 ** 2)
    assert p.ci_low_ms == pytest.approx(p.total_ms - lo)
    assert p.ci_high_ms == pytest.approx(p.total_ms + hi)
    assert p.q1_ms == pytest.approx(sum(u.q1_ms for u in p.units))
    assert p.q1_ms < p.total_ms < p.q3_ms


def test_an_unmeasured_count_widens_its_ci_by_the_curves_own_departure_from_a_line():
    xs, ys = [17, 33, 49, 65], [0.3, 0.5, 0.6, 0.8]  # 33 sits 0.05 above the chord 17-49: 11% of 0.45
    assert interpolation_error(xs, [0.1 + 0.01 * x for x in xs], 40) == pytest.approx(0, abs=1e-12)
    assert interpolation_error(xs, ys, 40) == pytest.approx(0.05 / 0.5)  # 33 (0.05 / 0.5), 49 (0.05 / 0.6)
    assert interpolation_error(xs, ys, 20) == pytest.approx(0.05 / 0.5)  # 17 borrows 33's
    assert interpolation_error(xs, ys, 60) == pytest.approx(0.05 / 0.6)  # 65 borrows 49's
    assert interpolation_error([17, 65], [0.3, 0.8], 40) == 0.0  # two counts: no evidence either way

    t = table()
    rows = t.frame["unit"].str.startswith("blocks.")
    t.frame.loc[rows, "median_ms"] = t.frame.loc[rows, "tokens"] ** 2 / 1e4  # convex: off the chord
    t.frame.loc[rows, "ci_low_ms"] = t.frame.loc[rows, "median_ms"] * 0.99
    t.frame.loc[rows, "ci_high_ms"] = t.frame.loc[rows, "median_ms"] * 1.01
    p = predict(t, "deit_t", parse_tokens(",".join(["197"] * 3 + ["150"] * 3 + ["120"] * 6), SPEC))
    at = {u.unit: u for u in p.units}
    assert at["blocks.4"].ci_high_ms == pytest.approx(150 ** 2 / 1e4 * 1.01)  # measured: the table's own CI
    b = at["blocks.8"]
    curve = t.curve("deit_t", "blocks.8")
    h = interpolation_error(curve[0], curve[1], 120) * b.median_ms
    assert h > 0.02 * b.median_ms
    assert b.ci_high_ms == pytest.approx(b.median_ms * 1.01 + h) and b.ci_low_ms == pytest.approx(b.median_ms * 0.99 - h)


def test_dense_macs_match_published_figures():
    # DeiT paper / timm: 1.3 (T), 4.6 (S), 17.6 (B) GFLOPs, counted as multiply-accumulates
    assert model_macs(get_model("deit_t")) / 1e9 == pytest.approx(1.26, rel=0.01)
    assert model_macs(get_model("deit_s")) / 1e9 == pytest.approx(4.6, rel=0.01)
    assert model_macs(get_model("deit_b")) / 1e9 == pytest.approx(17.6, rel=0.01)


def test_pruned_macs_shrink_and_count_spvit_parts():
    s = parse_keep("0.7,0.49,0.343", SPEC)
    pruned = model_macs(SPEC, s)
    assert 0.55 < pruned / model_macs(SPEC) < 0.7
    assert unit_macs(SPEC, "merge.1", 197) == 196 * 192
    assert 0 < unit_macs(SPEC, "selector.1", 197) < unit_macs(SPEC, "blocks.0", 197) / 10
    # block MACs grow quadratically in N (attention)
    b = [unit_macs(SPEC, "blocks.0", n) for n in (50, 100, 200)]
    assert b[2] - b[1] > b[1] - b[0]
    assert predict(table(), "deit_t", s).macs == pruned


@pytest.mark.parametrize("text, msg", [
    ("0.7,0.49", "2 keep ratios for 3 pruning locations"),
    ("0.7,0.49,1.2", "outside (0, 1]"),
    ("0.7,0.49,0", "outside (0, 1]"),
    ("0.5,0.6,0.3", "increase"),
    ("a,b,c", "bad keep ratios"),
])
def test_keep_parsing_errors(text, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse_keep(text, SPEC)


@pytest.mark.parametrize("text, msg", [
    ("197,197", "2 token counts for the 12 blocks"),
    (",".join(["197"] * 4 + ["139"] * 2 + ["99"] * 3 + ["71"] * 3), "different token counts"),
    (",".join(["150"] * 3 + ["139"] * 3 + ["99"] * 3 + ["71"] * 3), "see all 197 tokens"),
    (",".join(["197"] * 3 + ["139"] * 3 + ["99"] * 3 + ["3"] * 3), "no patch token"),
])
def test_tokens_parsing_errors(text, msg):
    with pytest.raises(UsageError, match=msg):
        parse_tokens(text, SPEC)


def test_tokens_and_keep_give_the_same_schedule():
    s = parse_keep("0.7,0.49,0.343", SPEC)
    assert parse_tokens(",".join(map(str, s.block_tokens())), SPEC) == s


def test_outside_the_table_range_is_an_error():
    t = table(grid=[50, 99, 150, 197])
    with pytest.raises(LutError, match=r"blocks.9: 16 tokens is outside the table's measured range 50..197"):
        predict(t, "deit_t", parse_keep("0.7,0.49,0.06", SPEC))


def test_table_without_spvit_units_is_an_error():
    t = synthetic_table(tokens=GRID, selectors=False)
    with pytest.raises(LutError, match="no rows for deit_t units"):
        predict(t, "deit_t", parse_keep("0.7,0.49,0.343", SPEC))


def test_overhead_sidecar_roundtrip_and_correction(tmp_path):
    t = table()
    lut = tmp_path / "dev.csv"
    write_lut(t, lut)
    t = read_lut(lut)
    assert read_overhead(lut, "deit_t", t) is None
    write_overhead(lut, Overhead(per_call_ms=0.01, scale=1.1, residual_ms=0.05, model="deit_t", engine="tvm",
                                 tuning="untuned"))
    assert overhead_path(lut, "deit_t").name == "dev.deit_t.overhead.json"
    oh = read_overhead(lut, "deit_t", t)
    p = predict(t, "deit_t", parse_keep("0.7,0.49,0.343", SPEC), oh)
    assert p.total_ms == pytest.approx(1.1 * (p.sum_ms - 19 * 0.01) + 0.05)
    assert p.ci_low_ms < p.total_ms < p.ci_high_ms and p.q1_ms < p.total_ms < p.q3_ms
    with pytest.raises(LutError, match="calibrated with --stat median, not min"):
        read_overhead(lut, "deit_t", t, "min")
    # the device ran 4% slower during the calibration than during the table: predictions are of the device
    # as the calibration found it, the CI scaled with them, and a budget on them inverts exactly
    write_overhead(lut, Overhead(per_call_ms=0.01, scale=1.1, residual_ms=0.05, drift=1.04, model="deit_t",
                                 engine="tvm", tuning="untuned"))
    oh = read_overhead(lut, "deit_t", t)
    q = predict(t, "deit_t", parse_keep("0.7,0.49,0.343", SPEC), oh)
    assert q.total_ms == pytest.approx(1.04 * p.total_ms) and oh.at_table(q.sum_ms, 20) == pytest.approx(p.total_ms)
    assert q.ci_high_ms - q.total_ms == pytest.approx(1.04 * (p.ci_high_ms - p.total_ms))
    assert budget_on_sum(q.total_ms, oh, 20) == pytest.approx(q.sum_ms)
    assert "x 1.040 machine drift" in format_prediction(q)
    # its age is shown, and past an hour the prediction says what it is of and how to renew it
    made = _dt.datetime.fromisoformat(oh.created)
    fresh = format_prediction(q, now=made + _dt.timedelta(minutes=30))
    old = format_prediction(q, now=made + _dt.timedelta(hours=3))
    assert f"calibrated {oh.created} (0.5 h ago)" in fresh and "recalibrate" not in fresh
    assert f"calibrated {oh.created} (3.0 h ago); " in old and "latprof validate --calibrate --model deit_t" in old
    assert calibration_age(Overhead()) is None  # a sidecar without its time: no age claimed
    data = json.loads(overhead_path(lut, "deit_t").read_text())
    del data["drift"]  # written before the calibration kept its drift: the table's moment, as then
    overhead_path(lut, "deit_t").write_text(json.dumps(data))
    assert read_overhead(lut, "deit_t", t).drift == 1.0
    write_overhead(lut, Overhead(per_call_ms=0.01, model="deit_t", engine="onnxruntime", tuning="none"))
    with pytest.raises(LutError, match="calibrated for onnxruntime/none"):
        read_overhead(lut, "deit_t", t)
    overhead_path(lut, "deit_t").write_text("{not json")
    with pytest.raises(LutError, match="unreadable overhead sidecar"):
        read_overhead(lut, "deit_t", t)


def _fit(xs, ys, per_call=0.0, calls=1):
    oh = fit_overhead(xs, ys, calls, per_call, model="deit_t")
    return oh, [oh.apply(x, calls) for x in xs]


def test_overhead_fit_finds_the_terms_that_made_the_data():
    xs = [6.0, 7.5, 9.0, 11.0, 13.0]
    oh, _ = _fit(xs, [1.2 * x for x in xs])  # pure scale (activations, as Swin with onnxruntime)
    assert oh.scale == pytest.approx(1.2) and oh.residual_ms == pytest.approx(0, abs=1e-9) and oh.spread < 1e-9
    oh, _ = _fit(xs, [x + 1.0 for x in xs])  # pure constant (weights reloaded, as DeiT-T with tuned TVM)
    assert oh.scale == pytest.approx(1.0) and oh.residual_ms == pytest.approx(1.0)
    oh, _ = _fit(xs, [1.1 * x + 0.5 for x in xs])  # both
    assert oh.scale == pytest.approx(1.1) and oh.residual_ms == pytest.approx(0.5) and oh.n_configs == 5
    # the per-call cost of every unit call but one is taken off the sum before the fit
    oh, pred = _fit([x + 19 * 0.01 for x in xs], [1.1 * x + 0.5 for x in xs], per_call=0.01, calls=20)
    assert oh.scale == pytest.approx(1.1) and oh.residual_ms == pytest.approx(0.5)
    assert pred == pytest.approx([1.1 * x + 0.5 for x in xs])


def test_the_prediction_interval_adds_the_calibrations_scatter_as_students_t():
    assert [t975(d) for d in (1, 4, 10)] == [12.706, 2.776, 2.228]
    assert t975(11) == pytest.approx(2.201, abs=1e-3) and t975(30) == pytest.approx(2.042, abs=1e-3)
    assert t975(10 ** 6) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError):
        t975(0)
    assert calibration_scatter([1.1, 0.9], [1.0, 1.0], 1) == pytest.approx(math.sqrt(0.02))
    assert calibration_scatter([1.1], [1.0], 0) == 0.0
    # the fit spends its degrees of freedom: two for a free line, one for a pure scale or constant
    xs = [6.0, 7.5, 9.0, 11.0, 13.0, 15.0]
    noise = [0.02, -0.03, 0.01, 0.03, -0.02, -0.01]
    oh = fit_overhead(xs, [(1.1 * x + 0.5) * (1 + e) for x, e in zip(xs, noise)], 1)
    assert oh.dof == 4 and 0.01 < oh.rel_sd < 0.05
    assert fit_overhead(xs, [1.2 * x for x in xs], 1).dof == 5
    assert fit_overhead([5.0], [6.0], 1).dof == 0
    # in the prediction: the CI and t x sd x sqrt(1 + 1/n) x value, in quadrature; without scatter, the CI
    t = table()
    s = parse_keep("0.7,0.49,0.343", SPEC)
    plain = predict(t, "deit_t", s, Overhead(scale=1.1, residual_ms=0.05))
    assert (plain.pi_low_ms, plain.pi_high_ms) == (plain.ci_low_ms, plain.ci_high_ms)
    p = predict(t, "deit_t", s, Overhead(scale=1.1, residual_ms=0.05, rel_sd=0.03, dof=4, n_configs=6))
    half = 2.776 * 0.03 * math.sqrt(1 + 1 / 6) * p.total_ms
    assert p.total_ms == plain.total_ms and p.ci_high_ms == plain.ci_high_ms
    assert p.pi_high_ms - p.total_ms == pytest.approx(math.hypot(plain.ci_high_ms - p.total_ms, half))
    assert p.total_ms - p.pi_low_ms == pytest.approx(math.hypot(p.total_ms - plain.ci_low_ms, half))
    assert "95% prediction interval" in format_prediction(p) and "3.0% scatter, 4 dof" in format_prediction(p)
    assert "prediction interval" not in format_prediction(plain)


def test_overhead_fit_is_never_unphysical_nor_worse_than_a_scale():
    xs = [60.0, 62.0, 64.0]
    # a line with a negative constant (or a scale below 1 with a large constant) extrapolates badly
    # from a narrow range of sums: not taken
    oh, _ = _fit(xs, [1.5 * x - 20 for x in xs])
    assert oh.residual_ms == 0 and oh.scale == pytest.approx(sum(1.5 - 20 / x for x in xs) / 3, rel=0.01)
    oh, _ = _fit(xs, [0.3 * x + 50 for x in xs])
    assert oh.residual_ms >= 0 and oh.scale >= 1
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = sorted(rng.uniform(5, 15, 4))
        y = [xi * rng.uniform(1.0, 1.3) + rng.uniform(0, 1.5) for xi in x]
        oh, pred = _fit(x, y)
        s = sum(xi / yi for xi, yi in zip(x, y)) / sum((xi / yi) ** 2 for xi, yi in zip(x, y))  # best pure scale
        err = sum((p / yi - 1) ** 2 for p, yi in zip(pred, y))
        assert err <= sum((s * xi / yi - 1) ** 2 for xi, yi in zip(x, y)) + 1e-9
        assert oh.residual_ms >= 0 and (oh.residual_ms == 0 or oh.scale >= 1)
        assert oh.spread == pytest.approx(float(np.median([abs(p / yi - 1) for p, yi in zip(pred, y)])))
    oh, _ = _fit([8.0], [9.0])  # one schedule: a scale, as calibrations were before the constant
    assert oh.scale == pytest.approx(9 / 8) and oh.residual_ms == 0
    with pytest.raises(ValueError):
        _fit([], [])


def test_a_calibration_is_one_models(tmp_path):
    """One device's table holds every model measured on it; each model's end to end relates to its units
    by its own scale, so a calibration of one is never applied to another."""
    import json

    import pandas as pd

    from latprof.lut.table import LutTable

    deit = table()
    other = deit.frame.assign(model="vit_x")
    both = LutTable(pd.concat([deit.frame, other], ignore_index=True), deit.provenance)
    lut = tmp_path / "dev.csv"
    write_lut(both, lut)
    t = read_lut(lut)
    write_overhead(lut, Overhead(per_call_ms=0.01, scale=1.3, model="deit_t", engine="tvm", tuning="untuned"))
    assert read_overhead(lut, "deit_t", t).scale == 1.3
    assert read_overhead(lut, "vit_x", t) is None  # not calibrated: the plain sum, said as such
    with pytest.raises(ValueError):
        write_overhead(lut, Overhead(scale=1.3))
    # a sidecar from before calibrations were per model: taken for a one-model table, refused for a shared one
    unkeyed = lut.with_name("dev.overhead.json")
    overhead_path(lut, "deit_t").rename(unkeyed)
    with pytest.raises(LutError, match="recalibrate"):
        read_overhead(lut, "deit_t", t)
    single = tmp_path / "one.csv"
    write_lut(deit, single)
    data = json.loads(unkeyed.read_text())
    del data["model"]
    single.with_name("one.overhead.json").write_text(json.dumps(data))
    oh = read_overhead(single, "deit_t", read_lut(single))
    assert oh.scale == 1.3 and oh.model == "deit_t"


def test_table_statistic_reads_raw_samples():
    from latprof.predict import table_statistic

    t = table()
    lo = table_statistic(t, "min")
    assert np.allclose(lo.frame["median_ms"], t.frame["median_ms"] * 0.98)  # synthetic samples: 0.98, 1, 1.02 x
    s = parse_keep("0.7,0.49,0.343", SPEC)
    assert predict(lo, "deit_t", s).sum_ms == pytest.approx(0.98 * predict(t, "deit_t", s).sum_ms)
    assert table_statistic(t, "median") is t
    with pytest.raises(UsageError, match="unknown statistic"):
        table_statistic(t, "mean")


def _cli(*args):
    from latprof.cli import main

    return CliRunner().invoke(main, list(args))


def test_predict_command(tmp_path):
    lut = tmp_path / "dev.csv"
    write_lut(table(), lut)
    out = _cli("predict", "--lut", str(lut), "--model", "deit_t", "--keep", "0.7,0.49,0.343")
    assert out.exit_code == 0, out.output
    s = parse_keep("0.7,0.49,0.343", SPEC)
    want = sum(expected(u, n) for u, n in unit_tokens(SPEC, s).items())
    assert f"predicted latency {want:.3f} ms" in out.output
    assert "selector.2" in out.output and "GMACs" in out.output and "1.254 GMACs" in out.output
    out = _cli("predict", "--lut", str(lut), "--model", "deit_t", "--tokens", ",".join(map(str, s.block_tokens())), "--brief")
    assert out.exit_code == 0 and f"predicted latency {want:.3f} ms" in out.output and "selector.2" not in out.output


@pytest.mark.parametrize("args, msg", [
    (["--model", "deit_x", "--keep", "0.7,0.49,0.343"], "unknown model 'deit_x'"),
    (["--model", "deit_t", "--keep", "0.7,0.8,0.3"], "increase"),
    (["--model", "deit_t", "--keep", "0.7,0.49,0.01"], "outside the table's measured range"),
    (["--model", "deit_t"], "exactly one of --keep and --tokens"),
])
def test_predict_errors_are_one_line(tmp_path, args, msg):
    lut = tmp_path / "dev.csv"
    write_lut(table(), lut)
    out = _cli("predict", "--lut", str(lut), *args)
    assert out.exit_code == 2, out.output
    assert msg in out.output and "fix:" in out.output
    assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output


def test_malformed_table_is_one_line(tmp_path):
    lut = tmp_path / "bad.csv"
    lut.write_text("model,unit\ndeit_t,blocks.0\n")
    out = _cli("predict", "--lut", str(lut), "--model", "deit_t", "--keep", "0.7,0.49,0.343")
    assert out.exit_code == 2 and "not a latprof table" in out.output and len(out.output.strip().splitlines()) == 1
