"""Which overhead model predicts end to end best? Cross-validated on validation results already measured.

`latprof validate` keeps every whole-model measurement (with the reference unit re-measured beside it)
in `<workdir>/validate/*.jsonl`. This script re-reads them with the tables they were predicted from and,
over many random splits, calibrates on K schedules and scores the rest, for three overhead models side
by side in one run:

- scale:    end to end = s x sum of units (s: the median ratio; what `validate --calibrate` fitted before)
- constant: end to end = sum + c (c: the median difference; a cost per model that pruning does not shrink)
- fit:      `latprof.predict.fit_overhead`, both terms, constrained (what `validate --calibrate` fits now)

Shares within ±5% are given as measured and drift-corrected (the reference unit's ratio to its table
figure divides the end to end: the machine's state is taken out, what is left is the model's error).
Nothing is measured: it runs in seconds and can be re-run on any workdir.

    python benchmarks/overhead_fit.py --workdir /path/to/latprof-work [--workdir ...] [--cal 4] [--stat min]
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import statistics
import sys
from pathlib import Path

from latprof.errors import run_script
from latprof.lut.table import read_lut
from latprof.models import get_model
from latprof.predict import fit_overhead, predict, schedule_of, table_statistic
from latprof.validate import _table_id, record_refs, reference_drift, reference_figures, reference_weights


def scale_only(xs, ys):
    s = statistics.median(y / x for x, y in zip(xs, ys))
    return lambda x: s * x


def constant_only(xs, ys):
    c = statistics.median(y - x for x, y in zip(xs, ys))
    return lambda x: x + c


def constrained(xs, ys):
    oh = fit_overhead(xs, ys, 1)
    return lambda x: oh.apply(x, 1)


MODELS = {"scale": scale_only, "constant": constant_only, "fit": constrained}


def groups(workdir: Path, stat: str):
    """(label, model, points) per (results file, table): points are (sum of units, end to end, drift)."""
    tables = {}
    for path in glob.glob(str(workdir / "luts" / "*.csv")):
        try:
            t = read_lut(path)
            tables[_table_id(t)] = (Path(path).name, t)
        except Exception:  # a table this version cannot read: its results are skipped
            continue
    for path in sorted(glob.glob(str(workdir / "validate" / "*.jsonl"))):
        rows = []
        for line in Path(path).read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if {"samples_ms", "kept", "table"} <= set(r) and record_refs(r):  # older lines lack the reference
                rows.append(r)
        for tid in dict.fromkeys(r["table"] for r in rows):
            if tid not in tables:
                continue
            name, t = tables[tid]
            first = next(r for r in rows if r["table"] == tid)
            model = first["model"]
            spec, ts = get_model(model), table_statistic(t, stat)
            figures = reference_figures(spec, ts)
            f = min if stat == "min" else statistics.median
            pts = []
            for r in (r for r in rows if r["table"] == tid and r["model"] == model):
                # the per-call cost (1-4 us here) is left out of this comparison: every model would carry it
                s = schedule_of(spec, r["kept"])
                p = predict(ts, model, s)
                drift = reference_drift(record_refs(r), figures, reference_weights(spec, p), stat)
                pts.append((p.sum_ms, f(r["samples_ms"]), drift))
            yield f"{model} {name} ({first['engine']})", pts


def score(pts, k: int, splits: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    rng, hits = random.Random(seed), {m: [0, 0] for m in MODELS}
    n = 0
    for _ in range(splits):
        idx = list(range(len(pts)))
        rng.shuffle(idx)
        cal, test = [pts[i] for i in idx[:k]], [pts[i] for i in idx[k:]]
        xs, ys = [p[0] for p in cal], [p[1] / p[2] for p in cal]  # calibrated on drift-corrected figures
        for name, fit in MODELS.items():
            pred = fit(xs, ys)
            hits[name][0] += sum(abs(pred(x) / y - 1) <= 0.05 for x, y, _ in test)
            hits[name][1] += sum(abs(pred(x) * d / y - 1) <= 0.05 for x, y, d in test)
        n += len(test)
    return {m: (a / n, b / n) for m, (a, b) in hits.items()}


def split_parser(doc: str, cal: int, cal_help: str) -> argparse.ArgumentParser:
    """The options of a script that cross-validates calibrations over stored result sets."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, action="append", required=True)
    ap.add_argument("--cal", type=int, default=cal, help=f"calibration schedules per split ({cal_help})")
    ap.add_argument("--splits", type=int, default=300)
    ap.add_argument("--stat", default="min,median")
    return ap


def result_sets(workdirs, stat: str, cal: int):
    """`groups` of every workdir with enough schedules to calibrate on `cal` and score at least 3."""
    for wd in workdirs:
        for label, pts in groups(wd, stat):
            if len(pts) >= cal + 3:
                yield label, pts


def main() -> None:
    args = split_parser(__doc__, 4, "validate's --configs").parse_args()
    head = "  ".join(f"{m:>15s}" for m in MODELS)
    for stat in args.stat.split(","):
        print(f"\n== statistic {stat}: calibrate on {args.cal}, score the rest, {args.splits} random splits; "
              f"share within ±5% as measured / drift-corrected")
        print(f"{'results':58s} {'n':>3s}  {head}")
        totals = {m: [0.0, 0.0] for m in MODELS}
        count = 0
        for label, pts in result_sets(args.workdir, stat, args.cal):
            res = score(pts, args.cal, args.splits)
            count += 1
            for m, (a, b) in res.items():
                totals[m][0] += a
                totals[m][1] += b
            print(f"{label[:58]:58s} {len(pts):3d}  " + "  ".join(f"{a:6.0%} / {b:5.0%}" for a, b in res.values()))
        if count:
            print(f"{'mean over ' + str(count) + ' result sets':58s} {'':3s}  "
                  + "  ".join(f"{a / count:6.0%} / {b / count:5.0%}" for a, b in totals.values()))


if __name__ == "__main__":
    sys.exit(run_script(main))
