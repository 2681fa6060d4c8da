"""What the remote transports (ssh, adb) share: validating the `connection` section, building the shell
command that starts the device's RPC server (every piece from a config shell-quoted), and reading the
device's state (arch, CPU, governor, frequencies, temperature) with one POSIX-sh script that works on
Linux boards and on Android's toybox alike."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

from latprof.devices.config import DeviceConfig
from latprof.errors import ConfigError

BIND_RE = re.compile(r"bind to ([\d.]+):(\d+)")
PID_RE = re.compile(r"LATPROF_PID=(\d+)")

REQUIRED = object()


def check_connection(cfg: DeviceConfig, schema: dict[str, tuple[Any, Any]], section: dict | None = None,
                     where: str = "connection") -> dict:
    """Validate cfg.connection (or `section`, a part of it named `where`) against {field: (type or tuple
    of types, default)}; errors name the field. Returns the section with defaults filled in (it is
    updated in place)."""
    conn = cfg.connection if section is None else section
    unknown = sorted(set(conn) - set(schema))
    if unknown:
        raise ConfigError(f"{cfg.source}: unknown field '{where}.{unknown[0]}' for transport {cfg.transport}",
                          f"allowed fields: {', '.join(f'{where}.{k}' for k in schema)}")
    out = {}
    for key, (typ, default) in schema.items():
        value = conn.get(key)
        if value is None:
            if default is REQUIRED:
                raise ConfigError(f"{cfg.source}: missing required field '{where}.{key}' for transport {cfg.transport}",
                                  f"see device_configs/ and docs/devices.md for an example of {where}.{key}")
            out[key] = default
            continue
        types = typ if isinstance(typ, tuple) else (typ,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{cfg.source}: field '{where}.{key}' must be {names}, got {value!r}",
                              f"set {where}.{key} to a {names}")
        out[key] = value
    if "env" in out and out["env"] is not None:
        for k, v in out["env"].items():
            if not (isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)) or isinstance(v, (dict, list)):
                raise ConfigError(f"{cfg.source}: field '{where}.env' has a bad entry {k!r}: {v!r}",
                                  "use NAME: value pairs with shell-variable names")
    conn.update(out)
    return out


def command_argv(cfg: DeviceConfig, field: str = "server_command") -> list[str]:
    """A command from the config as an argv list (a string is split like a shell would, never run by one)."""
    value = cfg.connection.get(field)
    try:
        argv = shlex.split(value) if isinstance(value, str) else [str(a) for a in value]
    except ValueError as exc:
        raise ConfigError(f"{cfg.source}: field 'connection.{field}' cannot be parsed ({exc})",
                          "give the command as a list of arguments") from None
    if not argv:
        raise ConfigError(f"{cfg.source}: field 'connection.{field}' is empty",
                          "e.g. python3 -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090")
    return argv


def server_shell_command(argv: list[str], env: dict | None = None, threads: int | None = None,
                         cpus: list | None = None, cwd: str | None = None, pin: bool = True) -> str:
    """The remote shell line that prints the server's pid and execs it (same pid, so killing its process
    group stops it and its workers). Every piece from the config is shell-quoted."""
    env = {**({"TVM_NUM_THREADS": str(threads)} if threads else {}), **{k: str(v) for k, v in (env or {}).items()}}
    parts = ["exec"]
    if env:
        parts += ["env", *(shlex.quote(f"{k}={v}") for k, v in env.items())]
    if cpus and pin:
        parts += ["taskset", cpu_mask(cpus)]
    parts += [shlex.quote(a) for a in argv]
    prefix = f"cd {shlex.quote(cwd)} && " if cwd else ""
    return f"{prefix}echo LATPROF_PID=$$; {' '.join(parts)}"


def cpu_mask(cpus: list) -> str:
    """taskset's hex mask form, which both util-linux and Android's toybox accept."""
    mask = 0
    for c in cpus:
        mask |= 1 << int(c)
    return format(mask, "x")


def kill_group_command(pid: int) -> str:
    return (f"kill -TERM -- -{int(pid)} 2>/dev/null || kill -TERM {int(pid)} 2>/dev/null; sleep 0.3; "
            f"kill -KILL -- -{int(pid)} 2>/dev/null || kill -KILL {int(pid)} 2>/dev/null; true")


def info_script(cpus: list | None = None) -> str:
    """POSIX sh printing key=value lines about the device (each read may fail: then the value is empty)."""
    cores = " ".join(str(int(c)) for c in (cpus or [0]))
    return (
        "echo arch=$(uname -m 2>/dev/null); "
        "echo cpu=$(grep -m1 -E '^(model name|Hardware|Processor)' /proc/cpuinfo 2>/dev/null | cut -d: -f2-); "
        "echo cores=$(grep -c ^processor /proc/cpuinfo 2>/dev/null); "
        "echo model=$(getprop ro.product.model 2>/dev/null); "
        f"for c in {cores}; do d=/sys/devices/system/cpu/cpu$c/cpufreq; "
        "echo gov$c=$(cat $d/scaling_governor 2>/dev/null); "
        "echo cur$c=$(cat $d/scaling_cur_freq 2>/dev/null); "
        "echo max$c=$(cat $d/cpuinfo_max_freq 2>/dev/null); done; "
        "for z in /sys/class/thermal/thermal_zone0 /sys/class/thermal/thermal_zone1; do "
        "echo temp=$(cat $z/type 2>/dev/null):$(cat $z/temp 2>/dev/null); done"
    )


def parse_info(text: str, cpus: list | None = None) -> dict:
    """The info dict (same keys as latprof.devices.local.host_info) from info_script's output."""
    raw: dict[str, str] = {}
    temps = []
    for line in text.replace("\r", "").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if key == "temp":
            kind, _, milli = value.rpartition(":")
            if milli.strip().lstrip("-").isdigit():
                temps.append((kind or "zone", milli.strip()))
        else:
            raw[key] = value
    cores = [int(c) for c in (cpus or [0])]

    def per_core(prefix: str) -> str | None:
        vals = [(c, raw.get(f"{prefix}{c}", "")) for c in cores]
        vals = [(c, v) for c, v in vals if v]
        if not vals:
            return None
        if len({v for _, v in vals}) == 1:
            return vals[0][1]
        return ",".join(f"cpu{c}={v}" for c, v in vals)

    info = {
        "arch": raw.get("arch") or None,
        "cpu": raw.get("cpu") or raw.get("model") or "",
        "cores": int(raw["cores"]) if raw.get("cores", "").isdigit() else None,
        "governor": per_core("gov"),
        "freq_khz": per_core("cur"),
        "max_freq_khz": per_core("max"),
        "temp_mc": temps[0][1] if temps else None,
    }
    if raw.get("model"):
        info["model"] = raw["model"]
    if len(temps) > 1:
        info["temp_zones"] = ",".join(f"{k}={v}" for k, v in temps)
    return info


def local_path(cfg: DeviceConfig, value: str | None) -> Path | None:
    """A path from the config on this host: ~ and $VARS expanded; relative paths are relative to the
    config file's folder."""
    if not value:
        return None
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    if not p.is_absolute() and cfg.source:
        p = Path(cfg.source).resolve().parent / p
    return p
