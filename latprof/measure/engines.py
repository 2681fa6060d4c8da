"""Engines: what turns an exported graph into something timed on the device.

- tvm: TVM Relax, tuned with MetaSchedule, compiled for the device's target, timed over the RPC session.
- onnxruntime: the same ONNX graph in onnxruntime on this host (the CPU reference, and the deployment
  runtime of many users); local devices only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from latprof.compile import tuning
from latprof.devices.config import DeviceConfig
from latprof.errors import CompileError, ConfigError, DeviceError, UsageError, require
from latprof.export import TIE_MARGIN, Graph, topk_margin
from latprof.measure.workdir import hold

OUTPUT_TOLERANCE = 2e-3  # device output vs onnxruntime (fast-math erf/exp differ by ~1e-5)

_ENGINES: dict[str, type] = {}


def register_engine(name: str):
    def wrap(cls):
        _ENGINES[name] = cls
        return cls

    return wrap


def get_engine(name: str, cfg: DeviceConfig, workdir: Path, trials: int | None = None):
    if name not in _ENGINES:
        raise ConfigError(f"unknown engine '{name}'", f"use one of {', '.join(sorted(_ENGINES))}")
    hold(workdir)  # its graphs and libraries are in use until this process ends
    return _ENGINES[name](cfg, workdir, trials)


def needs_session(name: str) -> bool:
    """Whether an engine runs through the device session (TVM) or in this process (onnxruntime)."""
    return bool(getattr(_ENGINES.get(name), "needs_session", False))


def unit_count(graph: Graph) -> int:
    """How many of its model's units one graph stands for (DeiT-T's block graph: 12; otherwise 1)."""
    from latprof.models import get_model

    try:
        return max(1, sum(u.shared == graph.shared for u in get_model(graph.model).units))
    except UsageError:  # not a registered model's unit (a whole pruned model in validate)
        return 1


def reference_output(graph: Graph, x: np.ndarray) -> np.ndarray:
    ort = require("onnxruntime", "models")
    sess = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]  # units' input is x; an export's, images


@register_engine("onnxruntime")
class OnnxRuntimeEngine:
    name = "onnxruntime"
    needs_session = False

    def __init__(self, cfg: DeviceConfig, workdir: Path, trials: int | None = None):
        if cfg.transport != "local":
            raise ConfigError(f"{cfg.source}: engine onnxruntime runs on this host only, device '{cfg.name}' is {cfg.transport}",
                              "use engine: tvm for remote devices")
        self.cfg = cfg
        self.ort = require("onnxruntime", "models")

    def tuning_label(self) -> str:
        return "none"

    def target_label(self) -> str:
        return f"onnxruntime-{self.ort.__version__}-cpu"

    def prepare(self, graphs: list[Graph], progress, anchors: list[Graph] = (), session=None) -> dict[str, str]:
        return {g.digest: "" for g in graphs}  # onnxruntime runs the ONNX files as they are

    def fork(self):
        return self  # nothing tied to a device session

    def measure(self, session, graph: Graph, artifact: str, repeats: int | None = None) -> tuple[list[float], float]:
        """Samples (ms): `repeats` of them (default the config's)."""
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.cfg.threads
        so.inter_op_num_threads = 1
        sess = self.ort.InferenceSession(str(graph.path), so, providers=["CPUExecutionProvider"])
        x = graph.example_input()
        feed = {sess.get_inputs()[0].name: x}
        m = self.cfg.measure
        for _ in range(m["warmup"]):
            sess.run(None, feed)
        number = m["number"]
        if not number:  # as TVM's time_evaluator: enough runs that one sample lasts min_repeat_ms
            t0 = time.perf_counter()
            sess.run(None, feed)
            number = max(1, int(m["min_repeat_ms"] / 1e3 / max(time.perf_counter() - t0, 1e-6)))
        samples = []
        for _ in range(repeats or m["repeats"]):
            t0 = time.perf_counter()
            for _ in range(number):
                sess.run(None, feed)
            samples.append((time.perf_counter() - t0) / number * 1e3)
        return samples, 0.0


@register_engine("tvm")
class TVMEngine:
    name = "tvm"
    needs_session = True

    def __init__(self, cfg: DeviceConfig, workdir: Path, trials: int | None = None):
        from latprof.compile import tvmlib

        self.tvmlib = tvmlib
        self.cfg = cfg
        self.trials = cfg.tuning["trials_per_task"] if trials is None else trials
        self.cold = cfg.tuning.get("cache") == "cold"
        self.target_spec = tvmlib.target_dict(cfg.target, cfg.threads)
        self.target = tvmlib.make_target(self.target_spec)
        spec_hash = hashlib.sha256(json.dumps(self.target_spec, sort_keys=True).encode()).hexdigest()[:10]
        self.workdir = Path(workdir)
        # records timed hot and cold must not compete in one database (the fastest record of a task wins)
        self.tuning_dir = self.workdir / "tuning" / f"{cfg.name}-{spec_hash}{'-cold' if self.cold else ''}"
        self.lib_dir = self.workdir / "libs"
        self._vms: dict[str, tuple] = {}
        self._ref_out: dict[str, np.ndarray] = {}  # graph digest -> onnxruntime output (shared by farm twins)
        self.anchors: list[int] = []  # set by the runner from the model and config

    def tuning_label(self) -> str:
        """Recorded with every row (and part of every sample's key): trials per task, the anchor token
        counts they were spent at, and the way schedules were transferred to the other counts."""
        if self.trials <= 0:
            return "untuned"
        return (f"metaschedule:{self.trials}@" + "+".join(map(str, self.anchors)) + f"/transfer{tuning.TRANSFER_VERSION}"
                + ("/cold" if self.cold else ""))

    def target_label(self) -> str:
        return json.dumps(self.target_spec, sort_keys=True)

    # -- compile ----------------------------------------------------------------------------------
    def _prepared(self, graph: Graph):
        try:
            mod = self.tvmlib.import_onnx(graph.path)
        except Exception as exc:  # TVM's ONNX frontend: an operator or shape it cannot take
            msg = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            raise CompileError(f"{graph.model}/{graph.shared} at N={graph.tokens}: TVM cannot import its ONNX graph "
                               f"({msg[-1].strip()[:200]})",
                               "measure it with --engine onnxruntime meanwhile, and report the unit") from None
        return self.tvmlib.prepare(mod, self.target)

    def prepare(self, graphs: list[Graph], progress, anchors: list[Graph] = (), session=None) -> dict[str, str]:
        """Tune what is missing (within the budget), then compile every graph; returns lib paths.

        `anchors` are graphs at the anchor token counts: tuned, never measured (see compile/tuning.py).
        `session` is the open device: tuning candidates run on it (this machine's `local` device is
        timed by MetaSchedule's own local runner, isolated worker processes on the same CPU)."""
        prepared = {g.digest: self._prepared(g) for g in [*graphs, *anchors]}
        db = tuning.TuningDB(self.tuning_dir) if self.trials > 0 else None
        if db is not None:
            self._tune(graphs, list(anchors), prepared, db, progress, self._runner(session))
        libs = {}
        bar = progress(total=len(graphs), desc="compile", unit="graph")
        for g in graphs:
            libs[g.digest] = str(self._compile(g, prepared[g.digest], db))
            bar.update(1)
        bar.close()
        return libs

    def other_tunings(self) -> list[str]:
        """Other device names with a tuning database for this same target in the workdir."""
        suffix = self.tuning_dir.name[len(self.cfg.name):]  # "-<target hash>"
        return sorted(d.name[:-len(suffix)] for d in self.tuning_dir.parent.glob(f"*{suffix}")
                      if d != self.tuning_dir and (d / "budget.json").exists())

    def _tasks(self, mod) -> list:
        return [t for t in self.tvmlib.extract_tasks(mod, self.target) if tuning.is_heavy(t.task_name)]

    def _runner(self, session):
        """Who times tuning candidates: the device through its session; for this machine, MetaSchedule's
        own runner (None: its defaults, hot), or a cold one."""
        if self.cfg.transport == "local":
            return self.tvmlib.local_runner(cold=True) if self.cold else None
        if session is None:  # a remote target cannot be timed here: its candidates run on the device
            raise DeviceError(f"tuning for '{self.cfg.name}' needs the device connected",
                              "run `latprof tune`/`measure` with the device reachable, or set tuning.trials_per_task: 0")
        return self.tvmlib.session_runner(session.rpc, self.cold)

    def _tune(self, graphs, anchors, prepared, db, progress, runner=None) -> None:
        anchored = {a.shared for a in anchors}
        # tuned for real: the anchors, and graphs of units that have no anchor (fixed-cost units)
        direct = anchors + [g for g in graphs if g.shared not in anchored]
        tasks = {g.digest: self._tasks(prepared[g.digest]) for g in [*graphs, *anchors]}
        todo, runs = [], {}  # runs: how often a task runs in its model (a DeiT block's: 12x)
        for g in direct:
            count = unit_count(g)
            for t in tasks[g.digest]:
                key = tuning.task_key(t)
                if key not in runs and db.trials(key) < self.trials:
                    todo.append((key, t))
                runs[key] = runs.get(key, 0) + count
        others = ", ".join(f"'{n}'" for n in self.other_tunings()) if todo and not db.budget else ""
        if others:
            print(f"warning: nothing is tuned yet for device '{self.cfg.name}', but this workdir holds tuning for the "
                  f"same target under {others}: tuning is kept per device name (same target, other hardware); if it "
                  f"is the same machine, use that config, or copy its folder to {self.tuning_dir}", flush=True)
        if todo:
            # the table's units get the bonus rounds; validate's whole pruned models (no anchors), whose
            # novel tasks (fusions across units, at every schedule's own N) each get the plain budget:
            # with the bonus (4x the cap per task), the scheduler re-picked a few small tasks for 7 minutes
            self._search([t for _, t in todo], self.trials, "tune", db, progress, runner,
                         counts=[runs[key] for key, _ in todo], bonus=bool(anchors))
            found = [(key, t) for key, t in todo if db.db.query_tuning_record(t.dispatched[0], self.target, "main")]
            for key, task in found:  # a task none of whose candidates ran is tried again next time
                db.record(key, trials=self.trials, name=task.task_name, tuned=True)
            if len(found) < len(todo):  # ... but not one whose records TVM cannot read back: it keeps the default
                unreadable = db.rejected()
                for key, task in todo:
                    if key in unreadable and not db.trials(key):
                        db.record(key, trials=self.trials, name=task.task_name, unreadable=True)
            db.save()
            if not found and runner is not None:
                raise DeviceError(f"no tuning candidate ran on '{self.cfg.name}' ({len(todo)} tasks)",
                                  "check the device (it may have dropped) and run the same command again")
        # every other graph replays the nearest anchor's schedule of the same task, re-fitted to its N
        # in every way that applies (compile/tuning.py); the fastest candidate is kept
        pending: dict[str, tuple] = {}
        retune: dict[str, object] = {}  # tasks due a short search of their own (see settle)
        for g in graphs:
            if g.shared not in anchored:
                continue
            src = min((a for a in anchors if a.shared == g.shared), key=lambda a: abs(a.tokens - g.tokens))
            if src.digest == g.digest:
                continue
            sources: dict[tuple, dict] = {}
            for t in tasks[src.digest]:
                rec = db.db.query_tuning_record(t.dispatched[0], self.target, "main")
                if rec is not None:
                    sources.setdefault(tuning.signature(t), {})[t.task_name] = rec
            for t in tasks[g.digest]:
                key = tuning.task_key(t)
                if db.retune_due(key):  # settled by a run that was stopped before its retune ended
                    retune[key] = t
                recs = sources.get(tuning.signature(t))
                if key in pending or db.transferred(key, self.trials) or not recs:
                    continue
                cands = tuning.candidates({name: (r.trace, r.workload.mod) for name, r in recs.items()},
                                          t.dispatched[0], self.target)
                if cands:
                    pending[key] = (t, src.tokens, cands, min(sum(map(float, r.run_secs)) for r in recs.values()),
                                    g.tokens, min(float(np.mean([float(x) for x in r.run_secs])) for r in recs.values()))
        # several candidates are timed on the device; a lone one needs no timing (it keeps the anchor's).
        # Each task is settled and the budget saved as soon as its candidates are timed: a transfer of
        # thousands of candidates that is stopped midway keeps what it timed
        flat = [(key, label, sch) for key, (_, _, cands, *_) in pending.items() if len(cands) > 1
                for label, sch in cands.items()]
        timed: dict[str, dict] = {}
        failed: dict[str, dict] = {}  # candidates with no time, and why (kept in budget.json)
        cache: dict = {}

        def settle(key) -> None:
            task, src_tokens, cands, anchor_secs, tokens, anchor_mean = pending[key]
            lone = len(cands) == 1
            found = {label: (anchor_secs, sch) for label, sch in cands.items()} if lone else timed.get(key)
            if not found:  # no candidate ran: tried again next time; say why
                why = next(iter(failed.get(key, {}).values()), "no candidate")
                print(f"warning: no transfer candidate of {task.task_name} ran ({why}); it is tried again next run",
                      file=sys.stderr)
                return
            # the fastest candidate that computes the right thing (checked on this CPU); if none does,
            # TVM's default schedule stays
            chosen, rejected = None, []
            for label in sorted(found, key=lambda k: found[k][0]):
                if tuning.verify(task.dispatched[0], found[label][1], cache):
                    tuning.commit(db.db, task, found[label][1], [found[label][0]], self.target)
                    chosen = label
                    break
                rejected.append(label)
            extra = {} if lone else {"candidates_ms": {k: round(v[0] * 1e3, 4) for k, v in found.items()}}
            if failed.get(key):
                extra["failed"] = failed[key]
            # the retune is owed in the budget until its search ends, so a run stopped before then owes it still
            due = not lone and tuning.needs_retune(task, found[chosen][0] if chosen else None, anchor_mean,
                                                   src_tokens, tokens)
            db.record(key, trials=self.trials, name=task.task_name, transferred_from=src_tokens, refit=chosen,
                      transfer=tuning.TRANSFER_VERSION, rejected=rejected, retune_due=due, **extra)
            if due:
                retune[key] = task
            else:
                retune.pop(key, None)

        for key, (_, _, cands, *_) in pending.items():
            if len(cands) == 1:
                settle(key)
        db.save()
        if flat:
            last = {key: i for i, (key, _, _) in enumerate(flat)}  # each task's last candidate in `flat`
            bar = progress(total=len(flat), desc=f"transfer {len(last)} tasks", unit="candidate")
            seen = 0
            for times, errors in self.tvmlib.benchmark_chunks([sch for _, _, sch in flat], self.target, runner=runner,
                                                              cross_compiler=self.cfg.cross_compiler):
                for (key, label, sch), secs, why in zip(flat[seen:], times, errors):
                    if secs is not None:
                        timed.setdefault(key, {})[label] = (secs, sch)
                    else:
                        failed.setdefault(key, {})[label] = why
                for key in dict.fromkeys(k for k, _, _ in flat[seen:seen + len(times)]):
                    if last[key] < seen + len(times):
                        settle(key)
                seen += len(times)
                db.save()
                bar.update(len(times))
            bar.close()
        if retune:  # re-fits that stay far from the anchor's speed (the softmax): a short search of their own
            self._search(list(retune.values()), tuning.RETUNE_TRIALS, "retune", db, progress, runner, bonus=False)
            for key in retune:  # the best record of each task now serves it
                db.record(key, retuned=tuning.RETUNE_TRIALS, retune_due=False)
            db.save()

    def _search(self, tasks, trials: int, what: str, db, progress, runner, counts=None, bonus=True) -> None:
        """MetaSchedule over `tasks` into the database (then re-read), with a progress bar."""
        bar = progress(total=self.tvmlib.search_budget(len(tasks), trials, bonus),
                       desc=f"{what} {len(tasks)} tasks x {trials}{'+' if bonus else ''} trials", unit="trial")
        try:
            self.tvmlib.tune_tasks(tasks, self.target, self.tuning_dir, trials, runner=runner, counts=counts, bonus=bonus,
                                   on_trials=lambda name, n: bar.update(min(n, bar.total - bar.n)),
                                   cross_compiler=self.cfg.cross_compiler)
        except Exception as exc:
            raise CompileError(f"MetaSchedule failed: {str(exc).splitlines()[-1][:200]}",
                               "check apache-tvm-ffi<0.1.15 and that psutil, cloudpickle, tornado, xgboost are installed") from None
        bar.update(max(0, bar.total - bar.n))  # searches that ran out of new candidates end early
        bar.close()
        db.db = self.tvmlib.database(self.tuning_dir)  # re-read what the tuner wrote

    def _compile(self, graph: Graph, mod, db) -> Path:
        fingerprint = "untuned"
        if db is not None:
            recs = []
            for t in self.tvmlib.extract_tasks(mod, self.target):
                rec = db.db.query_tuning_record(t.dispatched[0], self.target, "main")
                recs.append(str(rec.trace) if rec is not None else "-")
            fingerprint = hashlib.sha256("\n".join(recs).encode()).hexdigest()
        key = hashlib.sha256("|".join([graph.digest, self.target_label(), self.tvmlib.version(),
                                        self.tvmlib.BUILD_VERSION, fingerprint,
                                        self.cfg.cross_compiler or ""]).encode()).hexdigest()[:24]
        path = self.lib_dir / f"{key}.so"
        if path.exists():
            return path  # content-addressed: a rerun compiles nothing
        ex = self.tvmlib.build(mod, self.target, db.db if db is not None else None)
        return self.tvmlib.export_library(ex, path, self.cfg.cross_compiler)

    # -- measure ----------------------------------------------------------------------------------
    def fork(self):
        """This engine for another device of a farm: the loaded VMs belong to one RPC session."""
        twin = copy.copy(self)
        twin._vms = {}
        return twin

    def measure(self, session, graph: Graph, artifact: str, repeats: int | None = None) -> tuple[list[float], float]:
        """Samples (ms), `repeats` of them (default the config's), and the max abs error of the device's
        output against onnxruntime."""
        m = self.cfg.measure
        try:
            if artifact not in self._vms:
                self._vms[artifact] = self.tvmlib.load_remote(session.rpc, artifact)
            vm, dev = self._vms[artifact]
            x = graph.example_input()
            out = self.tvmlib.run_vm(vm, dev, [x])
            samples = self.tvmlib.time_vm(vm, dev, [x], m["warmup"], repeats or m["repeats"], m["number"],
                                          m["min_repeat_ms"])
        except Exception as exc:
            if isinstance(exc, (KeyboardInterrupt, CompileError)):
                raise
            raise DeviceError(f"device '{self.cfg.name}' failed while measuring ({str(exc).splitlines()[-1][:160]})",
                              "check the device and run the same command again: measured points are kept and skipped") from None
        if graph.digest not in self._ref_out:  # onnxruntime's answer to the graph's fixed input, once per graph
            self._ref_out[graph.digest] = reference_output(graph, x)
        err = float(np.abs(out - self._ref_out[graph.digest]).max())
        if not np.isfinite(err) or (err > OUTPUT_TOLERANCE and topk_margin(graph.path.read_bytes())(x) > TIE_MARGIN):
            raise CompileError(f"{graph.model}/{graph.shared} at N={graph.tokens}: device output differs from onnxruntime by {err:.2e}",
                               "the compiled module is wrong; remove its tuning records or report it")
        return samples, err
