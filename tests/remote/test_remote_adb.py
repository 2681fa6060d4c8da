"""ADB transport: Debian's real adb client and server driving the test adbd (tests/remote/adbd.py) on
loopback, with this x86 host behind it playing the phone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from latprof.devices import load_config, open_session
from latprof.errors import ConfigError, DeviceError
from latprof.measure.runner import measure, store_path
from tests.remote.conftest import SMALL_MEASURE, expected_counts, free_port, pid_alive, stop, write_yaml

ADBD = Path(__file__).with_name("adbd.py")


class ADBEnv:
    def __init__(self, base: Path):
        if not shutil.which("adb"):
            pytest.skip("Debian's adb is not installed (apt-get install adb, or .ci/install-remote.sh)")
        self.base = base
        self.server_port = free_port()  # a private adb server: never touch the user's on 5037
        self.env = {**os.environ, "ANDROID_ADB_SERVER_PORT": str(self.server_port)}
        self.adbds: list[subprocess.Popen] = []

    def start_adbd(self) -> str:
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(ADBD), "--port", str(port)], stdout=subprocess.PIPE, text=True)
        assert "listening" in proc.stdout.readline()
        self.adbds.append(proc)
        return f"127.0.0.1:{port}"

    def adb(self, *args: str, serial: str | None = None) -> subprocess.CompletedProcess:
        argv = ["adb", *(["-s", serial] if serial else []), *args]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=60)

    def close(self) -> None:
        try:
            self.adb("kill-server")
        except subprocess.TimeoutExpired:
            pass
        for p in self.adbds:
            stop(p)
        # make sure: the adb server this fixture started (it daemonizes, so it is found by its port)
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"fork-server" in args and f"tcp:{self.server_port}".encode() in args:
                try:
                    os.kill(int(cmdline.parent.name), 9)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def adb_env(tmp_path_factory):
    env = ADBEnv(tmp_path_factory.mktemp("adb"))
    yield env
    env.close()


def adb_config(path: Path, env: ADBEnv, runtime: Path, remote: Path, **conn) -> Path:
    (runtime / "rpc_server.sh").write_text(f"#!/bin/sh\nexec {sys.executable} -m tvm.exec.rpc_server \"$@\"\n")
    (runtime / "rpc_server.sh").chmod(0o755)
    return write_yaml(path, {
        "name": "adbdev", "transport": "adb", "target": {"kind": "llvm", "mcpu": "native"}, "threads": 1,
        "cpus": [1], "measure": dict(SMALL_MEASURE), "tuning": {"trials_per_task": 0},
        "connection": {"adb_server_port": env.server_port, "runtime_dir": str(runtime), "remote_dir": str(remote),
                       "server_command": ["./rpc_server.sh", "--host", "127.0.0.1", "--port", str(free_port()),
                                          "--port-end", "65000"],
                       "env": {"TVM_USE_RUNTIME_LIB": "1"}, "start_timeout": 150, **conn}})


def test_adbd_speaks_enough_adb_for_the_real_client(adb_env, tmp_path):
    serial = adb_env.start_adbd()
    assert "connected" in adb_env.adb("connect", serial).stdout
    res = adb_env.adb("shell", "echo out; echo err >&2; exit 3", serial=serial)
    assert (res.returncode, res.stdout, res.stderr) == (3, "out\n", "err\n")  # shell v2: codes, split stderr
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(700_000))
    assert adb_env.adb("push", str(blob), str(tmp_path / "dev/blob.bin"), serial=serial).returncode == 0
    assert adb_env.adb("pull", str(tmp_path / "dev/blob.bin"), str(tmp_path / "back.bin"), serial=serial).returncode == 0
    assert (tmp_path / "back.bin").read_bytes() == blob.read_bytes()
    assert adb_env.adb("disconnect", serial).returncode == 0


def test_measure_through_adb(adb_env, workdir, tmp_path):
    serial = adb_env.start_adbd()
    runtime, remote = tmp_path / "runtime", tmp_path / "phone/data/local/tmp/latprof"
    runtime.mkdir()
    path = adb_config(tmp_path / "adb.yaml", adb_env, runtime, remote, connect=serial)
    with open_session(load_config(str(path))) as s:
        info, pid, port = s.info(), s.remote_pid, s.local_port
        assert info["serial"] == serial and info["arch"] and info["cores"] >= 1
        assert pid_alive(pid)
        # pinned to the configured core (taskset mask 2 = cpu1)
        assert os.sched_getaffinity(pid) == {1}
    # pushed byte-identical, server stopped, forward removed
    assert hashlib.sha256((remote / "rpc_server.sh").read_bytes()).digest() == \
        hashlib.sha256((runtime / "rpc_server.sh").read_bytes()).digest()
    assert not pid_alive(pid)
    assert f"tcp:{port}" not in adb_env.adb("forward", "--list").stdout

    result = measure(str(path), "deit_t", [9, 17], progress=False)
    assert result.measured == expected_counts("deit_t", [9, 17])[0]
    records = [json.loads(x) for x in store_path(workdir, "adbdev").read_text().splitlines()]
    assert all(r["transport"] == "adb" and r["max_abs_err"] < 2e-3 for r in records)
    assert records[0]["info"]["serial"] == serial and records[0]["settings"]["cpus"] == [1]


def test_several_devices_and_none_named_is_refused(adb_env, tmp_path):
    serials = [adb_env.start_adbd(), adb_env.start_adbd()]
    for s in serials:
        assert "connected" in adb_env.adb("connect", s).stdout
    runtime = tmp_path / "rt"
    runtime.mkdir()
    path = adb_config(tmp_path / "many.yaml", adb_env, runtime, tmp_path / "r")
    try:
        with pytest.raises(DeviceError) as err:
            open_session(load_config(str(path))).__enter__()
        assert "names none" in err.value.message and all(s in err.value.message for s in serials)
        assert "connection.serial" in err.value.fix
        # named: that one is used
        path = adb_config(tmp_path / "one.yaml", adb_env, runtime, tmp_path / "r", serial=serials[1], start_timeout=1,
                          server_command=["sh", "-c", "exit 0"])
        with pytest.raises(DeviceError, match=f"server on {serials[1]} did not start"):
            open_session(load_config(str(path))).__enter__()
    finally:
        for s in serials:
            adb_env.adb("disconnect", s)


def test_adb_config_errors(adb_env, tmp_path):
    runtime = tmp_path / "rt"
    runtime.mkdir()
    with pytest.raises(ConfigError, match="connection.connect"):
        load_config(str(adb_config(tmp_path / "a.yaml", adb_env, runtime, tmp_path / "r", connect="nohostport")))
    with pytest.raises(ConfigError, match="connection.remote_dir"):
        load_config(str(adb_config(tmp_path / "b.yaml", adb_env, runtime, Path("relative"))))


def test_adb_server_killed_mid_run_and_hard_killed_latprof(adb_env, workdir, tmp_path, monkeypatch):
    """A server that dies mid-run: one-line DeviceError, samples kept, the same call resumes. A server
    left behind by a latprof killed with SIGKILL is stopped by the next session (pid file on the device)."""
    import signal

    from latprof.measure import engines

    serial = adb_env.start_adbd()
    runtime, remote = tmp_path / "runtime", tmp_path / "phone"
    runtime.mkdir()
    path = adb_config(tmp_path / "adb.yaml", adb_env, runtime, remote, connect=serial)
    original = engines.TVMEngine.measure
    calls = {"n": 0}

    def flaky(self, session, graph, artifact, *rest):
        calls["n"] += 1
        if calls["n"] == 3:
            os.killpg(session.remote_pid, signal.SIGKILL)
        return original(self, session, graph, artifact, *rest)

    monkeypatch.setattr(engines.TVMEngine, "measure", flaky)
    with pytest.raises(DeviceError) as err:
        measure(str(path), "deit_t", [9], progress=False)
    assert "2 points measured in this run are kept" in err.value.one_line()
    monkeypatch.setattr(engines.TVMEngine, "measure", original)
    points = expected_counts("deit_t", [9])[0]
    assert measure(str(path), "deit_t", [9], progress=False).measured == points - 2

    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
              "from latprof.devices import load_config, open_session\n"
              f"s = open_session(load_config({str(path)!r})).__enter__()\n"
              "print(s.remote_pid, flush=True); time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=adb_env.env)
    stale = int(child.stdout.readline())
    child.kill()
    child.wait()
    assert pid_alive(stale)  # nothing could clean up after SIGKILL...
    with open_session(load_config(str(path))) as s:
        assert s.remote_pid != stale
    assert not pid_alive(stale)  # ...until the next session on that device
