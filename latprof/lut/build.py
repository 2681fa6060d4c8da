"""`latprof build-lut`: raw samples -> `luts/<device>.csv`.

Statistics are over the raw samples (median, quartiles, a distribution-free 95% CI of the median from
order statistics), never a bare mean. A shared graph's samples give a row to every unit that uses it
(DeiT's twelve blocks: one graph per N, twelve rows). When a point was measured in several runs, the
newest run's samples are used and the older ones stay in the store.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

import latprof
from latprof.errors import LutError, UsageError
from latprof.lut.table import COLUMNS, SCHEMA_VERSION, LutTable, write_lut
from latprof.measure.samples import SampleStore
from latprof.models import get_model


def median_ci(samples: np.ndarray) -> tuple[float, float]:
    """95% order-statistic confidence interval of the median (binomial, normal approximation)."""
    s = np.sort(samples)
    n = len(s)
    if n < 6:
        return float(s[0]), float(s[-1])
    z = 1.959963984540054
    lo = int(np.floor(n / 2 - z * np.sqrt(n) / 2))
    hi = int(np.ceil(1 + n / 2 + z * np.sqrt(n) / 2))
    return float(s[max(lo, 1) - 1]), float(s[min(hi, n) - 1])


def build_lut(store_path: Path, device: str | None = None, engine: str | None = None) -> LutTable:
    import pandas as pd

    records = SampleStore(store_path).records()
    if not records:
        raise UsageError(f"no raw samples in {store_path}", "run `latprof measure --device NAME --model NAME` first")
    engines = sorted({r["engine"] for r in records})
    if engine is None and len(engines) > 1:
        raise UsageError(f"{store_path} holds samples of several engines {engines}", "choose one with --engine")
    engine = engine or engines[0]
    points = [r for r in records if r["engine"] == engine and not r.get("reference")]
    if not points:
        raise UsageError(f"no samples for engine '{engine}' in {store_path}", f"use one of {engines}")
    # newest record per (model, unit, tokens) wins; settings must agree across the table
    latest: dict = {}
    for r in points:
        latest[(r["model"], r["unit"], r["tokens"])] = r
    chosen = list(latest.values())
    first = chosen[0]
    for field in ("target", "tuning", "settings", "device"):
        values = {repr(r[field]) for r in chosen}
        if len(values) > 1:
            raise LutError(f"samples in {store_path} were measured with different {field}s: {sorted(values)[:2]}",
                           "re-measure with one setting, or move the old samples file aside")
    rows = []
    for r in chosen:
        spec = get_model(r["model"])
        samples = np.asarray(r["samples_ms"], dtype=float)
        q1, med, q3 = np.percentile(samples, [25, 50, 75])
        lo, hi = median_ci(samples)
        for unit in spec.units:
            if unit.shared != r["unit"]:
                continue
            rows.append({
                "model": r["model"], "unit": unit.name, "kind": unit.kind, "position": unit.position,
                "tokens": r["tokens"], "median_ms": med, "q1_ms": q1, "q3_ms": q3, "ci_low_ms": lo, "ci_high_ms": hi,
                "n_samples": len(samples), "engine": engine, "tuning": r["tuning"], "graph": r["graph"],
                "samples_ms": " ".join(f"{s:.6g}" for s in samples),
            })
    frame = pd.DataFrame(rows, columns=COLUMNS).sort_values(["model", "position", "tokens"]).reset_index(drop=True)
    refs: dict = {}  # per device: a farm's devices differ a little from each other, which is not drift
    for r in records:
        if r.get("reference") and r["engine"] == engine:
            refs.setdefault((r.get("info") or {}).get("server"), []).append(float(np.median(r["samples_ms"])))
    drifts = [max(m) / min(m) - 1 for m in refs.values() if len(m) > 1]
    drift = float(max(drifts)) if drifts else None
    provenance = {
        "schema": SCHEMA_VERSION, "device": first["device"], "engine": engine, "target": first["target"],
        "tuning": first["tuning"], "settings": first["settings"], "emulated": first.get("emulated", False),
        "transport": first.get("transport"), "tvm_version": first.get("tvm"), "latprof_version": latprof.__version__,
        "measured_with": first.get("packages"), "device_info": first.get("info", {}),
        "reference_drift": drift, "reference_samples": sum(map(len, refs.values())),
        "measured_from": min(r["time"] for r in chosen), "measured_to": max(r["time"] for r in chosen),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "samples_file": str(store_path),
    }
    return LutTable(frame, provenance)


def build_and_write(store_path: Path, out: Path, device: str | None = None, engine: str | None = None) -> LutTable:
    table = build_lut(store_path, device, engine)
    write_lut(table, out)
    table.path = str(out)
    return table
