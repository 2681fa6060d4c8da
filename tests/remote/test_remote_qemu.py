"""The emulated arm64 device end to end: the shipped qemu-arm64 config (aarch64 target, cross-compiled
with aarch64-linux-gnu-g++) over SSH to the test sshd, its RPC server the arm64 python under qemu.
Needs scripts/build_arm64_device.sh run once (LATPROF_ARM64_ROOTFS, default ~/.cache/latprof/arm64-rootfs)."""

from __future__ import annotations

import json

import pytest
import yaml

from latprof.devices import load_config
from latprof.lut.build import build_and_write
from latprof.lut.table import read_lut
from latprof.measure.runner import measure, store_path
from tests.remote.conftest import CONFIG_DIR, expected_counts, free_port, write_yaml
from tests.remote.test_remote_adb import ADBEnv


def qemu_config(tmp_path, sshd, rootfs):
    """The shipped config with this test's sshd, keys and rootfs (target and compiler unchanged)."""
    cfg = yaml.safe_load((CONFIG_DIR / "qemu-arm64.yaml").read_text())
    cfg["connection"].update(host=sshd.host, port=sshd.port, user=sshd.user, key=str(sshd.key),
                             known_hosts=str(sshd.known_hosts), start_timeout=180,
                             server_command=[str(rootfs / "opt/bin/python3"), "-m", "tvm.exec.rpc_server", "--host",
                                             "127.0.0.1", "--port", str(free_port()), "--port-end", "65000"])
    cfg["measure"].update(warmup=0, repeats=2, number=1, min_repeat_ms=0, reference_every=0, rounds=1)
    return write_yaml(tmp_path / "qemu-arm64.yaml", cfg)


@pytest.mark.slow
def test_emulated_arm64_device_end_to_end(sshd, arm64_rootfs, fresh_workdir, tmp_path):
    workdir = fresh_workdir
    path = qemu_config(tmp_path, sshd, arm64_rootfs)
    cfg = load_config(str(path))
    assert cfg.emulated and cfg.cross_compiler == "aarch64-linux-gnu-g++"
    tokens = [17, 50]
    result = measure(str(path), "deit_t", tokens, trials=0, progress=False)
    assert result.measured == expected_counts("deit_t", tokens)[0]
    libs = list((workdir / "libs").glob("*.so"))
    assert libs and all(b"\x7fELF" == p.read_bytes()[:4] and p.read_bytes()[18] == 183 for p in libs)  # EM_AARCH64
    records = [json.loads(x) for x in store_path(workdir, "qemu-arm64").read_text().splitlines()]
    assert all(r["emulated"] and r["max_abs_err"] < 2e-3 for r in records)  # outputs checked vs onnxruntime
    assert records[0]["info"]["arch"].startswith("aarch64 (emulated")
    build_and_write(store_path(workdir, "qemu-arm64"), tmp_path / "qemu.csv")
    t = read_lut(tmp_path / "qemu.csv")
    assert t.provenance["emulated"] in (True, "true", "True")
    assert "aarch64-linux-gnu" in json.dumps(t.provenance)


@pytest.mark.slow
def test_emulated_arm64_device_behind_the_test_adbd(arm64_rootfs, fresh_workdir, tmp_path_factory, tmp_path):
    """The ADB path with an aarch64 server: adb push of the runtime, the arm64 RPC server under qemu
    started through `adb shell`, `adb forward`, cross-compiled modules checked against onnxruntime."""
    env = ADBEnv(tmp_path_factory.mktemp("adb-qemu"))
    try:
        serial = env.start_adbd()
        runtime = tmp_path / "runtime"
        runtime.mkdir()
        (runtime / "rpc_server.sh").write_text(f"#!/bin/sh\nexec {arm64_rootfs / 'opt/bin/python3'} -m tvm.exec.rpc_server \"$@\"\n")
        (runtime / "rpc_server.sh").chmod(0o755)
        shipped = yaml.safe_load((CONFIG_DIR / "qemu-arm64.yaml").read_text())
        path = write_yaml(tmp_path / "adb-arm64.yaml", {
            "name": "adb-arm64", "transport": "adb", "emulated": True, "target": shipped["target"],
            "cross_compiler": shipped["cross_compiler"], "threads": 1,
            "measure": {"warmup": 0, "repeats": 2, "number": 1, "min_repeat_ms": 0, "reference_every": 0, "rounds": 1},
            "tuning": {"trials_per_task": 0},
            "connection": {"connect": serial, "adb_server_port": env.server_port, "runtime_dir": str(runtime),
                           "remote_dir": str(tmp_path / "phone"), "start_timeout": 180,
                           "server_command": ["./rpc_server.sh", "--host", "127.0.0.1", "--port", str(free_port()),
                                              "--port-end", "65000"]}})
        result = measure(str(path), "deit_t", [17, 50], trials=0, progress=False)
        assert result.measured == expected_counts("deit_t", [17, 50])[0]
        records = [json.loads(x) for x in store_path(fresh_workdir, "adb-arm64").read_text().splitlines()]
        assert all(r["emulated"] and r["transport"] == "adb" and r["max_abs_err"] < 2e-3 for r in records)
        assert all(p.read_bytes()[18] == 183 for p in (fresh_workdir / "libs").glob("*.so"))  # EM_AARCH64
    finally:
        env.close()


@pytest.mark.slow
def test_tuning_runs_its_candidates_on_the_emulated_arm64_device(sshd, arm64_rootfs, tmp_path):
    """MetaSchedule on a cross-compiled target: candidates linked with the aarch64 compiler and timed on
    the device through its session (a local runner cannot run aarch64 code); transfer candidates too."""
    from latprof.devices import open_session
    from latprof.measure.engines import TVMEngine
    from tests.test_tuning import _Bars, _tiny_graphs

    cfg = load_config(str(qemu_config(tmp_path, sshd, arm64_rootfs)))
    graphs = _tiny_graphs(tmp_path, [16, 13])
    eng = TVMEngine(cfg, tmp_path / "work", trials=2)
    eng.anchors = [16]
    bars = _Bars()
    with open_session(cfg) as session:
        libs = eng.prepare([graphs[13]], bars, anchors=[graphs[16]], session=session)
        budget = json.loads((eng.tuning_dir / "budget.json").read_text())
        assert sum(1 for v in budget.values() if v.get("tuned")) == 4  # every heavy task got a working record
        moved = [v for v in budget.values() if "candidates_ms" in v]
        assert moved and all(min(v["candidates_ms"].values()) > 0 for v in moved)
        lib = libs[graphs[13].digest]
        data = open(lib, "rb").read(20)
        assert data[:4] == b"\x7fELF" and data[18] == 183  # EM_AARCH64
        samples, err = eng.measure(session, graphs[13], lib)  # raises if the output differs from onnxruntime
    assert samples and err < 1e-4
