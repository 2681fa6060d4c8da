"""Fidelity of table predictions: share of random token schedules whose end-to-end latency the table
predicts within ±5% and ±10%, without and with the overhead model.

The whole pipeline, as a user runs it, in one workdir:
  1. `latprof measure` every unit of the model on a token grid -> table (shuffled order, drift reference);
  2. `latprof validate --calibrate` on K_cal schedules (seed S+1): per-call cost probe + residual -> sidecar;
  3. `latprof validate` on K fresh schedules (seed S, 0 unless --seed): out-of-sample shares, plain sum vs corrected.
With --interleave, steps 2 and 3 measure in one pass (`validate --calibrate --alongside K`), the K
validation schedules spread evenly among the calibration's, and step 3 only reads the results: the
fit is still out of sample, but no longer fitted on models measured minutes before the ones it is judged on.
The machine's load average is printed with the figures: on a shared 2-core host timings drift with
other people's jobs, and the shares mean little without it.

    python benchmarks/fidelity.py --engine onnxruntime --configs 20
    python benchmarks/fidelity.py --engine tvm --configs 8 --grid 17,49,81,113,145,177,197 --repeats 7
    python benchmarks/fidelity.py --engine tvm --trials 16 ...   # tuned (uses/extends the workdir's tuning DB)

With --remeasure, the table is then measured again (new samples in their own file; the first ones are
kept) and both validations run again against it at once: with tuned TVM, validating first tunes and
compiles every whole model (40+ minutes), so the first table and the end-to-end figures are an hour
apart on a host whose speed drifts; the second pass reuses every compiled model and takes minutes.
It also says how well each whole model's end to end repeats its first-pass figure: the ceiling on the
shares, since a table from one moment cannot be expected to predict end to end at another better than
end to end repeats itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

DEFAULT_GRID = "17,33,49,65,81,97,113,129,145,161,177,193,197"


def write_cfg(path: Path, engine: str, threads: int, repeats: int, trials: int) -> Path:
    cfg = {
        "name": f"fidelity-{engine}-{threads}t", "description": "benchmarks/fidelity.py", "transport": "local",
        "engine": engine, "target": {"kind": "llvm", "mcpu": "native"} if engine == "tvm" else {"kind": "onnxruntime"},
        "threads": threads,
        "measure": {"warmup": 3, "repeats": repeats, "number": 0, "min_repeat_ms": 25, "reference_every": 8},
    }
    if engine == "tvm":
        cfg["tuning"] = {"trials_per_task": trials}
    path.write_text(yaml.safe_dump(cfg))
    return path


def evaluate(args, device, lut, res, table, threads, loads, tag: str = "") -> list[list[int]]:
    """Calibrate and validate against `lut` with each statistic; print the shares. Returns the kept
    counts of every schedule used (calibration and validation)."""
    from latprof.predict import overhead_path
    from latprof.validate import format_validation, validate

    wd = args.workdir.resolve()
    for stat in args.stats.split(","):
        if overhead_path(lut, args.model).exists():
            overhead_path(lut, args.model).unlink()
        t1 = time.time()
        cal = validate(device, args.model, lut, configs=args.cal_configs, seed=args.seed + 1, workdir=wd, calibrate=True, stat=stat,
                       plot=wd / f"calibration{tag}-{stat}.png", progress=not args.quiet, echo=lambda *a: None,
                       on_grid=args.on_grid, alongside=args.configs if args.interleave else 0, alongside_seed=args.seed)
        loads.append(os.getloadavg()[0])
        val = validate(device, args.model, lut, configs=args.configs, seed=args.seed, workdir=wd, stat=stat,
                       plot=wd / f"validation{tag}-{stat}.png", progress=not args.quiet, echo=lambda *a: None,
                       on_grid=args.on_grid)
        loads.append(os.getloadavg()[0])
        oh = cal.overhead
        print(f"\n== statistic {stat}: calibration ({args.cal_configs} schedules, seed {args.seed + 1}): {oh.describe()}; "
              f"{time.time() - t1:.0f} s")
        print(format_validation(val))
        errs_raw = [c.sum_ms / c.measured_ms - 1 for c in val.configs]
        print(f"FIDELITY engine={res.engine} tuning={table.provenance.get('tuning')} threads={threads} stat={stat} "
              f"K={len(val.configs)}: calibrated {val.within(0.05):.0%} within ±5%, {val.within(0.10):.0%} within ±10%; "
              f"plain sum {val.within(0.05, raw=True):.0%} / {val.within(0.10, raw=True):.0%} "
              f"(plain-sum median error {statistics.median(errs_raw):+.1%}); drift-corrected: calibrated "
              f"{val.within(0.05, drift=True):.0%} / {val.within(0.10, drift=True):.0%}; plot {wd / f'validation{tag}-{stat}.png'}",
              flush=True)
        for what, share in reference_variants(val, args.model, lut, stat).items():
            print(f"drift-corrected by {what}: {share[0]:.0%} / {share[1]:.0%}", flush=True)
    return [list(c.kept) for c in cal.configs + val.configs]


def with_schedule_counts(table_counts, spec, kept_lists):
    """`tokens` for `measure`: a table's own counts plus every N that the schedules put a unit at."""
    from latprof.predict import schedule_of, unit_tokens

    extra: dict[str, set] = {}
    for kept in kept_lists:
        for name, n in unit_tokens(spec, schedule_of(spec, kept)).items():
            if spec.unit(name).kind == "tokens":
                extra.setdefault(spec.unit(name).shared, set()).add(int(n))
    return lambda u: sorted(set(table_counts(u)) | extra.get(u.shared, set()))


