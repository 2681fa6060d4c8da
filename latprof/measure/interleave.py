"""Two builds measured in alternation in one session: the robust way to compare on a noisy machine.

A "build" is a latprof workdir (its tuning database and compiled modules): for example the baseline
commit's `latprof-work/` and the candidate's. Round by round, every point is timed with build A, then
build B (the order flips each round), so drift hits both alike.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

from latprof.devices import open_session
from latprof.devices.config import DeviceConfig
from latprof.errors import UsageError
from latprof.measure.engines import needs_session
from latprof.measure.runner import compile_graphs, default_workdir, export_graphs, like_baseline, make_engine
from latprof.measure.samples import SampleStore, point_key
from latprof.models import get_model
from latprof.progress import bar_factory


def remeasure_interleaved(baseline, device: str | DeviceConfig, models: list[str], units: list[str] | None = None,
                          baseline_build: str | Path | None = None, rounds: int = 5, workdir: Path | None = None,
                          progress: bool = True, repeats: int | None = None, number: int | None = None):
    """(fresh baseline table, candidate table): the baseline build's modules and the current ones,
    timed alternately with the baseline's settings, except `repeats` (samples per side, spread over the
    rounds) and `number` (runs per sample) where given: both sides are measured now, alike, so these
    may differ from the table's."""
    from latprof.lut.build import build_lut

    if not baseline_build or not Path(baseline_build).is_dir():
        raise UsageError(f"baseline build '{baseline_build}' is not a directory",
                         "pass --baseline-build DIR: the baseline's latprof workdir (its latprof-work/)")
    cfg, engine, trials = like_baseline(device, baseline)
    prov = baseline.provenance
    measure = {**cfg.measure, **({"number": number} if number is not None else {})}
    per_round = max(1, (repeats or measure["repeats"]) // max(rounds, 1))
    cfg = dataclasses.replace(cfg, measure={**measure, "repeats": per_round})
    builds = {"baseline": Path(baseline_build), "candidate": Path(workdir or default_workdir())}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    stores = {k: SampleStore(builds["candidate"] / "samples" / f"interleave-{k}-{cfg.name}-{stamp}.jsonl") for k in builds}
    bars = bar_factory(progress)
    plan = []  # (build, engine, graph, artifact, wanted rows)
    samples: dict = {}
    # the device is opened first: a remote device's tuning candidates run on it
    with open_session(cfg) if needs_session(engine) else _nullsession() as session:
        for model in models:
            spec = get_model(model)
            frame = baseline.model_frame(model)
            if units:
                frame = frame[frame["unit"].isin(units)]
            tokens = sorted({int(n) for n in frame["tokens"]})
            shared = {spec.unit(u).shared for u in frame["unit"]}
            for build, wd in builds.items():
                eng = make_engine(engine, cfg, spec, wd, trials)
                graphs = [g for g in export_graphs(spec, tokens, wd, bars, shared) if g.tokens in tokens]
                arts = compile_graphs(eng, spec, graphs, wd, bars, session)
                plan += [(build, eng, g, arts[g.digest]) for g in graphs]
        bar = bars(total=rounds * len(plan), desc="interleaved", unit="run")
        for r in range(rounds):
            order = plan if r % 2 == 0 else plan[::-1]
            for build, eng, g, art in order:
                s, err = eng.measure(session, g, art)
                samples.setdefault((build, g.digest), [g, eng, [], err])[2].extend(s)
                bar.update(1)
        bar.close()
    for (build, _), (g, eng, s, err) in samples.items():
        prov_rec = {"device": cfg.name, "engine": eng.name, "tuning": eng.tuning_label(), "target": eng.target_label(),
                    "settings": {**cfg.settings(), "repeats": len(s)}, "emulated": cfg.emulated,
                    "transport": cfg.transport}
        stores[build].append({"key": point_key(graph=g.digest, **prov_rec), "reference": False, "model": g.model,
                              "unit": g.shared, "tokens": g.tokens, "graph": g.digest, "samples_ms": s,
                              "max_abs_err": err, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "info": {}, "tvm": prov.get("tvm_version"), **prov_rec})
    tables = []
    for build in ("baseline", "candidate"):
        t = build_lut(stores[build].path, engine=engine, drift_correction=False)  # alternation is the control
        keep = baseline.frame[["model", "unit", "tokens"]]
        if units:
            keep = keep[keep["unit"].isin(units)]
        t.frame = t.frame.merge(keep, on=["model", "unit", "tokens"]).reset_index(drop=True)
        tables.append(t)
    return tables[0], tables[1]


class _nullsession:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None
