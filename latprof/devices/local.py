"""The built-in `local` device: this machine's CPU behind a real TVM RPC server process on loopback,
so local measurement takes the same path as a remote device."""

from __future__ import annotations

import os
import platform

from latprof.devices import register_transport
from latprof.devices.config import DeviceConfig
from latprof.devices.rpcserver import ServerProcess, free_port, server_argv
from latprof.errors import ConfigError, DeviceError


def host_info() -> dict:
    """What can be read about this Linux host (also the shape of remote info dicts)."""
    info = {"arch": platform.machine(), "cpu": "", "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "Hardware")):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for key, path in (("governor", "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
                      ("freq_khz", "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"),
                      ("temp_mc", "/sys/class/thermal/thermal_zone0/temp")):
        try:
            with open(path) as fh:
                info[key] = fh.read().strip()
        except OSError:
            info[key] = None
    return info


class LocalSession:
    def __init__(self, cfg: DeviceConfig):
        from latprof.compile import tvmlib

        env = {"TVM_NUM_THREADS": str(cfg.threads)}
        port = cfg.connection.get("port") or free_port()
        self.server = ServerProcess(server_argv(port=port, port_end=port + 100), env=env, cpus=cfg.cpus)
        try:
            self.rpc = tvmlib.rpc_connect("127.0.0.1", self.server.port, threads=cfg.threads, cpus=cfg.cpus)
        except DeviceError as exc:
            self.server.stop()
            raise DeviceError(f"{exc.message}; server said: {' | '.join(self.server.lines[-3:])}", exc.fix) from None
        except BaseException:
            self.server.stop()
            raise

    def info(self) -> dict:
        return host_info()

    def alive(self) -> bool:
        return self.server.alive()

    def close(self) -> None:
        self.rpc = None
        self.server.stop()


@register_transport("local")
class LocalTransport:
    @staticmethod
    def validate(cfg: DeviceConfig) -> None:
        unknown = set(cfg.connection) - {"port"}
        if unknown:
            raise ConfigError(f"{cfg.source}: unknown field 'connection.{sorted(unknown)[0]}' for transport local",
                              "the local transport takes only connection.port")

    @staticmethod
    def open(cfg: DeviceConfig) -> LocalSession:
        return LocalSession(cfg)
