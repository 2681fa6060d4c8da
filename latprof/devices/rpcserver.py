"""Start a TVM RPC server as a child process and wait until it listens.

Used by the local transport directly, and by remote transports for the command they run on the device.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from latprof.errors import DeviceError

BIND_RE = re.compile(r"bind to ([\d.]+):(\d+)")


def free_port() -> int:
    """A port the OS says is free now (the server searches upwards from it if it is taken meanwhile)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_argv(python: str = sys.executable, host: str = "127.0.0.1", port: int = 9090, port_end: int = 9199,
                extra: list[str] | None = None) -> list[str]:
    return [python, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(port),
            "--port-end", str(port_end), *(extra or [])]


class ServerProcess:
    """A TVM RPC server child process, stopped with its whole process group.

    The server's session workers keep uploaded modules in temp dirs they remove only when they exit
    cleanly; the server gets a temp dir of its own (TMPDIR) that `stop` removes whatever way it ended."""

    def __init__(self, argv: list[str], env: dict | None = None, timeout: float = 60.0, cpus: list | None = None):
        self.argv = argv
        self.lines: list[str] = []
        self.scratch = tempfile.mkdtemp(prefix="latprof-rpc-")
        pin = (lambda: os.sched_setaffinity(0, [int(c) for c in cpus])) if cpus else None  # inherited by workers
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {}), "TMPDIR": self.scratch},
                                     start_new_session=True, preexec_fn=pin)
        self.port = self._wait_bind(timeout)

    def _wait_bind(self, timeout: float) -> int:
        found: list[int] = []
        ready = threading.Event()

        def pump():  # keep draining the pipe so the server never blocks on a full pipe
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                m = BIND_RE.search(line)
                if m and not found:
                    found.append(int(m.group(2)))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(timeout)
        if not found:
            self.stop()
            tail = " | ".join(self.lines[-3:]) or "no output"
            raise DeviceError(f"the TVM RPC server did not start ({' '.join(self.argv[:4])}...: {tail})",
                              "check that apache-tvm is installed for that Python (pip install 'latprof[tvm]')")
        return found[0]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left of it: TVM's session workers
        outlive a SIGTERMed server otherwise (orphans of about 350 MB each)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)
        shutil.rmtree(self.scratch, ignore_errors=True)
