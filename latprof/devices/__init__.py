"""Devices: configs, transports and the one session interface measurement code talks to.

A transport turns a DeviceConfig into a Session (a TVM RPC session plus what was learnt about the
device); measurement never knows whether the server is local, behind SSH, behind ADB or a tracker.
Transports register by name, so a new one is one module.
"""

from __future__ import annotations

from typing import Protocol

from latprof.devices.config import DeviceConfig, list_configs, load_config

__all__ = ["DeviceConfig", "Session", "Transport", "transports", "open_session", "load_config", "list_configs"]


class Session(Protocol):
    """What a measurement needs from a device. `rpc` is a tvm.rpc.RPCSession."""

    rpc: object

    def info(self) -> dict: ...          # arch, cpu, governor, freq_khz, temp_c where readable
    def close(self) -> None: ...


class Transport(Protocol):
    @staticmethod
    def validate(cfg: DeviceConfig) -> None: ...        # raise ConfigError naming the field
    @staticmethod
    def open(cfg: DeviceConfig) -> Session: ...         # raise DeviceError naming the fix


_TRANSPORTS: dict[str, type] = {}


def register_transport(name: str):
    def wrap(cls):
        _TRANSPORTS[name] = cls
        return cls

    return wrap


def transports() -> dict[str, type]:
    # importing the modules registers them; each keeps its heavy imports inside its functions
    from latprof.devices import local  # noqa: F401

    for optional in ("ssh", "adb", "tracker"):
        try:
            __import__(f"latprof.devices.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"latprof.devices.{optional}":
                raise
    return _TRANSPORTS


class open_session:
    """Context manager: `with open_session(cfg) as s: ...` closes the session (and stops any server
    latprof started) on exit, on error and on Ctrl-C."""

    def __init__(self, cfg: DeviceConfig):
        self.cfg = cfg
        self.session = None

    def __enter__(self) -> Session:
        self.session = transports()[self.cfg.transport].open(self.cfg)
        return self.session

    def __exit__(self, *exc) -> None:
        if self.session is not None:
            self.session.close()
