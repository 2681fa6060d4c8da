"""`transport: ssh`: a Linux device (a board, or the emulated arm64 device) reached over SSH.

One SSH connection (paramiko, key auth, host key checked against the config's known_hosts file, never
added silently) starts the TVM RPC server on the device with a pty, so it dies with the channel, waits
for its "bind to" line and forwards a local port to it. That connection lives in a helper process
(`python -m latprof.devices.ssh`): a paramiko forwarder thread in the process that calls TVM deadlocks,
because TVM's FFI holds the GIL while it blocks on the socket. The helper talks to the parent with JSON
lines on stdout and stops (remote server's process group killed, connection closed) when the parent
closes its stdin, exits, or is interrupted.

connection:
  host, port (22), user (default: this user), key (private key file), agent (true: offer the keys of the
  running ssh-agent, $SSH_AUTH_SOCK; key, agent or both), known_hosts (file),
  jump (a bastion to go through, like ssh -J: host, port, user, key, agent; its host key is checked
  against the same known_hosts),
  server_command (argv list or string, e.g. python3 -m tvm.exec.rpc_server --host 127.0.0.1 --port 9090),
  env (extra environment for the server), connect_timeout (s, 10), start_timeout (s, 120)
"""

from __future__ import annotations

import getpass
import json
import os
import queue
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from latprof.devices import register_transport
from latprof.devices.config import DeviceConfig
from latprof.devices.remote import (BIND_RE, PID_RE, REQUIRED, check_connection, command_argv, info_script,
                                    kill_group_command, local_path, parse_info, server_shell_command)
from latprof.errors import ConfigError, DeviceError, HostKeyError

SCHEMA = {
    "host": (str, REQUIRED),
    "port": (int, 22),
    "user": (str, None),
    "key": (str, None),
    "agent": (bool, False),
    "known_hosts": (str, REQUIRED),
    "jump": (dict, None),
    "server_command": ((str, list), REQUIRED),
    "env": (dict, {}),
    "connect_timeout": (float, 10.0),
    "start_timeout": (float, 120.0),
}


@register_transport("ssh")
class SSHTransport:
    @staticmethod
    def validate(cfg: DeviceConfig) -> None:
        check_connection(cfg, SCHEMA)
        conn = cfg.connection  # defaults filled in; what is set below is seen by the session too
        if not 0 < conn["port"] < 65536:
            raise ConfigError(f"{cfg.source}: field 'connection.port' must be a TCP port, got {conn['port']}",
                              "set connection.port to the device's sshd port (usually 22)")
        command_argv(cfg)
        if conn["user"] is None:
            conn["user"] = getpass.getuser()
        _check_auth(cfg, conn, "connection")
        if conn["jump"] is not None:
            conn["jump"] = _check_jump(cfg, conn)

    @staticmethod
    def open(cfg: DeviceConfig) -> "SSHSession":
        return SSHSession(cfg)


JUMP_SCHEMA = {"host": (str, REQUIRED), "port": (int, 22), "user": (str, None), "key": (str, None),
               "agent": (bool, None)}


def _check_auth(cfg: DeviceConfig, section: dict, where: str) -> None:
    if not section.get("key") and not section.get("agent"):
        raise ConfigError(f"{cfg.source}: '{where}' has no way to authenticate (neither key nor agent)",
                          f"set {where}.key to a private key file, or {where}.agent: true to use your ssh-agent")


def _check_jump(cfg: DeviceConfig, conn: dict) -> dict:
    """The bastion: the connection's user and credentials unless it names its own."""
    own_auth = "key" in conn["jump"] or "agent" in conn["jump"]
    jump = check_connection(cfg, JUMP_SCHEMA, dict(conn["jump"]), "connection.jump")
    jump["user"] = jump["user"] or conn["user"]
    if not own_auth:
        jump.update(key=conn["key"], agent=conn["agent"])
    if not 0 < jump["port"] < 65536:
        raise ConfigError(f"{cfg.source}: field 'connection.jump.port' must be a TCP port, got {jump['port']}",
                          "set connection.jump.port to the bastion's sshd port (usually 22)")
    _check_auth(cfg, jump, "connection.jump")
    return jump


