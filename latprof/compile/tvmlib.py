"""The one module that imports Apache TVM (0.27, Relax era). TVM's API moves fast: everything latprof
needs from it goes through the functions here."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import tempfile
import weakref
from pathlib import Path

from latprof.errors import CompileError, DeviceError, require

TVM_PIN = "0.27.0.post1"

# Logged by TOPI's C++ for every `take` in its default "fast" mode, once per graph legalized (a
# thousand lines per tuned fidelity run, burying the progress bars). Our graphs' gathers read constant
# indices that torch's export already bounds-checked, so the warning never applies here.
_TAKE_NOISE = b"Fast mode segfaults when there are out-of-bounds indices"


@functools.lru_cache(maxsize=None)
def tvm():
    return require("tvm", "tvm")


def version() -> str:
    return tvm().__version__


def host_cpu() -> str:
    return str(tvm().target.codegen.llvm_get_system_cpu())


def target_dict(spec: dict, threads: int) -> dict:
    """The config's target with `mcpu: native` resolved, and num-cores set to the threads used: the
    dict form, since this TVM refuses `-mcpu=native` strings."""
    out = dict(spec)
    if out.get("mcpu") == "native":
        out["mcpu"] = host_cpu()
    if out.get("kind") == "llvm":
        out.setdefault("num-cores", threads)
    return out


def make_target(spec: dict):
    try:
        return tvm().target.Target(spec)
    except Exception as exc:  # TVM raises its own error types for bad targets
        raise CompileError(f"TVM refuses target {spec}: {str(exc).splitlines()[-1]}",
                           "fix the device config's `target` (dict form, e.g. {kind: llvm, mtriple: aarch64-linux-gnu})") from None


def import_onnx(path: str | Path):
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(onnx.load(str(path)), keep_params_in_input=False)


def prepare(mod, target, fast_math: bool = True):
    """Legalize and fuse, as MetaSchedule's task extraction and the final build both expect.

    fast_math swaps erf/exp/softmax for TVM's fast approximations (GELU through erf alone cost 1.3 ms
    per DeiT-T block here; with fast_erf 13 us). Outputs are still checked against torch."""
    from tvm import relax

    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings()]
    if fast_math:
        passes.append(relax.transform.FastMathTransform())
    passes.append(relax.pipeline.zero_pipeline())
    with target, _native_stderr_without(_TAKE_NOISE):
        return tvm().transform.Sequential(passes)(mod)


@contextlib.contextmanager
def _native_stderr_without(noise: bytes):
    """Hold back the lines containing `noise` that native code writes to fd 2 meanwhile; the rest is
    passed on, in order, when the block ends. TVM's C++ logging writes to fd 2 directly, past Python."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(ln for ln in held.read().splitlines(keepends=True) if noise not in ln)
            if kept:
                sys.stderr.write(kept.decode(errors="replace"))
                sys.stderr.flush()


def extract_tasks(mod, target):
    from tvm.s_tir import meta_schedule as ms

    return ms.relax_integration.extract_tasks(mod, target)


def database(work_dir: str | Path):
    """The persistent tuning database of one device+target (MetaSchedule JSON files). A record that
    cannot be read back makes MetaSchedule refuse the whole file, hours of tuning with it; such records
    are set aside (see `set_aside_bad_records`) and the rest is loaded."""
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)

    def load():
        return ms.database.JSONDatabase(str(work_dir / "workloads.json"), str(work_dir / "records.json"),
                                        module_equality="structural")

    try:
        return load()
    except Exception:  # TVM says only "parallel_for_dynamic error": find the records it could not read
        bad = set_aside_bad_records(work_dir)
        if not bad:
            raise
        print(f"warning: {bad} tuning record(s) in {work_dir / 'records.json'} could not be read back by TVM; "
              f"they were moved to {work_dir / 'records.rejected.json'}, and their tasks keep their other records "
              f"or TVM's default schedule", flush=True)
        return load()


