"""`latprof check` end to end on small tables written with write_lut: reports, exit codes, refusals."""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from latprof.check import report, stats
from latprof.check.cli import check
from latprof.check.compat import check_comparable
from latprof.check.run import interleave, run_check
from latprof.errors import LutError, UsageError
from latprof.lut.table import COLUMNS, LutTable, read_lut, write_lut

PROV = {
    "schema": 1, "device": "s20", "target": "llvm -mtriple=aarch64-linux-android", "engine": "tvm",
    "tuning": "metaschedule:64", "emulated": False, "tvm_version": "0.20.0", "latprof_version": "0.1.0",
    "settings": {"warmup": 5, "repeats": 40, "number": 10, "min_repeat_ms": 50, "cooldown_s": 0, "threads": 4},
    "created": "2026-11-20T10:00:00+00:00",
}
UNITS = [("patch_embed", "fixed", 0, [197], 1.0), ("blocks.0", "tokens", 1, [50, 197], 2.0),
         ("blocks.1", "tokens", 2, [50, 197], 2.0), ("head", "fixed", 3, [1], 0.05)]


def make_table(seed=0, slow=None, n=40, sigma=0.02, prov=None, **prov_changes):
    """A DeiT-like table; `slow` maps unit -> factor. blocks.0/1 share a graph (same samples)."""
    rng = np.random.default_rng(seed)
    slow = slow or {}
    rows, shared = [], {}
    for unit, kind, pos, tokens, base in UNITS:
        for t in tokens:
            key = ("block" if unit.startswith("blocks") else unit, t)
            if key not in shared:
                shared[key] = base * t / 197 * rng.lognormal(0, sigma, n)
            s = shared[key] * slow.get(unit, 1.0)
            med, q1, q3 = np.median(s), np.quantile(s, 0.25), np.quantile(s, 0.75)
            rows.append({"model": "deit_t", "unit": unit, "kind": kind, "position": pos, "tokens": t,
                         "median_ms": med, "q1_ms": q1, "q3_ms": q3, "ci_low_ms": q1, "ci_high_ms": q3,
                         "n_samples": n, "engine": "tvm", "tuning": "metaschedule:64",
                         "graph": f"g-{key[0]}-{t}" + ("-new" if unit in slow else ""),
                         "samples_ms": " ".join(f"{v:.6g}" for v in s)})
    p = dict(prov or PROV)
    p.update(prov_changes)
    return LutTable(pd.DataFrame(rows, columns=COLUMNS), p)


@pytest.fixture
def tables(tmp_path):
    def write(name, **kw):
        return str(write_lut(make_table(**kw), tmp_path / f"{name}.csv"))
    return write


def test_run_check_groups_shared_graphs_and_finds_regression():
    base, cand = make_table(0), make_table(1, slow={"head": 1.2})
    res = run_check(base, cand, "median:5%")
    labels = {(p.label, p.tokens): p.verdict.status for p in res.points}
    assert labels[("blocks.0 (+1 same graph)", 197)] == stats.UNCHANGED
    assert labels[("head", 1)] == stats.REGRESSION
    assert len(res.points) == 4 and res.exit_code == 1
    assert res.regressions[0].units == ["head"]


def test_run_check_global_drift_within_tolerance_is_not_a_regression():
    base = make_table(0)
    cand = make_table(1, slow={u[0]: 1.03 for u in UNITS})  # the whole machine 3% slower
    res = run_check(base, cand, "median:5%")
    assert res.exit_code == 0 and not res.regressions
    assert any("same way" in w for w in res.warnings)


def test_run_check_selection_errors():
    base, cand = make_table(0), make_table(1)
    with pytest.raises(UsageError):
        run_check(base, cand, units=["blocks.99"])
    with pytest.raises(UsageError):
        run_check(base, cand, models=["vit_b"])
    res = run_check(base, cand, units="head,patch_embed")
    assert sorted(p.units[0] for p in res.points) == ["head", "patch_embed"]


def test_missing_candidate_points_are_reported():
    base = make_table(0)
    cand = make_table(1)
    cand = LutTable(cand.frame[cand.frame["unit"] != "head"].reset_index(drop=True), cand.provenance)
    res = run_check(base, cand)
    assert res.missing == ["deit_t/head@1"] and any("not measured" in w for w in res.warnings)


@pytest.mark.parametrize("field,value", [("device", "pixel7"), ("engine", "onnxruntime"), ("target", "llvm"),
                                         ("tuning", "untuned"), ("schema", 2), ("emulated", True)])
def test_incomparable_tables_refused_naming_the_field(field, value):
    base, cand = make_table(0), make_table(1, **{field: value})
    with pytest.raises(LutError, match=field):
        check_comparable(base, cand)


def test_tuning_column_difference_refused():
    base, cand = make_table(0), make_table(1)
    cand.frame["tuning"] = "untuned"
    with pytest.raises(LutError, match="tuning"):
        check_comparable(base, cand)


def test_version_and_settings_changes_are_warnings():
    settings = dict(PROV["settings"], repeats=20)
    warnings = check_comparable(make_table(0), make_table(1, tvm_version="0.21.0", settings=settings))
    assert any("tvm_version" in w for w in warnings) and any("repeats" in w for w in warnings)


def test_missing_required_provenance_refused():
    prov = {k: v for k, v in PROV.items() if k != "target"}
    with pytest.raises(LutError, match="target"):
        check_comparable(make_table(0), make_table(1, prov=prov))


