"""Closing the loop: the trained model `latprof export` wrote, timed on the device against the budget it
was trained for and against the table's prediction for its schedule.

The ONNX file carries the training facts in its metadata (model, kept counts, pruning locations, budget,
table). It is compiled like `validate`'s whole models (the table's engine and tuning state; for tuned TVM
the units at its token counts are transferred first) and measured beside the drift reference, so a miss
can be told apart from a machine that is slower than when the table was measured. Each run's raw
samples are appended to `<workdir>/validate/<device>-exports.jsonl`.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latprof.errors import UsageError


@dataclass
class DeployedResult:
    path: Path
    model: str
    kept: list[int]
    device: str
    engine: str
    tuning: str
    statistic: str
    budget_ms: float | None
    predicted_ms: float      # the table's prediction for the schedule (overhead-corrected when calibrated)
    corrected: bool          # whether an overhead sidecar was applied
    measured_ms: float
    samples_ms: list[float]
    drift: float             # reference units now / in the table
    results_path: Path

    @property
    def over_budget(self) -> bool:
        return self.budget_ms is not None and self.measured_ms > self.budget_ms


def export_graph(path: Path, model: str, kept, img_size: int):
    """An exported ONNX file as a measurable graph (content-addressed like the units)."""
    from latprof.export import Graph

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
    return Graph(model, "export-" + "-".join(map(str, kept)), 0, path, digest, (1, 3, img_size, img_size), 0.0)


def measure_export(device, onnx_path, lut=None, budget_ms: float | None = None, workdir=None, stat: str | None = None,
                   progress: bool = True, echo=print, use_overhead: bool = True, model: str | None = None) -> DeployedResult:
    """`model`, if given, must be the export's (a user's --model)."""
    from latprof.devices import load_config, open_session
    from latprof.devices.config import DeviceConfig
    from latprof.lut.table import read_lut
    from latprof.measure.runner import default_workdir
    from latprof.models import get_model
    from latprof.predict import parse_stat, predict, read_overhead, sample_stat, schedule_of, table_statistic
    from latprof.progress import bar_factory
    from latprof.train.export import read_export
    from latprof.validate import (_prepare, append_record, measure_references, reference_drift, reference_figures,
                                  reference_graphs, reference_weights, table_engine)

    path = Path(onnx_path)
    info = read_export(path)
    if model is not None and model != info["model"]:
        raise UsageError(f"--model {model}, but {path} is a trained {info['model']}", "leave --model out with --onnx")
    given = lut is not None
    lut = Path(lut or info.get("lut") or "")
    if not lut.is_file():
        where = "" if given else f" (the one {path.name} was trained with)"
        raise UsageError(f"no table at '{lut}'{where}", "give the table to compare with: --lut luts/<device>.csv")
    cfg = device if isinstance(device, DeviceConfig) else load_config(device)
    spec = get_model(info["model"])
    if info.get("model_kwargs") or int(info["img_size"]) != 224:
        raise UsageError(f"{path.name} is a {spec.name} trained with --model-kwargs or --img-size "
                         f"({info.get('model_kwargs') or info['img_size']}): the table's units are the registry's {spec.name}",
                         "train with the registry's structure and 224-pixel images to time it against a table")
    measured_table = read_lut(lut)
    measured_table.units(spec.name)  # a table without this model -> LutError with the fix
    schedule = schedule_of(spec, info["kept"], info.get("locations"))
    workdir = Path(workdir or default_workdir())
    bars = bar_factory(progress)
    eng = table_engine(measured_table, cfg, spec, workdir)
    overhead = read_overhead(lut, spec.name, measured_table, parse_stat(stat) if stat else None) if use_overhead else None
    stat = stat or (overhead.statistic if overhead else "median")  # default: the calibration's
    table = table_statistic(measured_table, stat)
    p = predict(table, spec.name, schedule, overhead)  # outside the table's range -> LutError before any compiling

    graph = export_graph(path, spec.name, info["kept"], int(info["img_size"]))
    ref_figures = reference_figures(spec, table)
    refs = reference_graphs(spec, workdir, bars)
    with open_session(cfg) if eng.needs_session else contextlib.nullcontext() as session:
        artifacts = _prepare(eng, spec, [graph, *refs.values()], workdir, bars, [schedule], session)
        echo(f"measuring {path.name} end to end on {cfg.name}")
        before = measure_references(eng, session, refs, artifacts)
        samples, _ = eng.measure(session, graph, artifacts[graph.digest])
        after = measure_references(eng, session, refs, artifacts)
    budget = budget_ms if budget_ms is not None else info.get("budget_ms")
    rpath = workdir / "validate" / f"{cfg.name}-exports.jsonl"
    append_record(rpath, before, after, {u: n for u, (n, _) in ref_figures.items()}, samples,
                  onnx=str(path.resolve()), graph=graph.digest, model=spec.name, kept=list(info["kept"]),
                  budget_ms=budget, predicted_ms=round(p.total_ms, 6),
                  engine=eng.name, tuning=eng.tuning_label(), device=cfg.name)
    drift = reference_drift({u: before[u] + after[u] for u in before}, ref_figures, reference_weights(spec, p), stat)
    return DeployedResult(path, spec.name, list(info["kept"]), cfg.name, eng.name, eng.tuning_label(), stat,
                          None if budget is None else float(budget), p.total_ms, overhead is not None,
                          sample_stat(samples, stat), list(samples), drift, rpath)


def format_deployed(r: DeployedResult) -> str:
    q1, q3 = np.percentile(r.samples_ms, [25, 75])
    lines = [f"{r.path.name}: {r.model}, kept {r.kept}, {r.engine} ({r.tuning}) on {r.device}",
             f"  measured   {r.measured_ms:9.3f} ms  ({r.statistic} of {len(r.samples_ms)} samples, IQR {q1:.3f}-{q3:.3f})",
             f"  predicted  {r.predicted_ms:9.3f} ms  (the table, {'with' if r.corrected else 'without'} the overhead "
             f"correction): error {r.predicted_ms / r.measured_ms - 1:+.1%}",
             f"  machine    reference units at {r.drift:.3f}x their figures in the table "
             f"(end to end at the table's machine state: {r.measured_ms / r.drift:.3f} ms)"]
    if r.budget_ms is None:
        lines.append("  budget     none recorded (give --budget)")
    else:
        verdict = (f"OVER by {r.measured_ms / r.budget_ms - 1:.1%}" if r.over_budget
                   else f"met with {1 - r.measured_ms / r.budget_ms:.1%} to spare")
        lines.append(f"  budget     {r.budget_ms:9.3f} ms  {verdict}")
    return "\n".join(lines)
