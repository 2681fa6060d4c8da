"""What the sum of units misses: the whole pruned model against its units, hot and cold, measured.

The table times each unit alone, over and over, so its weights and activations stay in the caches
between runs. In the whole model the units take turns in them (DeiT-T: twelve blocks of 1.8 MB of
weights each). This script times, interleaved round by round, on this CPU (in this process, so that it
can sweep the caches between calls), for one token schedule (default: SPViT's keep ratios 0.7, 0.49, ...):

  whole     the whole model as one graph, exactly as `validate` builds and compiles it
  sum hot   the sum of its units at the schedule's token counts, each timed alone, many times in a row:
            what the table sums (the plain prediction, before calibration)
  sum cold  the same sum, each unit timed right after a sweep of twice the last-level cache, so its
            weights come from DRAM: the most that caches can add
  call      one call of a graph that computes nothing (the per-call cost)

and prints whole / sum hot (what `validate --calibrate` fits as the scale) next to sum cold / sum hot.
Where the whole model sits below the cold sum, the caches can explain its extra cost; where it sits
above, something else costs (the data movement between units, or kernels fused across them).

--glue (Swin) also times the whole model with every block's computation made the identity: what is left
is the data movement between units that no unit holds (shifts, window partition and reverse, the pruned
blocks' per-window gathers and scatters) plus the fixed units, which are subtracted (hot).

    python benchmarks/additivity.py --model deit_t --rounds 5                # onnxruntime
    python benchmarks/additivity.py --engine tvm --workdir latprof-work       # a workdir tuned by measure
    python benchmarks/additivity.py --engine tvm --workdir W --device W/tvm.yaml   # one of fidelity.py's
    python benchmarks/additivity.py --model pit_xs --keep 0.7,0.5,0.3
    python benchmarks/additivity.py --model swin_t --glue
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def llc_bytes() -> int:
    """The last-level cache's size from sysfs (32 MiB if unreadable)."""
    sizes = {}
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
            sizes[int((idx / "level").read_text())] = int(size.rstrip("KM")) * {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
        except (OSError, ValueError):
            continue
    return sizes[max(sizes)] if sizes else 32 << 20


def llc_sweep():
    """A function that evicts the last-level cache: it reads a buffer twice the cache's size."""
    import numpy as np

    buf = np.ones(2 * llc_bytes() // 8)
    return lambda: buf.sum()


def per_call(fn, calls: int, before=None) -> float:
    """Median ms of `calls` single calls (each after `before()`, untimed, when given)."""
    out = []
    for _ in range(calls):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def glue_graph(spec, schedule, workdir: Path):
    """Swin's whole model with the blocks' computation made the identity (see --glue)."""
    from latprof.export import export_unit
    from latprof.models import swin_nn
    from latprof.validate import pruned_model

    if spec.family != "swin":
        raise SystemExit(f"--glue takes a Swin model, not {spec.name}")
    block = swin_nn.window_block
    swin_nn.window_block = lambda blk, x, bias, mask=None: x
    try:
        return export_unit(pruned_model(spec, schedule.kept), (1, 3, 224, 224), workdir / "graphs", spec.name,
                           "additivity-glue", 0)
    finally:
        swin_nn.window_block = block


def graphs(spec, schedule, workdir: Path):
    """The whole model (validate's), each unit's graph at the schedule's N with how often it runs, and the
    call probe: ONNX, content-addressed under workdir/graphs like everything latprof exports."""
    from latprof.measure.runner import export_graphs
    from latprof.predict import unit_tokens
    from latprof.progress import bar_factory
    from latprof.validate import _dim, _export_model, _export_probe

    bars = bar_factory(True)
    tokens = unit_tokens(spec, schedule)
    exported = {(g.shared, g.tokens): g for g in export_graphs(spec, sorted(set(tokens.values())), workdir, bars)}
    counts: dict = {}
    for name, n in tokens.items():
        key = (spec.unit(name).shared, n)
        counts[key] = counts.get(key, 0) + 1
    units = [(exported[key], c) for key, c in counts.items()]
    whole = _export_model(spec, schedule.kept, workdir / "graphs")
    probe = _export_probe(int(_dim(spec)), workdir / "graphs", spec.name)
    return whole, units, probe, len(tokens)


def callables(engine: str, gs: list, workdir: Path, spec, schedules: list, threads: int, device: str = "local") -> list:
    """A zero-argument function per graph that runs it once on its example input, in this process
    (`schedules`: the token schedules the graphs belong to)."""
    import numpy as np

    if engine == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        out = []
        for g in gs:
            sess = ort.InferenceSession(str(g.path), so, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: g.example_input()}
            out.append(lambda sess=sess, feed=feed: sess.run(None, feed))
        return out
    import dataclasses

    import tvm
    from tvm import relax, runtime

    from latprof.devices import load_config
    from latprof.measure.runner import make_engine
    from latprof.progress import bar_factory
    from latprof.validate import _prepare

    cfg = dataclasses.replace(load_config(device), threads=threads)  # its name and target key the tuning database
    eng = make_engine("tvm", cfg, spec, workdir)
    # as validate: the units at the schedule's N transferred from the anchors first (measure tuned those)
    libs = _prepare(eng, spec, gs, workdir, bar_factory(True), schedules)
    tvm.get_global_func("runtime.config_threadpool")(0, threads)
    out = []
    for g in gs:
        vm = relax.VirtualMachine(runtime.load_module(libs[g.digest]), runtime.cpu())
        f, arg = vm["main"], runtime.tensor(np.asarray(g.example_input()), runtime.cpu())
        out.append(lambda f=f, arg=arg: f(arg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--keep", default=None, help="keep ratios per pruning location, as for predict (default: 0.7, 0.49, ...)")
    ap.add_argument("--engine", choices=["onnxruntime", "tvm"], default="onnxruntime")
    ap.add_argument("--workdir", default="latprof-work")
    ap.add_argument("--device", default="local", help="the device config the workdir was tuned with (a name or a path)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=30, help="single calls per figure and round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--glue", action="store_true", help="Swin: also time the data movement between units")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    from latprof.models import get_model
    from latprof.predict import parse_keep

    spec = get_model(args.model)
    schedule = parse_keep(args.keep or ",".join(f"{0.7 ** (i + 1):.3g}" for i in range(len(spec.pruning_locations))), spec)
    workdir = Path(args.workdir)
    whole_g, unit_gs, probe_g, n_calls = graphs(spec, schedule, workdir)
    extra = [glue_graph(spec, schedule, workdir)] if args.glue else []
    fns = callables(args.engine, [whole_g, *(g for g, _ in unit_gs), probe_g, *extra], workdir, spec, [schedule],
                    args.threads, args.device)
    whole, units, probe = fns[0], fns[1:1 + len(unit_gs)], fns[1 + len(unit_gs)]
    glue = fns[-1] if extra else None
    counts = [c for _, c in unit_gs]
    blockless = [not g.shared.startswith("block") for g, _ in unit_gs]
    sweep = llc_sweep()

    def unit_times(before=None) -> list[float]:
        """Per graph: ms of one call times how often the schedule runs it."""
        return [c * per_call(u, args.calls, before) for u, c in zip(units, counts)]

    for fn in (whole, *units, probe, *([glue] if glue else [])):  # warm up
        per_call(fn, 5)
    cols = ["whole", "sum hot", "sum cold", "call"] + (["movement"] if glue else [])
    rows = []
    print(f"{args.model}, kept {list(schedule.kept)}, {args.engine}, {args.threads} thread(s): {n_calls} units "
          f"({len(units)} graphs); LLC sweep {2 * llc_bytes() >> 20} MiB; median ms of {args.calls} single calls")
    print(f"{'round':>5} " + " ".join(f"{c:>9}" for c in cols) + f" {'whole/hot':>10} {'cold/hot':>9}")
    for r in range(args.rounds):
        hot = unit_times()
        row = {"whole": per_call(whole, args.calls), "sum hot": sum(hot), "sum cold": sum(unit_times(sweep)),
               "call": per_call(probe, args.calls)}
        if glue:  # the glue model keeps the fixed units: subtract their hot times of this round
            row["movement"] = per_call(glue, args.calls) - sum(t for t, b in zip(hot, blockless) if b)
        rows.append(row)
        print(_line(f"{r + 1:>5}", row, cols), flush=True)
    print(_line("med", {c: statistics.median(row[c] for row in rows) for c in cols}, cols))


def _line(label: str, row: dict, cols: list) -> str:
    hot = row["sum hot"]
    return (f"{label:>5} " + " ".join(f"{row[c]:9.3f}" for c in cols)
            + f" {row['whole'] / hot:10.3f} {row['sum cold'] / hot:9.3f}")


if __name__ == "__main__":
    from latprof.errors import run_script

    sys.exit(run_script(main))
