"""Validation: random schedules inside the table, and one real end-to-end run with onnxruntime."""

import json
import statistics

import numpy as np
import pytest

from latprof.errors import LutError, UsageError
from latprof.models import get_model
from latprof.predict import read_overhead, schedule_of, unit_tokens
from latprof.train.synthetic import synthetic_table
from latprof.validate import _table_trials, random_schedules
from tests.conftest import write_config

SPEC = get_model("deit_t")


def test_random_schedules_stay_inside_the_grid():
    t = synthetic_table(tokens=[17, 50, 99, 197], selectors=True)
    scheds = random_schedules(t, SPEC, 30, seed=3)
    assert len({s.kept for s in scheds}) == 30
    for s in scheds:
        assert list(s.kept) == sorted(s.kept, reverse=True)
        assert all(17 <= n <= 197 for n in unit_tokens(SPEC, s).values())
    assert [s.kept for s in random_schedules(t, SPEC, 30, seed=3)] == [s.kept for s in scheds]  # seeded
    spread = [s.kept[-1] for s in scheds]
    assert max(spread) - min(spread) > 50  # light to heavy pruning


def test_random_schedules_need_the_dense_count():
    t = synthetic_table(tokens=[17, 50, 99, 150], selectors=True)
    with pytest.raises(LutError, match="needs 197"):
        random_schedules(t, SPEC, 3)


def test_tuning_labels():
    assert _table_trials("untuned") == 0 and _table_trials("none") == 0
    assert _table_trials("metaschedule:16") == 16 and _table_trials("metaschedule:64@17+99+197") == 64
    with pytest.raises(LutError):
        _table_trials("autotvm")


