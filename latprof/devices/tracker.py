"""`transport: tracker`: sessions requested by key from a TVM RPC tracker (a device farm: every phone or
board runs a server registered under a key such as `s20`).

connection:
  host, port (9190), key, priority (1), session_timeout (s the server grants a session; 0 = unlimited),
  sessions (how many servers under the key to hold at once, 1), request_timeout (s to wait while every
  server under the key is busy, 600)

With `sessions: N` the session holds N devices (`.sessions`) and they work at once: the measure runner
gives each its own thread (measure/runner.py `farm_lanes`), tuning times a candidate on each
(compile/tvmlib.py `session_runner`). Code that uses `.rpc` as one session (validate, interleaved
re-measurement) spreads modules round robin: each upload goes to the next device, and that module is
loaded, run and timed there. Every device under one key must be the same model: their samples go into
one table.
"""

from __future__ import annotations

import threading

from latprof.devices import register_transport
from latprof.devices.config import DeviceConfig
from latprof.devices.remote import REQUIRED, check_connection
from latprof.errors import ConfigError, DeviceError

SCHEMA = {
    "host": (str, REQUIRED),
    "port": (int, 9190),
    "key": (str, REQUIRED),
    "priority": (int, 1),
    "session_timeout": (float, 0.0),
    "sessions": (int, 1),
    "request_timeout": (float, 600.0),
}


@register_transport("tracker")
class TrackerTransport:
    @staticmethod
    def validate(cfg: DeviceConfig) -> None:
        conn = check_connection(cfg, SCHEMA)
        if conn["sessions"] < 1:
            raise ConfigError(f"{cfg.source}: field 'connection.sessions' must be at least 1", "set connection.sessions: 1")
        if not 0 < conn["port"] < 65536:
            raise ConfigError(f"{cfg.source}: field 'connection.port' must be a TCP port, got {conn['port']}",
                              "set connection.port to the tracker's port (9190 by default)")

    @staticmethod
    def open(cfg: DeviceConfig) -> "TrackerSession":
        return TrackerSession(cfg)


class RoundRobinRPC:
    """Looks like one tvm.rpc.RPCSession; each upload picks the next session, and what follows it
    (load_module, cpu, get_function) goes to the session that received the upload."""

    def __init__(self, sessions: list):
        self.sessions = sessions
        self.current = sessions[0]
        self._next = 0
        self.uploads = [0] * len(sessions)

    def upload(self, data, target=None):
        i = self._next
        self._next = (i + 1) % len(self.sessions)
        self.current = self.sessions[i]
        self.uploads[i] += 1
        return self.current.upload(data, target)

    def __getattr__(self, name):
        return getattr(self.current, name)


def server_system(sess) -> dict:
    """{arch, cpu} from a TVM RPC server's own LLVM (None where the server has only the runtime)."""
    out = {}
    for key, func in (("triple", "target.llvm_get_system_triple"), ("cpu", "target.llvm_get_system_cpu")):
        try:
            out[key] = str(sess.get_function(func)())
        except Exception:  # a runtime-only server has no compiler functions: unknown, not an error
            out[key] = None
    return {"arch": out["triple"].split("-")[0] if out["triple"] else None, "cpu": out["cpu"], "triple": out["triple"]}


class TrackerSession:
    def __init__(self, cfg: DeviceConfig):
        from latprof.compile import tvmlib

        conn = cfg.connection
        self.cfg = cfg
        self.where = f"{conn['host']}:{conn['port']}"
        self.tracker = tvmlib.connect_tracker(conn["host"], conn["port"])
        servers = tvmlib.tracker_servers(self.tracker)
        if not servers.get(conn["key"]):
            known = ", ".join(f"{k} ({n})" for k, n in sorted(servers.items())) or "none"
            raise DeviceError(f"no RPC server is registered under key '{conn['key']}' at the tracker {self.where} "
                              f"(registered: {known})",
                              f"start one on the device with --tracker {self.where} --key {conn['key']}, or fix connection.key")
        self.registered = servers[conn["key"]]
        want = min(conn["sessions"], self.registered)
        self.sessions = [self._request(tvmlib) for _ in range(want)]
        self.rpc = self.sessions[0] if want == 1 else RoundRobinRPC(self.sessions)

    def _request(self, tvmlib):
        conn = self.cfg.connection
        box: dict = {}

        def ask():
            try:
                box["sess"] = tvmlib.tracker_request(self.tracker, conn["key"], conn["priority"],
                                                     conn["session_timeout"], self.cfg.threads, None)
            except BaseException as exc:  # handed to the caller's thread
                box["err"] = exc

        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(conn["request_timeout"])
        if "err" in box:
            raise box["err"]
        if "sess" not in box:
            raise DeviceError(f"every server under key '{conn['key']}' at {self.where} stayed busy for "
                              f"{conn['request_timeout']:.0f} s", "retry later or raise connection.request_timeout")
        return box["sess"]

    def info(self) -> dict:
        """What the servers themselves can say: an RPC server offers no shell, so governor, frequencies and
        temperature stay unknown; a server with the full TVM (not a runtime-only one, like Android's
        tvm_rpc) reports its LLVM host triple and CPU, which give arch and cpu."""
        conn = self.cfg.connection
        found = [server_system(s) for s in self.sessions]
        first = found[0] if found else {}
        return {"arch": first.get("arch"), "cpu": first.get("cpu") or "", "governor": None, "freq_khz": None,
                "temp_mc": None, "tracker": self.where, "key": conn["key"], "registered": self.registered,
                "sessions": len(self.sessions),
                **({"servers": found} if len(found) > 1 else {})}

    def close(self) -> None:
        self.rpc = None
        self.sessions = []  # dropping the last reference closes each RPC session; the servers stay up
        self.tracker.close()
