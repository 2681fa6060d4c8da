"""Click commands `predict`, `validate`, `plot` (registered by latprof.cli when this module exists):
thin layers over latprof.predict, latprof.validate and latprof.plot."""

from __future__ import annotations

from pathlib import Path

import click

from latprof.errors import UsageError


@click.command()
@click.option("--lut", "lut", required=True, type=click.Path(path_type=Path), help="Lookup table (luts/<device>.csv).")
@click.option("--model", required=True, help="Model name (see `latprof models`).")
@click.option("--keep", default=None, help="Cumulative keep ratios per pruning location, e.g. 0.7,0.49,0.343.")
@click.option("--tokens", default=None, help="Explicit token count N per block (class and package tokens included).")
@click.option("--engine", default=None, help="Rows of this engine, when the table holds several.")
@click.option("--no-overhead", is_flag=True, help="Ignore the table's overhead sidecar (plain sum of units).")
@click.option("--brief", is_flag=True, help="Only the total, no per-unit breakdown.")
@click.option("--stat", default=None, help="Sample statistic: median (default, or the calibration's), min, q10, q25.")
def predict(lut, model, keep, tokens, engine, no_overhead, brief, stat):
    """Predict MODEL's latency for a token schedule from a table, with per-unit breakdown and MACs."""
    from latprof.lut.table import read_lut
    from latprof.models import get_model
    from latprof.predict import (format_prediction, model_macs, parse_keep, parse_stat, parse_tokens, predict as run,
                                 read_overhead, table_statistic)

    if (keep is None) == (tokens is None):
        raise UsageError("give exactly one of --keep and --tokens", "e.g. --keep 0.7,0.49,0.343")
    spec = get_model(model)
    schedule = parse_keep(keep, spec) if keep is not None else parse_tokens(tokens, spec)
    table = read_lut(lut)
    if engine:
        table = table.for_engine(engine)
    overhead = None if no_overhead else read_overhead(lut, table, parse_stat(stat) if stat else None)
    stat = stat or (overhead.statistic if overhead else "median")
    p = run(table_statistic(table, stat), model, schedule, overhead)
    if stat != "median":
        click.echo(f"(statistic: {stat} of every row's raw samples)")
    click.echo(format_prediction(p, breakdown=not brief))
    dense = model_macs(spec)
    click.echo(f"dense {model}: {dense / 1e9:.3f} GMACs; this schedule {p.macs / dense:.1%} of it")


@click.command()
@click.option("--device", required=True, help="Shipped device name or path to a YAML config.")
@click.option("--model", required=True)
@click.option("--lut", "lut", required=True, type=click.Path(path_type=Path))
@click.option("--configs", type=int, default=20, show_default=True, help="Random token schedules to validate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calibrate", is_flag=True,
              help="Measure the per-call overhead, fit the scale and write <table>.overhead.json.")
@click.option("--stat", default="median", show_default=True, help="Sample statistic for table and end to end: median, min, q10, q25.")
@click.option("--no-overhead", is_flag=True, help="Compare with the plain sum of units.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None,
              help="PNG of predicted vs measured (default <workdir>/validate/<device>-<model>.png).")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="The workdir the table was measured with (shares the tuning database).")
@click.option("--quiet", "-q", is_flag=True)
def validate(device, model, lut, configs, seed, calibrate, stat, no_overhead, plot_out, workdir, quiet):
    """Build, compile and measure the whole pruned MODEL for random schedules; compare with the table."""
    from latprof.measure.runner import default_workdir
    from latprof.validate import format_validation, validate as run

    wd = Path(workdir or default_workdir())
    out = plot_out or wd / "validate" / f"{Path(device).stem}-{model}{'-calibration' if calibrate else ''}.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        out = None
        click.echo("matplotlib missing: no plot (pip install 'latprof[plot]')", err=True)
    result = run(device, model, lut, configs=configs, seed=seed, workdir=wd, calibrate=calibrate, plot=out,
                 progress=not quiet, echo=click.echo, use_overhead=not no_overhead, stat=stat)
    click.echo(format_validation(result))
    if calibrate and result.overhead is not None:
        from latprof.predict import overhead_path

        click.echo(f"calibration written to {overhead_path(lut)} (in-sample figures above; validate with another --seed)")
    click.echo(f"results in {result.results_path}" + (f", plot {result.plot_path}" if result.plot_path else ""))


@click.command()
@click.option("--lut", "luts", required=True, multiple=True, type=click.Path(path_type=Path),
              help="A table; repeat to compare devices or engines.")
@click.option("--model", default=None, help="Default: the first table's first model.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="PNG to write.")
def plot(luts, model, out):
    """Latency vs token count per unit, one line per table."""
    from latprof.lut.table import read_lut
    from latprof.plot import plot_tables

    path = plot_tables([read_lut(p) for p in luts], out, model)
    click.echo(f"wrote {path}")
