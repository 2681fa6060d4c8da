"""Tuning with MetaSchedule, made cheap enough for a grid of token counts.

A DeiT-T block has 13 tasks at each N; tuning every task at every N of a 12-point grid would take hours
on a small CPU. Two things make it affordable:
- only the tasks that matter are tuned (matmuls, softmax, layer norm, GELU): the injective
  reshapes and transposes cost microseconds and get TVM's default schedule;
- tuning is shared across token counts: the grid's *anchor* counts are tuned with the trial budget,
  and every other count replays the tuned schedule of the same task at the nearest anchor, with its
  tile sizes re-factored for the new extent ("transfer"). A transferred schedule is checked like any
  other: the outputs are compared with onnxruntime before a sample is kept.

The persistent database lives under `<workdir>/tuning/<device>-<target hash>/`, so later runs and the
final deployment reuse it; `budget.json` there records the trials each task has had.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from latprof.lut.table import atomic_write_text

HEAVY = re.compile(r"matmul|softmax|layer_norm|erf|conv|mean|variance|sum|max|exp|dense")


def is_heavy(task_name: str) -> bool:
    return bool(HEAVY.search(task_name))


def anchors(tokens: list[int], every: int = 4) -> list[int]:
    """The token counts tuned for real: the largest, then every `every`-th below it."""
    ordered = sorted(set(tokens), reverse=True)
    return sorted(ordered[::every])


class TuningDB:
    """A device+target's MetaSchedule database and the trial budget already spent per task."""

    def __init__(self, work_dir: Path):
        from latprof.compile import tvmlib

        self.dir = Path(work_dir)
        self.db = tvmlib.database(self.dir)
        self.budget_path = self.dir / "budget.json"
        self.budget: dict[str, dict] = json.loads(self.budget_path.read_text()) if self.budget_path.exists() else {}

    def save(self) -> None:
        atomic_write_text(self.budget_path, json.dumps(self.budget, indent=1, sort_keys=True))

    def trials(self, key: str) -> int:
        return int(self.budget.get(key, {}).get("trials", 0))

    def record(self, key: str, **info) -> None:
        self.budget[key] = {**self.budget.get(key, {}), **info}


def task_key(task) -> str:
    from latprof.compile import tvmlib

    return "%016x" % (tvmlib.tvm().ir.structural_hash(task.dispatched[0]) & (2**64 - 1))


def refactor_tile(extent: int, old: list[int]) -> list[int]:
    """Tile factors for `extent` shaped like `old`: keep each inner factor as far as it divides
    what is left (largest divisor not above it), the outermost takes the rest."""
    new, rem = [1] * len(old), extent
    for i in range(len(old) - 1, 0, -1):
        f = max(1, min(int(old[i]), rem))
        while rem % f:
            f -= 1
        new[i], rem = f, rem // f
    new[0] = rem
    return new


def transfer(db, src_task, dst_task, target) -> bool:
    """Replay the best schedule of `src_task` on `dst_task` (same task, other N) into `db`."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    src_mod, dst_mod = src_task.dispatched[0], dst_task.dispatched[0]
    rec = db.query_tuning_record(src_mod, target, "main")
    if rec is None:
        return False
    sch = Schedule(dst_mod)

    def adjust(inst, inputs, attrs, decision):
        if inst.kind.name == "SamplePerfectTile":
            return refactor_tile(int(sch.get(inputs[0]).extent), [int(v) for v in decision])
        return decision

    try:
        rec.trace.apply_to_schedule(sch, remove_postproc=False, decision_provider=adjust)
    except Exception:  # a schedule that does not fit the new extent: that N keeps TVM's default
        return False
    workload = db.commit_workload(dst_mod)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, rec.run_secs, target, ms.arg_info.ArgInfo.from_prim_func(dst_mod["main"])))
    return True