def read_workloads(work_dir: Path, indices: set[int]) -> dict:
    """The database's workloads at these line indices (the workloads file can be hundreds of MB)."""
    import json

    from tvm.s_tir import meta_schedule as ms

    out = {}
    with open(Path(work_dir) / "workloads.json") as fh:
        for i, line in enumerate(fh):
            if i in indices:
                out[i] = ms.database.Workload.from_json(json.loads(line))
    return out


def set_aside_bad_records(work_dir: Path) -> int:
    """Move the records TVM cannot parse or replay on their workload from records.json (rewritten
    atomically) to records.rejected.json; returns how many. Seen here: MetaSchedule's own search wrote
    records for a [1, 127] -> [1] reduction whose RFactor trace it could not replay on reload."""
    import json

    from tvm.s_tir import meta_schedule as ms

    from latprof.lut.table import atomic_write_text
    from latprof.measure.samples import append_line

    records = [line for line in (work_dir / "records.json").read_text().splitlines() if line.strip()]
    workloads = read_workloads(work_dir, {json.loads(line)[0] for line in records})
    good, bad = [], []
    for line in records:
        try:
            index, record = json.loads(line)
            ms.database.TuningRecord.from_json(record, workloads[index])
            good.append(line)
        except Exception:
            bad.append(line)
    if bad:
        append_line(work_dir / "records.rejected.json", "\n".join(bad))  # one write: a kill keeps all or none
        atomic_write_text(work_dir / "records.json", "\n".join(good) + "\n" if good else "")
    return len(bad)


_console_level: int | None = None  # MetaSchedule's console log level (see tune_tasks)


# How the budget of several tasks is spent: every task gets one round of trials_per_task candidates, then
# BONUS x that budget more goes, round by round, to the tasks whose best time (weighted by how often they
# run in the model) is largest and still falling (MetaSchedule's gradient scheduler), up to SHARE x
# trials_per_task per task. With an even split of 16 trials each, DeiT-T's block was at the mercy of one
# draw: fc1 at N=192 ran 0.58 ms in one cold run and 0.28-0.36 ms in three others. A round costs about
# 10 s here whatever its size (evolutionary search, builder start-up), so rounds stay whole: halving
# them to spread the same budget further made the tuning 9 minutes instead of 4.8.
BONUS, SHARE = 0.25, 4


def _round_size(trials_per_task: int) -> int:
    return min(64, max(trials_per_task, 1))


def search_budget(n_tasks: int, trials_per_task: int, bonus: bool = True) -> int:
    """Candidates measured when tuning n_tasks tasks together (the most: a task's search may end early)."""
    bonus_rounds = math.ceil(BONUS * (n_tasks - 1)) if bonus else 0
    return trials_per_task * n_tasks + _round_size(trials_per_task) * bonus_rounds


def tune_tasks(tasks, target, work_dir: str | Path, trials_per_task: int, runner=None, seed: int = 0,
               on_trials=None, cross_compiler: str | None = None, counts: list[int] | None = None,
               bonus: bool = True):
    """Tune extracted tasks together into the persistent database at work_dir: one builder/runner pool
    and one cost model for all of them (per-task calls spent minutes each on pool start-up here).
    Each task gets `trials_per_task` candidates, and the slowest ones more (BONUS, SHARE); `counts` says
    how many times each task's graph runs in the model (twelve for a DeiT block), which weighs its time.
    `bonus=False` gives every task its trials_per_task and no more.
    `on_trials(task_name, n)` is called as a task's candidates go to be built and measured (progress)."""
    from tvm.s_tir import meta_schedule as ms

    import logging

    # MetaSchedule logs every candidate to the console at its logger's level; keep the console to
    # warnings (the progress bar says how far it is) and the full logs in work_dir/logs. Its logging
    # setup raises that level to DEBUG, so the level chosen at the first call is restored at every call
    # (a second tuning in one process, the retune after a transfer, printed every candidate).
    global _console_level
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if _console_level is None:
        _console_level = ms_logger.level if ms_logger.level != logging.NOTSET else logging.WARNING
    ms_logger.setLevel(_console_level)
    db = database(work_dir)
    counts = counts or [1] * len(tasks)
    todo = [(t, c) for t, c in zip(tasks, counts) if not t.mod.attrs.get("tirx.is_scheduled", False)]
    if not todo:
        return db
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        [t for t, _ in todo], str(Path(work_dir) / "logs"), strategy=_ending_search(on_trials), seed=seed)
    weights = [float(w) * c for w, (_, c) in zip(weights, todo)]
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    builder = candidate_builder(cross_compiler)
    try:
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(Path(work_dir) / "logs"),
            max_trials_global=search_budget(len(contexts), trials_per_task, bonus),
            max_trials_per_task=trials_per_task * (SHARE if bonus else 1),
            num_trials_per_iter=_round_size(trials_per_task), database=db,
            task_scheduler="gradient", runner=runner or "local", builder=builder, measure_callbacks=callbacks)
    finally:
        builder.close()
    return db


