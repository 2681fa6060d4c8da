"""Tuning with MetaSchedule, made cheap enough for a grid of token counts.

A DeiT-T block has 13 tasks at each N; tuning every task at every N of a 12-point grid would take hours
on a small CPU. Two things make it affordable:
- only the tasks that matter are tuned (matmuls, softmax, layer norm, GELU): the injective
  reshapes and transposes cost microseconds and get TVM's default schedule;
- tuning is shared across token counts: only *anchor* counts (default one, N=192) are tuned with the
  trial budget, and every measured count replays the tuned schedule of the same task at the nearest
  anchor, with its tile sizes re-fitted to the new extent ("transfer"). The split factors are written
  into the replayed trace as constants: a tile *sample* whose factors do not divide the new extent is
  silently re-sampled by TVM into trivial tiles (that made transferred blocks 4-7x slower). There is
  more than one way to re-fit (predicated tails, perfect divisors); each is a candidate, timed on the
  device, and the fastest is kept. For a matmul, one more way is to pad its token axes with zeros to a
  multiple of 8 or 16 first, so that the anchor's tiles fit exactly (197 is prime). A transferred
  schedule is checked like any other: the outputs are compared with onnxruntime before a sample is kept.

The persistent database lives under `<workdir>/tuning/<device>-<target hash>/`, so later runs and the
final deployment reuse it; `budget.json` there records the trials each task has had.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from latprof.lut.table import atomic_write_text

# The operators worth tuning, as whole words of a task name: a bare substring match once took
# "expand_dims" for exp and "maximum" (elementwise) for a max reduction, and every whole pruned model in
# `validate` then tuned a dozen reshaping tasks at 16 trials each.
HEAVY = re.compile(r"(?<![a-z])(matmul|einsum|dense|conv|softmax|layer_norm|erf|mean|variance|sum|max|exp)(?![a-z])")


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

    def transferred(self, key: str, trials: int) -> bool:
        """Whether a task has its schedule for this budget: tuned, or transferred the current way (a
        transfer made before a better way existed is done again)."""
        info = self.budget.get(key, {})
        return self.trials(key) >= trials and (
            "transferred_from" not in info or info.get("transfer", 1) >= TRANSFER_VERSION)

    def retune_due(self, key: str) -> bool:
        """Whether a transferred task was found to need a retune that has not ended yet."""
        return bool(self.budget.get(key, {}).get("retune_due"))

    def record(self, key: str, **info) -> None:
        self.budget[key] = {**self.budget.get(key, {}), **info}

    def rejected(self) -> set[str]:
        """Keys of the tasks whose records TVM could not read back (`tvmlib.set_aside_bad_records`)."""
        from latprof.compile import tvmlib

        path = self.dir / "records.rejected.json"
        if not path.exists():
            return set()
        indices = {json.loads(line)[0] for line in path.read_text().splitlines() if line.strip()}
        return {module_key(w.mod) for w in tvmlib.read_workloads(self.dir, indices).values()}


def task_key(task) -> str:
    """A stable name for a task's workload: its structural hash (shape and dtype included)."""
    return module_key(task.dispatched[0])


def module_key(mod) -> str:
    from tvm_ffi import structural_hash

    return "%016x" % (structural_hash(mod) & (2**64 - 1))


