"""The `latprof` command line: thin commands over library functions; LatprofError caught once here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from latprof.errors import LatprofError
from latprof.measure.workdir import REBUILDABLE


class Group(click.Group):
    """Turns every LatprofError into one line on stderr and its exit code, with no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LatprofError as exc:
            click.echo(exc.one_line(), err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: every point measured so far is kept; run the same command to resume", err=True)
            ctx.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="latprof")
def main():
    """Per-block latency lookup tables for token-pruned Vision Transformers."""


workdir_option = click.option("--workdir", type=click.Path(path_type=Path), default=None,
                              help="Cache, tuning database and raw samples (default ./latprof-work or $LATPROF_HOME).")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


@main.command()
def models():
    """List the models and their profiling units."""
    from latprof.models import get_model, list_models

    for name in list_models():
        spec = get_model(name)
        click.echo(f"{name:8s} {spec.description}")
        groups: dict[str, list[str]] = {}
        for u in spec.units:
            groups.setdefault(u.shared, []).append(u.name)
        for shared, names in groups.items():
            unit = spec.unit(names[0])
            cost = f"fixed (N={unit.fixed_tokens})" if unit.kind == "fixed" else "f(N)"
            shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} units, one graph)"
            click.echo(f"    {shown:44s} {cost}")
        click.echo(f"    pruning locations (before blocks): {', '.join(map(str, spec.pruning_locations))}")


@main.group(invoke_without_command=True, cls=Group)
@click.pass_context
def devices(ctx):
    """List the shipped device configs (`latprof devices check NAME` connects to one)."""
    if ctx.invoked_subcommand:
        return
    from latprof.devices import list_configs, load_config

    for name in list_configs():
        try:
            cfg = load_config(name)
            click.echo(f"{name:12s} {cfg.transport:8s} {cfg.engine:12s} {cfg.description}")
        except LatprofError as exc:
            click.echo(f"{name:12s} INVALID  {exc.one_line()}")


@devices.command("check")
@click.argument("device")
def devices_check(device):
    """Connect to DEVICE, report what was found, disconnect."""
    from latprof.devices import load_config, open_session

    cfg = load_config(device)
    with open_session(cfg) as session:
        info = session.info()
    click.echo(f"{cfg.name}: reachable over {cfg.transport}")
    for key, value in info.items():
        click.echo(f"  {key:10s} {value if value not in (None, '') else 'not readable'}")


@main.command()
@click.option("--device", required=True, help="Shipped device name or path to a YAML config.")
@click.option("--model", required=True, help="Model name (see `latprof models`).")
@click.option("--tokens", default=None, help="Token counts N: comma-separated counts or ranges, A-B every count, A-B:S every S-th and B "
              "(default: a grid over each unit's range, 1..197 for DeiT).")
@click.option("--engine", type=click.Choice(["tvm", "onnxruntime"]), default=None, help="Default: the config's engine.")
@click.option("--trials", type=int, default=None, help="MetaSchedule trials per task (default: the config's).")
@click.option("--lut", "lut_out", type=click.Path(path_type=Path), default=None,
              help="Also build the table at this path when done.")
@workdir_option
@quiet_option
def measure(device, model, tokens, engine, trials, lut_out, workdir, quiet):
    """Export, tune, compile and time every unit of MODEL on DEVICE; keep every raw sample."""
    from latprof.measure.runner import measure as run

    result = run(device, model, tokens, engine, workdir, trials, progress=not quiet, echo=click.echo)
    click.echo(f"{result.measured} points measured, {result.skipped} already there; raw samples in {result.store}")
    if lut_out:
        _build(result.store, lut_out, result.engine)


