"""How often does `latprof check` raise a false alarm, and how often does it catch a real slowdown?

Real noise, measured on this machine: a DeiT-T-sized transformer block in numpy (single BLAS thread),
timed at a few token counts. The measurement is organised in *runs*, one after another in time; inside
a run every point is measured in rounds, and each round times four variants in a random order:

    A   the block                      A2  the block again (a second "nothing changed" series)
    S5  the block + 5% busy work        S10 the block + 10% busy work

The injected slowdown is REAL extra work inside the timed region: a busy-wait loop whose length is
5% / 10% of the block's median time, calibrated once before the runs. Load changes between calibration
and runs make the realised slowdown differ from 5% / 10%: the script prints the measured ratio.
`--also-scaled` additionally reports the same trials with A2's samples multiplied by exactly 1.05 /
1.10 (real noise, exact slowdown).

`--clock wall` (default) times with perf_counter: on a shared machine every stall caused by other
processes is in the samples. `--clock cpu` times with the thread's CPU time, closer to a dedicated
device (cache, frequency and memory effects remain; waiting for the core does not count).

Trials, each one complete `latprof check` run over every token count:
  sequential:  baseline = A of run i, candidate = A2 / S5 / S10 of run i+lag (measured later, so drift
               between runs is in the data)
  interleaved: baseline = A of run i, candidate = A2 / S5 / S10 of the same run, unpaired test
  paired:      the same samples, repeat k of A compared with repeat k of the candidate (measured moments
               apart): the sign test that `latprof check --interleave` uses

A false alarm is a trial with nothing changed (A vs A2) that reports any regression (rate per check
run, with the 95% Wilson upper bound); detection is the share of slowed points reported as a
regression (every point of an S5/S10 trial is slowed). "noisy" is the share of unchanged points that
the check could not decide.

    python benchmarks/regress.py                   # ~1-2 minutes on 2 cores
    python benchmarks/regress.py --runs 300 --repeats 30
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from latprof.check import stats  # noqa: E402
from latprof.errors import run_script  # noqa: E402

DIM, HEADS, MLP = 192, 3, 768  # DeiT-T


def make_block(tokens: int, rng):
    w = {k: rng.standard_normal(s).astype(np.float32) * 0.05 for k, s in
         {"qkv": (DIM, 3 * DIM), "proj": (DIM, DIM), "fc1": (DIM, MLP), "fc2": (MLP, DIM)}.items()}
    x = rng.standard_normal((tokens, DIM)).astype(np.float32)

    def block():
        h = x - x.mean(-1, keepdims=True)
        qkv = (h @ w["qkv"]).reshape(tokens, 3, HEADS, DIM // HEADS).transpose(1, 2, 0, 3)
        a = qkv[0] @ qkv[1].transpose(0, 2, 1)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ qkv[2]).transpose(1, 0, 2).reshape(tokens, DIM) @ w["proj"]
        y = x + o
        m = np.maximum(y @ w["fc1"], 0) @ w["fc2"]
        return y + m

    return block


CLOCK = time.perf_counter  # --clock cpu: time.thread_time, which does not count time the thread waits


def busy(seconds: float) -> None:
    """Real extra work: spin until `seconds` have passed on the benchmark's clock."""
    end = CLOCK() + seconds
    while CLOCK() < end:
        pass


MIN_REPEAT_MS = 25.0  # device_configs/local.yaml: measure.min_repeat_ms


def timed(fn, extra_s: float, number: int) -> float:
    """One sample: mean time (ms) of `number` calls, like TVM's time_evaluator(number=...)."""
    t0 = CLOCK()
    for _ in range(number):
        fn()
        if extra_s:
            busy(extra_s)
    return (CLOCK() - t0) / number * 1e3


