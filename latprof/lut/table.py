"""The lookup-table file: `luts/<device>.csv`.

One row per (model, unit, token count). Two comment lines head the file: the schema version and a JSON
provenance record (device, target, versions, settings, date), so the table travels as one file and
pandas reads it with ``comment="#"``. Reading validates everything a consumer relies on.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latprof.errors import LutError

SCHEMA_VERSION = 1
MAGIC = "# latprof-lut schema="
COLUMNS = [
    "model",      # registry name, e.g. deit_t
    "unit",       # unit name, e.g. blocks.3, patch_embed, selector.0
    "kind",       # fixed: one cost whatever the token count; tokens: cost is a function of N
    "position",   # order of the unit in the network (0 = first)
    "tokens",     # N, every token the unit sees (class + kept + package tokens)
    "median_ms",
    "q1_ms",
    "q3_ms",
    "ci_low_ms",  # 95% confidence interval of the median (order statistics)
    "ci_high_ms",
    "n_samples",
    "engine",     # tvm | onnxruntime
    "tuning",     # e.g. metaschedule:64, untuned, none (onnxruntime)
    "graph",      # content hash of the measured graph; equal hashes were measured once
    "samples_ms", # every raw sample, space-separated: `latprof check` tests significance against them
]
KINDS = ("fixed", "tokens")


@dataclass
class LutTable:
    frame: "pandas.DataFrame"  # noqa: F821
    provenance: dict = field(default_factory=dict)
    path: str | None = None

    # -- queries ---------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return sorted(self.frame["model"].unique())

    @property
    def engine(self) -> str:
        engines = sorted(self.frame["engine"].unique())
        if len(engines) != 1:
            raise LutError(f"table {self.path} mixes engines {engines}", "select one with LutTable.for_engine(name)")
        return engines[0]

    def for_engine(self, engine: str) -> "LutTable":
        sub = self.frame[self.frame["engine"] == engine]
        if sub.empty:
            raise LutError(f"table {self.path} has no rows for engine '{engine}'",
                           f"use one of {sorted(self.frame['engine'].unique())}")
        return LutTable(sub.reset_index(drop=True), self.provenance, self.path)

    def model_frame(self, model: str):
        sub = self.frame[self.frame["model"] == model]
        if sub.empty:
            raise LutError(f"table {self.path} has no rows for model '{model}'",
                           f"measure it first (latprof measure --model {model}) or use one of {self.models}")
        return sub

    def units(self, model: str) -> list[str]:
        """Unit names of a model in network order."""
        sub = self.model_frame(model)
        return list(sub.sort_values("position").drop_duplicates("unit")["unit"])

    def kind(self, model: str, unit: str) -> str:
        return str(self._unit_rows(model, unit)["kind"].iloc[0])

    def curve(self, model: str, unit: str):
        """(tokens, median_ms, q1_ms, q3_ms) as ascending numpy arrays."""
        rows = self._unit_rows(model, unit).sort_values("tokens")
        return (rows["tokens"].to_numpy(int), rows["median_ms"].to_numpy(float),
                rows["q1_ms"].to_numpy(float), rows["q3_ms"].to_numpy(float))

    def samples(self, model: str, unit: str, tokens: int) -> np.ndarray:
        """The raw samples (ms) behind one row."""
        rows = self._unit_rows(model, unit)
        row = rows[rows["tokens"] == tokens]
        if row.empty:
            raise LutError(f"{model}/{unit} was not measured at {tokens} tokens",
                           f"measured counts are {sorted(rows['tokens'])}")
        return np.array([float(v) for v in str(row["samples_ms"].iloc[0]).split()])

    def token_range(self, model: str, unit: str) -> tuple[int, int]:
        tokens = self.curve(model, unit)[0]
        return int(tokens[0]), int(tokens[-1])

    def latency_ms(self, model: str, unit: str, tokens: float) -> float:
        """Median latency at `tokens`, linear (hence monotone, never overshooting) between measured
        counts. Outside the measured range is an error, not an extrapolation."""
        return float(self.interpolate(model, unit, tokens, column=1))

    def interpolate(self, model: str, unit: str, tokens: float, column: int = 1) -> float:
        curve = self.curve(model, unit)
        xs, ys = curve[0], curve[column]
        if self.kind(model, unit) == "fixed":
            return float(ys[0])
        if tokens < xs[0] or tokens > xs[-1]:
            raise LutError(
                f"{model}/{unit}: {tokens} tokens is outside the measured range {xs[0]}..{xs[-1]}",
                f"measure that token count (latprof measure --tokens {int(round(tokens))})")
        return float(np.interp(tokens, xs, ys))

    def _unit_rows(self, model: str, unit: str):
        sub = self.model_frame(model)
        rows = sub[sub["unit"] == unit]
        if rows.empty:
            raise LutError(f"table {self.path} has no unit '{unit}' for model '{model}'",
                           f"units are {self.units(model)}")
        return rows


# -- reading and writing -----------------------------------------------------------------------------
def read_lut(path: str | os.PathLike) -> LutTable:
    import pandas as pd

    path = str(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise LutError(f"cannot read table {path}: {exc.strerror}",
                       "build it with `latprof build-lut --device NAME`") from None
    lines = text.splitlines()
    if not lines or not lines[0].startswith(MAGIC):
        raise LutError(f"{path} is not a latprof table (first line must start with '{MAGIC}')",
                       "build it with `latprof build-lut`")
    try:
        version = int(lines[0][len(MAGIC):].strip())
    except ValueError:
        raise LutError(f"{path}: unreadable schema version '{lines[0]}'", "rebuild it with `latprof build-lut`") from None
    if version != SCHEMA_VERSION:
        raise LutError(f"{path} has schema {version}, this latprof reads schema {SCHEMA_VERSION}",
                       "rebuild the table from its raw samples with `latprof build-lut`")
    provenance = {}
    if len(lines) > 1 and lines[1].startswith("# provenance="):
        try:
            provenance = json.loads(lines[1][len("# provenance="):])
        except json.JSONDecodeError as exc:
            raise LutError(f"{path}: provenance line is not valid JSON ({exc.msg})", "rebuild it with `latprof build-lut`") from None
    try:
        frame = pd.read_csv(io.StringIO(text), comment="#")
    except Exception as exc:  # pandas raises several types for malformed CSV
        raise LutError(f"{path}: malformed CSV ({exc})", "rebuild it with `latprof build-lut`") from None
    _validate(frame, path)
    return LutTable(frame, provenance, path)


def _validate(frame, path: str) -> None:
    import pandas as pd

    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise LutError(f"{path}: missing columns {missing}", "rebuild it with `latprof build-lut`")
    if frame.empty:
        raise LutError(f"{path}: the table has no rows", "measure something first with `latprof measure`")
    numeric = ["position", "tokens", "median_ms", "q1_ms", "q3_ms", "ci_low_ms", "ci_high_ms", "n_samples"]
    for col in numeric:
        values = pd.to_numeric(frame[col], errors="coerce")
        if values.isna().any():
            row = int(values.index[values.isna()][0]) + 1
            raise LutError(f"{path}: column '{col}' has a missing or non-numeric value (data row {row})",
                           "fix or rebuild the table with `latprof build-lut`")
        frame[col] = values
    bad_kind = ~frame["kind"].isin(KINDS)
    if bad_kind.any():
        raise LutError(f"{path}: unknown kind '{frame['kind'][bad_kind].iloc[0]}' (expected one of {KINDS})",
                       "rebuild the table with `latprof build-lut`")
    if (frame["tokens"] < 1).any() or (frame["median_ms"] <= 0).any() or (frame["n_samples"] < 1).any():
        raise LutError(f"{path}: token counts, latencies and sample counts must be positive",
                       "rebuild the table with `latprof build-lut`")
    if ((frame["q1_ms"] > frame["median_ms"]) | (frame["median_ms"] > frame["q3_ms"])).any():
        raise LutError(f"{path}: quartiles do not bracket the median", "rebuild the table with `latprof build-lut`")
    dup = frame.duplicated(["model", "unit", "tokens", "engine"])
    if dup.any():
        r = frame[dup].iloc[0]
        raise LutError(f"{path}: duplicate row for {r['model']}/{r['unit']} at {r['tokens']} tokens ({r['engine']})",
                       "rebuild the table with `latprof build-lut`")


def write_lut(table: LutTable, path: str | os.PathLike) -> Path:
    """Write atomically: a reader sees the old table or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = table.frame[COLUMNS]
    _validate(frame, str(path))
    body = io.StringIO()
    body.write(f"{MAGIC}{SCHEMA_VERSION}\n")
    body.write("# provenance=" + json.dumps(table.provenance, sort_keys=True) + "\n")
    frame.to_csv(body, index=False, float_format="%.6g")
    atomic_write_text(path, body.getvalue())
    return path


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