@main.command()
@click.option("--device", required=True)
@click.option("--model", required=True)
@click.option("--tokens", default=None)
@click.option("--trials", type=int, default=None, help="MetaSchedule trials per task (default: the config's).")
@workdir_option
@quiet_option
def tune(device, model, tokens, trials, workdir, quiet):
    """Tune MODEL's graphs for DEVICE into the persistent tuning database (and compile them)."""
    from latprof.devices import load_config, open_session
    from latprof.measure.runner import compile_graphs, default_workdir, export_graphs, make_engine, parse_tokens
    from latprof.models import get_model
    from latprof.progress import bar_factory

    cfg = load_config(device)
    spec = get_model(model)
    workdir = Path(workdir or default_workdir())
    bars = bar_factory(not quiet)
    eng = make_engine("tvm", cfg, spec, workdir, trials)
    graphs = export_graphs(spec, parse_tokens(tokens, spec), workdir, bars)
    if cfg.transport == "local":  # this CPU: MetaSchedule's local runner times the candidates
        libs = compile_graphs(eng, spec, graphs, workdir, bars)
    else:  # candidates are timed on the device
        with open_session(cfg) as session:
            libs = compile_graphs(eng, spec, graphs, workdir, bars, session)
    click.echo(f"{len(libs)} graphs tuned ({eng.tuning_label()}) and compiled; database in {eng.tuning_dir}")


@main.command()
@click.option("--only", type=click.Choice(list(REBUILDABLE)), multiple=True,
              help="Clean only this part (repeatable; default: both).")
@click.option("--dry-run", is_flag=True, help="Say what would be freed, delete nothing.")
@workdir_option
def clean(only, dry_run, workdir):
    """Free disk: delete what a workdir can rebuild (exported graphs, compiled libraries).

    Raw samples, tuning databases, tables and validation results are kept."""
    from latprof.measure.runner import default_workdir
    from latprof.measure.workdir import clean as run

    workdir = Path(workdir or default_workdir())
    parts = run(workdir, tuple(only) or tuple(REBUILDABLE), dry_run)
    verb = "would free" if dry_run else "freed"
    for p in parts:
        click.echo(f"{p.name}/: {verb} {p.bytes / 2**20:,.1f} MiB in {p.files} files; {p.rebuilt}")
    total = sum(p.bytes for p in parts)
    click.echo(f"{workdir}: {verb} {total / 2**20:,.1f} MiB in all" if parts else f"{workdir}: nothing to clean")


def _build(store: Path, out: Path, engine: str | None, raw: bool = False):
    from latprof.lut.build import build_and_write

    table = build_and_write(store, out, engine=engine, drift_correction=not raw)
    drift = table.provenance.get("reference_drift")
    corr = table.provenance.get("drift_correction")
    click.echo(f"wrote {out}: {len(table.frame)} rows, {table.frame['model'].nunique()} model(s), engine "
               f"{table.provenance['engine']}, tuning {table.provenance['tuning']}"
               + (f", reference drift {drift:.1%}" if drift is not None else "")
               + (f" (points scaled by {corr['factor_min']:.3f}..{corr['factor_max']:.3f} to one machine state)"
                  if corr else ""))


@main.command("build-lut")
@click.option("--device", required=True, help="Device name whose raw samples to use.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: luts/<device>.csv")
@click.option("--engine", type=click.Choice(["tvm", "onnxruntime"]), default=None)
@click.option("--raw", is_flag=True, help="No drift correction: the samples as measured.")
@workdir_option
def build_lut(device, out, engine, raw, workdir):
    """Turn raw samples into luts/<device>.csv (median, spread, CI, samples, provenance)."""
    from latprof.measure.runner import default_workdir, store_path

    name = Path(device).stem if device.endswith((".yaml", ".yml")) else device
    _build(store_path(Path(workdir or default_workdir()), name), out or Path("luts") / f"{name}.csv", engine, raw)


def _register_optional():
    """Commands of sub-packages, added when their module is present."""
    import importlib

    for module, attr in (("latprof.check.cli", "check"), ("latprof.train.cli", "train"),
                         ("latprof.train.cli", "export"), ("latprof.predict_cli", "predict"),
                         ("latprof.predict_cli", "validate"), ("latprof.predict_cli", "plot"),
                         ("latprof.predict_cli", "solve")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            raise
        cmd = getattr(mod, attr, None)
        if cmd is not None:
            main.add_command(cmd, attr)


_register_optional()

if __name__ == "__main__":
    sys.exit(main())