def collect(tokens, runs, repeats, number, seed=0):
    """number: calls per sample, or 0 for latprof's default (`number: 0`): enough calls that a sample
    lasts MIN_REPEAT_MS, like TVM's time_evaluator(min_repeat_ms=...)."""
    rng = np.random.default_rng(seed)
    blocks = {t: make_block(t, rng) for t in tokens}
    for fn in blocks.values():  # warm up
        for _ in range(20):
            fn()
    base_ms = {t: float(np.median([timed(blocks[t], 0, 1) for _ in range(30)])) for t in tokens}
    calls = {t: number or max(1, math.ceil(MIN_REPEAT_MS / base_ms[t])) for t in tokens}
    variants = {"A": 0.0, "A2": 0.0, "S5": 0.05, "S10": 0.10}
    data = {v: np.zeros((runs, len(tokens), repeats)) for v in variants}
    names = list(variants)
    t0 = time.time()
    for r in range(runs):
        order = rng.permutation(len(tokens))  # shuffle points within a run
        for ti in order:
            t = tokens[ti]
            for k in range(repeats):
                # a fresh random order every repeat: a fixed rotation let one variant always follow the
                # busy-wait one, and that carry-over made it ~2% slower (wall clock) in every comparison
                for v in rng.permutation(names):
                    data[v][r, ti, k] = timed(blocks[t], variants[v] * base_ms[t] / 1e3, calls[t])
    return data, base_ms, time.time() - t0


def trial_rates(data, pairs, tolerance, alpha, scale=None, cand="A2", paired=False):
    """Fraction of trials with any regression (per check run) and fraction of points flagged."""
    runs_alarm, points_flag, points_total, noisy = 0, 0, 0, 0
    for i, j in pairs:
        base = data["A"][i]
        c = data[cand][j] * (scale or 1.0)
        verdicts = stats.compare_many(list(zip(base, c)), tolerance, alpha, seed=i * 7919 + j, resamples=200,
                                      paired=paired)
        flags = [v.status == stats.REGRESSION for v in verdicts]
        runs_alarm += any(flags)
        points_flag += sum(flags)
        points_total += len(flags)
        noisy += sum(v.status == stats.NOISY for v in verdicts)
    return runs_alarm / len(pairs), points_flag / points_total, noisy / points_total


