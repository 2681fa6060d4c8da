"""The raw-sample store: `<workdir>/samples/<device>.jsonl`, one JSON line per measured visit of a point.

Appended and fsynced as each visit finishes, so Ctrl-C, a crash or a dropped device loses nothing; a
torn last line (killed mid-write) is ignored on read, and the next append starts a line of its own. A
point's `key` identifies what was measured (graph, engine, tuning, target, settings): a rerun skips the
(key, visit) pairs already present, which is how runs resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SAMPLES_SCHEMA = 1


def point_key(**fields) -> str:
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class SampleStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-write; everything before it is intact
                if rec.get("schema") == SAMPLES_SCHEMA:
                    out.append(rec)
        return out

    def append(self, record: dict) -> None:
        append_line(self.path, json.dumps({"schema": SAMPLES_SCHEMA, **record}, sort_keys=True))


def append_line(path: Path, line: str) -> None:
    """One line appended to a JSON-lines file in one write on an O_APPEND descriptor, then fsynced: never
    interleaved, never half-kept. After a line torn by a kill, it starts a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        torn = end > 0 and os.pread(fd, 1, end - 1) != b"\n"
        os.write(fd, (("\n" if torn else "") + line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
