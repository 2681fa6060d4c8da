"""`latprof measure`: model -> graphs -> compiled modules -> timed on the device -> raw samples.

Points are measured in a seeded shuffled order (so drift cannot look like a trend over N), a reference
point is re-measured every few points to detect thermal or frequency drift, and every point is appended
to the sample store as soon as it is measured. Each point's samples are taken in `measure.rounds` visits
spread through the run (the shuffled list walked `rounds` times, each walk started a further share of the
way in), so a slow stretch of a shared host lands on a share of every point's samples rather than on all
of a few points'. The same command resumes where a run stopped, visit by visit.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import latprof
from latprof.devices import load_config, open_session
from latprof.devices.config import DeviceConfig
from latprof.errors import DeviceError, UsageError
from latprof.export import Graph, export_unit
from latprof.lut.table import atomic_write_text
from latprof.measure.engines import get_engine
from latprof.measure.samples import SampleStore, point_key
from latprof.measure.workdir import hold
from latprof.models import ModelSpec, get_model
from latprof.progress import bar_factory

DEFAULT_GRID = (1, 17, 33, 49, 65, 97, 129, 161, 197)  # linear interpolation between these


def default_workdir() -> Path:
    return Path(os.environ.get("LATPROF_HOME", "latprof-work"))


def default_grid(top: int) -> list[int]:
    """Token counts measured by default for a unit that sees 1..top tokens: DEFAULT_GRID for DeiT's 197,
    the same shares of `top` otherwise (a PiT stage of 730 or 50 tokens, a Swin window of 49)."""
    if top == DEFAULT_GRID[-1]:
        return list(DEFAULT_GRID)
    return sorted({1, top} | {max(1, round(g * top / DEFAULT_GRID[-1])) for g in DEFAULT_GRID[1:]})


def unit_grid(spec: ModelSpec, unit, tokens) -> list[int]:
    """The counts a token-dependent unit is measured at: `tokens` None = its default grid; a list = the
    values within its range; a callable = tokens(unit)."""
    top = spec.unit_max(unit)
    if tokens is None:
        return default_grid(top)
    if callable(tokens):
        return list(tokens(unit))
    return [n for n in tokens if n <= top]


def parse_tokens(text: str | None, spec: ModelSpec) -> list[int] | None:
    """--tokens as a sorted list, or None for every unit's default grid. Items are counts or ranges:
    `A-B` is every count from A to B, `A-B:S` every S-th (a dense table: latency is not smooth in N)."""
    if not text:
        return None
    try:
        values = sorted({n for item in text.split(",") if item.strip() for n in _token_item(item.strip())})
    except ValueError:
        raise UsageError(f"bad token counts '{text}'",
                         "give comma-separated counts or ranges, e.g. --tokens 197,150,99 or --tokens 1-197:2") from None
    if not values or values[0] < 1 or values[-1] > spec.max_tokens:
        raise UsageError(f"token counts {values} must lie within 1..{spec.max_tokens} for {spec.name}",
                         f"N counts the class token too, so {spec.max_tokens} is the dense model")
    for u in spec.units:
        if u.kind == "tokens" and not unit_grid(spec, u, values):
            raise UsageError(f"none of the token counts {values} fits {spec.name}/{u.name}, which sees 1..{spec.unit_max(u)}",
                             f"add a count of at most {spec.unit_max(u)} to --tokens")
    return values


def _token_item(item: str) -> list[int]:
    """One --tokens item: `N`, `A-B` or `A-B:S` (B is always included); ValueError if malformed."""
    span, _, step = item.partition(":")
    lo, dash, hi = span.partition("-")
    if not dash:
        if step:
            raise ValueError(item)
        return [int(lo)]
    lo, hi, step = int(lo), int(hi), int(step or 1)
    if lo > hi or step < 1:
        raise ValueError(item)
    return sorted({*range(lo, hi + 1, step), hi})


@dataclass
class MeasureResult:
    device: str
    model: str
    engine: str
    measured: int
    skipped: int
    store: Path
    drift: float | None


def export_graphs(spec: ModelSpec, tokens, workdir: Path, progress,
                  shared_keys: set[str] | None = None) -> list[Graph]:
    """One graph per (shared unit, N); fixed units at their own N, token-dependent ones at
    `unit_grid(spec, unit, tokens)`. Cached by an index so a warm run does not rebuild the torch model."""
    wanted = []
    for shared in dict.fromkeys(u.shared for u in spec.units):
        if shared_keys is not None and shared not in shared_keys:
            continue
        unit = next(u for u in spec.units if u.shared == shared)
        for n in ([unit.fixed_tokens] if unit.kind == "fixed" else unit_grid(spec, unit, tokens)):
            wanted.append((shared, n))
    hold(workdir)
    graph_dir = workdir / "graphs"
    index_path = graph_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    versions = _versions() + "," + _unit_sources()
    graphs, missing = [], []
    for shared, n in wanted:
        entry = index.get(f"{spec.name}|{shared}|{n}|{versions}")
        if entry and (graph_dir / f"{entry['digest']}.onnx").exists():
            graphs.append(Graph(spec.name, shared, n, graph_dir / f"{entry['digest']}.onnx", entry["digest"],
                                tuple(entry["shape"]), entry["err"]))
        else:
            missing.append((shared, n))
    if missing:
        _, modules = spec.builder(spec)
        bar = progress(total=len(missing), desc="export+check", unit="graph")
        for shared, n in missing:
            module, shape = modules[shared]
            g = export_unit(module, shape(n), graph_dir, spec.name, shared, n)
            index[f"{spec.name}|{shared}|{n}|{versions}"] = {"digest": g.digest, "shape": list(g.input_shape),
                                                             "err": g.ort_max_abs_err}
            graphs.append(g)
            bar.update(1)
        bar.close()
        atomic_write_text(index_path, json.dumps(index, indent=1, sort_keys=True))
    return graphs


def _unit_sources() -> str:
    """Digest of the code that defines the units' graphs: a changed unit is exported again (the graph's
    own digest then decides whether anything is compiled or measured again)."""
    root = Path(latprof.__file__).parent
    files = sorted((root / "models").glob("*.py")) + [root / "train" / "pruning.py", root / "train" / "units.py"]
    return "units=" + hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def _versions() -> str:
    import importlib.metadata as md

    parts = []
    for pkg in ("torch", "timm", "onnx"):
        try:
            parts.append(f"{pkg}={md.version(pkg)}")
        except md.PackageNotFoundError:
            parts.append(f"{pkg}=none")
    return ",".join(parts + [f"latprof={latprof.__version__}"])


def store_path(workdir: Path, device: str) -> Path:
    return workdir / "samples" / f"{device}.jsonl"


def measure(device: str | DeviceConfig, model: str, tokens: str | list[int] | Callable | None = None,
            engine: str | None = None, workdir: Path | None = None, trials: int | None = None,
            progress: bool = True, seed: int = 0, echo=print, units: list[str] | None = None,
            store: Path | None = None) -> MeasureResult:
    """Measure `units` (default all) of `model` at `tokens`; samples go to `store` (default the
    device's store in the workdir)."""
    cfg = device if isinstance(device, DeviceConfig) else load_config(device)
    spec = get_model(model)
    # a list, a callable (unit -> counts) or --tokens text; None: each unit's default grid
    grid = tokens if isinstance(tokens, list) or callable(tokens) else parse_tokens(tokens, spec)
    workdir = Path(workdir or default_workdir())
    bars = bar_factory(progress)
    eng = make_engine(engine or cfg.engine, cfg, spec, workdir, trials)
    shared_keys = None if not units else {spec.unit(u).shared for u in units}
    graphs = export_graphs(spec, grid, workdir, bars, shared_keys)
    store = SampleStore(store or store_path(workdir, cfg.name))
    provenance = {
        "device": cfg.name, "engine": eng.name, "tuning": eng.tuning_label(), "target": eng.target_label(),
        "settings": cfg.settings(), "emulated": cfg.emulated, "transport": cfg.transport,
    }
    keys = {g.digest: point_key(graph=g.digest, **provenance) for g in graphs}
    rounds = cfg.measure["rounds"]
    per_visit = -(-cfg.measure["repeats"] // rounds)  # ceil: no fewer samples in all
    done = visits_done(store.records(), rounds)
    todo = [g for g in graphs if any((keys[g.digest], v) not in done for v in range(rounds))]
    skipped = len(graphs) - len(todo)
    part_way = sum(any((keys[g.digest], v) in done for v in range(rounds)) for g in todo)
    if skipped or part_way:
        echo(f"resuming: {skipped} of {len(graphs)} points already measured in {store.path}"
             + (f", {part_way} part-way" if part_way else ""))
    if not todo:
        return MeasureResult(cfg.name, spec.name, eng.name, 0, skipped, store.path, None)
    reference = max(graphs, key=lambda g: (g.shared != "patch_embed", g.tokens))
    versions = {"latprof": latprof.__version__, "tvm": _tvm_version(), "packages": _versions()}
    every = cfg.measure["reference_every"]
    ref_medians: dict[int, list[float]] = collections.defaultdict(list)  # per device (farm lane)

    def record(g: Graph, samples: list[float], err: float, info: dict, is_ref: bool, visit: int | None = None) -> None:
        store.append({
            "key": keys[g.digest], "reference": is_ref, "model": spec.name, "unit": g.shared, "tokens": g.tokens,
            "graph": g.digest, "samples_ms": [round(s, 6) for s in samples], "max_abs_err": err,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "info": info,
            **({} if is_ref else {"visit": visit, "rounds": rounds}), **provenance, **versions,
        })

    tries: collections.Counter = collections.Counter()  # times each (point, visit) was measured in this run
    tolerance, retries = cfg.measure["drift_tolerance"], cfg.measure["drift_retries"]
    lock = threading.Lock()
    session_cm = open_session(cfg) if eng.needs_session else None
    session = session_cm.__enter__() if session_cm else None
    try:
        # compiled with the device open: a remote device's tuning candidates run on it
        artifacts = compile_graphs(eng, spec, todo, workdir, bars, session)
        random.Random(seed).shuffle(todo)
        info = session.info() if session else _local_info()
        ref_artifacts = artifacts if reference.digest in artifacts else {**artifacts, **compile_graphs(eng, spec, [reference], workdir, bars, session)}
        queue = [(g, v) for v in range(rounds) for g in rotated(todo, v, rounds) if (keys[g.digest], v) not in done]
        bar = bars(total=len(queue), desc=f"measure {spec.name} on {cfg.name} ({eng.name})",
                   unit="point" if rounds == 1 else "visit")

        def lane(sess, lane_eng, lane_info, medians: list[float]) -> None:
            """Measure points from the shared queue on one device (each farm device is a lane). The points
            between two references that disagree by more than the tolerance go back to the queue's head."""
            i, bracket = 0, []

            def check_reference() -> None:
                rs, rerr = lane_eng.measure(sess, reference, ref_artifacts[reference.digest])
                prev = medians[-1] if medians else None
                medians.append(_median(rs))
                with lock:
                    record(reference, rs, rerr, lane_info, True)
                    if prev is not None and abs(medians[-1] / prev - 1) > tolerance:
                        redo = [(g, v) for g, v in bracket if tries[g.digest, v] <= retries]
                        queue[:0] = redo
                bracket.clear()

            while True:
                with lock:
                    if failed:
                        return
                    item = queue.pop(0) if queue else None
                if item is None:
                    if not (every and bracket):
                        return
                    check_reference()  # close the last bracket (and give its points a reference after them)
                    continue
                if every and i % every == 0:  # each device's own drift reference
                    check_reference()
                g, visit = item
                samples, err = lane_eng.measure(sess, g, artifacts[g.digest], per_visit)
                with lock:
                    record(g, samples, err, lane_info, False, visit)
                    tries[g.digest, visit] += 1
                    if tries[g.digest, visit] == 1:
                        bar.update(1)
                bracket.append(item)
                i += 1
                if cfg.measure["cooldown_s"]:
                    time.sleep(cfg.measure["cooldown_s"])

        failed: list[BaseException] = []
        lanes = farm_lanes(session, info)
        if len(lanes) == 1:
            lane(lanes[0][0], eng, lanes[0][1], ref_medians[0])
        else:  # a farm: every device measures at the same time, one point each
            run_lanes([(s, eng.fork(), inf, ref_medians[k]) for k, (s, inf) in enumerate(lanes)], lane, failed)
        bar.close()
    except DeviceError as exc:
        taken = f"{len(tries)} points" if rounds == 1 else f"{len(tries)} visits of {len({d for d, _ in tries})} points"
        raise DeviceError(f"{exc.message}; {taken} measured in this run are kept in {store.path}", exc.fix) from None
    finally:
        if session_cm:
            session_cm.__exit__(None, None, None)
    again = sum(tries.values()) - len(tries)
    if again:
        echo(f"measured {again} {'points' if rounds == 1 else 'visits'} again: the reference moved by more than "
             f"{tolerance:.0%} around them (the newest samples of a point make the table)")
    drifts = [max(m) / min(m) - 1 for m in ref_medians.values() if len(m) > 1]
    drift = max(drifts) if drifts else None
    if drift is not None and drift > tolerance:
        echo(f"warning: the reference point drifted by {drift:.1%} during the run (thermal or frequency change?); "
             "it is recorded in the table's provenance")
    return MeasureResult(cfg.name, spec.name, eng.name, len({d for d, _ in tries}), skipped, store.path, drift)


def visits_done(records: list[dict], rounds: int) -> set[tuple[str, int]]:
    """(point key, visit) already in a store; a record without a visit (measured before visits, or by
    an interleaved check) is a whole measurement: every visit of its point."""
    done = set()
    for r in records:
        if not r.get("reference"):
            v = r.get("visit")
            done |= {(r["key"], k) for k in range(rounds)} if v is None else {(r["key"], v)}
    return done


def rotated(items: list, r: int, rounds: int) -> list:
    """Round r's order: the list started r/rounds of the way in, so each item's visits are about a pass apart."""
    k = (r * len(items)) // max(rounds, 1) % max(len(items), 1)
    return items[k:] + items[:k]


class _Lane:
    """One device of a farm session, as an engine's measure() sees a session."""

    def __init__(self, rpc):
        self.rpc = rpc


def farm_lanes(session, info: dict) -> list[tuple]:
    """(session, info) per device: a farm session holding several devices gives one lane each, its info
    naming the server (drift is then checked per device); anything else is one lane."""
    subs = getattr(session, "sessions", None) or []
    if len(subs) < 2:
        return [(session, info)]
    return [(_Lane(rpc), {**info, "server": k}) for k, rpc in enumerate(subs)]


def run_lanes(lanes: list[tuple], work, failed: list) -> None:
    """Run `work(*lane)` for every lane in its own thread; the first error stops the others after their
    current point and is raised here (Ctrl-C too: what was measured is already in the store)."""
    def guarded(*args):
        try:
            work(*args)
        except BaseException as exc:  # handed to the main thread
            failed.append(exc)

    threads = [threading.Thread(target=guarded, args=ln, daemon=True) for ln in lanes]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    except KeyboardInterrupt:
        failed.append(KeyboardInterrupt())
        raise
    if failed:
        raise failed[0]


def compile_graphs(eng, spec: ModelSpec, graphs: list[Graph], workdir: Path, bars, session=None) -> dict[str, str]:
    """Tune (what is missing) and compile graphs with an engine; returns {graph digest: artifact}.

    For TVM the token-dependent units are tuned at the anchor counts (exported here, never measured)
    and every measured count reuses those schedules; see compile/tuning.py."""
    anchors = []
    if eng.name == "tvm" and eng.trials > 0:
        configured = eng.cfg.tuning.get("anchors")
        # anchors only for the graphs being compiled (a --units check or a validation needs no others)
        anchors = [g for g in export_graphs(spec, lambda u: unit_anchors(spec, u, configured), workdir, bars,
                                            {g.shared for g in graphs})
                   if spec.unit_by_shared(g.shared).kind == "tokens"]
    return eng.prepare(graphs, bars, anchors=anchors, session=session)


def make_engine(name: str, cfg: DeviceConfig, spec: ModelSpec, workdir: Path, trials: int | None = None):
    """An engine set up for a model: for TVM, the anchor token counts its tuning label names."""
    eng = get_engine(name, cfg, workdir, trials)
    if eng.name == "tvm":
        eng.anchors = sorted({a for u in spec.units if u.kind == "tokens"
                              for a in unit_anchors(spec, u, cfg.tuning.get("anchors"))})
    return eng


def unit_anchors(spec: ModelSpec, unit, configured: list | None) -> list[int]:
    """The anchor token counts a unit is tuned at: the configured ones within its range, else the
    default for its range (compile/tuning.py)."""
    from latprof.compile.tuning import anchor_tokens

    top = spec.unit_max(unit)
    mine = [a for a in anchor_tokens(top, configured) if a <= top] if configured else []
    return mine or anchor_tokens(top)


def like_baseline(device: str | DeviceConfig, baseline) -> tuple[DeviceConfig, str, int]:
    """The device config with the baseline's measurement settings, threads and cores, and the baseline's
    engine and trials per task: what makes new samples comparable with the baseline's."""
    import dataclasses
    import re

    cfg = device if isinstance(device, DeviceConfig) else load_config(device)
    prov = baseline.provenance
    settings = prov.get("settings") or {}
    cfg = dataclasses.replace(cfg, measure={**cfg.measure, **{k: v for k, v in settings.items() if k in cfg.measure}},
                              threads=settings.get("threads", cfg.threads), cpus=settings.get("cpus", cfg.cpus))
    m = re.match(r"metaschedule:(\d+)", str(prov.get("tuning", "")))
    return cfg, prov.get("engine") or baseline.engine, int(m.group(1)) if m else 0


def remeasure_like(baseline, device: str | DeviceConfig, model: str, units: list[str] | None = None,
                   workdir: Path | None = None, progress: bool = True):
    """A fresh table of `model` measured like `baseline` (same engine, tuning budget, token counts and
    measurement settings), for `latprof check`. Its samples go to a store of their own."""
    from latprof.lut.build import build_lut

    cfg, engine, trials = like_baseline(device, baseline)
    frame = baseline.model_frame(model)
    if units:
        frame = frame[frame["unit"].isin(units)]
        if frame.empty:
            raise UsageError(f"the baseline has none of the units {units} for {model}",
                             f"choose from {baseline.units(model)}")
    workdir = Path(workdir or default_workdir())
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    store = workdir / "samples" / f"check-{cfg.name}-{stamp}.jsonl"
    measure(cfg, model, table_tokens(get_model(model), frame), engine, workdir, trials, progress,
            units=sorted(set(frame["unit"])), store=store, echo=lambda *a, **k: None)
    table = build_lut(store, engine=engine, drift_correction=False)  # compared as measured (check's statistics)
    keep = table.frame.merge(frame[["unit", "tokens"]], on=["unit", "tokens"])
    table.frame = keep.reset_index(drop=True)
    return table


def table_tokens(spec: ModelSpec, frame) -> Callable:
    """`tokens` for `measure` that re-measures exactly the token counts a table's rows have, per shared
    graph (a table built from a store that other runs added to can cover more than any one grid)."""
    counts: dict[str, set] = {}
    for unit, n in zip(frame["unit"], frame["tokens"]):
        counts.setdefault(spec.unit(unit).shared, set()).add(int(n))
    return lambda u: sorted(counts.get(u.shared, ()))


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def _tvm_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("apache-tvm")
    except md.PackageNotFoundError:
        return None


def _local_info() -> dict:
    from latprof.devices.local import host_info

    return host_info()