def _ending_search(on_trials=None):
    """MetaSchedule's evolutionary search, except that a task whose search finds no candidate it has not
    measured yet is ended at once. MetaSchedule picks such a task (a small space, all of it measured:
    the whole models' elementwise exp and small sums in `validate`) again until its search has failed
    5 times, 3 s a round: one validate run here spent 4-5 min on 20 such tasks, measuring nothing.

    It also reports progress, `on_trials(task_name, n)`, as candidates are generated: MetaSchedule's
    measure callbacks run only when a task's results are collected, which its scheduler defers until
    every task has had its first round, so a bar fed by them sat at 0 for the whole first 4.5 minutes."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class EndingSearch(ms.search_strategy.PySearchStrategy):
        def __init__(self, inner=None):
            self.inner = inner or ms.search_strategy.EvolutionarySearch()
            self.task_name = ""

        def _initialize_with_tune_context(self, context) -> None:
            self.inner._initialize_with_tune_context(context)
            self.task_name = str(context.task_name)

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
            self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def generate_measure_candidates(self):
            out = self.inner.generate_measure_candidates()
            if not out:
                return None  # None ends the task
            if on_trials is not None:
                on_trials(self.task_name, len(out))
            return out

        def notify_runner_results(self, candidates, results) -> None:
            self.inner.notify_runner_results(candidates, results)

        def clone(self):
            return EndingSearch(self.inner.clone())

    return EndingSearch()


def _evaluator(cold: bool = False):
    """Hot: repeated back to back, the weights stay in the caches. Cold: each run after a flush of
    every argument but the first (the weights; the input comes hot from the op before), as in a whole
    model whose weights do not all fit in the last-level cache (docs/measurements.md, "Hot or cold")."""
    from tvm.s_tir import meta_schedule as ms

    if cold:
        return ms.runner.EvaluatorConfig(number=1, repeat=10, min_repeat_ms=0, enable_cpu_cache_flush=True)
    return ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=20, enable_cpu_cache_flush=False)


def local_runner(cold: bool = False):
    """MetaSchedule's runner on this machine, timing hot or cold."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.LocalRunner(evaluator_config=_evaluator(cold))


def export_for_device(cross_compiler: str | None, mod) -> str:
    """MetaSchedule builder export: a shared library the device can load as it is (cross-linked for an
    ARM device; MetaSchedule's default exports a tar of objects, which only a device with a compiler links)."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / "candidate.so"
    mod.export_library(str(path), **_link_kwargs(cross_compiler))
    return str(path)


def build_candidate(mod, target, _params=None):
    """MetaSchedule's default build without its first step, `import tvm.s_tir.tensor_intrin`: that
    registers every tensor intrinsic TVM has (CUDA, Hexagon, ...) and took 25-50 s here, in every builder
    worker, and MetaSchedule's LocalBuilder starts fresh workers for every batch of candidates. It was 30
    of the 35 s a 16-candidate batch took to build. A scheduled candidate needs no registry: a tensorized block
    already holds the intrinsic's body."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _build_and_export(mod, target, cross_compiler):
    return export_for_device(cross_compiler, build_candidate(mod, target))


