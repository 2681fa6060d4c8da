"""Two tunings of one model, end to end, side by side: the whole models a validation compiled in each
workdir, loaded together and timed interleaved (rounds alternate which goes first), so host drift
falls on both alike. Prints each schedule's latency under both and the ratio.

    python benchmarks/tunings.py --model pit_xs --a /tmp/hot/w:/tmp/hot/w/tvm.yaml \\
        --b /tmp/cold/w:/tmp/cold/w/cold.yaml --configs 20

Each side is WORKDIR:DEVICE_CONFIG; the schedules are those side B's validation measured (its
validate/*.jsonl), and both workdirs must already hold their compiled models (compiles nothing new
only if they do: a validation in each, with the same schedules, is the way to get there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np


def libs_for(model: str, workdir: Path, config: str, kepts: list) -> tuple[dict, np.ndarray]:
    """Each schedule's compiled whole model in this workdir's tuning, and an input for them."""
    from latprof.devices.config import load_config
    from latprof.measure.runner import make_engine
    from latprof.models import get_model
    from latprof.progress import bar_factory
    from latprof.validate import _export_model

    spec, cfg = get_model(model), load_config(config)
    eng = make_engine(cfg.engine, cfg, spec, workdir, cfg.tuning.get("trials_per_task"))
    graphs = [_export_model(spec, k, workdir / "graphs") for k in kepts]
    libs = eng.prepare(graphs, bar_factory(False), anchors=[])
    return {tuple(k): libs[g.digest] for k, g in zip(kepts, graphs)}, graphs[0].example_input()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pit_xs")
    ap.add_argument("--a", required=True, help="WORKDIR:DEVICE_CONFIG of the first tuning")
    ap.add_argument("--b", required=True, help="WORKDIR:DEVICE_CONFIG of the second")
    ap.add_argument("--configs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import tvm
    from tvm import relax

    sides = {name: (Path(v.split(":")[0]), v.split(":", 1)[1]) for name, v in (("A", args.a), ("B", args.b))}
    kepts = []
    for path in sorted((sides["B"][0] / "validate").glob(f"*-{args.model}-*.jsonl")):
        for line in path.read_text().splitlines():
            k = json.loads(line)["kept"]
            if k not in kepts:
                kepts.append(k)
    kepts = kepts[: args.configs]
    if not kepts:
        sys.exit(f"error: no validated schedules of {args.model} in {sides['B'][0]}/validate; run `latprof validate` there first")
    dev = tvm.cpu()
    vms, x = {}, None
    for name, (wd, cfg) in sides.items():
        libs, x = libs_for(args.model, wd, cfg, kepts)
        vms.update({(name, k): relax.VirtualMachine(tvm.runtime.load_module(p), dev) for k, p in libs.items()})
    arg = tvm.runtime.tensor(np.asarray(x), dev)
    samples = {key: [] for key in vms}
    for rnd in range(args.rounds):
        for k in map(tuple, kepts):
            for name in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
                vm = vms[(name, k)]
                for _ in range(3):
                    vm["main"](arg)
                timer = vm.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=25)
                samples[(name, k)] += [min(timer(arg).results) * 1e3 for _ in range(5)]
    ratios = []
    print(f"{'kept':18s} {'A min (median) ms':>20s} {'B min (median) ms':>20s}  B/A min, median")
    for k in map(tuple, kepts):
        a, b = samples[("A", k)], samples[("B", k)]
        ratios.append(min(b) / min(a))
        print(f"{str(list(k)):18s} {min(a):9.3f} ({statistics.median(a):7.3f}) {min(b):9.3f} ({statistics.median(b):7.3f})"
              f"  {min(b) / min(a):.3f}, {statistics.median(b) / statistics.median(a):.3f}")
    print(f"B/A end to end (min statistic) over {len(kepts)} schedules: median {statistics.median(ratios):.3f}, "
          f"{min(ratios):.3f}..{max(ratios):.3f}; A = {args.a}, B = {args.b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
