"""SSH transport against a real OpenSSH sshd on loopback (this x86 host plays the device)."""

from __future__ import annotations

import json
import signal
import os

import pytest

from latprof.devices import load_config, open_session
from latprof.errors import ConfigError, DeviceError, HostKeyError
from latprof.lut.build import build_and_write
from latprof.lut.table import read_lut
from latprof.measure.runner import measure, store_path
from tests.remote.conftest import expected_counts, pid_alive, ssh_config

FAST = {"env": {"TVM_USE_RUNTIME_LIB": "1"}}  # runtime-only import: the server is up in about 1 s, not 10


def test_measure_over_ssh_two_token_counts(sshd, workdir, tmp_path):
    cfg = load_config(str(ssh_config(tmp_path / "dev.yaml", sshd, connection=FAST)))
    with open_session(cfg) as session:
        info, pid = session.info(), session.remote_pid
        assert info["arch"] and info["cpu"] and info["cores"] >= 1
        assert pid_alive(pid) and session.local_port != session.remote_port
    assert not pid_alive(pid)  # the remote server was stopped on close

    result = measure(str(tmp_path / "dev.yaml"), "deit_t", [9, 17], progress=False)
    points, rows = expected_counts("deit_t", [9, 17])
    assert (result.measured, result.skipped) == (points, 0)
    records = [json.loads(x) for x in store_path(workdir, "sshdev").read_text().splitlines()]
    assert {r["transport"] for r in records} == {"ssh"} and all(not r["emulated"] for r in records)
    assert all(r["max_abs_err"] < 2e-3 and len(r["samples_ms"]) == 3 for r in records)
    assert {r["tokens"] for r in records if r["unit"] == "block"} == {9, 17}
    table = build_and_write(store_path(workdir, "sshdev"), tmp_path / "ssh.csv")
    t = read_lut(tmp_path / "ssh.csv")
    assert t.provenance["device"] == "sshdev" and len(t.frame) == rows
    assert t.latency_ms("deit_t", "blocks.0", 9) > 0 and table.provenance["emulated"] in (False, "False", 0)


def test_unknown_and_changed_host_keys_are_refused(sshd, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cfg = load_config(str(ssh_config(tmp_path / "a.yaml", sshd, connection={"known_hosts": str(empty)})))
    with pytest.raises(HostKeyError, match=rf"not in .*ssh-keyscan -p {sshd.port} 127.0.0.1 >> "):
        open_session(cfg).__enter__()
    assert empty.read_text() == ""  # nothing was added behind the user's back

    changed = tmp_path / "changed_known_hosts"
    changed.write_text(sshd.known_line(sshd.dir / "other_host_key.pub"))
    cfg = load_config(str(ssh_config(tmp_path / "b.yaml", sshd, connection={"known_hosts": str(changed)})))
    with pytest.raises(HostKeyError, match="CHANGED"):
        open_session(cfg).__enter__()


def test_config_errors_name_the_field(sshd, tmp_path):
    path = ssh_config(tmp_path / "c.yaml", sshd, connection={"prot": 22})
    with pytest.raises(ConfigError, match="connection.prot"):
        load_config(str(path))
    path = ssh_config(tmp_path / "d.yaml", sshd, connection={"port": "22"})
    with pytest.raises(ConfigError, match="'connection.port' must be int, got '22'"):
        load_config(str(path))
    import yaml

    data = yaml.safe_load(path.read_text())
    data["connection"]["port"] = 22
    del data["connection"]["known_hosts"]
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="connection.known_hosts"):
        load_config(str(tmp_path / "e.yaml"))


def test_config_never_reaches_the_shell_unquoted(sshd, tmp_path):
    """A server command with shell syntax in it is passed as words: `;` does not start a second command."""
    marker = tmp_path / "pwned"
    cfg = load_config(str(ssh_config(tmp_path / "q.yaml", sshd, connection={
        "server_command": f"echo hello; touch {marker}", "start_timeout": 3})))
    with pytest.raises(DeviceError, match="did not start"):
        open_session(cfg).__enter__()
    assert not marker.exists()


def test_server_killed_mid_run_keeps_samples_and_resumes(sshd, workdir, tmp_path, monkeypatch):
    from latprof.measure import engines

    path = ssh_config(tmp_path / "dev.yaml", sshd, connection=FAST)
    original = engines.TVMEngine.measure
    calls = {"n": 0, "pid": None}

    def flaky(self, session, graph, artifact, *rest):
        calls["n"] += 1
        if calls["n"] == 3:  # the device's RPC server crashes (its whole process group)
            calls["pid"] = session.remote_pid
            os.killpg(session.remote_pid, signal.SIGKILL)
        return original(self, session, graph, artifact, *rest)

    monkeypatch.setattr(engines.TVMEngine, "measure", flaky)
    with pytest.raises(DeviceError) as err:
        measure(str(path), "deit_t", [9, 17], progress=False)
    line = err.value.one_line()
    assert "\n" not in line and "2 points measured in this run are kept" in line
    assert len(store_path(workdir, "sshdev").read_text().splitlines()) == 2
    monkeypatch.setattr(engines.TVMEngine, "measure", original)
    result = measure(str(path), "deit_t", [9, 17], progress=False)
    assert (result.measured, result.skipped) == (expected_counts("deit_t", [9, 17])[0] - 2, 2)


