"""A small adbd for tests: the device side of the ADB transport protocol over TCP, enough for Debian's real
adb client and server (`adb connect 127.0.0.1:PORT`, shell, push/pull, forward) with this host (or
whatever the shell commands start, e.g. the emulated arm64 device) playing the phone.

Speaks: CNXN without AUTH; OPEN/OKAY/WRTE/CLSE with flow control (one WRTE in flight per stream, an OKAY
per WRTE received); services `shell:` (v1), `shell,v2,...:` (stdout/stderr/exit packets, stdin),
`exec:`, `tcp:PORT[:HOST]` and `sync:` (STAT/LIST/SEND/RECV/QUIT).
Does not emulate: AUTH/pairing, TLS, ptys, getprop/toybox/Android's shell, `adb reverse`, `root`/`remount`,
stat_v2/ls_v2, compression, install. Run: python tests/remote/adbd.py --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat as st
import struct

CNXN, OPEN, OKAY, CLSE, WRTE = 0x4E584E43, 0x4E45504F, 0x59414B4F, 0x45534C43, 0x45545257
VERSION, MAXDATA = 0x01000001, 256 * 1024
BANNER = b"device::ro.product.name=latprof;ro.product.model=latprof-test-adbd;ro.product.device=latprof;features=shell_v2,cmd\0"


def message(cmd: int, a0: int, a1: int, data: bytes = b"") -> bytes:
    return struct.pack("<6I", cmd, a0, a1, len(data), sum(data) & 0xFFFFFFFF, cmd ^ 0xFFFFFFFF) + data


class Stream:
    def __init__(self, conn: "Conn", local: int, remote: int):
        self.conn, self.local, self.remote = conn, local, remote
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.buf = b""
        self.ready = asyncio.Event()
        self.ready.set()
        self.closed = False

    async def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.conn.maxdata):
            await self.ready.wait()  # flow control: the previous WRTE must be OKAYed first
            if self.closed:
                return
            self.ready.clear()
            self.conn.send(message(WRTE, self.local, self.remote, data[i:i + self.conn.maxdata]))

    async def read(self) -> bytes:
        """Next chunk the host wrote; b"" when the host closed the stream."""
        if self.buf:
            data, self.buf = self.buf, b""
            return data
        return await self.inbox.get() or b""

    async def readexactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self.inbox.get()
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.ready.set()
            self.conn.send(message(CLSE, self.local, self.remote))
            self.conn.streams.pop(self.local, None)


class Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.streams: dict[int, Stream] = {}
        self.next_id = 1
        self.maxdata = MAXDATA
        self.procs: set = set()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def run(self) -> None:
        try:
            while True:
                cmd, a0, a1, n, _, _ = struct.unpack("<6I", await self.reader.readexactly(24))
                data = await self.reader.readexactly(n) if n else b""
                if cmd == CNXN:
                    self.maxdata = min(MAXDATA, a1)
                    self.send(message(CNXN, VERSION, MAXDATA, BANNER))
                elif cmd == OPEN:
                    local, self.next_id = self.next_id, self.next_id + 1
                    stream = Stream(self, local, a0)
                    asyncio.ensure_future(self.serve(stream, data.rstrip(b"\0").decode()))
                elif cmd == OKAY and a1 in self.streams:
                    self.streams[a1].remote = a0
                    self.streams[a1].ready.set()
                elif cmd == WRTE and a1 in self.streams:
                    self.streams[a1].inbox.put_nowait(data)
                    self.send(message(OKAY, a1, a0))
                elif cmd == CLSE and a1 in self.streams:
                    s = self.streams[a1]
                    s.inbox.put_nowait(None)
                    s.close()  # answer CLSE with CLSE
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for s in list(self.streams.values()):
                s.closed = True
                s.inbox.put_nowait(None)
                s.ready.set()
            self.writer.close()

    async def serve(self, stream: Stream, service: str) -> None:
        name, _, arg = service.partition(":")
        head = name.split(",")
        try:
            if head[0] == "tcp":
                port, _, host = arg.partition(":")
                reader, writer = await asyncio.open_connection(host or "127.0.0.1", int(port))
            elif head[0] not in ("shell", "exec", "sync"):
                raise ValueError(service)
        except (OSError, ValueError):
            self.send(message(CLSE, 0, stream.remote))
            return
        self.streams[stream.local] = stream
        self.send(message(OKAY, stream.local, stream.remote))
        try:
            if head[0] == "tcp":
                await self.tcp(stream, reader, writer)
            elif head[0] == "sync":
                await self.sync(stream)
            else:
                await self.shell(stream, arg, v2="v2" in head[1:], merge=head[0] == "shell")
        except (EOFError, ConnectionError):
            pass
        finally:
            stream.close()

    async def shell(self, stream: Stream, cmd: str, v2: bool, merge: bool) -> None:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", *(["-c", cmd] if cmd else []), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if v2 else (asyncio.subprocess.STDOUT if merge else None),
            start_new_session=True, cwd=os.environ.get("ADBD_HOME", "/"))
        self.procs.add(proc)

        async def pump(pipe, packet_id):
            while data := await pipe.read(65536):
                await stream.write(struct.pack("<BI", packet_id, len(data)) + data if v2 else data)

        async def feed():  # host -> stdin (v2: packets 0 stdin, 3 close stdin)
            buf = b""
            while chunk := await stream.read():
                if not v2:
                    proc.stdin.write(chunk)
                    continue
                buf += chunk
                while len(buf) >= 5 and len(buf) >= 5 + struct.unpack("<I", buf[1:5])[0]:
                    pid, n = struct.unpack("<BI", buf[:5])
                    body, buf = buf[5:5 + n], buf[5 + n:]
                    if pid == 0:
                        proc.stdin.write(body)
                    elif pid == 3:
                        proc.stdin.close()
            # the host closed the stream: like adbd without a pty, the command is left to its own fate
            if not proc.stdin.is_closing():
                proc.stdin.close()

        feeder = asyncio.ensure_future(feed())
        pumps = [pump(proc.stdout, 1)] + ([pump(proc.stderr, 2)] if proc.stderr else [])
        await asyncio.gather(*pumps)
        code = await proc.wait()
        self.procs.discard(proc)
        feeder.cancel()
        if v2:
            await stream.write(struct.pack("<BIB", 3, 1, code & 0xFF))

    async def tcp(self, stream: Stream, reader, writer) -> None:
        async def up():
            while data := await stream.read():
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.ensure_future(up())
        while data := await reader.read(65536):
            await stream.write(data)
        task.cancel()
        writer.close()

    async def sync(self, stream: Stream) -> None:
        while True:
            req, n = struct.unpack("<4sI", await stream.readexactly(8))
            if req == b"QUIT":
                return
            path = (await stream.readexactly(n)).decode()
            if req == b"STAT":
                try:
                    s = os.stat(path)
                    await stream.write(struct.pack("<4sIII", b"STAT", s.st_mode, s.st_size & 0xFFFFFFFF, int(s.st_mtime)))
                except OSError:
                    await stream.write(struct.pack("<4sIII", b"STAT", 0, 0, 0))
            elif req == b"LIST":
                try:
                    names = os.listdir(path)
                except OSError:
                    names = []
                for name in names:
                    try:
                        s = os.lstat(os.path.join(path, name))
                    except OSError:
                        continue
                    raw = name.encode()
                    await stream.write(struct.pack("<4sIIII", b"DENT", s.st_mode, s.st_size & 0xFFFFFFFF,
                                                   int(s.st_mtime), len(raw)) + raw)
                await stream.write(struct.pack("<4sIIII", b"DONE", 0, 0, 0, 0))
            elif req == b"SEND":
                target, _, mode = path.rpartition(",")
                chunks = []
                while True:
                    kind, size = struct.unpack("<4sI", await stream.readexactly(8))
                    if kind == b"DONE":
                        break
                    chunks.append(await stream.readexactly(size))
                try:
                    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                    with open(target, "wb") as fh:
                        fh.write(b"".join(chunks))
                    os.chmod(target, st.S_IMODE(int(mode or "420")))
                    await stream.write(struct.pack("<4sI", b"OKAY", 0))
                except OSError as exc:
                    msg = str(exc).encode()
                    await stream.write(struct.pack("<4sI", b"FAIL", len(msg)) + msg)
            elif req == b"RECV":
                try:
                    with open(path, "rb") as fh:
                        data = fh.read()
                except OSError as exc:
                    msg = str(exc).encode()
                    await stream.write(struct.pack("<4sI", b"FAIL", len(msg)) + msg)
                    continue
                for i in range(0, len(data), 64 * 1024):
                    part = data[i:i + 64 * 1024]
                    await stream.write(struct.pack("<4sI", b"DATA", len(part)) + part)
                await stream.write(struct.pack("<4sI", b"DONE", 0))
            else:
                msg = f"unsupported sync request {req!r}".encode()
                await stream.write(struct.pack("<4sI", b"FAIL", len(msg)) + msg)
                return


async def main(port: int) -> None:
    server = await asyncio.start_server(lambda r, w: Conn(r, w).run(), "127.0.0.1", port)
    print(f"adbd listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    asyncio.run(main(ap.parse_args().port))