def refit_tile(extent: int, old: list[int]) -> list[int]:
    """Tile factors for `extent` shaped like `old`: the inner factors stay (they set the vector width and
    register blocking that tuning found), dropping the largest while they exceed the extent; the outer
    factor covers the rest, with a predicated tail when it does not divide."""
    inner = [int(v) for v in old[1:]]
    while math.prod(inner) > extent and max(inner, default=1) > 1:
        inner[inner.index(max(inner))] = 1
    return [-(-extent // max(math.prod(inner), 1))] + inner


def divisor_tile(extent: int, old: list[int]) -> list[int]:
    """Perfect tile factors for `extent` shaped like `old`: each inner factor becomes the largest
    divisor of what is left that does not exceed it (no predicate; for a prime extent, no tiling)."""
    inner, rest = [1] * (len(old) - 1), extent
    for j in range(len(old) - 1, 0, -1):
        inner[j - 1] = max(d for d in range(1, min(int(old[j]), rest) + 1) if rest % d == 0)
        rest //= inner[j - 1]
    return [rest] + inner


# How a tuned schedule's tiles are re-fitted to another token count. No one policy wins (measured on a
# DeiT-T block, anchor 192 -> 197: predicated tails are 8x faster for the attention-times-V matmul, and
# 2x slower for QK^T than perfect tiles), so every policy is a candidate and the fastest one is kept.
# MetaSchedule's multi-level tiling samples 2 factors for a reduction loop and 4 for a spatial one.
REFITS = {
    "predicated": lambda e, old: refit_tile(e, old),
    "divisors": lambda e, old: divisor_tile(e, old),
    "mixed": lambda e, old: (divisor_tile if len(old) == 2 else refit_tile)(e, old),
}


# Padding (pad_einsum): a token count with few divisors (197 is prime) leaves perfect tiles no choice,
# and predicated tails stop the vectorizer: at N=197 DeiT-T's fc1 ran 1.6-3.9 ms re-fitted those ways
# against 0.53 ms tuned at 192. Padded to 208 first, the anchor's tiles fit and it runs in 0.50 ms.
# Zeros leave a sum of products exact, so only matmul blocks are padded (zeros would change a max).
PADS = (8, 16)
TRANSFER_VERSION = 5  # 2: padded; 3: unwritten outputs caught; 4: anchor-tile padding;
# 5: over-reads caught (guarded buffers). Older ones are redone
PADDED_BLOCK = "matmul"
# A task with no matmul block (the softmax) cannot be padded, and its tuned reduction is split for a
# parallel reduction (rfactor), which only perfect tiles allow: at N=197 its best re-fit ran 0.40-0.41 ms
# against 0.06-0.11 ms tuned at 192 (three tuning runs); 8 trials of its own found 0.11-0.13 ms. Such a task
# gets a short search of its own, warm-started from the database, when its best re-fit is over
# RETUNE_RATIO x the anchor's time scaled linearly to N (and by more than RETUNE_MIN_S). Matmuls are
# left to padding: retuning them too cost 2.4 min of a cold run for small gains. A cold run retuned the
# tasks (softmaxes) at 8 token counts in 1:44 (197: 0.41 -> 0.11 ms, 161: 0.24 -> 0.08; 49 and 65 gained 25-39 us,
# which RETUNE_MIN_S now leaves alone).
RETUNE_RATIO, RETUNE_MIN_S, RETUNE_TRIALS = 1.5, 50e-6, 8


def needs_retune(task, best_s: float | None, anchor_s: float, anchor_tokens: int, tokens: int) -> bool:
    """Whether a transferred task without a matmul block is far from what its anchor promises at N
    (best_s None: no re-fit was kept)."""
    if PADDED_BLOCK in signature(task)[0]:
        return False
    if best_s is None:
        return True
    expected = anchor_s * tokens / anchor_tokens
    return best_s > RETUNE_RATIO * expected and best_s - expected > RETUNE_MIN_S


def _einsum_extents(mod) -> list[int]:
    from tvm.s_tir import Schedule

    sch = Schedule(mod)
    return [int(iv.dom.extent) for iv in sch.get(sch.get_sblock(PADDED_BLOCK)).iter_vars]


def _token_pads(src_mod, dst_mod, multiple: int) -> list[int] | None:
    """pad_einsum factors for dst_mod's matmul block: `multiple` on its token axes (those whose extent
    differs from the anchor's) where it does not divide them; None when nothing is padded."""
    try:
        old, new = _einsum_extents(src_mod), _einsum_extents(dst_mod)
    except Exception:  # no matmul block in this task
        return None
    pads = [multiple if a != b and b % multiple else 1 for a, b in zip(old, new)]
    return pads if len(old) == len(new) and any(p > 1 for p in pads) else None


def _anchor_tile_pads(trace, src_mod, dst_mod) -> list[int] | None:
    """pad_einsum factors that keep the anchor's inner tiles of every token axis as they are: each axis
    padded to a multiple of the product of its inner tile factors, so only the outer loop changes.
    Padding to 8 or 16 instead re-factors the inner tiles, and LLVM then scalarized DeiT-T's QKV matmul
    at N=197 (4.0 ms padded to 200, 0.26 ms tuned at 192; 0.30 ms padded to 204 = 17 x its 12-row tile).
    The matmul's tile samples come first in its trace, in its axis order; None when that does not hold
    or nothing needs padding."""
    try:
        old, new = _einsum_extents(src_mod), _einsum_extents(dst_mod)
    except Exception:
        return None
    if len(old) != len(new):
        return None
    # axes of extent 1 may have no sample; the others are sampled in the block's axis order
    samples = [(i, e) for i, e in zip([i for i in trace.insts if i.kind.name == "SamplePerfectTile"],
                                      _tile_extents(trace, src_mod)) if e > 1]
    axes = [j for j, e in enumerate(old) if e > 1]
    if len(samples) < len(axes) or [e for _, e in samples[:len(axes)]] != [old[j] for j in axes]:
        return None
    pads = [1] * len(old)
    for j, (sample, _) in zip(axes, samples):
        inner = math.prod(int(v) for v in trace.decisions[sample][1:])
        if old[j] != new[j] and new[j] % inner:
            pads[j] = inner
    return pads if any(p > 1 for p in pads) else None


def _postprocessed(sch, target) -> bool:
    """Apply MetaSchedule's postprocessors for the target (parallel, vectorize and unroll from the
    trace's annotations) to a schedule replayed without its own: a padded module has more blocks than
    the anchor's recorded postprocessing steps name. No tune context: the CPU postprocessors read
    nothing from it, and making one imports every tensor intrinsic TVM has (25 s here)."""
    from tvm.s_tir import meta_schedule as ms

    return all(p.apply(sch) for p in ms.postproc.Postproc.create(str(target.kind.name)))


def _tile_extents(trace, mod) -> list[int]:
    """The extent at `mod` of the loop behind each tile sample of `trace`, in order."""
    from tvm.s_tir import Schedule

    sch, extents = Schedule(mod), []

    def record(inst, inputs, attrs, decision):
        if inst.kind.name == "SamplePerfectTile":
            extents.append(int(sch.get(inputs[0]).extent))
        return decision

    try:  # the replay stops where the source's decisions no longer fit; the extents seen so far are right
        trace.apply_to_schedule(sch, remove_postproc=False, decision_provider=record)
    except Exception:
        pass
    return extents


def _with_tiles(trace, extents: list[int], refit):
    """`trace` with each changed tile sample replaced by constant split factors: a split may be
    predicated, a tile sample may not (TVM re-samples a decision that does not divide)."""
    from tvm.s_tir.schedule import Instruction, Trace

    samples = [i for i in trace.insts if i.kind.name == "SamplePerfectTile"]
    if len(samples) != len(extents):
        return None
    # TVM objects hash by identity of the underlying node: instructions and RVs work as dict keys
    tiles = {i: refit(e, [int(v) for v in trace.decisions[i]]) for i, e in zip(samples, extents)}
    const, insts, decisions = {}, [], {}
    for inst in trace.insts:
        old = trace.decisions.get(inst) if inst.kind.name == "SamplePerfectTile" else None
        if old is not None and [int(v) for v in old] != tiles[inst]:
            const.update(zip(inst.outputs, tiles[inst]))
            continue
        orig = list(inst.inputs)
        if any(_is_rv(x) and x in const for x in orig):
            new = Instruction(inst.kind, [const.get(x, x) if _is_rv(x) else x for x in orig], inst.attrs, inst.outputs)
        else:
            new = inst
        if inst in trace.decisions:
            decisions[new] = trace.decisions[inst]
        insts.append(new)
    return Trace(insts, decisions)


def _is_rv(x) -> bool:
    return not isinstance(x, (int, float, str, type(None)))


def signature(task) -> tuple:
    """What a task is, whatever N: its block names and its buffers' ranks. Task *names* do not carry
    across token counts: at N=16 an N x 16 x N and an N x N x 16 matmul have the same shape and share one
    function, at N=13 they are two, and the names shift."""
    func = task.dispatched[0]["main"]
    blocks = tuple(re.findall(r'T\.sblock\("([^"]+)"', func.script()))
    return blocks, tuple(len(b.shape) for b in _arg_infos(task.dispatched[0]))


def _arg_infos(mod):
    from tvm.s_tir import meta_schedule as ms

    return ms.arg_info.ArgInfo.from_prim_func(mod["main"])


def candidates(sources: dict, dst_mod, target=None) -> dict:
    """Schedules of `dst_mod` (a task at another N) replayed from the tuned traces of the same task at an
    anchor: `sources` maps a task name to (trace, anchor module), several when the signature is
    ambiguous. One schedule per re-fit policy that applies, TVM's own fallback ("resampled"), and given
    the target, the padded ones ("pad16:divisors"). Identical schedules are kept once."""
    from tvm.s_tir import Schedule

    out, seen = {}, set()

    def add(label, trace, provider=None, pads=None):
        sch = Schedule(dst_mod)
        try:
            if pads:  # in the schedule, so the stored trace pads before it replays
                sch.pad_einsum(sch.get_sblock(PADDED_BLOCK), pads)
            trace.apply_to_schedule(sch, remove_postproc=bool(pads), decision_provider=provider)
            if pads and not _postprocessed(sch, target):
                return
        except Exception:  # a structural step (rfactor, compute_at) that does not fit the new extent
            return
        text = str(sch.mod)
        if text not in seen:
            seen.add(text)
            out[label] = sch

    for src, (trace, src_mod) in sources.items():
        prefix = f"{src}:" if len(sources) > 1 else ""
        extents = _tile_extents(trace, dst_mod)
        for label, refit in REFITS.items():
            refitted = _with_tiles(trace, extents, refit)
            if refitted is not None:
                add(prefix + label, refitted)
        it = iter(extents)
        add(prefix + "resampled", trace,
            lambda inst, inputs, attrs, d: refit_tile(next(it, 1), [int(v) for v in d])
            if inst.kind.name == "SamplePerfectTile" else d)
        padded_ways = {f"pad{m}": _token_pads(src_mod, dst_mod, m) for m in PADS}
        padded_ways["padtile"] = _anchor_tile_pads(trace, src_mod, dst_mod)
        for way, pads in padded_ways.items() if target is not None else ():
            if pads:
                padded = Schedule(dst_mod)
                padded.pad_einsum(padded.get_sblock(PADDED_BLOCK), pads)
                refitted = _with_tiles(trace, _tile_extents(trace, padded.mod), REFITS["divisors"])
                if refitted is not None:
                    add(f"{prefix}{way}:divisors", refitted, pads=pads)
    return out


GUARDS = (float("nan"), float("inf"), float("-inf"))  # what lies around a buffer in verify's runs
_ALIGN = 64  # bytes; TVM's default buffer alignment, which compiled kernels may assume


def _guarded(arr, fill):
    """`arr` copied into the middle of a larger aligned array filled with `fill`: returns (the whole
    array, the guard length in elements, a zero-copy TVM tensor of the middle with `arr`'s shape)."""
    import numpy as np
    import tvm

    pad = -(-max(arr.size, 64) * arr.itemsize // _ALIGN) * _ALIGN // arr.itemsize
    raw = np.full(arr.size + 2 * pad + _ALIGN, fill, arr.dtype)
    start = (-raw.ctypes.data % _ALIGN) // arr.itemsize
    whole = raw[start:start + arr.size + 2 * pad]
    whole[pad:pad + arr.size] = arr.ravel()
    return whole, pad, tvm.runtime.from_dlpack(whole[pad:pad + arr.size].reshape(arr.shape))


def verify(task_mod, sch, cache: dict | None = None) -> bool:
    """Whether a replayed schedule computes what the unscheduled task computes, run on this machine's CPU
    with random inputs (a schedule's loop structure and bounds are target-independent).

    Two ways a re-fitted schedule has gone wrong, both seen in DeiT-T softmaxes with predicated tails:
    it leaves output elements unwritten (the candidate's outputs start as NaN, so that fails), or it
    reads past the end of a buffer. An over-read gives whatever lies in memory there: finite and harmless
    in one process, NaN in the next (a transferred block passed the end-to-end output check and failed
    it in a later compile). So each buffer sits inside a guard, one run each with NaN, +inf and -inf
    (whether a max passes NaN on depends on its lowering; a max drops -inf, a min +inf): an over-read
    shows as a non-finite or wrong output, and a write past the end as a changed guard."""
    import numpy as np
    import tvm

    host = tvm.target.Target({"kind": "llvm"})
    infos = _arg_infos(task_mod)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal([int(d) for d in a.shape]).astype(str(a.dtype)) for a in infos]
    from tvm_ffi import structural_hash

    key = structural_hash(task_mod)  # by content: Python wrappers of one task come and go
    if cache is None or key not in cache:
        want = [tvm.runtime.tensor(a) for a in args]
        tvm.compile(task_mod, target=host)["main"](*want)
        want = [w.numpy() for w in want]
        outputs = {i for i, (w, a) in enumerate(zip(want, args)) if not np.array_equal(w, a)}  # what it wrote
        if cache is not None:
            cache[key] = want, outputs
    else:
        want, outputs = cache[key]
    try:
        run = tvm.compile(sch.mod, target=host)["main"]
    except Exception:
        return False
    given = [np.full_like(a, np.nan) if i in outputs and a.dtype.kind == "f" else a for i, a in enumerate(args)]
    for fill in GUARDS:
        fills = [fill if a.dtype.kind == "f" else 0 for a in given]
        bufs = [_guarded(a, f) for a, f in zip(given, fills)]
        try:
            run(*(t for _, _, t in bufs))
        except Exception:
            return False
        for (whole, pad, _), f, w in zip(bufs, fills, want):
            g = whole[pad:pad + w.size].reshape(w.shape)
            scale = max(1.0, float(np.abs(w).max()) if w.size else 1.0)
            if not np.all(np.isfinite(g)) or not np.allclose(g, w, rtol=1e-3, atol=1e-3 * scale):
                return False
            guard = np.concatenate([whole[:pad], whole[pad + w.size:]])
            if not np.array_equal(guard, np.full_like(guard, f), equal_nan=True):
                return False  # wrote past the buffer
    return True


def commit(db, dst_task, sch, run_secs: list[float], target) -> None:
    """Store a schedule of `dst_task` in the database as its tuning record. The database serves a task's
    fastest record, so a transfer that is done again must rank above the one it replaces (whose time
    was taken in another run): it is stored with a time just under that one's when that is lower."""
    from tvm.s_tir import meta_schedule as ms

    dst_mod = dst_task.dispatched[0]
    secs = [float(s) for s in run_secs]
    prior = db.query_tuning_record(dst_mod, target, "main")
    if prior is not None and prior.run_secs:
        best = min(float(getattr(t, "value", t)) for t in prior.run_secs)
        secs = [min(s, best * 0.999) for s in secs]
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(dst_mod), secs, target, _arg_infos(dst_mod)))
