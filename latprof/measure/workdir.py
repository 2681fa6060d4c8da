"""A workdir's parts: what it keeps and what can be rebuilt from it, and `clean` for the latter.

Kept: raw samples, tuning databases, tables, validation results (hours of device time each).
Rebuilt: exported ONNX graphs and compiled libraries, which are content-addressed (a graph by the
hash of its bytes, a library by its graph, target and tuning records), so a later run exports or
compiles them again to the same names and measures nothing again. They are most of a workdir's size
(a tuned-TVM PiT-S validation left 2.5 GB of graphs and 2.6 GB of libraries beside 0.1 GB of the rest).

A run holds a shared lock on the workdir from the moment it opens an engine or exports a graph until
its process ends; `clean` takes it exclusively, so it never deletes files a running measurement reads.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from latprof.errors import UsageError

LOCK = ".latprof.lock"
# part -> what removing it costs the next run
REBUILDABLE = {
    "graphs": "exported again from the model code by the next run that needs them",
    "libs": "compiled again from the tuning database by the next run that needs them; nothing is tuned again",
}

_held: dict[Path, int] = {}  # workdir -> fd holding its shared lock (released when the process exits)


def _lock_fd(workdir: Path) -> int:
    return os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)


def hold(workdir: Path) -> None:
    """Mark this process as using `workdir` until it exits: `clean` then refuses to touch it."""
    workdir = Path(workdir).resolve()
    if workdir in _held:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    fd = _lock_fd(workdir)
    fcntl.flock(fd, fcntl.LOCK_SH)  # blocks only while a clean is deleting, seconds at most
    _held[workdir] = fd


@dataclass(frozen=True)
class Part:
    name: str
    files: int
    bytes: int
    rebuilt: str


def _size(path: Path) -> tuple[int, int]:
    files = size = 0
    for p in path.rglob("*"):
        if p.is_file():
            files += 1
            size += p.stat().st_size
    return files, size


def clean(workdir: Path, parts: tuple[str, ...] = tuple(REBUILDABLE), dry_run: bool = False) -> list[Part]:
    """Delete the rebuildable `parts` of `workdir` (all by default); returns what was (or would be)
    freed. Raises UsageError if the workdir is not one, or a run is using it."""
    workdir = Path(workdir)
    unknown = [p for p in parts if p not in REBUILDABLE]
    if unknown:
        raise UsageError(f"cannot clean {', '.join(unknown)}: only {', '.join(REBUILDABLE)} can be rebuilt",
                         "samples, tuning databases, tables and validation results are kept; delete them by hand")
    if not workdir.is_dir() or not any((workdir / d).is_dir() for d in (*REBUILDABLE, "samples", "tuning", "validate")):
        raise UsageError(f"{workdir} is not a latprof workdir (no graphs/, libs/, samples/, tuning/ or validate/)",
                         "pass the --workdir that `latprof measure` used (default ./latprof-work or $LATPROF_HOME)")
    own = _held.pop(workdir.resolve(), None)
    if own is not None:  # this process's own runs are done with it (a second lock of ours would block us)
        os.close(own)
    fd = _lock_fd(workdir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"a latprof run is using {workdir} (it holds {workdir / LOCK})",
                             "wait for it to end, then clean again") from None
        freed = []
        for name in parts:
            path, doomed = workdir / name, workdir / f".{name}.deleting"
            if not dry_run:
                shutil.rmtree(doomed, ignore_errors=True)  # left by a clean that was stopped
            if not path.is_dir():
                continue
            files, size = _size(path)
            if not dry_run:
                # renamed first: a part half-deleted by a crash is never read as a cache
                os.replace(path, doomed)
                shutil.rmtree(doomed)
            freed.append(Part(name, files, size, REBUILDABLE[name]))
        return freed
    finally:
        os.close(fd)  # releases the lock
