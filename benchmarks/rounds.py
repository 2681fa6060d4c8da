"""Does spreading a whole model's samples over visits make end to end repeat itself better?

`validate` takes each model's samples in `measure.rounds` visits spread through its pass. This script
measures the same compiled whole models in passes that alternate between one visit per model (all its
samples in one burst, as before rounds) and R visits, A B A B ... so both see the same hour of the host,
and prints, side by side, how well each kind of pass repeats the one of its kind before it: the share
of models within ±5% and ±10% of their earlier figure and the median change. That repeatability is the
ceiling on any table's fidelity (docs/measurements.md).

    python benchmarks/rounds.py --lut W/luts/local.csv --workdir W --device cold.yaml --model deit_t --passes 4
    python benchmarks/rounds.py --engine onnxruntime --model deit_t      # measures a small table first

The first run of a workdir compiles the schedules' whole models (tuned TVM: minutes per model); the
passes then only measure. Nothing else should run beside it: it is itself the measurement of noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def repeatability(passes: list[dict], stat: str) -> tuple[list[float], list[float]]:
    """|now / before - 1| of each model between consecutive passes of one kind (all pairs pooled), and
    the within-pass spread (q3 - q1) / median of every model in every pass."""
    from latprof.predict import sample_stat

    changes, spreads = [], []
    for before, now in zip(passes, passes[1:]):
        for kept, xs in now.items():
            if kept in before:
                changes.append(abs(sample_stat(xs, stat) / sample_stat(before[kept], stat) - 1))
    for p in passes:
        for xs in p.values():
            q = statistics.quantiles(xs, n=4)
            spreads.append((q[2] - q[0]) / statistics.median(xs))
    return changes, spreads


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["onnxruntime", "tvm"], default="onnxruntime")
    ap.add_argument("--device", default=None, help="a device config (default: a generated local one)")
    ap.add_argument("--lut", type=Path, default=None, help="the table whose schedules to draw (default: measure one)")
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--configs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="visits per model in the spread passes")
    ap.add_argument("--passes", type=int, default=4, help="passes of each kind (at least 2)")
    ap.add_argument("--stats", default="median,min")
    ap.add_argument("--workdir", type=Path, default=Path("latprof-work-rounds"))
    args = ap.parse_args(argv)
    if args.passes < 2 or args.rounds < 2:
        ap.error("--passes and --rounds must be at least 2")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fidelity import DEFAULT_GRID, write_cfg

    from latprof.validate import validate

    wd = args.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    device = args.device or str(write_cfg(wd / f"{args.engine}.yaml", args.engine, 1, 15, 0))
    lut = args.lut
    if lut is None:
        from latprof.lut.build import build_and_write
        from latprof.measure.runner import measure

        res = measure(device, args.model, [int(v) for v in DEFAULT_GRID.split(",")], workdir=wd, progress=False)
        lut = wd / "luts" / f"{res.device}.csv"
        build_and_write(res.store, lut, engine=res.engine)
    kinds = {"1 visit": 1, f"{args.rounds} visits": args.rounds}
    passes: dict[str, list[dict]] = {k: [] for k in kinds}
    loads, t0 = [os.getloadavg()[0]], time.time()
    # compile (and, with tuned TVM, tune) the whole models once, outside the timed comparison
    validate(device, args.model, lut, configs=args.configs, seed=args.seed, workdir=wd, progress=False,
             echo=lambda *a: None, use_overhead=False)
    for p in range(args.passes):
        for kind in (list(kinds) if p % 2 == 0 else list(kinds)[::-1]):
            v = validate(device, args.model, lut, configs=args.configs, seed=args.seed, workdir=wd, progress=False,
                         echo=lambda *a: None, use_overhead=False, rounds=kinds[kind], again=True)
            passes[kind].append({tuple(c.kept): c.samples_ms for c in v.configs})
            loads.append(os.getloadavg()[0])
            print(f"pass {p + 1}, {kind}: {time.time() - t0:.0f} s", flush=True)
    print(f"\n{args.model}, {args.engine}, {args.configs} whole models, {args.passes} passes of each kind, alternated; "
          f"each pass against the one of its kind before it:")
    print(f"{'statistic':9s} {'kind':10s} {'within ±5%':>10s} {'within ±10%':>11s} {'median |change|':>15s} "
          f"{'spread in pass':>14s}")
    for stat in args.stats.split(","):
        for kind in kinds:
            ch, sp = repeatability(passes[kind], stat)
            print(f"{stat:9s} {kind:10s} {sum(c <= 0.05 for c in ch) / len(ch):>10.0%} "
                  f"{sum(c <= 0.10 for c in ch) / len(ch):>11.0%} {statistics.median(ch):>15.1%} "
                  f"{statistics.median(sp):>14.1%}")
    print(f"1-min load average {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} cores; {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from latprof.errors import run_script

    sys.exit(run_script(main))
