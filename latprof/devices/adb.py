"""`transport: adb`: an Android phone (or anything speaking adbd) through the `adb` client.

Picks the device by serial (connection.serial, else $ANDROID_SERIAL; with several attached and none
named it refuses and lists them), pushes the device-side TVM runtime and RPC server the config points to
(connection.runtime_dir, e.g. an NDK build of TVM's apps/cpp_rpc `tvm_rpc` and `libtvm_runtime.so`),
starts the server in connection.remote_dir pinned to the config's cores (taskset), forwards a local port
to it with `adb forward` (inside the adb server process, so it never starves behind TVM's GIL-holding
calls), reads governor, frequencies and temperature where readable, and on close kills the server's
process group and removes the forward. Every adb call names the device with -s.

connection:
  serial, connect (HOST:PORT for `adb connect`, adb over TCP), adb (client binary, "adb"),
  adb_server_port (private adb server, else $ANDROID_ADB_SERVER_PORT or 5037), runtime_dir (local folder
  pushed to remote_dir), remote_dir (/data/local/tmp/latprof), server_command (argv or string, run in
  remote_dir), env, start_timeout (s, 60), pin (taskset to cpus, true)
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading

from latprof.devices import register_transport
from latprof.devices.config import DeviceConfig
from latprof.devices.remote import (BIND_RE, PID_RE, REQUIRED, check_connection, command_argv, info_script,
                                    kill_group_command, local_path, parse_info, server_shell_command)
from latprof.errors import ConfigError, DeviceError

SCHEMA = {
    "serial": (str, None),
    "connect": (str, None),
    "adb": (str, "adb"),
    "adb_server_port": (int, None),
    "runtime_dir": (str, None),
    "remote_dir": (str, "/data/local/tmp/latprof"),
    "server_command": ((str, list), REQUIRED),
    "env": (dict, {}),
    "start_timeout": (float, 60.0),
    "pin": (bool, True),
}


@register_transport("adb")
class ADBTransport:
    @staticmethod
    def validate(cfg: DeviceConfig) -> None:
        conn = check_connection(cfg, SCHEMA)
        command_argv(cfg)
        if conn["connect"] and ":" not in conn["connect"]:
            raise ConfigError(f"{cfg.source}: field 'connection.connect' must be HOST:PORT, got {conn['connect']!r}",
                              "e.g. connect: 192.168.1.20:5555 (adb over TCP), or leave it out for USB")
        if not conn["remote_dir"].startswith("/"):
            raise ConfigError(f"{cfg.source}: field 'connection.remote_dir' must be an absolute path",
                              "e.g. remote_dir: /data/local/tmp/latprof")

    @staticmethod
    def open(cfg: DeviceConfig) -> "ADBSession":
        return ADBSession(cfg)


class ADB:
    """The adb client, always naming the device (-s) and the adb server port."""

    def __init__(self, binary: str, server_port: int | None):
        path = shutil.which(binary)
        if not path:
            raise DeviceError(f"the adb client '{binary}' is not installed",
                              "apt-get install adb (or the Android SDK platform-tools), or set connection.adb")
        self.binary = path
        self.env = dict(os.environ)
        if server_port:
            self.env["ANDROID_ADB_SERVER_PORT"] = str(server_port)
        self.serial: str | None = None

    def argv(self, *args: str) -> list[str]:
        return [self.binary, *(["-s", self.serial] if self.serial else []), *args]

    def run(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        try:
            res = subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"adb {' '.join(args[:2])} did not answer in {timeout:.0f} s",
                              "check the device (adb devices) and its USB/network connection") from None
        if check and res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise DeviceError(f"adb {' '.join(args[:2])} failed on {self.serial or 'the host'} "
                              f"({msg[-1][:200] if msg else f'exit {res.returncode}'})",
                              "check the device is attached and authorized (adb devices)")
        return res.stdout

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)

    def devices(self) -> dict[str, str]:
        out = self.run("devices")
        found = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2:
                found[parts[0]] = parts[1]
        return found


def choose_serial(cfg: DeviceConfig, attached: dict[str, str]) -> str:
    conn = cfg.connection
    serial = conn["serial"] or os.environ.get("ANDROID_SERIAL") or conn["connect"]
    listing = ", ".join(f"{s} ({state})" for s, state in sorted(attached.items())) or "none"
    if serial is None:
        if not attached:
            raise DeviceError(f"no Android device is attached for '{cfg.name}'",
                              "plug it in with USB debugging on (or set connection.connect for adb over TCP)")
        if len(attached) > 1:
            raise DeviceError(f"{len(attached)} devices are attached and '{cfg.name}' names none: {listing}",
                              "set connection.serial in the config, or ANDROID_SERIAL, to one of them")
        serial = next(iter(attached))
    if attached.get(serial) != "device":
        state = attached.get(serial, "not attached")
        raise DeviceError(f"device {serial} is {state} (attached: {listing})",
                          "unlock the phone and accept the USB debugging prompt" if state == "unauthorized"
                          else "check the serial (adb devices) and the cable")
    return serial


class ADBSession:
    def __init__(self, cfg: DeviceConfig):
        self.cfg = cfg
        self.rpc = None
        self.remote_pid: int | None = None
        self.local_port: int | None = None
        self.server: subprocess.Popen | None = None
        self.lines: list[str] = []
        conn = cfg.connection
        self.adb = ADB(conn["adb"], conn["adb_server_port"])
        self.connected = None
        try:
            if conn["connect"]:
                out = self.adb.run("connect", conn["connect"], timeout=30)
                if "connected" not in out:
                    raise DeviceError(f"adb connect {conn['connect']} failed ({out.strip()[:200]})",
                                      "check the address and that adbd listens there (adb tcpip 5555)")
                self.connected = conn["connect"]
            self.adb.serial = choose_serial(cfg, self.adb.devices())
            self._info = parse_info(self.adb.run("shell", info_script(cfg.cpus)), cfg.cpus)
            self._push()
            self._start()
            from latprof.compile import tvmlib

            # cores are pinned by taskset at the server's start: TVM's RPC cannot pass the core list to
            # runtime.config_threadpool (an Array argument), so only the thread count goes over RPC
            self.rpc = tvmlib.rpc_connect("127.0.0.1", self.local_port, threads=cfg.threads, cpus=None)
        except BaseException:
            self.close()
            raise

    def _push(self) -> None:
        conn = self.cfg.connection
        self.adb.run("shell", f"mkdir -p {_q(conn['remote_dir'])}")
        src = local_path(self.cfg, conn["runtime_dir"])
        if src is None:
            return
        if not src.is_dir():
            raise DeviceError(f"connection.runtime_dir {src} of '{self.cfg.name}' is not a folder",
                              "build the Android TVM runtime and RPC server (docs/devices.md) and point runtime_dir at it")
        files = sorted(p for p in src.iterdir() if p.is_file())
        if files:
            self.adb.run("push", *map(str, files), conn["remote_dir"] + "/", timeout=600)

    def _start(self) -> None:
        conn, cfg = self.cfg.connection, self.cfg
        # a server left by a latprof that was killed hard (no close) is stopped first, by its pid file
        pidfile = _q(conn["remote_dir"] + "/latprof-server.pid")
        self.adb.run("shell", f"test -f {pidfile} && {{ p=$(cat {pidfile}); case $p in *[!0-9]*|'') ;; *) "
                              f"kill -KILL -- -$p 2>/dev/null || kill -KILL $p 2>/dev/null;; esac; rm -f {pidfile}; }}; true",
                     check=False)
        line = server_shell_command(command_argv(cfg), conn["env"], cfg.threads, cfg.cpus if conn["pin"] else None,
                                    cwd=conn["remote_dir"])
        line = line.replace("echo LATPROF_PID=$$;", f"echo $$ > {pidfile}; echo LATPROF_PID=$$;", 1)
        self.server = self.adb.popen("shell", line)
        events: queue.Queue = queue.Queue()

        def pump():
            for raw in self.server.stdout:
                text = raw.rstrip()
                self.lines = (self.lines + [text])[-20:]
                m = PID_RE.search(text)
                if m and self.remote_pid is None:
                    self.remote_pid = int(m.group(1))
                m = BIND_RE.search(text)
                if m:
                    events.put(int(m.group(2)))
            events.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            remote_port = events.get(timeout=conn["start_timeout"])
        except queue.Empty:
            remote_port = None
        if remote_port is None:
            tail = " | ".join(self.lines[-3:]) or "no output"
            raise DeviceError(f"the TVM RPC server on {self.adb.serial} did not start ({tail})",
                              "run connection.server_command by hand in connection.remote_dir (adb shell)")
        self.remote_port = remote_port
        self.local_port = int(self.adb.run("forward", "tcp:0", f"tcp:{remote_port}").strip().splitlines()[-1])

    def info(self) -> dict:
        return {**self._info, "serial": self.adb.serial}

    def alive(self) -> bool:
        return self.server is not None and self.server.poll() is None

    def close(self) -> None:
        self.rpc = None
        if self.remote_pid and self.adb.serial:
            pidfile = _q(self.cfg.connection["remote_dir"] + "/latprof-server.pid")
            try:
                self.adb.run("shell", f"{kill_group_command(self.remote_pid)}; rm -f {pidfile}", timeout=15, check=False)
            except DeviceError:
                pass
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(5)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(5)
        if self.local_port:
            try:
                self.adb.run("forward", "--remove", f"tcp:{self.local_port}", timeout=15, check=False)
            except DeviceError:
                pass
            self.local_port = None
        if self.connected:
            serial, self.adb.serial = self.adb.serial, None
            try:
                self.adb.run("disconnect", self.connected, timeout=15, check=False)
            except DeviceError:
                pass
            self.adb.serial, self.connected = serial, None
        self.remote_pid = None


def _q(text: str) -> str:
    import shlex

    return shlex.quote(text)

