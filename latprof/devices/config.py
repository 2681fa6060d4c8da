"""Device configs (`device_configs/<name>.yaml`): how to reach a device and what to compile for it.

Validated on load; every error names the file and the field. Secrets never live in a config: SSH keys
and known_hosts are referenced by path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latprof.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "device_configs"
ENGINES = ("tvm", "onnxruntime")

# field -> (type, default); a default of REQUIRED must be given
REQUIRED = object()
_MEASURE = {
    "warmup": (int, 3),            # untimed runs before timing
    "repeats": (int, 20),          # raw samples per point
    "number": (int, 0),            # runs averaged per sample; 0 = derive from min_repeat_ms
    "min_repeat_ms": (float, 20.0),
    "cooldown_s": (float, 0.0),    # pause between points
    "reference_every": (int, 8),   # re-measure the reference point every k points (drift check)
    "drift_tolerance": (float, 0.05),
    # points taken between two references that disagree by more than drift_tolerance are measured
    # again, up to this many times each: a table taken while the host changed speed is not trusted
    "drift_retries": (int, 1),
    # `measure` takes each point's samples, and `validate` each whole model's, in this many visits spread
    # through the run, so a slow stretch of a shared host lands on a share of every point's samples
    "rounds": (int, 3),
}
# policy, not a condition of the samples: left out of the settings recorded with them (and their keys)
_POLICY = ("drift_retries", "rounds")
_TUNING = {
    "trials_per_task": (int, 32),
    "anchors": (list, None),       # token counts tuned for real; default: see compile/tuning.py
    # candidates timed "hot" (back to back, weights left in the caches) or "cold" (the caches flushed of
    # all but the input before each run, as in a whole model whose weights outgrow the last-level cache)
    "cache": (str, "hot"),
}
CACHE_MODES = ("hot", "cold")
_TOP = {
    "name": (str, REQUIRED),
    "description": (str, ""),
    "transport": (str, REQUIRED),
    "engine": (str, "tvm"),
    "target": (dict, REQUIRED),
    "threads": (int, 1),
    "cpus": (list, None),          # core affinity (ids), e.g. big cores on a phone
    "cross_compiler": (str, None),  # e.g. aarch64-linux-gnu-g++; none = the host compiler
    "emulated": (bool, False),
    "measure": (dict, {}),
    "tuning": (dict, {}),
    "connection": (dict, {}),      # transport-specific; validated by the transport
}


@dataclass
class DeviceConfig:
    name: str
    transport: str
    target: dict
    engine: str = "tvm"
    description: str = ""
    threads: int = 1
    cpus: list | None = None
    cross_compiler: str | None = None
    emulated: bool = False
    measure: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    connection: dict = field(default_factory=dict)
    source: str = ""

    def settings(self) -> dict:
        """Measurement settings that make samples comparable (recorded with every sample)."""
        kept = {k: v for k, v in self.measure.items() if k not in _POLICY}
        return {**kept, "threads": self.threads, "cpus": self.cpus}


def _check(section: dict, schema: dict, where: str, source: str) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping", "see device_configs/local.yaml for the format")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise ConfigError(f"{source}: unknown field '{where + '.' if where else ''}{unknown[0]}'",
                          f"allowed fields: {', '.join(schema)}")
    out = {}
    for key, (typ, default) in schema.items():
        name = f"{where}.{key}" if where else key
        if key not in section or section[key] is None:
            if default is REQUIRED:
                raise ConfigError(f"{source}: missing required field '{name}'", "see device_configs/local.yaml for the format")
            out[key] = default
            continue
        value = section[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: field '{name}' must be {typ.__name__}, got {value!r}",
                              f"set '{name}' to a {typ.__name__}")
        if typ in (int, float) and value < 0:
            raise ConfigError(f"{source}: field '{name}' must not be negative", f"set '{name}' to a value >= 0")
        out[key] = value
    return out


def parse_config(data: Any, source: str) -> DeviceConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a device config must be a YAML mapping", "see device_configs/local.yaml")
    top = _check(data, _TOP, "", source)
    top["measure"] = _check(top["measure"], _MEASURE, "measure", source)
    top["tuning"] = _check(top["tuning"], _TUNING, "tuning", source)
    if top["tuning"]["cache"] not in CACHE_MODES:
        raise ConfigError(f"{source}: field 'tuning.cache' is '{top['tuning']['cache']}'", f"use one of {', '.join(CACHE_MODES)}")
    if top["engine"] not in ENGINES:
        raise ConfigError(f"{source}: field 'engine' is '{top['engine']}'", f"use one of {', '.join(ENGINES)}")
    if top["threads"] < 1:
        raise ConfigError(f"{source}: field 'threads' must be at least 1", "set threads: 1 or more")
    if top["measure"]["repeats"] < 1:
        raise ConfigError(f"{source}: field 'measure.repeats' must be at least 1", "set measure.repeats: 10 or more")
    if top["measure"]["rounds"] < 1:
        raise ConfigError(f"{source}: field 'measure.rounds' must be at least 1", "set measure.rounds: 1 (one visit) or more")
    if "kind" not in top["target"]:
        raise ConfigError(f"{source}: field 'target.kind' is missing", "e.g. target: {kind: llvm, mcpu: native}")
    from latprof.devices import transports

    if top["transport"] not in transports():
        raise ConfigError(f"{source}: unknown transport '{top['transport']}'", f"use one of {', '.join(sorted(transports()))}")
    cfg = DeviceConfig(**top, source=source)
    transports()[cfg.transport].validate(cfg)
    return cfg


def load_config(name_or_path: str) -> DeviceConfig:
    """A shipped device by name (`local`, `s20`, ...) or a path to a YAML file."""
    import yaml

    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown device '{name_or_path}'",
                              f"use one of {', '.join(list_configs())} (see `latprof devices`) or a path to a YAML config")
    if not path.exists():
        raise ConfigError(f"device config {path} does not exist", "check the path, or use a shipped device name")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}", "fix the syntax (see device_configs/local.yaml)") from None
    return parse_config(data, str(path))


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