def test_end_to_end_validation_onnxruntime(workdir, tmp_path):
    """Measure a small grid, build the table, validate K=3 whole pruned models, resume, calibrate."""
    from click.testing import CliRunner

    from latprof.cli import main
    from latprof.lut.build import build_and_write
    from latprof.measure.runner import measure, store_path
    from latprof.validate import validate

    cfg = write_config(tmp_path / "ort.yaml", name="ortval", engine="onnxruntime", threads=1,
                       measure={"repeats": 7, "number": 0, "min_repeat_ms": 5, "rounds": 3})
    measure(str(cfg), "deit_t", [17, 50, 99, 197], progress=False)
    lut = tmp_path / "luts" / "ortval.csv"
    table = build_and_write(store_path(workdir, "ortval"), lut)
    assert {"selector.1", "merge.3"} <= set(table.units("deit_t"))

    v = validate(str(cfg), "deit_t", lut, configs=3, seed=0, progress=False, plot=tmp_path / "v.png", echo=lambda *a: None)
    assert len(v.configs) == 3 and v.engine == "onnxruntime"
    lines = [json.loads(l) for l in v.results_path.read_text().splitlines()]
    # 3 visits per model (measure.rounds), each round starting a third further into the list
    s0, s1, s2 = (c.kept for c in v.configs)
    assert [l["kept"] for l in lines] == [s0, s1, s2, s1, s2, s0, s2, s0, s1]
    assert len({l["run"] for l in lines}) == 1 and {l["rounds"] for l in lines} == {3}
    for c in v.configs:
        assert c.measured_ms > 0 and c.predicted_ms == c.sum_ms > 0
        # same order of magnitude as the sum of units (within 10x either way: this only checks the
        # pipeline; fidelity is measured by benchmarks/fidelity.py, where load is controlled)
        assert np.isfinite(c.error) and -0.9 < c.error < 9.0
        # ceil(7 / 3) samples per visit, all three visits' samples together
        assert sorted(c.samples_ms) == sorted(x for l in lines if l["kept"] == c.kept for x in l["samples_ms"])
        assert len(c.samples_ms) == 9 and c.measured_ms == statistics.median(c.samples_ms)
    rec = lines[0]
    assert rec["kept"] == v.configs[0].kept and rec["engine"] == "onnxruntime"
    # the reference unit (a block at N=197) is re-measured with every visit: drift against the table
    assert [r["unit"] for r in rec["refs"]] == ["blocks.0"] and len(rec["refs"][0]["samples_ms"]) == 3
    # ... right before and right after the model; the after of one visit is the before of the next
    nxt = lines[1]
    assert len(rec["refs"][0]["after_ms"]) == 3 and nxt["refs"][0]["samples_ms"] == rec["refs"][0]["after_ms"]
    assert v.has_drift and all(0.2 < c.drift < 5 for c in v.configs)
    assert all(c.corrected_ms == pytest.approx(c.measured_ms / c.drift) for c in v.configs)
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"

    # resumable: nothing measured again
    again = validate(str(cfg), "deit_t", lut, configs=3, seed=0, progress=False, echo=lambda *a: None)
    assert len(v.results_path.read_text().splitlines()) == 9
    assert [c.measured_ms for c in again.configs] == [c.measured_ms for c in v.configs]
    assert again.retest == []  # a resumed record is not a second measurement of itself

    # a pass cut off before its last two visits (and mid-line) is finished under its own id: only those
    # two visits are taken, the schedule measured in full is not touched
    text = v.results_path.read_text().splitlines(keepends=True)
    v.results_path.write_text("".join(text[:7]) + text[7][:20])
    said = []
    cut = validate(str(cfg), "deit_t", lut, configs=3, seed=0, progress=False, echo=said.append)
    tail = [json.loads(l) for l in v.results_path.read_text().splitlines()[7:] if l.startswith("{") and l.endswith("}")]
    assert sorted(l["kept"] for l in tail) == sorted([s0, s1]) and {l["run"] for l in tail} == {lines[0]["run"]}
    assert "1 of 3 schedules already measured" in said[0] and "2 part-way" in said[0]
    assert cut.configs[2].measured_ms == v.configs[2].measured_ms and all(len(c.samples_ms) == 9 for c in cut.configs)
    assert cut.retest == []
    base = 7 + 1 + 2  # lines in the results file now, the cut one included

    # calibration writes the sidecar that predictions then use; with `alongside`, two more schedules
    # (seed 2) are measured in the same pass, interleaved with its own, and a validation of them resumes
    cal = validate(str(cfg), "deit_t", lut, configs=2, seed=1, calibrate=True, progress=False, echo=lambda *a: None,
                   stat="min", alongside=2, alongside_seed=2)
    own = [list(c.kept) for c in cal.configs]
    others = [list(s.kept) for s in random_schedules(table, SPEC, 2, seed=2)]
    lines = [json.loads(l) for l in v.results_path.read_text().splitlines()[base:]]
    assert len(lines) == 4 * 3 and len(cal.configs) == 2
    assert [l["kept"] for l in lines[:4]] == [others[0], own[0], others[1], own[1]]
    later = validate(str(cfg), "deit_t", lut, configs=2, seed=2, progress=False, echo=lambda *a: None, stat="min")
    assert len(v.results_path.read_text().splitlines()) == base + 12 and [c.kept for c in later.configs] == others
    assert [c.measured_ms for c in later.configs] == [min(x for l in lines if l["kept"] == k for x in l["samples_ms"])
                                                      for k in others]
    oh = read_overhead(lut, "deit_t", table)
    assert oh is not None and oh.n_configs == 2 and 0 < oh.per_call_ms < 1.0 and oh.statistic == "min"
    assert 0.5 < oh.scale < 3.0
    for c in cal.configs:  # in sample: the calibrated prediction, whose median relative error is the spread
        assert c.measured_ms == min(c.samples_ms)
        calls = len(unit_tokens(get_model("deit_t"), schedule_of(get_model("deit_t"), c.kept)))
        assert c.predicted_ms == pytest.approx(oh.apply(c.sum_ms, calls))
    # scale and constant are fitted at the table's machine state; the calibration's own drift is one factor
    assert oh.spread == pytest.approx(statistics.median(abs(c.corrected_error) for c in cal.configs))
    assert oh.drift == pytest.approx(statistics.median(c.drift for c in cal.configs)) and oh.drift != 1.0
    assert all(c.at_table_ms * oh.drift == pytest.approx(c.predicted_ms) for c in cal.configs)
    assert all(c.machine == oh.drift for c in later.configs)
    assert cal.per_call_ms == oh.per_call_ms
    out = CliRunner().invoke(main, ["predict", "--lut", str(lut), "--model", "deit_t", "--keep", "0.7,0.49,0.343"])
    assert out.exit_code == 0 and "overhead correction" in out.output, out.output

    # --again: the same schedules in a new pass, with the repeatability against the first; cut off, a
    # rerun with --again finishes that pass rather than starting a third
    n0 = len(v.results_path.read_text().splitlines())
    a = validate(str(cfg), "deit_t", lut, configs=3, seed=0, progress=False, echo=lambda *a: None, stat="min", again=True)
    new = [json.loads(l) for l in v.results_path.read_text().splitlines()[n0:]]
    assert len(new) == 9 and len({l["run"] for l in new}) == 1 and new[0]["run"] != lines[0]["run"]
    assert sorted(r.kept for r in a.retest) == sorted(c.kept for c in v.configs)
    v.results_path.write_text("".join(v.results_path.read_text().splitlines(keepends=True)[:n0 + 4]))
    said = []
    b = validate(str(cfg), "deit_t", lut, configs=3, seed=0, progress=False, echo=said.append, stat="min", again=True)
    new = [json.loads(l) for l in v.results_path.read_text().splitlines()[n0:]]
    assert len(new) == 9 and {l["run"] for l in new} == {new[0]["run"]} and "finishing the pass" in said[0]
    assert all(len(c.samples_ms) == 9 for c in b.configs) and len(b.retest) == 3


