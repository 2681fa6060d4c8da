"""Does the 95% prediction interval hold 95% of what is measured? Cross-validated on validation results
already measured, as `benchmarks/overhead_fit.py` does (its `groups`), in one run:

over many random splits of each result set, calibrate on K schedules (`fit_overhead` on drift-corrected
figures, the calibration's median drift carried, the scatter of the K as measured, as `validate
--calibrate` does) and count the other schedules measured inside the prediction's interval:
t(dof) x scatter x sqrt(1 + 1/K) either side. The table's CI is left out (the groups keep the sums only),
so the intervals here are at most as wide as `predict`'s: a lower bound on its coverage.
Nothing is measured: it runs in seconds.

    python benchmarks/interval_coverage.py --workdir /path/to/latprof-work [--workdir ...] [--cal 6] [--stat min]
"""

from __future__ import annotations

import random
import statistics
import sys

from latprof.errors import run_script
from latprof.predict import fit_overhead
from overhead_fit import result_sets, split_parser


def coverage(pts, k: int, splits: int, seed: int = 0) -> tuple[float, float, float]:
    """(share inside the interval, share within ±5%, median relative half-width) over the held-out schedules."""
    rng, inside, close, halves, n = random.Random(seed), 0, 0, [], 0
    for _ in range(splits):
        idx = list(range(len(pts)))
        rng.shuffle(idx)
        cal, test = [pts[i] for i in idx[:k]], [pts[i] for i in idx[k:]]
        oh = fit_overhead([x for x, _, _ in cal], [y / d for _, y, d in cal], 1)
        oh.drift = statistics.median(d for _, _, d in cal)
        oh.rel_sd = oh.measured_scatter([x for x, _, _ in cal], [y for _, y, _ in cal], 1)
        half = oh.scatter_half()
        halves.append(half)
        for x, y, _ in test:
            pred = oh.apply(x, 1)
            inside += abs(y / pred - 1) <= half  # |y - pred| <= half x pred
            close += abs(pred / y - 1) <= 0.05
        n += len(test)
    return inside / n, close / n, statistics.median(halves)


def main() -> None:
    args = split_parser(__doc__, 6, "fidelity.py's --cal-configs").parse_args()
    for stat in args.stat.split(","):
        print(f"\n== statistic {stat}: calibrate on {args.cal}, {args.splits} random splits; held-out schedules "
              f"inside the 95% prediction interval, within ±5%, median half-width")
        print(f"{'results':58s} {'n':>3s}  {'inside':>7s} {'±5%':>5s} {'half':>6s}")
        rows = []
        for label, pts in result_sets(args.workdir, stat, args.cal):
            rows.append(coverage(pts, args.cal, args.splits))
            a, b, h = rows[-1]
            print(f"{label[:58]:58s} {len(pts):3d}  {a:7.0%} {b:5.0%} {h:6.1%}")
        if rows:
            print(f"{'mean over ' + str(len(rows)) + ' result sets':58s} {'':3s}  "
                  f"{statistics.mean(r[0] for r in rows):7.0%} {statistics.mean(r[1] for r in rows):5.0%} "
                  f"{statistics.median(r[2] for r in rows):6.1%}")


if __name__ == "__main__":
    sys.exit(run_script(main))