# Builds a worker process serves before it is replaced: LocalBuilder replaces its workers at every call
# for "a known memory leak issue with the PopenPool workers after a couple times of usage".
WORKER_USES = 256
BUILD_TIMEOUT_S = 60


def candidate_builder(cross_compiler: str | None = None):
    """A MetaSchedule builder linking candidates into shared libraries for the device, on worker
    processes kept between calls. MetaSchedule's LocalBuilder starts fresh ones at every call, and each
    imports TVM (2.7 s here): once per tuning round and per batch of transfer candidates, about 2 minutes
    of a cold run. `close()` stops the workers."""
    import os

    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PooledBuilder(ms.builder.PyBuilder):
        def __init__(self):
            self.pool = PopenPoolExecutor(max_workers=os.cpu_count() or 1, timeout=BUILD_TIMEOUT_S,
                                          maximum_process_uses=WORKER_USES)

        def build(self, build_inputs):
            results = []
            for res in self.pool.map_with_error_catching(
                    lambda args: _build_and_export(*args),
                    [(b.mod, b.target, cross_compiler) for b in build_inputs]):
                if res.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(None, f"build timed out after {BUILD_TIMEOUT_S} s"))
                else:
                    results.append(ms.builder.BuilderResult(None, f"build failed: {res.value}"))
            return results

        def close(self):
            self.pool.shutdown()

    return PooledBuilder()


