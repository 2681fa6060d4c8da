"""Tuning with the real MetaSchedule on a tiny attention-like graph: tile re-fitting, schedule transfer
to another token count, the progress of tuning, and that a tuned build really carries the schedules."""

import json
from pathlib import Path

import numpy as np
import pytest

from latprof.compile import tuning
from latprof.validate import _table_trials
from tests.conftest import write_config

pytest.importorskip("tvm")


@pytest.mark.parametrize("extent,old", [(197, [8, 3, 4, 2]), (129, [8, 3, 4, 2]), (13, [1, 16]), (1, [4, 4]),
                                        (65, [3, 64]), (192, [2, 96])])
def test_refit_policies(extent, old):
    pred, perfect = tuning.refit_tile(extent, old), tuning.divisor_tile(extent, old)
    for tile in (pred, perfect):
        assert len(tile) == len(old)
        assert all(new <= max(o, 1) for new, o in zip(tile[1:], old[1:]))  # inner factors only shrink
    inner = int(np.prod(pred[1:]))
    assert extent <= int(np.prod(pred)) < extent + inner  # covers the extent; the tail is under one tile
    assert int(np.prod(perfect)) == extent  # no predicate


def test_refit_examples():
    assert tuning.refit_tile(197, [8, 3, 4, 2]) == [9, 3, 4, 2]
    assert tuning.divisor_tile(197, [8, 3, 4, 2]) == [197, 1, 1, 1]  # prime: nothing divides
    assert tuning.divisor_tile(129, [8, 3, 4, 2]) == [43, 1, 3, 1]
    assert tuning.refit_tile(192, [8, 3, 4, 2]) == [8, 3, 4, 2]  # the anchor itself is unchanged


class _Bars:
    """A progress factory that records what every bar was told."""

    def __init__(self):
        self.bars = []

    def __call__(self, total, desc, unit):
        bar = _Bar(total, desc)
        self.bars.append(bar)
        return bar

    def by_prefix(self, prefix):
        return [b for b in self.bars if b.desc.startswith(prefix)]


class _Bar:
    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False

    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed = True


def _tiny_graphs(tmp_path, tokens):
    import torch

    from latprof.export import export_unit

    class Attn(torch.nn.Module):  # a projection, an N x N score matmul, softmax and attention-times-V
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            h = self.fc(x)
            return torch.softmax(h @ h.transpose(1, 2) * 0.25, -1) @ h

    m = Attn().eval()
    return {n: export_unit(m, (1, n, 16), tmp_path / "graphs", "tiny", "attn", n) for n in tokens}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One real tuning run shared by the slow tests: anchor N=16 tuned (2 trials per task), 13 and 7
    transferred from it. MetaSchedule's fixed cost per task dominates, so it runs once."""
    import torch

    from latprof.devices.config import load_config
    from latprof.measure.engines import TVMEngine
    from tests.conftest import write_config

    tmp_path = tmp_path_factory.mktemp("tuned")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    graphs = _tiny_graphs(tmp_path, [16, 13, 7])
    cfg = load_config(str(write_config(tmp_path / "dev.yaml", tuning={"trials_per_task": 2})))
    eng = TVMEngine(cfg, tmp_path / "work", trials=2)
    eng.anchors = [16]
    bars = _Bars()
    libs = eng.prepare([graphs[13], graphs[7]], bars, anchors=[graphs[16]])
    yield eng, graphs, bars, libs
    torch.set_num_threads(old)