def test_sshd_gone_mid_run_is_a_device_error(sshd, workdir, tmp_path, monkeypatch):
    """The whole SSH connection drops (sshd and its session processes killed)."""
    from latprof.measure import engines

    path = ssh_config(tmp_path / "dev.yaml", sshd, connection=FAST)
    original = engines.TVMEngine.measure
    calls = {"n": 0}

    def flaky(self, session, graph, artifact, *rest):
        calls["n"] += 1
        if calls["n"] == 2:
            sshd.crash()
        return original(self, session, graph, artifact, *rest)

    monkeypatch.setattr(engines.TVMEngine, "measure", flaky)
    try:
        with pytest.raises(DeviceError, match="1 points measured in this run are kept"):
            measure(str(path), "deit_t", [9], progress=False)
    finally:
        sshd.start()
    with pytest.raises(DeviceError, match="cannot reach"):  # and a dead sshd is a clear error up front
        sshd.stop()
        try:
            open_session(load_config(str(path))).__enter__()
        finally:
            sshd.start()


def test_devices_check_and_a_hard_killed_latprof_leaves_no_server(sshd, tmp_path):
    """`latprof devices check` reports the device; a latprof killed with SIGKILL leaves no RPC server
    behind (its SSH helper sees stdin close, stops the server's process group and disconnects)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from click.testing import CliRunner

    from latprof.cli import main

    path = ssh_config(tmp_path / "dev.yaml", sshd, connection=FAST)
    res = CliRunner().invoke(main, ["devices", "check", str(path)])
    assert res.exit_code == 0, res.output
    assert "reachable over ssh" in res.output and "arch" in res.output and "governor" in res.output

    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
              "from latprof.devices import load_config, open_session\n"
              f"s = open_session(load_config({str(path)!r})).__enter__()\n"
              "print(s.remote_pid, flush=True); time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(child.stdout.readline())
    assert pid_alive(pid)
    child.kill()
    child.wait()
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(pid)


@pytest.fixture
def ssh_agent(tmp_path, monkeypatch):
    """A real OpenSSH ssh-agent on its own socket, empty; SSH_AUTH_SOCK points at it."""
    import shutil
    import subprocess

    if not shutil.which("ssh-agent") or not shutil.which("ssh-add"):
        pytest.skip("ssh-agent is not installed (apt-get install openssh-client)")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    from tests.remote.conftest import stop

    try:
        import time

        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        stop(agent)


def test_agent_authentication(sshd, ssh_agent, tmp_path, monkeypatch):
    """No key file in the config: the client key is offered by a running ssh-agent."""
    import subprocess

    path = ssh_config(tmp_path / "agent.yaml", sshd, connection={**FAST, "agent": True})
    import yaml

    data = yaml.safe_load(path.read_text())
    del data["connection"]["key"]
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(str(path))
    with pytest.raises(DeviceError, match="ssh-agent holds no keys.*ssh-add"):
        open_session(cfg).__enter__()

    subprocess.run(["ssh-add", "-q", str(sshd.key)], check=True, env={**os.environ, "SSH_AUTH_SOCK": str(ssh_agent)})
    with open_session(load_config(str(path))) as session:
        pid = session.remote_pid
        assert pid_alive(pid) and session.info()["arch"]
    assert not pid_alive(pid)

    monkeypatch.delenv("SSH_AUTH_SOCK")
    with pytest.raises(DeviceError, match="no ssh-agent is running"):
        open_session(load_config(str(path))).__enter__()

    data["connection"]["agent"] = False
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="neither key nor agent"):
        load_config(str(path))


def test_through_a_jump_host(sshd, tmp_path):
    """`connection.jump` (like ssh -J): the device is reached through a channel the bastion opens; the
    bastion's host key is checked against the same known_hosts."""
    jump = {"host": sshd.host, "port": sshd.port}
    cfg = load_config(str(ssh_config(tmp_path / "j.yaml", sshd, connection={**FAST, "jump": jump})))
    assert cfg.connection["jump"]["key"] == str(sshd.key)  # the connection's credentials unless it names its own
    with open_session(cfg) as session:
        pid = session.remote_pid
        assert pid_alive(pid) and session.rpc is not None
    assert not pid_alive(pid)

    # the device's address is opened by the bastion: a port nobody listens on fails there, named as such
    from tests.remote.conftest import free_port

    cfg = load_config(str(ssh_config(tmp_path / "k.yaml", sshd, connection={**FAST, "jump": jump,
                                                                             "port": free_port()})))
    with pytest.raises(DeviceError, match=rf"the bastion {sshd.host} cannot reach 127.0.0.1:\d+"):
        open_session(cfg).__enter__()

    other = tmp_path / "other_known_hosts"
    other.write_text(sshd.known_line(sshd.dir / "other_host_key.pub"))
    cfg = load_config(str(ssh_config(tmp_path / "l.yaml", sshd, connection={**FAST, "jump": jump,
                                                                             "known_hosts": str(other)})))
    with pytest.raises(HostKeyError, match="CHANGED"):
        open_session(cfg).__enter__()

    bad = ssh_config(tmp_path / "m.yaml", sshd, connection={"jump": {"host": sshd.host, "prot": 22}})
    with pytest.raises(ConfigError, match="connection.jump.prot"):
        load_config(str(bad))