def _hop(cfg: DeviceConfig, section: dict, where: str) -> dict:
    """One SSH hop for the helper; a key file that is named must exist."""
    key = None
    if section.get("key"):
        key = local_path(cfg, section["key"])
        if not key.exists():
            raise DeviceError(f"SSH key {key} ({where}.key of {cfg.name}) does not exist",
                              f"create one (ssh-keygen -t ed25519 -f {key}) and add its .pub to the device's authorized_keys")
    if section.get("agent") and not os.environ.get("SSH_AUTH_SOCK"):
        raise DeviceError(f"{where}.agent of {cfg.name} is true but no ssh-agent is running (SSH_AUTH_SOCK is not set)",
                          "start one and add your key (eval $(ssh-agent); ssh-add KEY), or set a key file")
    return {"host": section["host"], "port": section["port"], "user": section["user"],
            "key": str(key) if key else None, "agent": bool(section.get("agent"))}


def helper_params(cfg: DeviceConfig) -> dict:
    conn = cfg.connection
    known = local_path(cfg, conn["known_hosts"])
    if not known.exists():
        raise HostKeyError(f"known_hosts file {known} (connection.known_hosts of {cfg.name}) does not exist",
                           f"after checking the host's fingerprint, trust it explicitly: {keyscan_hint(conn, known)}")
    return {
        **_hop(cfg, conn, "connection"), "known_hosts": str(known),
        "jump": _hop(cfg, conn["jump"], "connection.jump") if conn.get("jump") else None,
        "command": server_shell_command(command_argv(cfg), conn["env"], cfg.threads, cfg.cpus),
        "info": info_script(cfg.cpus), "cpus": cfg.cpus, "connect_timeout": conn["connect_timeout"],
        "start_timeout": conn["start_timeout"],
        "arch_command": (shlex.quote(command_argv(cfg)[0]) + " -c 'import platform; print(platform.machine())'"
                         if cfg.emulated else None),
    }


def keyscan_hint(conn: dict, known) -> str:
    port = f"-p {conn['port']} " if conn["port"] != 22 else ""
    return f"ssh-keyscan {port}{shlex.quote(conn['host'])} >> {shlex.quote(str(known))}"