def test_reports_parse():
    res = run_check(make_table(0), make_table(1, slow={"head": 1.2}), "median:5%")
    data = json.loads(report.render(res, "json"))
    assert data["exit_code"] == 1 and data["counts"]["regression"] == 1
    assert {p["status"] for p in data["points"]} <= set(stats.STATUSES)
    root = ET.fromstring(report.render(res, "junit").split("?>", 1)[1])
    assert root.tag == "testsuite" and int(root.get("tests")) == 4 and int(root.get("failures")) == 1
    failed = [c for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed[0].get("name") == "head@1"
    md = report.render(res, "markdown")
    assert "**REGRESSION**" in md and md.count("\n|") >= 6
    term = report.render(res, "terminal")
    assert "REGRESSION" in term and "FAIL" in term
    with pytest.raises(UsageError):
        report.render(res, "html")


def test_junit_marks_noisy_as_skipped_or_failed_when_strict():
    base = make_table(0, n=4, sigma=0.5)
    cand = make_table(1, n=4, sigma=0.5, slow={"head": 1.3})
    res = run_check(base, cand)
    assert res.by_status(stats.NOISY)
    root = ET.fromstring(report.junit(res).split("?>", 1)[1])
    assert int(root.get("skipped")) == len(res.by_status(stats.NOISY))
    res.strict = True
    assert res.exit_code == 1
    root = ET.fromstring(report.junit(res).split("?>", 1)[1])
    assert int(root.get("failures")) >= len(res.by_status(stats.NOISY))


def test_cli_exit_0_without_regression(tables):
    out = CliRunner().invoke(check, ["--baseline", tables("a", seed=0), "--candidate", tables("b", seed=1)])
    assert out.exit_code == 0, out.output
    assert "OK:" in out.output


def test_cli_exit_1_on_regression_and_writes_reports(tables, tmp_path):
    runner = CliRunner()
    args = ["--baseline", tables("a", seed=0), "--candidate", tables("b", seed=1, slow={"blocks.0": 1.25, "blocks.1": 1.25})]
    out = runner.invoke(check, args + ["--format", "json", "--output", str(tmp_path / "r.json")])
    assert out.exit_code == 1, out.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["tolerance"] == "median:5%"  # two tables measured apart: the default that absorbs drift
    reg = [p for p in data["points"] if p["status"] == "regression"]
    assert {p["tokens"] for p in reg} == {50, 197} and reg[0]["units"] == ["blocks.0", "blocks.1"]
    out = runner.invoke(check, args + ["--format", "junit"])
    assert out.exit_code == 1 and ET.fromstring(out.output.split("?>", 1)[1]).get("failures") == "2"
    # a tolerance wider than the slowdown lets it through
    assert runner.invoke(check, args + ["--tolerance", "median:30%"]).exit_code == 0
    # restricting to units that did not change
    assert runner.invoke(check, args + ["--units", "head,patch_embed"]).exit_code == 0


def test_cli_exit_2_on_incomparable_tables(tables):
    out = CliRunner().invoke(check, ["--baseline", tables("a"), "--candidate", tables("b", seed=1, device="pixel7")])
    assert out.exit_code == 2
    assert "device differs" in out.output  # click >= 8.2 mixes stderr into output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [["--tolerance", "median:5"], ["--tokens", "a,b"], ["--device", "pixel7"],
                                   ["--units", "nope"], []])
def test_cli_exit_2_on_usage_errors(tables, extra):
    args = ["--baseline", tables("a")]
    if extra:
        args += ["--candidate", tables("b", seed=1)] + extra
    out = CliRunner().invoke(check, args)  # [] -> no candidate, no --device/--model: must say so
    assert out.exit_code == 2, out.output
    assert out.exception is None or isinstance(out.exception, SystemExit)


def test_cli_exit_2_on_missing_or_bad_table(tmp_path, tables):
    bad = tmp_path / "bad.csv"
    bad.write_text("not a table\n")
    assert CliRunner().invoke(check, ["--baseline", str(bad), "--candidate", tables("b")]).exit_code == 2
    assert CliRunner().invoke(check, ["--baseline", str(tmp_path / "none.csv"), "--candidate", tables("b")]).exit_code == 2
    assert CliRunner().invoke(check, ["--candidate", tables("b")]).exit_code == 2  # --baseline is required


def test_cli_remeasure_path_calls_runner(tables, monkeypatch):
    import types
    import sys as _sys

    calls = []
    cand = make_table(1, slow={"head": 1.3})

    def remeasure_like(baseline_table, device, model, units):
        calls.append((device, model, units))
        return cand

    fake = types.ModuleType("latprof.measure.runner")
    fake.remeasure_like = remeasure_like
    monkeypatch.setitem(_sys.modules, "latprof.measure.runner", fake)
    import latprof.measure as measure_pkg
    monkeypatch.setattr(measure_pkg, "runner", fake, raising=False)
    out = CliRunner().invoke(check, ["--baseline", tables("a"), "--device", "s20", "--model", "deit_t", "--units", "head"])
    assert out.exit_code == 1, out.output
    assert calls == [("s20", "deit_t", ["head"])]
    out = CliRunner().invoke(check, ["--baseline", tables("a"), "--device", "s20", "--model", "deit_t",
                                     "--interleave"])
    assert out.exit_code == 2  # needs --baseline-build


def test_interleave_alternates_abba():
    log = []
    a, b = interleave(lambda: log.append("a") or [1.0, 1.1], lambda: log.append("b") or [2.0], rounds=3)
    assert log == ["a", "b", "b", "a", "a", "b"]
    assert a == [1.0, 1.1] * 3 and b == [2.0] * 3
    with pytest.raises(UsageError):
        interleave(lambda: [1.0], lambda: [1.0], rounds=0)


def test_written_table_roundtrip_keeps_samples(tables):
    t = read_lut(tables("a"))
    assert len(t.samples("deit_t", "head", 1)) == 40
