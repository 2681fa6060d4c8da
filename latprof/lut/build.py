"""`latprof build-lut`: raw samples -> `luts/<device>.csv`.

Statistics are over the raw samples (median, quartiles, a distribution-free 95% CI of the median from
order statistics), never a bare mean. A shared graph's samples give a row to every unit that uses it
(DeiT's twelve blocks: one graph per N, twelve rows). A point's samples are those of all its visits
(`measure.rounds`), each visit's newest record (a visit measured again after drift replaces the older
one); when a point was measured under another key (another graph or engine), the newest key's samples
are used and the older ones stay in the store.

Drift correction (default): the reference unit re-measured through a run (`reference_every`) says how
fast the machine was around each point. Every point's samples are scaled by (the median of all
reference figures) / (the references just before and after it), so a table whose points were measured
in a slow stretch, or resumed in another run, reads as one machine state. On this shared host the
reference moved from 2.9-3.1 ms to 3.7-3.8 ms between two runs 8 minutes apart, and four of the five
points measured in the slow run read 21-28% high. The raw samples stay in the store; `--raw` skips it.
`latprof check` compares samples as measured (its statistics and the interleaving deal with noise).
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


# what every sample of one table (and every reference that corrects it) was measured with
SAME_ACROSS_TABLE = ("target", "tuning", "settings", "device")


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


def _time(record) -> float:
    return _dt.datetime.fromisoformat(record["time"]).timestamp()


def reference_series(references: list) -> dict:
    """(device of a farm's server, model) -> [(time, median ms)] of its reference unit, oldest first."""
    series: dict = {}
    for r in references:
        key = ((r.get("info") or {}).get("server"), r["model"])
        series.setdefault(key, []).append((_time(r), float(np.median(r["samples_ms"]))))
    return {k: sorted(v) for k, v in series.items()}


def drift_factors(records: list, series: dict) -> dict[int, float]:
    """Per point (by id of its record): median reference / the mean of the references measured nearest
    before and after it, on the same device and model. 1.0 where fewer than two references were taken."""
    out = {}
    for r in records:
        refs = series.get(((r.get("info") or {}).get("server"), r["model"]), [])
        if len(refs) < 2:
            out[id(r)] = 1.0
            continue
        t = _time(r)
        before = [m for tt, m in refs if tt <= t][-1:]
        after = [m for tt, m in refs if tt >= t][:1]
        out[id(r)] = float(np.median([m for _, m in refs]) / np.mean(before + after))
    return out


def build_lut(store_path: Path, device: str | None = None, engine: str | None = None,
              drift_correction: bool = True) -> LutTable:
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
    # per (model, unit, tokens): the newest key's records, the newest per visit; settings must agree
    latest: dict = {}
    for r in points:
        visits = latest.setdefault((r["model"], r["unit"], r["tokens"]), {})
        if visits and next(iter(visits.values()))["key"] != r["key"]:
            visits.clear()
        if r.get("visit") is None or None in visits:  # a whole measurement replaces visits, and is replaced
            visits.clear()
        visits[r.get("visit")] = r
    groups = [[v[k] for k in sorted(v)] for v in latest.values()]  # visits in order ({None: r} alone)
    chosen = [r for g in groups for r in g]
    first = chosen[0]
    for field in SAME_ACROSS_TABLE:
        values = {repr(r[field]) for r in chosen}
        if len(values) > 1:
            raise LutError(f"samples in {store_path} were measured with different {field}s: {sorted(values)[:2]}",
                           "re-measure with one setting, or move the old samples file aside")
    series = reference_series([r for r in records if r.get("reference") and r["engine"] == engine
                               and all(repr(r[f]) == repr(first[f]) for f in SAME_ACROSS_TABLE)])
    factors = drift_factors(chosen, series) if drift_correction else {}
    rows = []
    for g in groups:  # each visit corrected by the references around it, then the visits pooled
        r = g[-1]
        spec = get_model(r["model"])
        samples = np.concatenate([np.asarray(v["samples_ms"], dtype=float) * factors.get(id(v), 1.0) for v in g])
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
    # per device and model: a farm's devices differ a little from each other, which is not drift
    drifts = [max(m for _, m in v) / min(m for _, m in v) - 1 for v in series.values() if len(v) > 1]
    drift = float(max(drifts)) if drifts else None
    provenance = {
        "schema": SCHEMA_VERSION, "device": first["device"], "engine": engine, "target": first["target"],
        "tuning": first["tuning"], "settings": first["settings"], "emulated": first.get("emulated", False),
        "transport": first.get("transport"), "tvm_version": first.get("tvm"), "latprof_version": latprof.__version__,
        "measured_with": first.get("packages"), "device_info": first.get("info", {}),
        "reference_drift": drift, "reference_samples": sum(map(len, series.values())),
        "visits_per_point": max(len(g) for g in groups),
        "drift_correction": ({"factor_min": round(min(factors.values()), 4), "factor_max": round(max(factors.values()), 4)}
                             if factors else None),
        "measured_from": min(r["time"] for r in chosen), "measured_to": max(r["time"] for r in chosen),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "samples_file": str(store_path),
    }
    return LutTable(frame, provenance)


def build_and_write(store_path: Path, out: Path, device: str | None = None, engine: str | None = None,
                    drift_correction: bool = True) -> LutTable:
    table = build_lut(store_path, device, engine, drift_correction)
    write_lut(table, out)
    table.path = str(out)
    return table