@pytest.mark.slow
def test_tune_transfer_and_build(tuned):
    import onnxruntime as ort
    import tvm
    from tvm import relax

    from latprof.compile import tvmlib

    eng, graphs, bars, libs = tuned
    # tuning progress advanced to its total (it once stayed at 0 for a whole run)
    (tune_bar,) = bars.by_prefix("tune")
    assert tune_bar.total > 0 and tune_bar.n == tune_bar.total and tune_bar.closed
    # the other counts got the anchor's schedules, re-fitted: candidates measured, the fastest kept
    budget = json.loads((eng.tuning_dir / "budget.json").read_text())
    moved = [v for v in budget.values() if v.get("transferred_from") == 16]
    measured = [v for v in moved if "candidates_ms" in v]
    assert len(moved) == 8 and measured  # 4 heavy tasks at each of 13 and 7
    assert all(v["refit"] in v["candidates_ms"] for v in measured)
    # the fastest of those that compute the right thing (`verify` rejects a wrong predicated tail)
    assert all(v["candidates_ms"][v["refit"]] == min(t for k, t in v["candidates_ms"].items() if k not in v["rejected"])
               for v in measured)
    assert all(v["candidates_ms"][k] <= v["candidates_ms"][v["refit"]] for v in measured for k in v["rejected"])
    assert any(len(v["candidates_ms"]) >= 2 for v in measured)
    (xfer_bar,) = bars.by_prefix("transfer")
    assert xfer_bar.n == xfer_bar.total >= sum(len(v["candidates_ms"]) for v in measured) and xfer_bar.closed

    db = tuning.TuningDB(eng.tuning_dir)
    for n in (13, 7):
        mod = eng._prepared(graphs[n])
        heavy = {t.task_name for t in eng._tasks(mod)}
        applied = tvmlib.apply_database(mod, eng.target, db.db)
        # every tuned task of the build carries a schedule: a build that drops them is caught here
        assert heavy and heavy <= tvmlib.scheduled_functions(applied), heavy - tvmlib.scheduled_functions(applied)
        # and the compiled module computes what onnxruntime computes
        x = graphs[n].example_input()
        vm = relax.VirtualMachine(tvm.runtime.load_module(libs[graphs[n].digest]), tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        want = ort.InferenceSession(str(graphs[n].path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(got - want).max() < 1e-4

    # a rerun tunes and transfers nothing
    again = _Bars()
    eng.prepare([graphs[13], graphs[7]], again, anchors=[graphs[16]])
    assert not again.by_prefix("tune") and not again.by_prefix("transfer")
    # nor with its libraries cleaned: they are compiled again, from the database, to the same files
    from latprof.measure.workdir import clean

    held = sorted(eng.lib_dir.iterdir())
    (part,) = clean(eng.workdir, ("libs",))
    assert part.files == len(held) >= 2 and not eng.lib_dir.exists()
    again = _Bars()
    assert eng.prepare([graphs[13], graphs[7]], again, anchors=[graphs[16]]) == libs
    assert not again.by_prefix("tune") and not again.by_prefix("transfer")
    assert all(Path(p).exists() for p in libs.values())


@pytest.mark.slow
def test_transfer_candidates_are_correct(tuned):
    """Re-fit candidates (predicated tails included) are checked against the untuned task: `verify`
    keeps only those that compute the same thing (a predicated softmax tail can be wrong: it depends on
    the tuned schedule; it may also refuse a right-looking one, which reads past a buffer), and every
    task keeps at least one."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    eng, graphs, _, _ = tuned
    db = tuning.TuningDB(eng.tuning_dir).db
    tasks = {n: {t.task_name: t for t in eng._tasks(eng._prepared(graphs[n]))} for n in (16, 13)}
    sources = {}
    for name, task in tasks[16].items():
        rec = db.query_tuning_record(task.dispatched[0], eng.target, "main")
        assert rec is not None, name
        sources.setdefault(tuning.signature(task), {})[name] = (rec.trace, rec.workload.mod)
    rng = np.random.default_rng(0)
    labels = set()
    for name, task in tasks[13].items():
        cands = tuning.candidates(sources[tuning.signature(task)], task.dispatched[0], eng.target)
        assert cands, name
        infos = ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])
        args = [rng.standard_normal([int(s) for s in a.shape]).astype(str(a.dtype)) for a in infos]
        want = [tvm.runtime.tensor(a) for a in args]
        tvm.compile(task.dispatched[0], target=eng.target)["main"](*want)
        right, kept = set(), set()
        for label, sch in cands.items():
            got = [tvm.runtime.tensor(a) for a in args]
            tvm.compile(sch.mod, target=eng.target)["main"](*got)
            w = want[-1].numpy()  # verify's tolerance: absolute error relative to the output's magnitude
            if np.allclose(got[-1].numpy(), w, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(w).max()))):
                right.add(label)
            if tuning.verify(task.dispatched[0], sch):
                kept.add(label)
            labels.add(label.split(":")[-1])
        assert kept and kept <= right, (name, kept - right)
    assert {"predicated", "divisors"} <= labels



@pytest.mark.slow
def test_a_transfer_stopped_midway_keeps_what_it_timed(tuned, tmp_path, monkeypatch):
    """Each task is settled and saved once its candidates are timed: a transfer stopped halfway keeps
    the tasks it finished, and the rerun times only the rest."""
    from latprof.compile import tvmlib

    eng, _, _, _ = tuned
    graphs = _tiny_graphs(tmp_path, [16, 10])
    real = tvmlib.benchmark_chunks

    def stopped(schedules, target, chunk=32, **kw):  # one candidate a chunk; killed halfway
        for i, out in enumerate(real(schedules, target, chunk=1, **kw)):
            if i == len(schedules) // 2:
                raise KeyboardInterrupt
            yield out

    def budget():
        return json.loads((eng.tuning_dir / "budget.json").read_text())

    before = set(budget())
    first = _Bars()
    with monkeypatch.context() as m:
        m.setattr(tvmlib, "benchmark_chunks", stopped)
        with pytest.raises(KeyboardInterrupt):
            eng.prepare([graphs[10]], first, anchors=[graphs[16]])
    kept = {k: v for k, v in budget().items() if k not in before}
    timed = [v for v in kept.values() if "candidates_ms" in v]
    (bar,) = first.by_prefix("transfer")
    assert timed and all(v["transferred_from"] == 16 for v in kept.values())
    assert sum(len(v["candidates_ms"]) for v in timed) <= bar.total // 2  # the first half's tasks, no more
    again = _Bars()
    eng.prepare([graphs[10]], again, anchors=[graphs[16]])
    (rest,) = again.by_prefix("transfer")
    assert rest.total == bar.total - sum(len(v["candidates_ms"]) for v in timed)
    assert len([k for k in budget() if k not in before]) == 4  # the 4 heavy tasks at N=10, all settled


@pytest.mark.slow
def test_a_retune_stopped_before_its_search_ends_is_done_by_the_next_run(tuned, tmp_path, monkeypatch):
    """A transferred task found to need a retune (here: the plain attention-times-V matmul, by decree;
    the softmax once had a lone candidate at 11, which is never timed and so never retuned) owes it in
    budget.json until the retune's search ends. A run stopped inside that search leaves the task settled
    but owed; the next run retunes it, and the one after has nothing left to do."""
    eng, _, _, _ = tuned
    graphs = _tiny_graphs(tmp_path, [16, 11])
    monkeypatch.setattr(tuning, "needs_retune", lambda task, *a: task.task_name == "matmul2")
    real = eng._search

    def stopped(tasks, trials, what, *a, **kw):
        if what == "retune":
            raise KeyboardInterrupt
        return real(tasks, trials, what, *a, **kw)

    def budget():
        return json.loads((eng.tuning_dir / "budget.json").read_text())

    with monkeypatch.context() as m:
        m.setattr(eng, "_search", stopped)
        with pytest.raises(KeyboardInterrupt):
            eng.prepare([graphs[11]], _Bars(), anchors=[graphs[16]])
    owed = {k for k, v in budget().items() if v.get("transferred_from") == 16 and v.get("retune_due")}
    assert owed and all("retuned" not in budget()[k] for k in owed)  # settled, the retune still owed

    again = _Bars()
    eng.prepare([graphs[11]], again, anchors=[graphs[16]])
    assert not again.by_prefix("transfer")  # the transfer was kept ...
    (bar,) = again.by_prefix("retune")  # ... and the retune done
    assert bar.desc.startswith(f"retune {len(owed)} tasks") and bar.n == bar.total > 0 and bar.closed
    assert all(budget()[k]["retuned"] == tuning.RETUNE_TRIALS and not budget()[k]["retune_due"] for k in owed)

    third = _Bars()
    eng.prepare([graphs[11]], third, anchors=[graphs[16]])
    assert not third.by_prefix("retune") and not third.by_prefix("transfer")


def _matmul_mod(off_by_one: bool = False):
    import tvm
    from tvm import te

    a, b = te.placeholder((64, 64), name="a"), te.placeholder((64, 64), name="b")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((64, 64), lambda i, j: te.sum(a[i, k] * b[k, j] + (1.0 if off_by_one else 0.0), axis=k), name="c")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def _matmul_schedules():
    """A naive 64x64 matmul and the same with its inner loop vectorized (tens of times faster)."""
    from tvm.s_tir import Schedule

    mod = _matmul_mod()
    naive, fast = Schedule(mod), Schedule(mod)
    i, j, kk = fast.get_loops(fast.get_sblock("c"))
    fast.reorder(i, kk, j)
    fast.vectorize(fast.split(j, [None, 8])[1])
    return naive, fast


def test_session_runner_times_candidates_on_the_device(monkeypatch, tmp_path):
    """Tuning candidates timed through a device session (the path remote devices take), here the local
    device's real RPC server: each candidate is its own module (they once all ran the first one)."""
    from latprof.compile import tvmlib
    from latprof.devices import load_config, open_session

    cfg = load_config("local")
    target = tvmlib.make_target(tvmlib.target_dict(cfg.target, 1))
    naive, fast = _matmul_schedules()
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the builder's worker processes make their temp dirs here
    with open_session(cfg) as session:
        t_naive, t_fast = tvmlib.benchmark([naive, fast], target, runner=tvmlib.session_runner(session.rpc))
    assert t_naive > 0 and t_fast > 0
    assert not list(tmp_path.glob("*/candidate.so")), "built candidates were left behind in the temp dir"
    assert t_fast < t_naive / 4, (t_naive, t_fast)


def test_candidates_build_without_importing_every_tensor_intrinsic():
    """MetaSchedule's default build imports tvm.s_tir.tensor_intrin (every intrinsic TVM has: 25-50 s
    here) in each builder worker; ours does not, and what it builds runs."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, tvm\n"
        "from tvm import te\n"
        "from latprof.compile import tvmlib\n"
        "a = te.placeholder((8,), name='a'); b = te.compute((8,), lambda i: a[i] * 2.0, name='b')\n"
        "lib = tvmlib.build_candidate(tvm.IRModule({'main': te.create_prim_func([a, b])}), tvm.target.Target('llvm'))\n"
        "x = tvm.runtime.tensor(np.arange(8, dtype='float32')); y = tvm.runtime.tensor(np.zeros(8, 'float32'))\n"
        "lib['main'](x, y)\n"
        "print(float(y.numpy().sum()), 'tvm.s_tir.tensor_intrin' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["56.0", "False"], out.stdout


def test_the_candidate_builder_keeps_its_workers_between_calls():
    """MetaSchedule's LocalBuilder starts new worker processes at every call, each importing TVM (2.7 s
    here, once per tuning round); ours keeps them until close(), and what they build runs."""
    import psutil
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from latprof.compile import tvmlib

    def workers():
        return {p.pid for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE and "popen_worker" in " ".join(p.cmdline())}

    target = tvm.target.Target("llvm")
    naive, fast = _matmul_schedules()
    builder = tvmlib.candidate_builder()
    try:
        first = builder.build([ms.builder.BuilderInput(naive.mod, target)])
        serving = workers()
        second = builder.build([ms.builder.BuilderInput(fast.mod, target)])
        assert serving and workers() == serving
    finally:
        builder.close()
    assert not workers() & serving, "close() left the builder's workers running"
    a, b = np.random.rand(64, 64).astype("float32"), np.random.rand(64, 64).astype("float32")
    for res in first + second:
        assert res.error_msg is None, res.error_msg
        c = tvm.runtime.tensor(np.zeros((64, 64), "float32"))
        tvm.runtime.load_module(res.artifact_path)["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
        np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-4)
        ms.utils.remove_build_dir(res.artifact_path)


def test_a_task_whose_search_space_is_used_up_is_ended():
    """The search strategy ends a task (None) when the evolutionary search has no unmeasured candidate
    left ([]), instead of MetaSchedule picking it again; candidates and None pass through."""
    from latprof.compile import tvmlib

    class Inner:
        def __init__(self, out):
            self.out = out

        def generate_measure_candidates(self):
            return self.out

    told = []

    def ending(out):
        cls = type(tvmlib._ending_search(lambda name, n: told.append((name, n)))._inst)  # the Python class
        strategy = cls(Inner(out))
        strategy.task_name = "fused_matmul"
        return strategy

    assert ending([]).generate_measure_candidates() is None
    assert ending(None).generate_measure_candidates() is None
    assert ending(["a", "b"]).generate_measure_candidates() == ["a", "b"]
    # progress is told as candidates are generated: MetaSchedule's measure callbacks wait until every
    # task has had its first round, and a bar fed by them sat at 0 for most of a tuning run
    assert told == [("fused_matmul", 2)]


def test_the_bonus_budget_goes_to_the_tasks_that_cost_most_in_the_model(tmp_path):
    """Two matmul tasks of the same size, one counted 12 times (as a DeiT block's) and one once (as the
    patch embedding's): after a round each, the extra round goes to the one that runs 12 times."""
    import torch

    from latprof.compile import tvmlib
    from latprof.export import export_unit

    torch.manual_seed(0)
    two = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 64)).eval()
    g = export_unit(two, (1, 64, 64), tmp_path / "graphs", "tiny", "two", 64)
    target = tvmlib.make_target(tvmlib.target_dict({"kind": "llvm"}, 1))
    tasks = [t for t in tvmlib.extract_tasks(tvmlib.prepare(tvmlib.import_onnx(g.path), target), target)
             if "matmul" in t.task_name]
    assert len(tasks) == 2
    told = {}
    tvmlib.tune_tasks(tasks, target, tmp_path / "db", 2, counts=[1, 12],
                      on_trials=lambda name, n: told.__setitem__(name, told.get(name, 0) + n))
    light, heavy = (tasks[0].task_name, tasks[1].task_name)
    assert tvmlib.search_budget(2, 2) == 4 + 2
    assert told == {light: 2, heavy: 4}, told
    # without the bonus (validate's whole models, the softmax retune) each task gets its trials, no more
    told.clear()
    tvmlib.tune_tasks(tasks, target, tmp_path / "db2", 2, counts=[1, 12], bonus=False,
                      on_trials=lambda name, n: told.__setitem__(name, told.get(name, 0) + n))
    assert told == {light: 2, heavy: 2} and tvmlib.search_budget(2, 2, bonus=False) == 4, told


def test_verify_rejects_a_schedule_that_computes_something_else():
    """Transferred schedules are checked on this CPU against the unscheduled task before they are kept."""
    from tvm.s_tir import Schedule

    naive, fast = _matmul_schedules()
    task = _matmul_mod()
    cache = {}
    assert tuning.verify(task, fast, cache) and tuning.verify(task, naive, cache)
    assert not tuning.verify(task, Schedule(_matmul_mod(off_by_one=True)), cache)


def _doubling(n: int | None = None):
    """The task b = 2a over 64 elements (n None), or a schedule of it whose loop runs n times: 63 leaves
    b's last element unwritten, 65 writes one past b (reading a's last element again)."""
    from types import SimpleNamespace

    import tvm
    from tvm import te
    from tvm.script import tirx as T

    if n is None:
        a = te.placeholder((64,), name="a")
        return tvm.IRModule({"main": te.create_prim_func([a, te.compute((64,), lambda i: a[i] * 2.0, name="b")])})

    @T.prim_func
    def main(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
        for i in range(n):
            b[i] = a[T.min(i, 63)] * T.float32(2)

    return SimpleNamespace(mod=tvm.IRModule({"main": main}))


def test_verify_rejects_a_schedule_that_leaves_outputs_unwritten():
    """A candidate that skips the last element (as a re-fitted predicated softmax once skipped a row)
    is refused, even though both runs are handed the same buffers; the whole loop passes."""
    task, cache = _doubling(), {}
    assert tuning.verify(task, _doubling(64), cache)
    assert not tuning.verify(task, _doubling(63), cache)


def test_verify_rejects_a_schedule_that_writes_past_a_buffer():
    """A loop one step too long writes one element past b: every value inside is right, only the guard
    shows it."""
    task = _doubling()
    assert tuning.verify(task, _doubling(64))
    assert not tuning.verify(task, _doubling(65))


def test_verify_rejects_a_schedule_that_reads_past_a_buffer():
    """A row-max that is exact on rows 0-2 and runs one element too far on the last row reads a[3, 10],
    just past the end of the input: what lies in memory there decides the result, so without guards it
    passes whenever that happens to be small. With guarded buffers it fails every time; the exact
    schedule still passes (its reads stay inside, and it writes nothing outside b)."""
    from types import SimpleNamespace

    import tvm
    from tvm import te
    from tvm.script import tirx as T

    a = te.placeholder((4, 10), name="a")
    k = te.reduce_axis((0, 10), name="k")
    task = tvm.IRModule({"main": te.create_prim_func([a, te.compute((4,), lambda i: te.max(a[i, k], axis=k))])})

    def row_max(last_row: int):
        @T.prim_func
        def main(a: T.Buffer((4, 10), "float32"), b: T.Buffer((4,), "float32")):
            for i in range(4):
                b[i] = T.float32(-3.4e38)
                for j in range(T.if_then_else(i == 3, last_row, 10)):
                    b[i] = T.max(b[i], a[i, j])

        return SimpleNamespace(mod=tvm.IRModule({"main": main}))

    cache = {}
    assert tuning.verify(task, row_max(10), cache)
    assert not tuning.verify(task, row_max(11), cache)


def _token_matmul(n: int, name: str = "matmul"):
    """An attention-times-V-like task: the token count is a spatial axis and the reduction axis."""
    import tvm
    from tvm import te

    a, b = te.placeholder((1, n, n), name="a"), te.placeholder((1, n, 16), name="b")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((1, n, 16), lambda z, i, j: te.sum(a[z, i, k] * b[z, k, j], axis=k), name=name)
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def _tiled_trace(mod, block: str = "matmul"):
    """A MetaSchedule-like trace at the anchor (N=16): perfect tiles sampled per loop, then reordered."""
    from tvm.s_tir import Schedule

    sch = Schedule(mod)
    b = sch.get_sblock(block)
    z, i, j, k = sch.get_loops(b)
    ti = sch.split(i, sch.sample_perfect_tile(i, n=4, decision=[1, 2, 2, 4]))
    tj = sch.split(j, sch.sample_perfect_tile(j, n=4, decision=[1, 1, 2, 8]))
    tk = sch.split(k, sch.sample_perfect_tile(k, n=2, decision=[4, 4]))
    sch.reorder(ti[0], tj[0], ti[1], tj[1], tk[0], ti[2], tj[2], tk[1], ti[3], tj[3])
    sch.annotate(sch.get_sblock("root"), "meta_schedule.vectorize", 16)
    return sch.trace


def test_padding_to_the_anchor_tile_keeps_its_inner_tiles():
    """"padtile": each token axis padded to a multiple of its anchor tile's inner product (rows 2x2x4 =
    16: 20 -> 32; the reduction's inner 4 divides 20: not padded), so the replay changes only outer loops."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    src, dst = _token_matmul(16), _token_matmul(20)
    trace = _tiled_trace(src)
    assert tuning._anchor_tile_pads(trace, src, dst) == [1, 16, 1, 1]
    assert tuning._anchor_tile_pads(trace, src, _token_matmul(32)) is None  # the tiles fit: nothing to pad
    sch = tuning.candidates({"matmul": (trace, src)}, dst, target)["padtile:divisors"]
    assert tuning.verify(dst, sch)
    text = str(sch.trace)  # changed tile samples are replayed as constant split factors
    assert "factors=[2, 2, 2, 4]" in text and "factors=[5, 4]" in text, text  # rows: only the outer factor grew


def test_retune_a_softmax_no_re_fit_brings_close_to_its_anchor():
    import tvm
    from tvm import te, topi

    x = te.placeholder((1, 3, 197, 197), name="x")
    softmax = type("Task", (), {"dispatched": [tvm.IRModule({"main": te.create_prim_func([x, topi.nn.softmax(x)])})]})()
    matmul = type("Task", (), {"dispatched": [_token_matmul(20)]})()
    # anchor 0.088 ms at 192; at 197 the best re-fit ran 0.41 ms: retuned
    assert tuning.needs_retune(softmax, 0.41e-3, 0.088e-3, 192, 197)
    assert not tuning.needs_retune(softmax, 0.095e-3, 0.088e-3, 192, 197)
    assert tuning.needs_retune(softmax, None, 0.088e-3, 192, 197)  # no verified re-fit at all
    assert not tuning.needs_retune(softmax, 40e-6, 4e-6, 192, 17)  # 100x, but 40 us: not worth a search
    assert not tuning.needs_retune(matmul, 0.41e-3, 0.088e-3, 192, 197)  # matmuls are padded instead


def test_padded_transfer_fits_the_anchor_tiles_and_stays_exact(tmp_path):
    """At a token count the anchor's tiles do not divide (20 here, 197 in DeiT), the matmul is padded
    with zeros to a multiple of 8 or 16, so the tiles fit; the result (a reduction over tokens included)
    is what the unscheduled task computes, and the stored trace pads again when the database replays it."""
    import tvm

    from latprof.compile import tvmlib

    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    src, dst = _token_matmul(16), _token_matmul(20)
    cands = tuning.candidates({"matmul": (_tiled_trace(src), src)}, dst, target)
    assert {"pad8:divisors", "pad16:divisors", "divisors"} <= set(cands)
    assert not any(k.startswith("pad") for k in tuning.candidates({"matmul": (_tiled_trace(src), src)}, dst))
    for label, padded in (("pad8:divisors", 24), ("pad16:divisors", 32)):
        sch = cands[label]
        assert tuning.verify(dst, sch), label
        block = sch.get(sch.get_sblock("matmul_update"))  # the postprocessors split off its init
        assert [int(iv.dom.extent) for iv in block.iter_vars] == [1, padded, 16, padded]  # tokens and reduction
        assert "pad_einsum" in str(sch.trace)
    db = tvmlib.database(tmp_path)
    task = type("Task", (), {"dispatched": [dst]})()
    tuning.commit(db, task, cands["pad16:divisors"], [1e-3], target)
    tvm.ir.assert_structural_equal(db.query_schedule(dst, target, "main").mod, cands["pad16:divisors"].mod)
    # a re-done transfer replaces the stored one even when that one was timed faster in another run
    tuning.commit(db, task, cands["divisors"], [5e-3], target)
    tvm.ir.assert_structural_equal(db.query_schedule(dst, target, "main").mod, cands["divisors"].mod)


def test_only_matmul_blocks_are_padded():
    """Zeros appended to a max reduction would change it: a task without a matmul block gets no pads."""
    from tvm import te
    import tvm

    def max_task(n):
        a = te.placeholder((1, n, n), name="a")
        k = te.reduce_axis((0, n), name="k")
        c = te.compute((1, n), lambda z, i: te.max(a[z, i, k], axis=k), name="red")
        return tvm.IRModule({"main": te.create_prim_func([a, c])})

    assert tuning._token_pads(max_task(16), max_task(13), 8) is None
    assert tuning._token_pads(_token_matmul(16), _token_matmul(13), 8) == [1, 8, 1, 8]
    assert tuning._token_pads(_token_matmul(16), _token_matmul(24), 8) is None  # already a multiple


def test_transfers_made_before_padding_are_done_again(tmp_path):
    db = tuning.TuningDB(tmp_path)
    db.record("old", trials=16, transferred_from=192, refit="divisors")
    db.record("new", trials=16, transferred_from=192, refit="pad8:divisors", transfer=tuning.TRANSFER_VERSION)
    db.record("tuned", trials=16)
    assert not db.transferred("old", 16)
    assert db.transferred("new", 16) and db.transferred("tuned", 16)
    assert not db.transferred("new", 64)  # a larger budget is a new transfer too


@pytest.mark.parametrize("name,heavy", [
    ("fused_matmul4_add3_divide_fast_erf_add4_multiply1_multiply2", True), ("matmul1", True),
    ("fused_einsum3_add6", True), ("fast_softmax", True), ("log_softmax", True), ("layer_norm1", True),
    ("fused_conv2d_add", True), ("sum8", True), ("fused_fast_exp1_cast1_cast1_multiply24", True),
    ("fused_expand_dims1_broadcast_to2_less1_add16_where2", False),  # "exp" inside "expand"
    ("fused_maximum1_tir_log_strided_slice2", False),  # elementwise maximum, not a max reduction
    ("fused_reshape_transpose_split", False), ("fused_squeeze_multiply", False),
])
def test_heavy_tasks_are_named_by_whole_operator_words(name, heavy):
    assert tuning.is_heavy(name) is heavy


def test_tuning_of_the_same_target_under_another_device_name_is_pointed_out(tmp_path):
    """A tuning database is per device name; a second config for the same machine starts from nothing,
    and is told where the first one's tuning is."""
    from latprof.devices import load_config
    from latprof.measure.engines import TVMEngine

    work = tmp_path / "work"
    a = TVMEngine(load_config(str(write_config(tmp_path / "a.yaml", name="bench-a"))), work, trials=2)
    b = TVMEngine(load_config(str(write_config(tmp_path / "b.yaml", name="b"))), work, trials=2)
    other = TVMEngine(load_config(str(write_config(tmp_path / "c.yaml", name="c", threads=2))), work, trials=2)
    assert a.other_tunings() == [] and a.tuning_dir.name.startswith("bench-a-")
    a.tuning_dir.mkdir(parents=True)
    assert b.other_tunings() == []  # a folder without a budget holds no tuning
    (a.tuning_dir / "budget.json").write_text("{}")
    assert b.other_tunings() == ["bench-a"] and a.other_tunings() == []
    assert other.other_tunings() == []  # another target (threads are part of it): not the same tuning


def test_cold_tuning_is_labelled_and_kept_apart(tmp_path):
    """Records timed cold and hot go to databases of their own (the fastest record of a task wins, so
    mixed they would not compare like with like), and a table says which it was measured with."""
    from latprof.devices import load_config
    from latprof.measure.engines import TVMEngine

    hot = TVMEngine(load_config(str(write_config(tmp_path / "h.yaml", name="dev"))), tmp_path, trials=2)
    cold = TVMEngine(load_config(str(write_config(tmp_path / "c.yaml", name="dev", tuning={"cache": "cold"}))),
                     tmp_path, trials=2)
    assert cold.tuning_dir != hot.tuning_dir and cold.tuning_dir.name.endswith("-cold")
    hot.anchors = cold.anchors = [32]
    assert cold.tuning_label() == hot.tuning_label() + "/cold"
    assert _table_trials(cold.tuning_label()) == 2


def test_cold_timing_runs_here_and_through_a_device_session(monkeypatch, tmp_path):
    """Candidates timed after a cache flush, by MetaSchedule's local runner and through the local
    device's real RPC server (the flush is a function of the TVM runtime on the device); a cold engine
    on this machine hands tuning and transfer the cold local runner."""
    from latprof.compile import tvmlib
    from latprof.devices import load_config, open_session
    from latprof.measure.engines import TVMEngine

    cfg = load_config("local")
    target = tvmlib.make_target(tvmlib.target_dict(cfg.target, 1))
    naive, fast = _matmul_schedules()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    errors: list = []
    local = tvmlib.benchmark([naive, fast], target, runner=tvmlib.local_runner(cold=True), errors=errors)
    with open_session(cfg) as session:
        remote = tvmlib.benchmark([naive, fast], target, runner=tvmlib.session_runner(session.rpc, cold=True),
                                  errors=errors)
    assert errors == [None] * 4 and all(t is not None and t > 0 for t in local + remote), (errors, local, remote)
    assert tvmlib._evaluator(True).enable_cpu_cache_flush and not tvmlib._evaluator().enable_cpu_cache_flush
    cold_engine = TVMEngine(load_config(str(write_config(tmp_path / "c.yaml", tuning={"cache": "cold"}))), tmp_path)
    assert cold_engine._runner(None).evaluator_config.enable_cpu_cache_flush and TVMEngine(cfg, tmp_path)._runner(None) is None


def test_a_record_tvm_cannot_read_back_is_set_aside_not_the_whole_database(tmp_path, capsys):
    """MetaSchedule refuses a whole records file over one record it cannot replay (seen: 28 records of
    a [1, 127] reduction, in a database holding hours of tuning). The others load; the bad one is kept
    aside, and said so."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from latprof.compile import tvmlib

    target = tvm.target.Target("llvm")
    mod = _matmul_mod()
    _, fast = _matmul_schedules()
    db = tvmlib.database(tmp_path)
    db.commit_tuning_record(ms.database.TuningRecord(fast.trace, db.commit_workload(mod), [1e-5], target))
    records = tmp_path / "records.json"
    good = records.read_text().strip()
    damaged = good.replace('"c"', '"no_such_block"')  # its trace names a block the workload lacks
    assert damaged != good
    records.write_text(good + "\n" + damaged + "\n")
    with pytest.raises(Exception):  # what TVM itself does with the file
        ms.database.JSONDatabase(str(tmp_path / "workloads.json"), str(records), module_equality="structural")

    db = tvmlib.database(tmp_path)
    assert len(db) == 1 and db.query_tuning_record(mod, target, "main") is not None
    assert records.read_text().strip() == good
    assert (tmp_path / "records.rejected.json").read_text().strip() == damaged
    assert "1 tuning record(s)" in capsys.readouterr().out
    assert len(tvmlib.database(tmp_path)) == 1 and "warning" not in capsys.readouterr().out  # nothing more to do
    # the task is known as one whose records TVM cannot read back, so it is not searched again each run
    assert tuning.TuningDB(tmp_path).rejected() == {tuning.module_key(mod)}


def test_a_library_loaded_twice_in_one_session_is_uploaded_once(tmp_path):
    """Two consumers of one compiled library in one session (benchmarks/tunings.py given one workdir
    for both sides): writing it again over the copy the server has loaded killed the server."""
    import numpy as np
    import tvm
    from tvm.script import relax as R

    from latprof.compile import tvmlib
    from latprof.devices import load_config, open_session

    @tvm.script.ir_module
    class Double:
        @R.function
        def main(x: R.Tensor((4, 4), "float32")):
            with R.dataflow():
                y = R.add(x, x)
                R.output(y)
            return y

    cfg = load_config("local")
    target = tvmlib.make_target(tvmlib.target_dict(cfg.target, 1))
    lib = tvmlib.export_library(tvmlib.build(Double, target, None), tmp_path / "double.so", None)
    x = np.arange(16, dtype="float32").reshape(4, 4)
    with open_session(cfg) as session:
        first = tvmlib.load_remote(session.rpc, lib)
        second = tvmlib.load_remote(session.rpc, lib)
        for vm, dev in (first, second, first):
            np.testing.assert_array_equal(tvmlib.run_vm(vm, dev, [x]), 2 * x)


def test_prepare_holds_back_topis_take_warning_and_nothing_else(capfd):
    """TOPI logs one warning per `take` legalized; a tuned run printed a thousand of them."""
    import os
    import tvm
    from tvm import relax
    from latprof.compile import tvmlib

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        out = bb.emit(relax.op.take(x, relax.const(np.array([0, 2], "int64")), axis=0))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm"})

    capfd.readouterr()
    mod = tvmlib.prepare(bb.get(), target)
    err = capfd.readouterr().err
    assert "Fast mode segfaults" not in err
    assert "take" in [gv.name_hint for gv in mod.functions]  # legalized, so TOPI did log it

    # anything else native code writes to fd 2 meanwhile still comes through, in order
    with tvmlib._native_stderr_without(b"noise"):
        os.write(2, b"first\nnoise here\nsecond\n")
    assert capfd.readouterr().err == "first\nsecond\n"
