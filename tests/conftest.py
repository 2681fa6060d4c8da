import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh latprof workdir and cwd per test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATPROF_HOME", str(tmp_path / "work"))
    return tmp_path / "work"


def write_config(path: Path, **overrides) -> Path:
    """A local device config with small measurement settings for tests."""
    import yaml

    cfg = {
        "name": "testdev", "transport": "local", "engine": "tvm",
        "target": {"kind": "llvm", "mcpu": "native"}, "threads": 1,
        "measure": {"warmup": 1, "repeats": 5, "number": 2, "min_repeat_ms": 0, "reference_every": 3, "rounds": 1},
        "tuning": {"trials_per_task": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def one_torch_thread():
    """The CI machine has 2 shared cores: one torch thread avoids oversubscription (much faster here)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session", autouse=True)
def _no_orphaned_tvm_workers():
    """MetaSchedule and TVM's RPC pools leave popen workers behind when their owner dies; stop the ones
    in this test run's process group, and orphaned ones of this Python (an RPC server killed by a test
    runs in its own session; two of its workers outlived a CI run), so repeated runs cannot exhaust memory."""
    yield
    import signal

    import psutil

    me, group = os.getpid(), os.getpgid(0)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            if proc.pid != me and "tvm.exec.popen_worker" in " ".join(cmd) \
                    and (os.getpgid(proc.pid) == group or (proc.ppid() == 1 and cmd[0] == sys.executable)):
                os.kill(proc.pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError):
            pass


def decisive_selectors(checkpoint: Path, out: Path) -> Path:
    """A checkpoint whose selectors score decisively. A step or two leave them near their uniform start,
    where runtimes break top-k ties differently; random scores stand in for a trained selector."""
    import torch

    ckpt = torch.load(checkpoint, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for key, value in ckpt["model"].items():
        if key.startswith("selectors.") and key.rsplit(".", 1)[-1] in ("w_in", "w1", "w2", "w3"):
            ckpt["model"][key] = torch.randn(value.shape, generator=gen) * 0.3
    torch.save(ckpt, out)
    return out
