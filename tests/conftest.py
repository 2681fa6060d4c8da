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
        "measure": {"warmup": 1, "repeats": 5, "number": 2, "min_repeat_ms": 0, "reference_every": 3},
        "tuning": {"trials_per_task": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path
