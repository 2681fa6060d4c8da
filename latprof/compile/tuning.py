"""Tuning with MetaSchedule, made cheap enough for a grid of token counts.

A DeiT-T block has 13 tasks at each N; tuning every task at every N of a 12-point grid would take hours
on a small CPU. Two things make it affordable:
- only the tasks that matter are tuned (matmuls, softmax, layer norm, GELU): the injective
  reshapes and transposes cost microseconds and get TVM's default schedule;
- tuning is shared across token counts: only *anchor* counts (default one, N=192) are tuned with the
  trial budget, and every measured count replays the tuned schedule of the same task at the nearest
  anchor, with its tile sizes re-fitted to the new extent ("transfer"; a loop that no longer divides
  gets a predicated tail). A transferred schedule is checked like any
  other: the outputs are compared with onnxruntime before a sample is kept.

The persistent database lives under `<workdir>/tuning/<device>-<target hash>/`, so later runs and the
final deployment reuse it; `budget.json` there records the trials each task has had.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from latprof.lut.table import atomic_write_text

HEAVY = re.compile(r"matmul|softmax|layer_norm|erf|conv|mean|variance|sum|max|exp|dense")


def is_heavy(task_name: str) -> bool:
    return bool(HEAVY.search(task_name))


def anchor_tokens(max_tokens: int, configured: list | None = None) -> list[int]:
    """Token counts tuned for real. Default: the largest multiple of 32 not above the model's maximum
    (192 for DeiT): a count with many divisors gives MetaSchedule real tile choices, which then re-factor
    well for every other N (197 is prime: tuned there, every tile of the token loop is trivial)."""
    if configured:
        return sorted({int(n) for n in configured})
    return [max(32, max_tokens // 32 * 32)]


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
    """A stable name for a task's workload: its structural hash (shape and dtype included)."""
    from tvm_ffi import structural_hash

    return "%016x" % (structural_hash(task.dispatched[0]) & (2**64 - 1))


def refit_tile(extent: int, old: list[int]) -> list[int]:
    """Tile factors for `extent` shaped like `old`: the inner factors stay (they set the vector width and
    register blocking that tuning found), dropping the largest while they exceed the extent; the outer
    factor covers the rest, with a predicated tail when it does not divide."""
    inner = [int(v) for v in old[1:]]
    while math.prod(inner) > extent and max(inner, default=1) > 1:
        inner[inner.index(max(inner))] = 1
    return [-(-extent // max(math.prod(inner), 1))] + inner


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
            return refit_tile(int(sch.get(inputs[0]).extent), [int(v) for v in decision])
        return decision

    try:
        rec.trace.apply_to_schedule(sch, remove_postproc=False, decision_provider=adjust)
    except Exception:  # a schedule that does not fit the new extent: that N keeps TVM's default
        return False
    workload = db.commit_workload(dst_mod)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, rec.run_secs, target, ms.arg_info.ArgInfo.from_prim_func(dst_mod["main"])))
    return True