def _write_synthetic(tmp_path):
    from latprof.lut.table import write_lut

    t = synthetic_table(tokens=[17, 50, 99, 197], selectors=True)  # engine tvm, tuning untuned
    t.provenance.update(device="testdev", engine="tvm", tuning="untuned")
    return write_lut(t, tmp_path / "syn.csv")


@pytest.mark.parametrize("extra, msg", [
    (["--model", "deit_x"], "unknown model 'deit_x'"),
    (["--model", "deit_s"], "no rows for model 'deit_s'"),
    (["--model", "deit_t", "--configs", "0"], "--configs 0"),
    (["--model", "deit_t", "--stat", "mean"], "unknown statistic 'mean'"),
    (["--model", "deit_t", "--alongside", "3"], "--alongside 3 without --calibrate"),
    (["--model", "deit_t", "--calibrate", "--alongside", "3"], "--alongside with --seed 0"),
])
def test_validate_errors_are_one_line(workdir, tmp_path, extra, msg):
    from click.testing import CliRunner

    from latprof.cli import main

    lut = _write_synthetic(tmp_path)
    cfg = write_config(tmp_path / "dev.yaml")
    out = CliRunner().invoke(main, ["validate", "--device", str(cfg), "--lut", str(lut), "-q", *extra])
    assert out.exit_code == 2, out.output
    assert msg in out.output and "Traceback" not in out.output
    assert len([l for l in out.output.strip().splitlines() if l.startswith("error")]) == 1


def test_interleaved_spreads_the_shorter_evenly():
    from latprof.validate import interleaved

    assert interleaved([], [1, 2]) == [1, 2] and interleaved(["a"], []) == ["a"]
    assert interleaved(["a", "b", "c"], [1, 2, 3]) == [1, "a", 2, "b", 3, "c"]
    out = interleaved(list("abcdef"), list(range(20)))
    assert sorted(map(str, out)) == sorted(map(str, [*"abcdef", *range(20)]))
    assert [x for x in out if isinstance(x, int)] == list(range(20))  # each list keeps its order
    gaps = [i for i, x in enumerate(out) if isinstance(x, str)]
    assert gaps[0] <= 2 and gaps[-1] >= 22 and max(b - a for a, b in zip(gaps, gaps[1:])) <= 5


def test_retest_pairs_each_model_with_its_latest_earlier_measurement():
    """Repeatability: the same graph (engine, tuning) measured before, under any table."""
    from latprof.validate import ConfigResult, Retest, format_retest, retests

    def rec(graph, time, ms, ref_ms, tuning="metaschedule:16"):
        return {"graph": graph, "tuning": tuning, "engine": "tvm", "time": f"2026-11-24T{time}:00+00:00",
                "samples_ms": [ms, ms * 1.1, ms * 1.2], "ref_samples_ms": [ref_ms] * 3}

    now_a, now_b = rec("a", "10:30", 10.4, 2.08), rec("b", "10:31", 5.0, 2.0)
    history = [rec("a", "09:00", 8.0, 1.0), rec("a", "10:00", 10.0, 2.0), now_a,  # latest earlier: 10:00
               rec("a", "10:10", 1.0, 1.0, tuning="untuned"),                       # another compiled model
               rec("c", "10:20", 5.0, 2.0)]                                          # another graph
    cs = [ConfigResult(0, [150], [], 0, 0, 0, 0, 0, 0, 0, recorded=now_a),
          ConfigResult(1, [120], [], 0, 0, 0, 0, 0, 0, 0, recorded=now_b)]  # b: never measured before
    (r,) = retests(cs, history, "min")
    assert r.kept == [150] and r.minutes == pytest.approx(30)
    assert r.error == pytest.approx(0.04) and r.drift_error == pytest.approx(0.0)  # the machine was 4% slower
    (m,) = retests(cs, history, "median")
    assert m.error == pytest.approx(0.04)
    far = Retest([99], 300.0, -0.08, None)
    line = format_retest([r, far])
    assert "2 of these compiled models" in line and "(30-300 min earlier)" in line
    assert "50% within ±5%, 100% within ±10%" in line and "reference unit" not in line  # one pair has no reference
    assert "reference units: 100% within ±5%" in format_retest([r])