def session_runner(rpc, cold: bool = False):
    """A MetaSchedule runner that times candidates on the device behind a latprof session (its TVM RPC
    session): tuning and transfer then measure on the device the table is for, whatever its transport.
    A farm session holding several devices (`.sessions`) runs candidates on all of them at once, one
    candidate per device at a time. A failing candidate is reported, not raised. `cold`: each run after a
    cache flush on the device (`_evaluator`)."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    config = _evaluator(cold)
    free: queue.Queue = queue.Queue()
    for sess in getattr(rpc, "sessions", None) or [rpc]:
        free.put(sess)
    pool = ThreadPoolExecutor(max_workers=free.qsize())

    def run_one(inp):
        path = Path(inp.artifact_path)  # every artifact has the same file name, in its own temp dir
        name = f"{path.parent.name}-{path.name}"  # a reused name would load the first module again
        sess = free.get()
        try:
            sess.upload(str(path), name)
            mod = sess.load_module(name)
            dev = sess.device(inp.device_type, 0)
            rng = np.random.default_rng(0)
            args = [tvm().runtime.tensor(rng.standard_normal([int(s) for s in a.shape]).astype(str(a.dtype)), dev)
                    for a in inp.args_info]
            timer = mod.time_evaluator(mod.entry_name, dev, number=config.number, repeat=config.repeat,
                                       min_repeat_ms=config.min_repeat_ms,
                                       f_preproc="cache_flush_cpu_non_first_arg" if cold else "")
            secs = [float(t) for t in timer(*args).results]
            sess.remove(name)
            return ms.runner.RunnerResult(secs, None)
        except Exception as exc:
            return ms.runner.RunnerResult(None, str(exc).splitlines()[-1][:300] if str(exc) else repr(exc))
        finally:
            free.put(sess)

    @derived_object
    class SessionRunner(ms.runner.PyRunner):
        def run(self, runner_inputs):
            results = list(pool.map(run_one, runner_inputs))
            return [ms.runner.RunnerFuture(lambda: True, lambda r=r: r) for r in results]

    return SessionRunner()


def benchmark(schedules: list, target, on_done=None, chunk: int = 32, runner=None,
              cross_compiler: str | None = None, errors: list | None = None) -> list[float | None]:
    """Median run time in seconds of each schedule's function (None where it failed to build or run),
    built and run the way MetaSchedule measures its candidates: one builder pool, and the given runner
    (default: MetaSchedule's local one, this machine). `on_done(n)` is called as candidates finish.
    `errors`, if given, receives one entry per schedule: None, or why it has no time (build or run
    error, first line)."""
    out: list[float | None] = []
    for times, why in benchmark_chunks(schedules, target, chunk, runner, cross_compiler):
        out += times
        if errors is not None:
            errors += why
        if on_done is not None:
            on_done(len(times))
    return out


def benchmark_chunks(schedules: list, target, chunk: int = 32, runner=None, cross_compiler: str | None = None):
    """`benchmark`, chunk by chunk: yields (times, why) for the next `chunk` schedules, so a caller can
    keep what is timed before the rest has run (a long transfer stopped midway loses one chunk)."""
    import statistics

    from tvm.s_tir import meta_schedule as ms

    target = make_target(target) if isinstance(target, dict) else target
    builder = candidate_builder(cross_compiler)
    runner = runner or local_runner()
    device = "cpu" if target.kind.name == "llvm" else str(target.kind.name)
    try:
        for i in range(0, len(schedules), chunk):
            part = schedules[i:i + chunk]
            built = builder.build([ms.builder.BuilderInput(s.mod, target) for s in part])
            ok = [(j, b) for j, b in enumerate(built) if b.error_msg is None]
            futures = runner.run([ms.runner.RunnerInput(b.artifact_path, device,
                                                        ms.arg_info.ArgInfo.from_prim_func(part[j].mod["main"]))
                                  for j, b in ok])
            times: list[float | None] = [None] * len(part)
            why: list[str | None] = [None if b.error_msg is None else "build: " + _first_line(b.error_msg) for b in built]
            for (j, _), fut in zip(ok, futures):
                res = fut.result()
                if res.error_msg is None and res.run_secs:
                    times[j] = statistics.median(float(getattr(t, "value", t)) for t in res.run_secs)
                else:
                    why[j] = "run: " + _first_line(res.error_msg or "no run time reported")
            for _, b in ok:  # MetaSchedule's tuning loop removes its artifacts; this loop must too
                ms.utils.remove_build_dir(b.artifact_path)
            yield times, why
    finally:
        builder.close()


def _first_line(msg: str) -> str:
    """The informative line of a MetaSchedule error (they start with a traceback banner)."""
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "Error" in ln or "error" in ln or "Timeout" in ln] or lines or ["?"]
    return keep[-1][:300]


# Part of every compiled library's cache key: bump it when the way a module is built changes.
BUILD_VERSION = "2"


def apply_database(mod, target, db):
    """The prepared (already fused) module with the database's schedules applied to its functions.

    Not `meta_schedule.relax_integration.compile_relax`: on this TVM it re-runs the fusion passes and the
    tuned schedules were lost (a DeiT-T block at N=192: 73 ms built that way, 3.1 ms this way)."""
    from tvm import relax

    with make_target(target) if isinstance(target, dict) else target, db, \
            tvm().transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase()(mod)


def scheduled_functions(mod) -> set[str]:
    """Names of the module's functions that carry a schedule (from a database or elsewhere)."""
    return {gv.name_hint for gv, f in mod.functions.items()
            if getattr(f, "attrs", None) is not None and "tirx.is_scheduled" in f.attrs
            and int(f.attrs["tirx.is_scheduled"]) == 1}


def build(mod, target, db=None):
    """Compile a prepared module; with a database, its tuned schedules are applied first."""
    from tvm import relax

    try:
        if db is not None:
            mod = apply_database(mod, target, db)
        return relax.build(mod, target)
    except Exception as exc:
        raise CompileError(f"TVM failed to compile: {str(exc).splitlines()[-1][:300]}",
                           "report it with the graph in the cache directory") from None


def _link_kwargs(cross_compiler: str | None) -> dict:
    if not cross_compiler:
        return {}
    from tvm.support import cc  # type: ignore[attr-defined]

    return {"fcompile": cc.cross_compiler(cross_compiler)}


def export_library(executable, path: str | Path, cross_compiler: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.so")
    executable.export_library(str(tmp), **_link_kwargs(cross_compiler))
    os.replace(tmp, path)
    return path


def rpc_connect(host: str, port: int, threads: int | None = None, cpus: list | None = None,
                session_timeout: float = 0, retry_s: float = 30.0):
    """Connect, retrying while the server is still coming up: TVM's server logs "bind to" before it
    calls listen(), so a connect right after that line can be refused on a busy machine."""
    import time

    from tvm import rpc

    deadline = time.monotonic() + retry_s
    while True:
        try:
            sess = rpc.connect(host, port, session_timeout=session_timeout)
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                raise DeviceError(f"cannot connect to the TVM RPC server at {host}:{port} ({str(exc).splitlines()[-1][:200]})",
                                  "check that the device is up and its RPC server is running") from None
            time.sleep(0.2)
    configure_threads(sess, threads, cpus)
    return sess


def configure_threads(sess, threads: int | None, cpus: list | None = None) -> None:
    """Set the server's thread count. Core pinning is done where the server starts (taskset or
    sched_setaffinity): a core list cannot cross TVM's RPC here."""
    if threads:
        sess.get_function("runtime.config_threadpool")(0, threads)


# Libraries each live RPC session already holds. Writing a library again over one the server has loaded
# kills the server (kShutdown); names are content-addressed, so a name uploaded once is current.
_UPLOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def load_remote(sess, lib_path: str | Path):
    """Upload a compiled library (once per session) and open a Relax VM on it on the remote device."""
    from tvm import relax

    lib_path = Path(lib_path)
    uploaded = _UPLOADED.setdefault(sess, set())
    if lib_path.name not in uploaded:
        sess.upload(str(lib_path))
        uploaded.add(lib_path.name)
    rlib = sess.load_module(lib_path.name)
    dev = sess.cpu()
    return relax.VirtualMachine(rlib, dev), dev


def time_vm(vm, dev, inputs: list, warmup: int, repeats: int, number: int, min_repeat_ms: float) -> list[float]:
    """Raw samples in ms: each is the mean of `number` runs (number 0: enough runs for min_repeat_ms)."""
    import numpy as np

    args = [tvm().runtime.tensor(np.asarray(x), dev) for x in inputs]
    for _ in range(max(warmup, 0)):
        vm["main"](*args)
    timer = vm.time_evaluator("main", dev, number=max(number, 1), repeat=repeats,
                              min_repeat_ms=0 if number else int(min_repeat_ms))
    return [float(t) * 1e3 for t in timer(*args).results]


def run_vm(vm, dev, inputs: list):
    import numpy as np

    out = vm["main"](*[tvm().runtime.tensor(np.asarray(x), dev) for x in inputs])
    return out.numpy()


# -- RPC tracker (latprof.devices.tracker) ---------------------------------------------------------------

def connect_tracker(host: str, port: int, timeout: float = 10.0):
    import socket

    from tvm import rpc

    try:  # TVM's own connect retries for 60 s; a tracker that is not there should fail fast
        socket.create_connection((host, port), timeout=timeout).close()
        return rpc.connect_tracker(host, port)
    except Exception as exc:
        raise DeviceError(f"cannot reach the TVM RPC tracker at {host}:{port} ({str(exc).splitlines()[-1][:200]})",
                          "start it (python -m tvm.exec.rpc_tracker) or fix connection.host/port") from None


def tracker_servers(tracker) -> dict[str, int]:
    """Servers registered with the tracker, counted per key (free or busy)."""
    counts: dict[str, int] = {}
    for item in tracker.summary()["server_info"]:
        key = item["key"].split(":", 1)[-1]
        counts[key] = counts.get(key, 0) + 1
    return counts


def tracker_request(tracker, key: str, priority: int, session_timeout: float, threads: int | None = None,
                    cpus: list | None = None):
    """One RPC session from the tracker (blocks while every server under key is busy)."""
    try:
        sess = tracker.request(key, priority=priority, session_timeout=session_timeout)
    except Exception as exc:
        raise DeviceError(f"the tracker gave no session for key '{key}' ({str(exc).splitlines()[-1][:200]})",
                          "check the servers registered under that key (python -m tvm.exec.query_rpc_tracker)") from None
    configure_threads(sess, threads, cpus)
    return sess