def restricted(table, first, path: Path):
    """`table` with only the (unit, N) rows `first` has: the same samples, interpolated between them."""
    from latprof.lut.table import LutTable, write_lut

    keep = set(zip(first.frame["model"], first.frame["unit"], first.frame["tokens"].astype(int)))
    f = table.frame
    mask = [(m, u, int(n)) in keep for m, u, n in zip(f["model"], f["unit"], f["tokens"])]
    sub = LutTable(f[mask].reset_index(drop=True), table.provenance)
    write_lut(sub, path)
    sub.path = str(path)
    return sub


def reference_variants(val, model: str, lut, stat: str) -> dict[str, tuple[float, float]]:
    """Shares within ±5% / ±10% with each end to end corrected by less of its drift reference: the
    references before the model only, and the first stage's alone (the reference of earlier versions)."""
    from latprof.lut.table import read_lut
    from latprof.models import get_model
    from latprof.predict import predict, schedule_of, table_statistic
    from latprof.validate import reference_drift, reference_figures, reference_weights

    spec = get_model(model)
    table = table_statistic(read_lut(lut), stat)
    figures = reference_figures(spec, table)
    first = next(iter(figures))
    out = {}
    for what, units in (("the references before each model only", list(figures)),
                        ("the first stage's reference alone, before the model", [first])):
        errs = []
        for c in val.configs:
            refs = {r["unit"]: r["samples_ms"] for r in c.recorded.get("refs", [])}  # before the model
            if not all(u in refs for u in units):
                return out  # results written before the per-stage reference
            w = reference_weights(spec, predict(table, model, schedule_of(spec, c.kept)))
            drift = reference_drift({u: refs[u] for u in units}, figures, w, stat)
            errs.append(c.at_table_ms / (c.measured_ms / drift) - 1)
        out[what] = tuple(sum(abs(e) <= tol for e in errs) / len(errs) for tol in (0.05, 0.10))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["onnxruntime", "tvm"], default="onnxruntime")
    ap.add_argument("--device", default=None, help="a device config instead of the generated local one")
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--grid", default=None, help=f"token counts (default {DEFAULT_GRID} for DeiT; for "
                    "hierarchical models every unit's own default grid)")
    ap.add_argument("--configs", type=int, default=20, help="validation schedules (seed S)")
    ap.add_argument("--cal-configs", type=int, default=6, help="calibration schedules (seed S+1)")
    ap.add_argument("--seed", type=int, default=0, help="S: the validation's schedules are drawn with seed S, the "
                    "calibration's with S+1 (another S: other random schedules)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--trials", type=int, default=None, help="TVM MetaSchedule trials per task (0 = untuned; "
                    "default: the --device config's, 0 for the generated one)")
    ap.add_argument("--workdir", type=Path, default=Path("latprof-work-fidelity"))
    ap.add_argument("--quiet", action="store_true", help="no progress bars on stderr (in a log file they redraw "
                    "every 30 s; a tuned run builds its table for half an hour before printing a result)")
    ap.add_argument("--stats", default="median,min", help="sample statistics to evaluate (the measurements are shared)")
    ap.add_argument("--on-grid", action="store_true", help="schedules among the solver's kept counts (blocks at "
                    "the table's token counts), as `train` picks them")
    ap.add_argument("--interleave", action="store_true", help="measure the calibration and validation schedules in one "
                    "pass, interleaved (the calibration's constant then sees the machine as the schedules it is judged "
                    "on do, not as it was minutes before them)")
    ap.add_argument("--remeasure", action="store_true", help="then measure the table again and validate against it "
                    "at once (the table and the end-to-end figures minutes apart)")
    ap.add_argument("--schedule-counts", action="store_true", help="with --remeasure: the table measured again also "
                    "holds every N the schedules put a unit at (as a table at every count would), and the schedules "
                    "are validated against it and against the same samples at the first table's counts only")
    args = ap.parse_args(argv)
    if args.schedule_counts and not args.remeasure:
        ap.error("--schedule-counts needs --remeasure")

    from latprof.lut.build import build_and_write
    from latprof.measure.runner import measure

    wd = args.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    device = args.device or str(write_cfg(wd / f"{args.engine}.yaml", args.engine, args.threads, args.repeats, args.trials or 0))
    loads = [os.getloadavg()[0]]
    t0 = time.time()
    from latprof.models import get_model

    if args.grid is None and get_model(args.model).layout is None:
        args.grid = DEFAULT_GRID
    grid = [int(v) for v in args.grid.split(",")] if args.grid else None
    res = measure(device, args.model, grid, workdir=wd, progress=not args.quiet,
                  trials=args.trials if args.engine == "tvm" else None, echo=lambda *a: print(*a, file=sys.stderr))
    lut = wd / "luts" / f"{res.device}.csv"
    table = build_and_write(res.store, lut, engine=res.engine)
    t1 = time.time()
    loads.append(os.getloadavg()[0])
    settings = table.provenance.get("settings") or {}  # the device config's, when --device is given
    threads, repeats = settings.get("threads", args.threads), settings.get("repeats", args.repeats)
    print(f"engine {res.engine} ({table.provenance.get('tuning')}), {threads} thread(s), grid {args.grid}, "
          f"{repeats} repeats, model {args.model}; table {t1 - t0:.0f} s; reference drift during the table "
          f"{table.provenance.get('reference_drift') or 0:.1%}"
          + ("; calibration and validation measured interleaved" if args.interleave else ""), flush=True)
    kept_lists = evaluate(args, device, lut, res, table, threads, loads)
    if args.remeasure:  # the same compiled graphs, measured again now, next to the end-to-end runs below
        from latprof.measure.runner import table_tokens

        t1 = time.time()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        # the first table's own token counts (its store may hold more than this run's grid): the same range
        # gives the same random schedules, so their compiled whole models and tuning are reused
        first = table
        counts = table_tokens(get_model(args.model), table.model_frame(args.model))
        if args.schedule_counts:
            counts = with_schedule_counts(counts, get_model(args.model), kept_lists)
        res = measure(device, args.model, counts, workdir=wd, progress=not args.quiet, store=wd / "samples" / f"{res.device}-{stamp}.jsonl",
                      trials=args.trials if args.engine == "tvm" else None, echo=lambda *a: print(*a, file=sys.stderr))
        lut = wd / "luts" / f"{res.device}-{stamp}.csv"
        table = build_and_write(res.store, lut, engine=res.engine)
        print(f"\n== table measured again ({time.time() - t1:.0f} s, {len(table.frame)} rows, reference drift during "
              f"it {table.provenance.get('reference_drift') or 0:.1%}), validated against at once: {lut}", flush=True)
        if args.schedule_counts:
            grid_lut = lut.with_name(lut.stem + "-grid.csv")
            sub = restricted(table, first, grid_lut)
            print(f"\n== the same samples at the first table's counts only ({len(sub.frame)} rows, interpolated): "
                  f"{grid_lut}", flush=True)
            evaluate(args, device, grid_lut, res, sub, threads, loads, tag="-again-grid")
            print(f"\n== every N the schedules use measured ({len(table.frame)} rows): {lut}", flush=True)
        evaluate(args, device, lut, res, table, threads, loads, tag="-again")
    print(f"1-min load average {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} cores during the run")
    return 0


if __name__ == "__main__":
    from latprof.errors import run_script

    sys.exit(run_script(main))