def test_on_grid_schedules_are_the_solvers_candidates():
    t = synthetic_table(tokens=[17, 50, 99, 130, 160, 197], selectors=True)
    scheds = random_schedules(t, SPEC, 15, seed=1, on_grid=True)
    assert len({s.kept for s in scheds}) == 15
    for s in scheds:
        assert list(s.kept) == sorted(s.kept, reverse=True)
        assert set(unit_tokens(SPEC, s).values()) <= {17, 50, 99, 130, 160, 197}  # nothing interpolated
    assert [s.kept for s in random_schedules(t, SPEC, 15, seed=1, on_grid=True)] == [s.kept for s in scheds]
    with pytest.raises(UsageError, match="fewer than 60 distinct"):  # 6 counts: at most 56 schedules
        random_schedules(t, SPEC, 60, on_grid=True)


def test_drift_corrected_shares_compare_both_sides_at_the_tables_moment():
    """A calibration taken while the device ran 8% slower than during the table predicts 8% more: as
    measured that is right, and against end to end corrected by its references the prediction is taken
    back to the table's moment too, so the corrected share does not count the drift twice."""
    from pathlib import Path

    from latprof.validate import ConfigResult, ValidationResult

    errs = [0.0, 0.03, -0.04]
    cs = [ConfigResult(i, [i], [], x, 1.08 * x, 1.08 * x * (1 + e), 0, 0, 0, 0, drift=1.08, machine=1.08)
          for i, (x, e) in enumerate(zip([10.0, 20.0, 30.0], errs))]
    v = ValidationResult("d", "deit_t", "tvm", "untuned", cs, None, Path("r.jsonl"))
    assert [c.corrected_error for c in cs] == pytest.approx([1 / (1 + e) - 1 for e in errs])
    assert v.within(0.05) == 1 and v.within(0.05, drift=True) == 1
    for c in cs:
        c.machine = 1.0  # as if the drift stayed in the prediction: +8%, +4.9%, +12.5% against the corrected
    assert v.within(0.05, drift=True) == pytest.approx(1 / 3)


def test_the_report_counts_the_schedules_measured_inside_their_interval():
    from pathlib import Path

    from latprof.predict import Overhead
    from latprof.validate import ConfigResult, ValidationResult, format_validation

    # measured 10.0 each; intervals: around it, just below it, touching it from above
    cis = [(9.5, 10.5), (9.0, 9.9), (10.0, 10.4)]
    cs = [ConfigResult(i, [100], [], 10.0, 10.0, 10.0, 9.8, 10.2, lo, hi) for i, (lo, hi) in enumerate(cis)]
    v = ValidationResult("d", "deit_t", "tvm", "untuned", cs, None, Path("r.jsonl"))
    assert v.inside_interval() == 2
    assert "measured inside the prediction's 95% CI (the table's noise and interpolation): 2 of 3" in format_validation(v)
    assert "prediction interval" not in format_validation(v)  # no calibration, no scatter: no second count
    for c, (lo, hi) in zip(cs, [(9.0, 9.99), (9.0, 11.0), (10.0, 10.0)]):
        c.pi_low_ms, c.pi_high_ms = lo, hi
    v.overhead = Overhead(rel_sd=0.031, dof=4, n_configs=6)
    assert v.inside_prediction_interval() == 2
    assert "inside the 95% prediction interval (the CI and the calibration's scatter, 3.1%, 4 dof): 2 of 3" in format_validation(v)
