"""The raw-sample store: `<workdir>/samples/<device>.jsonl`, one JSON line per measured point.

Appended and fsynced as each point finishes, so Ctrl-C, a crash or a dropped device loses nothing; a
torn last line (killed mid-write) is ignored on read. A point's `key` identifies what was measured
(graph, engine, tuning, target, settings): a rerun skips keys already present, which is how runs resume.
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

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.records() if not r.get("reference")}

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"schema": SAMPLES_SCHEMA, **record}, sort_keys=True) + "\n"
        # one write of one line on an O_APPEND descriptor, then fsync: never interleaved, never half-kept
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
