"""Per-block latency of TVM (tuned), onnxruntime and torch eager at several N, side by side, as ratios.

All three are timed in one run, interleaved round by round (this machine is shared and noisy), with the
same thread count. TVM runs through the `local` device's RPC server with the tuned modules from the
workdir's tuning database (tuned first if missing, with --trials per task).

    python benchmarks/engines.py --tokens 197,150,99,50 --trials 16 --rounds 5
    python benchmarks/engines.py --threads 2 --rounds 10   # stability: see the spread columns

The spread columns are (p90 - p10) / median over all of an engine's samples at that N, taken across the
rounds (seconds apart): how far one timing can be trusted on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path



# Each engine runs alone for this long before its samples are taken: the engine before it leaves worker
# threads spinning for a while (TVM's pool in the RPC server, torch's OpenMP), and onnxruntime timed
# right after TVM measured 4.4 ms at N=197 against 1.3 ms alone.
SETTLE_MS = 200.0


def settle(fn, ms: float = SETTLE_MS) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        fn()


def time_callable(fn, min_ms: float, repeats: int) -> list[float]:
    settle(fn)
    t0 = time.perf_counter()
    fn()
    number = max(1, int(min_ms / 1e3 / max(time.perf_counter() - t0, 1e-6)))
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) / number * 1e3)
    return out


def spread(samples: list[float]) -> float:
    """(p90 - p10) / median."""
    q = statistics.quantiles(samples, n=10)
    return (q[-1] - q[0]) / statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--device", default="local")
    ap.add_argument("--tokens", default="197,150,99,50")
    ap.add_argument("--trials", type=int, default=None, help="MetaSchedule trials per task (default: the config's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="threads for every engine (default: the config's)")
    ap.add_argument("--workdir", default="latprof-work")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from latprof.devices import load_config, open_session
    from latprof.measure.runner import compile_graphs, export_graphs, make_engine, parse_tokens
    from latprof.models import get_model
    from latprof.progress import bar_factory

    cfg = load_config(args.device)
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)
    spec = get_model(args.model)
    tokens = parse_tokens(args.tokens, spec)
    workdir = Path(args.workdir)
    bars = bar_factory(True)
    graphs = [g for g in export_graphs(spec, tokens, workdir, bars) if g.shared == "block"]
    tvm_engine = make_engine("tvm", cfg, spec, workdir, args.trials)
    libs = compile_graphs(tvm_engine, spec, graphs, workdir, bars)
    _, modules = spec.builder(spec)
    block = modules["block"][0]
    torch.set_num_threads(cfg.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.threads
    m = cfg.measure
    results = {g.tokens: {"tvm": [], "onnxruntime": [], "torch": []} for g in graphs}
    with open_session(cfg) as session:
        from latprof.compile import tvmlib

        vms = {g.digest: tvmlib.load_remote(session.rpc, libs[g.digest]) for g in graphs}
        sessions = {g.digest: ort.InferenceSession(str(g.path), so, providers=["CPUExecutionProvider"]) for g in graphs}
        for _ in range(args.rounds):  # interleaved: each round times every engine at every N
            for g in graphs:
                x = g.example_input()
                vm, dev = vms[g.digest]
                args_tvm = [tvmlib.tvm().runtime.tensor(x, dev)]
                settle(lambda: vm["main"](*args_tvm))
                results[g.tokens]["tvm"] += tvmlib.time_vm(vm, dev, [x], 2, 3, 0, m["min_repeat_ms"])
                feed = {"x": x}
                results[g.tokens]["onnxruntime"] += time_callable(lambda: sessions[g.digest].run(None, feed),
                                                                  m["min_repeat_ms"], 3)
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    results[g.tokens]["torch"] += time_callable(lambda: block(xt), m["min_repeat_ms"], 3)
    print(f"\n{args.model} block on {cfg.name}, {cfg.threads} thread(s), TVM {tvm_engine.tuning_label()}; "
          f"median ms of {args.rounds * 3} samples per cell")
    print(f"{'N':>5} {'TVM':>9} {'ORT':>9} {'torch':>9} {'TVM/ORT':>9} {'torch/ORT':>10} {'TVM spread':>11} {'ORT spread':>11}")
    for n in sorted(results, reverse=True):
        med = {k: statistics.median(v) for k, v in results[n].items()}
        print(f"{n:>5} {med['tvm']:9.3f} {med['onnxruntime']:9.3f} {med['torch']:9.3f} "
              f"{med['tvm'] / med['onnxruntime']:9.2f} {med['torch'] / med['onnxruntime']:10.2f} "
              f"{spread(results[n]['tvm']):11.0%} {spread(results[n]['onnxruntime']):11.0%}")


if __name__ == "__main__":
    from latprof.errors import run_script

    sys.exit(run_script(main))
