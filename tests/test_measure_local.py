"""The local vertical slice with the real TVM and a real RPC server process, on a small grid."""

import collections
import json
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from latprof.errors import DeviceError
from latprof.lut.build import build_and_write
from latprof.lut.table import read_lut
from latprof.measure.runner import measure, store_path
from latprof.models import get_model
from tests.conftest import write_config


def expected_points(tokens):
    """Graphs measured for deit_t: fixed units once, every other shared graph at each N."""
    spec = get_model("deit_t")
    shared = {u.shared: u.kind for u in spec.units}
    return sum(1 if kind == "fixed" else len(tokens) for kind in shared.values()), spec


def test_measure_build_lut_and_resume(workdir, tmp_path):
    cfg = write_config(tmp_path / "dev.yaml")
    result = measure(str(cfg), "deit_t", [9, 17], progress=False)
    n_points, spec = expected_points([9, 17])
    assert (result.measured, result.skipped) == (n_points, 0)
    records = [json.loads(line) for line in store_path(workdir, "testdev").read_text().splitlines()]
    points = [r for r in records if not r["reference"]]
    # a point taken while the reference moved past 5% is measured once more (drift_retries: 1)
    keys = collections.Counter(r["key"] for r in points)
    assert len(keys) == n_points and max(keys.values()) <= 2 and all(len(r["samples_ms"]) == 5 for r in points)
    assert all(r["max_abs_err"] < 2e-3 for r in points)  # the device's output matched onnxruntime
    assert any(r["reference"] for r in records)  # drift reference re-measured
    # a rerun measures nothing and compiles nothing
    libs = sorted((workdir / "libs").iterdir())
    again = measure(str(cfg), "deit_t", [9, 17], progress=False)
    assert (again.measured, again.skipped) == (0, n_points)
    assert sorted((workdir / "libs").iterdir()) == libs
    # cleaned: nothing is measured again, and graphs and libraries come back under the same names
    from latprof.devices.config import load_config
    from latprof.measure.runner import compile_graphs, export_graphs, make_engine
    from latprof.measure.workdir import clean
    from latprof.progress import bar_factory

    assert {p.name for p in clean(workdir)} == {"graphs", "libs"} and not (workdir / "libs").exists()
    again = measure(str(cfg), "deit_t", [9, 17], progress=False)
    assert (again.measured, again.skipped) == (0, n_points)
    bars = bar_factory(False)
    eng = make_engine("tvm", load_config(str(cfg)), spec, workdir)
    compile_graphs(eng, spec, export_graphs(spec, [9, 17], workdir, bars), workdir, bars)
    assert sorted((workdir / "libs").iterdir()) == libs

    table = build_and_write(store_path(workdir, "testdev"), tmp_path / "luts" / "testdev.csv")
    t = read_lut(tmp_path / "luts" / "testdev.csv")
    # a row per unit and N although the twelve blocks were measured once per N
    assert len(t.frame) == sum(1 if u.kind == "fixed" else 2 for u in spec.units)
    assert t.provenance["device"] == "testdev" and t.provenance["tuning"] == "untuned"
    assert t.provenance["tvm_version"] == "0.27.0.post1"
    b0, b11 = t.curve("deit_t", "blocks.0"), t.curve("deit_t", "blocks.11")
    assert list(b0[0]) == [9, 17] and np.allclose(b0[1], b11[1])
    assert (t.frame["n_samples"] == 5).all()
    assert table.provenance["settings"]["threads"] == 1