def wilson_upper(k, n, z=1.96):
    if n == 0:
        return float("nan")
    p = k / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def _contender(seed: int) -> None:
    """Another job on a shared machine: bursts of work (1-40 ms of matrix products) and pauses (1-40 ms)."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((128, 128)).astype(np.float32)
    while True:
        end = time.perf_counter() + rng.uniform(0.001, 0.04)
        while time.perf_counter() < end:
            m = np.tanh(m @ m)
        time.sleep(rng.uniform(0.001, 0.04))


def start_background(k: int) -> list:
    """k contending processes, so that a quiet machine shows a shared runner's noise (stopped at exit)."""
    import atexit
    import multiprocessing

    procs = [multiprocessing.Process(target=_contender, args=(i,), daemon=True) for i in range(k)]
    for p in procs:
        p.start()
    atexit.register(lambda: [p.terminate() for p in procs])
    return procs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="50,100,197")
    ap.add_argument("--runs", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=30, help="samples per point per side")
    ap.add_argument("--number", type=int, default=1,
                    help="calls averaged into one sample; 0: enough calls that a sample lasts 25 ms, as latprof's "
                         "local device does by default (number: 0, min_repeat_ms: 25)")
    ap.add_argument("--tolerances", default="median:2%,median:3%,median:5%")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--lag", type=int, default=1, help="runs between baseline and candidate (sequential)")
    ap.add_argument("--also-scaled", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter, every stall counts (a shared machine's real noise); cpu: thread CPU "
                         "time, as on a dedicated device where nothing else competes for the core")
    ap.add_argument("--background", type=int, default=0,
                    help="start this many contending processes (bursty matrix work) while measuring: a shared "
                         "runner's noise on a quiet machine")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--save-raw", help="write the raw samples here (.npz) for re-analysis")
    ap.add_argument("--load-raw", help="re-analyse samples saved with --save-raw instead of measuring")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.load_raw:
        raw = np.load(args.load_raw)
        data = {v: raw[v] for v in ("A", "A2", "S5", "S10")}
        tokens = [int(t) for t in raw["tokens"]]
        base_ms = dict(zip(tokens, map(float, raw["base_ms"])))
        secs = float(raw["secs"])
    else:
        start_background(args.background)
        data, base_ms, secs = collect(tokens, args.runs, args.repeats, args.number)
    if args.save_raw:
        np.savez_compressed(args.save_raw, tokens=np.array(tokens), base_ms=np.array([base_ms[t] for t in tokens]),
                            secs=secs, **data)
    runs, args.repeats = data["A"].shape[0], data["A"].shape[2]
    seq = [(i, i + args.lag) for i in range(runs - args.lag)]
    inter = [(i, i) for i in range(runs)]
    print(f"measured {runs} runs x {len(tokens)} token counts x {args.repeats} repeats x 4 variants in {secs:.0f}s; "
          f"block medians {', '.join(f'{t} tok {m:.3f} ms' for t, m in base_ms.items())}")
    print(f"measurement time per point and side: {secs / (runs * len(tokens) * 4) * 1e3:.0f} ms (a default latprof "
          f"measurement of one point on `local`: 15 samples of >= 25 ms, at least 375 ms)")
    # how much real noise is there? run-to-run drift of the median, and the injected slowdowns as measured
    med = {v: np.median(d, axis=2) for v, d in data.items()}
    drift = np.abs(med["A"][1:] / med["A"][:-1] - 1)
    print(f"run-to-run drift of a point's median (A vs A of the next run): median {np.median(drift) * 100:.1f}%, "
          f"95th pct {np.quantile(drift, .95) * 100:.1f}%, max {drift.max() * 100:.1f}%")
    for v in ("A2", "S5", "S10"):
        print(f"  measured {v}/A ratio of medians within a run: {np.median(med[v] / med['A']):.3f}")
    print(f"\ncheck runs of {len(tokens)} points each, alpha {args.alpha}; false alarm = any regression when nothing "
          "changed (per check run); detection = share of slowed points flagged (and of runs flagging any)")
    rows = []
    header = f"{'tolerance':<12} {'order':<12} {'trials':>6} {'false alarm':>12} {'(95% upper)':>11} {'detect 5%':>10} {'detect 10%':>11} {'noisy (null)':>12}"
    for label, inj in [("busy-work", None)] + ([("scaled", 1)] if args.also_scaled else []):
        print(f"\ninjection: {label}\n{header}")
        for tol in args.tolerances.split(","):
            for order, pairs, paired in (("sequential", seq, False), ("interleaved", inter, False),
                                         ("paired", inter, True)):
                fa_run, _, noisy = trial_rates(data, pairs, tol, args.alpha, paired=paired)
                if inj:
                    d5 = trial_rates(data, pairs, tol, args.alpha, scale=1.05, paired=paired)
                    d10 = trial_rates(data, pairs, tol, args.alpha, scale=1.10, paired=paired)
                else:
                    d5 = trial_rates(data, pairs, tol, args.alpha, cand="S5", paired=paired)
                    d10 = trial_rates(data, pairs, tol, args.alpha, cand="S10", paired=paired)
                k = round(fa_run * len(pairs))
                row = {"injection": label, "tolerance": tol, "order": order, "trials": len(pairs),
                       "false_alarm_per_run": fa_run, "false_alarm_upper95": wilson_upper(k, len(pairs)),
                       "detect5_points": d5[1], "detect5_runs": d5[0], "detect10_points": d10[1],
                       "detect10_runs": d10[0], "noisy_null_points": noisy}
                rows.append(row)
                print(f"{tol:<12} {order:<12} {len(pairs):>6} {fa_run * 100:>11.1f}% {row['false_alarm_upper95'] * 100:>10.1f}% "
                      f"{d5[1] * 100:>9.1f}% {d10[1] * 100:>10.1f}% {noisy * 100:>11.1f}%")
    print("\ntargets: false alarms <= 1%, detect 10% >= 95%, detect 5% >= 80%")
    if args.json:
        Path(args.json).write_text(json.dumps({"base_ms": base_ms, "rows": rows, "args": vars(args)}, indent=2))
    return rows


if __name__ == "__main__":
    sys.exit(run_script(main))
