"""Two tunings of one model, end to end, side by side: the whole models a validation compiled in each
workdir, loaded together and timed interleaved (rounds alternate which goes first), so host drift
falls on both alike. Prints each schedule's latency under both and the ratio.

    python benchmarks/tunings.py --model pit_xs --a /tmp/hot/w:/tmp/hot/w/tvm.yaml \\
        --b /tmp/cold/w:/tmp/cold/w/cold.yaml --configs 20

Each side is WORKDIR:DEVICE_CONFIG, both for this machine or for the same device: they are timed as
`validate` times them (a session on B's device, each engine's own `measure`). The schedules are those
side B's validation measured (its validate/*.jsonl); both workdirs should already hold their compiled
models (a validation in each, with the same schedules), or they are tuned and compiled first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def side(model: str, workdir: Path, config: str, kepts: list):
    """The engine of one tuning, and each schedule's whole model with its compiled library."""
    from latprof.devices.config import load_config
    from latprof.measure.runner import make_engine
    from latprof.models import get_model
    from latprof.progress import bar_factory
    from latprof.validate import _export_model

    spec, cfg = get_model(model), load_config(config)
    eng = make_engine(cfg.engine, cfg, spec, workdir)
    graphs = [_export_model(spec, k, workdir / "graphs") for k in kepts]
    libs = eng.prepare(graphs, bar_factory(False), anchors=[])
    return eng, [(g, libs[g.digest]) for g in graphs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pit_xs")
    ap.add_argument("--a", required=True, help="WORKDIR:DEVICE_CONFIG of the first tuning")
    ap.add_argument("--b", required=True, help="WORKDIR:DEVICE_CONFIG of the second")
    ap.add_argument("--configs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    from latprof.devices import load_config, open_session
    from latprof.validate import results_path

    paths = {name: (Path(v.partition(":")[0]), v.partition(":")[2]) for name, v in (("A", args.a), ("B", args.b))}
    b_cfg = load_config(paths["B"][1])
    rpath = results_path(paths["B"][0], b_cfg.name, args.model, b_cfg.engine)
    kepts = []
    for line in rpath.read_text().splitlines() if rpath.exists() else []:
        k = json.loads(line)["kept"]
        if k not in kepts:
            kepts.append(k)
    kepts = kepts[: args.configs]
    if not kepts:
        sys.exit(f"error: no validated schedules of {args.model} in {rpath}; run `latprof validate` there first")
    sides = {name: side(args.model, wd, cfg, kepts) for name, (wd, cfg) in paths.items()}
    samples = {(name, i): [] for name in sides for i in range(len(kepts))}
    # both timed as the table and validate time them: the device session, the engine's measure (the B
    # config's device, its warmup, repeats and threads)
    with open_session(sides["B"][0].cfg) as session:
        for rnd in range(args.rounds):
            for i in range(len(kepts)):
                for name in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
                    eng, models = sides[name]
                    samples[(name, i)] += eng.measure(session, *models[i])[0]
    ratios = []
    print(f"{'kept':18s} {'A min (median) ms':>20s} {'B min (median) ms':>20s}  B/A min, median")
    for i, k in enumerate(kepts):
        a, b = samples[("A", i)], samples[("B", i)]
        ratios.append(min(b) / min(a))
        print(f"{str(k):18s} {min(a):9.3f} ({statistics.median(a):7.3f}) {min(b):9.3f} ({statistics.median(b):7.3f})"
              f"  {min(b) / min(a):.3f}, {statistics.median(b) / statistics.median(a):.3f}")
    print(f"B/A end to end (min statistic) over {len(kepts)} schedules: median {statistics.median(ratios):.3f}, "
          f"{min(ratios):.3f}..{max(ratios):.3f}; A = {args.a}, B = {args.b}")
    return 0


if __name__ == "__main__":
    from latprof.errors import run_script

    sys.exit(run_script(main))