def test_points_between_references_that_disagree_are_measured_again(workdir, tmp_path):
    """With a zero tolerance every bracket disagrees: each point is measured once more, and no more
    (drift_retries: 1); the table takes the newest samples; the policy is not part of the settings."""
    from latprof.devices.config import load_config

    cfg = write_config(tmp_path / "dev.yaml", measure={"reference_every": 2, "drift_tolerance": 0.0, "drift_retries": 1})
    lines = []
    result = measure(str(cfg), "deit_t", [9], progress=False, echo=lines.append)
    n_points, _ = expected_points([9])
    records = [json.loads(line) for line in store_path(workdir, "testdev").read_text().splitlines()]
    points = [r for r in records if not r["reference"]]
    assert result.measured == n_points
    assert sorted(collections.Counter(r["key"] for r in points).values()) == [2] * n_points
    assert any(f"measured {n_points} points again" in line for line in lines)
    # every point's last samples have a reference after them (the closing one)
    assert records[-1]["reference"]
    table = build_and_write(store_path(workdir, "testdev"), tmp_path / "t.csv", drift_correction=False)
    last = {r["tokens"]: r for r in points if r["unit"] == "block"}[9]
    row = table.frame[(table.frame["unit"] == "blocks.0") & (table.frame["tokens"] == 9)].iloc[0]
    assert row["median_ms"] == pytest.approx(float(np.median(last["samples_ms"])))
    assert "drift_retries" not in load_config(str(cfg)).settings()


def test_onnxruntime_engine(workdir, tmp_path):
    cfg = write_config(tmp_path / "ort.yaml", name="ortdev", engine="onnxruntime")
    result = measure(str(cfg), "deit_t", [17, 33], progress=False)
    assert result.engine == "onnxruntime" and result.measured == expected_points([17, 33])[0]
    t = build_and_write(store_path(workdir, "ortdev"), tmp_path / "ort.csv")
    assert set(t.frame["engine"]) == {"onnxruntime"} and set(t.frame["tuning"]) == {"none"}
    n17, n33 = t.latency_ms("deit_t", "blocks.0", 17), t.latency_ms("deit_t", "blocks.0", 33)
    assert 0 < n17 < n33 * 1.5


def test_points_are_measured_in_visits_spread_through_the_run(workdir, tmp_path):
    """measure.rounds 3: every point in 3 visits of ceil(5/3) samples, each walk of the shuffled list
    started a third further in; the table pools the visits; a run cut mid-visit finishes the missing ones."""
    cfg = write_config(tmp_path / "ort.yaml", name="ortdev", engine="onnxruntime",
                       measure={"rounds": 3, "reference_every": 0})
    n_points = expected_points([9, 17])[0]
    result = measure(str(cfg), "deit_t", [9, 17], progress=False)
    path = store_path(workdir, "ortdev")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert result.measured == n_points and len(lines) == 3 * n_points
    assert [r["visit"] for r in lines] == [v for v in range(3) for _ in range(n_points)]
    assert all(r["rounds"] == 3 and len(r["samples_ms"]) == 2 for r in lines)
    walks = [[r["key"] for r in lines[v * n_points:(v + 1) * n_points]] for v in range(3)]
    for v in (1, 2):
        k = v * n_points // 3
        assert walks[v] == walks[0][k:] + walks[0][:k]
    table = build_and_write(path, tmp_path / "t.csv", drift_correction=False)
    assert (table.frame["n_samples"] == 6).all() and table.provenance["visits_per_point"] == 3
    row = table.frame[(table.frame["unit"] == "blocks.0") & (table.frame["tokens"] == 9)].iloc[0]
    mine = [x for r in lines if r["unit"] == "block" and r["tokens"] == 9 for x in r["samples_ms"]]
    assert row["median_ms"] == pytest.approx(float(np.median(mine)))

    # killed during the last visits: two lines lost, the one before them torn mid-write
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:-3]) + text[-3][:40])
    said = []
    again = measure(str(cfg), "deit_t", [9, 17], progress=False, echo=said.append)
    assert (again.measured, again.skipped) == (3, n_points - 3)
    assert any(f"{n_points - 3} of {n_points} points already measured" in s and "3 part-way" in s for s in said)
    redone = [json.loads(line) for line in path.read_text().splitlines()[-3:]]  # after the torn line
    assert [r["visit"] for r in redone] == [2, 2, 2]
    assert sorted(r["key"] for r in redone) == sorted(walks[2][-3:])
    table = build_and_write(path, tmp_path / "t.csv", drift_correction=False)
    assert (table.frame["n_samples"] == 6).all()

    # measure.rounds raised to 5 later: only visits 3 and 4 are taken (ceil(5/5) sample each), pooled with
    # the first three; lowered to 1, nothing is measured
    cfg = write_config(tmp_path / "ort.yaml", name="ortdev", engine="onnxruntime",
                       measure={"rounds": 5, "reference_every": 0})
    n_lines = len(path.read_text().splitlines())
    more = measure(str(cfg), "deit_t", [9, 17], progress=False)
    added = [json.loads(line) for line in path.read_text().splitlines()[n_lines:]]
    assert more.measured == n_points and sorted(r["visit"] for r in added) == [3] * n_points + [4] * n_points
    assert all(len(r["samples_ms"]) == 1 for r in added)
    table = build_and_write(path, tmp_path / "t.csv", drift_correction=False)
    assert (table.frame["n_samples"] == 8).all() and table.provenance["visits_per_point"] == 5
    cfg = write_config(tmp_path / "ort.yaml", name="ortdev", engine="onnxruntime",
                       measure={"rounds": 1, "reference_every": 0})
    assert measure(str(cfg), "deit_t", [9, 17], progress=False).measured == 0