class SSHSession:
    """The parent's side: the helper process, the TVM RPC session through its forwarded port."""

    def __init__(self, cfg: DeviceConfig):
        self.cfg = cfg
        self.rpc = None
        self.remote_pid: int | None = None
        self.remote_port: int | None = None
        self._info: dict = {}
        self._stderr: list[str] = []
        self._events: queue.Queue = queue.Queue()
        params = helper_params(cfg)
        self.proc = subprocess.Popen([sys.executable, "-m", "latprof.devices.ssh"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)  # Ctrl-C reaches us; we stop it in order
        try:
            self.proc.stdin.write(json.dumps(params) + "\n")
            self.proc.stdin.flush()
            threading.Thread(target=self._pump_stdout, daemon=True).start()
            threading.Thread(target=self._pump_stderr, daemon=True).start()
            ready = self._wait("ready", params["connect_timeout"] + params["start_timeout"] + 5)
            self.local_port = ready["port"]
            from latprof.compile import tvmlib

            # cores are pinned by taskset at the server's start (TVM's RPC cannot pass a core list)
            self.rpc = tvmlib.rpc_connect("127.0.0.1", self.local_port, threads=cfg.threads, cpus=None)
        except BaseException:
            self.close()
            raise

    def _pump_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                self._stderr.append(line.rstrip())
        self._events.put({"event": "eof"})

    def _pump_stderr(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-50]

    def _wait(self, wanted: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self._events.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise DeviceError(f"device '{self.cfg.name}': no RPC server up after {timeout:.0f} s over SSH",
                                  "check connection.server_command by hand on the device, or raise connection.start_timeout") from None
            kind = ev.get("event")
            if kind == "info":
                self._info = ev["info"]
            elif kind == "server":
                self.remote_pid = ev["pid"]
            elif kind == "error":
                cls = HostKeyError if ev.get("kind") == "hostkey" else DeviceError
                raise cls(ev["message"], ev.get("fix"))
            elif kind == "eof":
                tail = " | ".join(self._stderr[-3:]) or "no output"
                raise DeviceError(f"device '{self.cfg.name}': the SSH helper exited ({tail})",
                                  "check the device is reachable over SSH")
            if kind == wanted:
                if "remote_port" in ev:
                    self.remote_port = ev["remote_port"]
                return ev

    def info(self) -> dict:
        return dict(self._info)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.rpc = None
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the helper stops the remote server and disconnects
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)


# -- the helper process -------------------------------------------------------------------------------

def _emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class _UnknownHost(Exception):
    pass


def _connect(hop: dict, known_hosts: str, timeout: float, sock=None):
    """One SSH hop (over `sock`, a channel through the previous hop, when given); exits with an error
    event on an unknown or changed host key, failed authentication, or no route."""
    import paramiko

    class Refuse(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            raise _UnknownHost(f"{hostname} {key.get_name()} SHA256:{_fingerprint(key)}")

    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts)  # only this file: no system or user known_hosts
    client.set_missing_host_key_policy(Refuse())
    where = f"{hop['user']}@{hop['host']}:{hop['port']}"
    hint = keyscan_hint(hop, known_hosts)
    if hop["agent"] and not hop["key"] and not paramiko.Agent().get_keys():
        _emit(event="error", kind="device", message=f"SSH to {where}: the ssh-agent holds no keys",
              fix="add your key to it (ssh-add KEY), or set connection.key")
        sys.exit(1)
    try:
        client.connect(hop["host"], hop["port"], username=hop["user"], key_filename=hop["key"], look_for_keys=False,
                       allow_agent=hop["agent"], sock=sock, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout)
    except _UnknownHost as exc:
        _emit(event="error", kind="hostkey", message=f"SSH host key of {where} is not in {known_hosts} ({exc})",
              fix=f"verify the fingerprint, then trust it explicitly: {hint}")
        sys.exit(1)
    except paramiko.BadHostKeyException as exc:
        _emit(event="error", kind="hostkey",
              message=f"SSH host key of {where} has CHANGED (got SHA256:{_fingerprint(exc.key)}, {known_hosts} "
                      "has another): refusing to connect",
              fix=f"if the device was reinstalled, remove its old line from {known_hosts} and trust the new key: {hint}")
        sys.exit(1)
    except paramiko.AuthenticationException as exc:
        offered = " and ".join(x for x in (hop["key"], "the ssh-agent's keys" if hop["agent"] else None) if x)
        _emit(event="error", kind="device", message=f"SSH key authentication to {where} failed with {offered} ({exc})",
              fix="add the public key to the device's ~/.ssh/authorized_keys")
        sys.exit(1)
    except (OSError, paramiko.SSHException) as exc:
        _emit(event="error", kind="device", message=f"cannot reach {where} over SSH ({str(exc)[:200]})",
              fix="check that the device is on and its sshd listens there (connection.host, connection.port)")
        sys.exit(1)
    return client


def _connect_all(p: dict) -> list:
    """[bastion,] device: each hop's host key checked against known_hosts."""
    t = p["connect_timeout"]
    if not p.get("jump"):
        return [_connect(p, p["known_hosts"], t)]
    bastion = _connect(p["jump"], p["known_hosts"], t)
    try:
        chan = bastion.get_transport().open_channel("direct-tcpip", (p["host"], p["port"]), ("127.0.0.1", 0),
                                                    timeout=t)
    except Exception as exc:
        _emit(event="error", kind="device",
              message=f"the bastion {p['jump']['host']} cannot reach {p['host']}:{p['port']} ({str(exc)[:200]})",
              fix="check connection.host and connection.port as the bastion sees them, and its AllowTcpForwarding")
        sys.exit(1)
    return [bastion, _connect(p, p["known_hosts"], t, sock=chan)]


def _fingerprint(key) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _run(client, command: str, timeout: float = 30.0) -> str:
    _, out, _ = client.exec_command(command, timeout=timeout)
    return out.read().decode(errors="replace")


def _pipe(sock: socket.socket, chan) -> None:
    try:
        while True:
            r, _, _ = select.select([sock, chan], [], [], 5)
            if sock in r:
                data = sock.recv(65536)
                if not data:
                    break
                chan.sendall(data)
            if chan in r:
                data = chan.recv(65536)
                if not data:
                    break
                sock.sendall(data)
    except (OSError, EOFError):
        pass
    finally:
        for c in (chan, sock):
            try:
                c.close()
            except Exception:
                pass


def helper_main() -> None:
    """Runs in its own process: connect, read device info, start the server, forward, clean up."""
    p = json.loads(sys.stdin.readline())
    *hops, client = _connect_all(p)
    transport = client.get_transport()
    transport.set_keepalive(5)
    stop = threading.Event()
    state: dict = {"pid": None, "lines": []}
    cleaned = threading.Lock()

    def cleanup(*_):
        if not cleaned.acquire(blocking=False):
            return
        stop.set()
        if state["pid"] and transport.is_active():
            try:
                _run(client, kill_group_command(state["pid"]), timeout=10)
            except Exception:
                pass
        for c in [client, *hops]:
            c.close()

    signal.signal(signal.SIGTERM, lambda *a: (cleanup(), os._exit(0)))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        info = parse_info(_run(client, p["info"]), p["cpus"])
        if p.get("arch_command"):
            arch = _run(client, p["arch_command"], timeout=60).strip().splitlines()
            info["arch"] = f"{arch[-1] if arch else '?'} (emulated on {info['arch']})"
        _emit(event="info", info=info)
        chan = transport.open_session()
        chan.get_pty()  # the server gets SIGHUP when the channel closes
        chan.exec_command(p["command"])
    except Exception as exc:
        _emit(event="error", kind="device", message=f"SSH session to {p['host']} failed ({str(exc)[:200]})")
        cleanup()
        sys.exit(1)

    bound = threading.Event()

    def read_server():
        buf = b""
        while True:
            data = chan.recv(4096)
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").rstrip("\r")
                state["lines"] = (state["lines"] + [line])[-20:]
                m = PID_RE.search(line)
                if m and state["pid"] is None:
                    state["pid"] = int(m.group(1))
                    _emit(event="server", pid=state["pid"])
                m = BIND_RE.search(line)
                if m and not bound.is_set():
                    host = m.group(1)
                    state["bind"] = ("127.0.0.1" if host in ("0.0.0.0", "") else host, int(m.group(2)))
                    bound.set()
        status = chan.recv_exit_status() if chan.exit_status_ready() else None
        if not stop.is_set():
            _emit(event="server_exit", status=status, tail=state["lines"][-3:])
        bound.set()
        stop.set()

    threading.Thread(target=read_server, daemon=True).start()
    if not bound.wait(p["start_timeout"]) or "bind" not in state:
        tail = " | ".join(state["lines"][-3:]) or "no output"
        _emit(event="error", kind="device",
              message=f"the TVM RPC server on {p['host']} did not start ({tail})",
              fix="run connection.server_command by hand on the device; is apache-tvm installed for that python?")
        cleanup()
        sys.exit(1)

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.5)

    def accept_loop():
        while not stop.is_set():
            try:
                sock, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            try:  # errors per connection: one failed open never ends the loop
                ch = transport.open_channel("direct-tcpip", state["bind"], addr, timeout=10)
            except Exception:
                sock.close()
                continue
            threading.Thread(target=_pipe, args=(sock, ch), daemon=True).start()
        listener.close()

    threading.Thread(target=accept_loop, daemon=True).start()
    _emit(event="ready", port=listener.getsockname()[1], remote_port=state["bind"][1])

    def watch_stdin():  # EOF: the parent closed us or died
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(1.0):
        if not transport.is_active():
            _emit(event="server_exit", status=None, tail=["SSH connection lost"])
            break
    cleanup()


if __name__ == "__main__":
    helper_main()
