"""Fixtures for the remote transports: a real OpenSSH sshd on 127.0.0.1 with its own keys, the test adbd
(tests/remote/adbd.py) driven by Debian's real adb, a TVM RPC tracker, and the emulated arm64 device.
Each skips with the reason when its system tool is missing (.ci/install-remote.sh installs them)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ARM64_ROOTFS = Path(os.environ.get("LATPROF_ARM64_ROOTFS", Path.home() / ".cache/latprof/arm64-rootfs"))
SMALL_MEASURE = {"warmup": 1, "repeats": 3, "number": 1, "min_repeat_ms": 0, "reference_every": 0, "rounds": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


class SSHD:
    def __init__(self, base: Path):
        sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
        if not sshd or not shutil.which("ssh-keygen"):
            pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server, or .ci/install-remote.sh)")
        os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation dir
        self.dir = base
        for name in ("host_key", "client_key", "other_host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True)
        (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
        self.port = free_port()
        self.host, self.user = "127.0.0.1", os.environ.get("USER") or __import__("getpass").getuser()
        self.key = base / "client_key"
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text(self.known_line(base / "host_key.pub"))
        cfg = base / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {base / 'host_key'}", "UsePAM no",
            "StrictModes no", f"AuthorizedKeysFile {base / 'authorized_keys'}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", f"PidFile {base / 'sshd.pid'}",
            "LogLevel ERROR", "MaxStartups 50", "MaxSessions 50", ""]))
        self.argv = [sshd, "-D", "-e", "-f", str(cfg)]
        self.start()

    def known_line(self, pub: Path) -> str:
        kind, blob = pub.read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def start(self) -> None:
        self.log = open(self.dir / "sshd.log", "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()

    def crash(self) -> None:
        """Kill sshd and every session process it forked: the device drops off the network."""
        for pid in descendants(self.proc.pid) + [self.proc.pid]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait(5)
        self.log.close()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = SSHD(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ssh_config(path: Path, sshd: SSHD, name: str = "sshdev", python: str = sys.executable, **overrides) -> Path:
    """A device config for this host behind the test sshd (x86, untuned, few repeats)."""
    cfg = {
        "name": name, "transport": "ssh", "engine": "tvm",
        "target": {"kind": "llvm", "mcpu": "native"}, "threads": 1,
        "measure": dict(SMALL_MEASURE), "tuning": {"trials_per_task": 0},
        "connection": {"host": sshd.host, "port": sshd.port, "user": sshd.user, "key": str(sshd.key),
                       "known_hosts": str(sshd.known_hosts),
                       "server_command": [python, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                                          "--port", str(free_port()), "--port-end", "65000"],
                       "start_timeout": 150},  # generous: several engineers share 2 cores here
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return write_yaml(path, cfg)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """Exported graphs and compiled libraries shared by the remote tests (both are content-addressed),
    so only the first test pays for export and compilation; samples stay per test."""
    base = tmp_path_factory.mktemp("latprof-cache")
    (base / "graphs").mkdir()
    (base / "libs").mkdir()
    return base


@pytest.fixture
def workdir(tmp_path, monkeypatch, shared_cache):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("graphs", "libs"):
        (work / name).symlink_to(shared_cache / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATPROF_HOME", str(work))
    return work


@pytest.fixture
def fresh_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATPROF_HOME", str(tmp_path / "work"))
    return tmp_path / "work"


@pytest.fixture(scope="session")
def arm64_rootfs():
    py = ARM64_ROOTFS / "opt/bin/python3"
    if not shutil.which("qemu-aarch64-static"):
        pytest.skip("qemu-user-static is not installed (.ci/install-remote.sh)")
    if not py.exists():
        pytest.skip(f"no emulated arm64 device at {ARM64_ROOTFS}: run scripts/build_arm64_device.sh {ARM64_ROOTFS}")
    if not shutil.which("aarch64-linux-gnu-g++"):
        pytest.skip("the aarch64 cross compiler is not installed (apt-get install g++-aarch64-linux-gnu)")
    return ARM64_ROOTFS


def expected_counts(model: str, tokens: list[int]) -> tuple[int, int]:
    """(points measured, table rows) for a model at these token counts: shared units are measured once
    per N (fixed units once), and the table has a row per unit."""
    from latprof.models import get_model

    spec = get_model(model)
    size = lambda u: 1 if u.kind == "fixed" else len(tokens)  # noqa: E731
    shared = {u.shared: u for u in spec.units}
    return sum(size(u) for u in shared.values()), sum(size(u) for u in spec.units)


CONFIG_DIR = ROOT / "device_configs"