def test_device_dropping_mid_run_keeps_samples_and_resumes(workdir, tmp_path, monkeypatch):
    """Kill the RPC server after the second point: a one-line DeviceError, nothing lost, resume."""
    from latprof.measure import engines

    cfg = write_config(tmp_path / "dev.yaml", measure={"reference_every": 0})
    original = engines.TVMEngine.measure
    calls = {"n": 0}

    def flaky(self, session, graph, artifact, *rest):
        calls["n"] += 1
        if calls["n"] == 3:
            # the whole server process group: TVM serves each session from a forked worker
            os.killpg(session.server.proc.pid, signal.SIGKILL)
            session.server.proc.wait()
        return original(self, session, graph, artifact, *rest)

    monkeypatch.setattr(engines.TVMEngine, "measure", flaky)
    with pytest.raises(DeviceError, match="2 points measured in this run are kept"):
        measure(str(cfg), "deit_t", [9, 17], progress=False)
    kept = store_path(workdir, "testdev").read_text().splitlines()
    assert len(kept) == 2
    monkeypatch.setattr(engines.TVMEngine, "measure", original)
    result = measure(str(cfg), "deit_t", [9, 17], progress=False)
    assert (result.measured, result.skipped) == (expected_points([9, 17])[0] - 2, 2)


def test_torn_last_line_is_ignored(workdir, tmp_path):
    from latprof.measure.samples import SampleStore

    store = SampleStore(tmp_path / "s.jsonl")
    store.append({"key": "a", "samples_ms": [1.0]})
    with open(store.path, "a") as fh:
        fh.write('{"schema": 1, "key": "b", "samples_')  # killed mid-write
    assert [r["key"] for r in store.records()] == ["a"]
    store.append({"key": "c", "samples_ms": [2.0]})  # on a line of its own, not glued to the torn one
    assert [r["key"] for r in store.records()] == ["a", "c"]


def test_local_server_is_pinned_to_configured_cores(workdir, tmp_path):
    from latprof.devices import load_config, open_session

    cfg = load_config(str(write_config(tmp_path / "pin.yaml", cpus=[0])))
    with open_session(cfg) as session:
        assert os.sched_getaffinity(session.server.proc.pid) == {0}
        pid = session.server.proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped on close


def test_local_server_files_are_removed_when_it_stops(workdir, tmp_path):
    """What sessions upload lands in the server's own temp dir, which goes with the server (its workers,
    stopped by SIGKILL, never remove their dirs themselves)."""
    from latprof.devices import load_config, open_session

    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"x" * 1000)
    with open_session(load_config("local")) as session:
        session.rpc.upload(str(blob), "blob.bin")
        scratch = Path(session.server.scratch)
        assert [p.name for p in scratch.rglob("blob.bin")] == ["blob.bin"]
    assert not scratch.exists()
