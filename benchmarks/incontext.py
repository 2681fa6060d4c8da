"""A unit's cost in the whole model, between hot and cold: which overhead form predicts end to end.

The table times each unit hot (alone, back to back: its weights stay in the caches). In the whole model
the units take turns in the last-level cache, so each pays part of what it costs cold (right after a
sweep of the caches), and how much more cold costs than hot depends on the schedule TVM picked at that N
(docs/measurements.md, "Hot or cold": PiT-XS's fc2 at N=41 runs 3-4x slower cold, at N=33 1-2x). A
calibration that scales the hot sum cannot follow that; one that adds a share of the cold-minus-hot gap
can. This script measures, in one process and interleaved round by round, for the calibration and
validation schedules `benchmarks/fidelity.py` draws (seeds 1 and 0):

  whole   each whole pruned model, exactly as `validate` builds and compiles it
  hot     each of their units at its N, timed back to back (what the table sums)
  cold    the same, each call right after a sweep of twice the last-level cache

and scores overhead forms by the share of schedules within ±5% out of sample (calibrated on the
calibration schedules and on random splits of the same size):

  scale+const   the library's fit on the hot sum (latprof.predict.fit_overhead)
  hot+gap       whole = hot + a * (cold - hot) + c              (a, c >= 0)
  scale+gap     whole = s * hot + a * (cold - hot) + c          (s >= 1; a, c >= 0)

Everything is timed in this process, so the forms are compared on the same figures; the drift between a
table and the end to end is a separate matter (fidelity.py measures that).

    python benchmarks/incontext.py --engine tvm --workdir W --device W/tvm.yaml --model pit_xs --on-grid
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import sys
from pathlib import Path

from additivity import callables, llc_bytes, llc_sweep, per_call


def nnls_rel(columns: list[list[float]], target: list[float], weights: list[float]) -> list[float]:
    """Non-negative weighted least squares over a few columns, exactly: every subset of columns solved
    free, the best one whose coefficients are all >= 0 kept (zeros for the rest)."""
    import numpy as np

    A, y, w = np.array(columns, float).T, np.array(target, float), np.sqrt(np.array(weights, float))
    best, best_sse = [0.0] * len(columns), float(np.sum((y * w) ** 2))
    for r in range(1, len(columns) + 1):
        for cols in itertools.combinations(range(len(columns)), r):
            coef, *_ = np.linalg.lstsq(A[:, cols] * w[:, None], y * w, rcond=None)
            if (coef < 0).any():
                continue
            sse = float(np.sum(((A[:, cols] @ coef - y) * w) ** 2))
            if sse < best_sse - 1e-15:
                full = [0.0] * len(columns)
                for c, v in zip(cols, coef):
                    full[c] = float(v)
                best, best_sse = full, sse
    return best


def fit_forms(hot: list[float], cold: list[float], whole: list[float]) -> dict:
    """Each form fitted to calibration schedules: a function of (hot, cold) -> predicted whole."""
    from latprof.predict import fit_overhead

    gap = [c - h for h, c in zip(hot, cold)]
    rest = [y - h for h, y in zip(hot, whole)]
    w = [1 / y ** 2 for y in whole]  # relative error
    oh = fit_overhead(hot, whole, calls=1)
    a, c = nnls_rel([gap, [1.0] * len(hot)], rest, w)
    b, a2, c2 = nnls_rel([hot, gap, [1.0] * len(hot)], rest, w)
    return {
        "scale+const": (lambda h, k: oh.apply(h, 1), f"{oh.scale:.3f} x hot {oh.residual_ms:+.2f} ms"),
        "hot+gap": (lambda h, k: h + a * (k - h) + c, f"hot + {a:.2f} x gap {c:+.2f} ms"),
        "scale+gap": (lambda h, k: (1 + b) * h + a2 * (k - h) + c2, f"{1 + b:.3f} x hot + {a2:.2f} x gap {c2:+.2f} ms"),
    }


def within(forms: dict, idx: list[int], hot, cold, whole, tol: float = 0.05) -> dict:
    return {name: sum(abs(f(hot[i], cold[i]) / whole[i] - 1) <= tol for i in idx) / len(idx)
            for name, (f, _) in forms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_t")
    ap.add_argument("--engine", choices=["onnxruntime", "tvm"], default="onnxruntime")
    ap.add_argument("--workdir", default="latprof-work-fidelity")
    ap.add_argument("--device", default="local", help="the device config the workdir was measured with (a name or a path)")
    ap.add_argument("--lut", default=None, help="the table the schedules are drawn from (default: the workdir's, by device name)")
    ap.add_argument("--configs", type=int, default=20, help="validation schedules (seed 0, as fidelity.py)")
    ap.add_argument("--cal-configs", type=int, default=6, help="calibration schedules (seed 1)")
    ap.add_argument("--on-grid", action="store_true", help="schedules among the solver's kept counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=20, help="single calls per figure and round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--splits", type=int, default=300, help="random calibration/validation splits to score")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    from latprof.devices import load_config
    from latprof.lut.table import read_lut
    from latprof.measure.runner import export_graphs
    from latprof.models import get_model
    from latprof.predict import unit_tokens
    from latprof.progress import bar_factory
    from latprof.validate import _export_model, random_schedules

    spec, workdir = get_model(args.model), Path(args.workdir)
    lut = args.lut or workdir / "luts" / f"{load_config(args.device).name}.csv"
    table = read_lut(lut)
    cal = random_schedules(table, spec, args.cal_configs, seed=1, on_grid=args.on_grid)
    val = random_schedules(table, spec, args.configs, seed=0, on_grid=args.on_grid)
    schedules = cal + val
    uses = [unit_tokens(spec, s) for s in schedules]
    ns = sorted({n for u in uses for n in u.values()})
    units = {(g.shared, g.tokens): g for g in export_graphs(spec, ns, workdir, bar_factory(True))}
    wholes = [_export_model(spec, s.kept, workdir / "graphs") for s in schedules]
    keys = sorted({(spec.unit(name).shared, n) for u in uses for name, n in u.items()})
    fns = callables(args.engine, [units[k] for k in keys] + wholes, workdir, spec, schedules, args.threads, args.device)
    unit_fn, whole_fn = dict(zip(keys, fns[:len(keys)])), fns[len(keys):]
    sweep = llc_sweep()
    for fn in fns:
        per_call(fn, 3)
    hots, colds, wholes_ms = {k: [] for k in keys}, {k: [] for k in keys}, [[] for _ in schedules]
    print(f"{args.model}, {args.engine}, {args.threads} thread(s): {len(schedules)} schedules, {len(keys)} unit graphs; "
          f"{args.rounds} rounds of {args.calls} single calls; LLC sweep {2 * llc_bytes() >> 20} MiB", flush=True)
    for r in range(args.rounds):
        for k in keys:
            hots[k].append(per_call(unit_fn[k], args.calls))
            colds[k].append(per_call(unit_fn[k], args.calls, sweep))
        for i, fn in enumerate(whole_fn):
            wholes_ms[i].append(per_call(fn, args.calls))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    hot_k = {k: statistics.median(v) for k, v in hots.items()}
    cold_k = {k: statistics.median(v) for k, v in colds.items()}
    hot, cold, whole = [], [], []
    for i, u in enumerate(uses):
        ks = [(spec.unit(name).shared, n) for name, n in u.items()]
        hot.append(sum(hot_k[k] for k in ks))
        cold.append(sum(cold_k[k] for k in ks))
        whole.append(statistics.median(wholes_ms[i]))
    print(f"\n{'':3} {'kept':18} {'whole':>8} {'hot':>8} {'cold':>8} {'whole/hot':>9} {'share of gap':>12}")
    for i, s in enumerate(schedules):
        tag = "cal" if i < len(cal) else "val"
        print(f"{tag:3} {str(list(s.kept)):18} {whole[i]:8.3f} {hot[i]:8.3f} {cold[i]:8.3f} {whole[i] / hot[i]:9.3f} "
              f"{(whole[i] - hot[i]) / (cold[i] - hot[i]):12.2f}")

    cal_idx, val_idx = list(range(len(cal))), list(range(len(cal), len(schedules)))
    forms = fit_forms(*([x[i] for i in cal_idx] for x in (hot, cold, whole)))
    fixed = within(forms, val_idx, hot, cold, whole)
    rng, scores = random.Random(0), {name: [] for name in forms}
    for _ in range(args.splits):
        idx = list(range(len(schedules)))
        rng.shuffle(idx)
        c, v = idx[:len(cal)], idx[len(cal):]
        for name, share in within(fit_forms(*([x[i] for i in c] for x in (hot, cold, whole))), v, hot, cold, whole).items():
            scores[name].append(share)
    print(f"\nwithin ±5% out of sample: calibrated on the {len(cal)} calibration schedules, validated on the "
          f"{len(val)} others; and the mean over {args.splits} random splits of the same sizes")
    for name, (_, desc) in forms.items():
        print(f"  {name:12} {fixed[name]:6.0%}   {statistics.mean(scores[name]):6.0%}   ({desc})")


if __name__ == "__main__":
    from latprof.errors import run_script

    sys.exit(run_script(main))
