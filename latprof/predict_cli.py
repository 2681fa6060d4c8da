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
    overhead = None if no_overhead else read_overhead(lut, model, table, parse_stat(stat) if stat else None)
    stat = stat or (overhead.statistic if overhead else "median")
    p = run(table_statistic(table, stat), model, schedule, overhead)
    if stat != "median":
        click.echo(f"(statistic: {stat} of every row's raw samples)")
    click.echo(format_prediction(p, breakdown=not brief))
    dense = model_macs(spec)
    click.echo(f"dense {model}: {dense / 1e9:.3f} GMACs; this schedule {p.macs / dense:.1%} of it")


@click.command()
@click.option("--device", required=True, help="Shipped device name or path to a YAML config.")
@click.option("--model", default=None, help="Model name (see `latprof models`); with --onnx, the export's.")
@click.option("--lut", "lut", default=None, type=click.Path(path_type=Path),
              help="Lookup table; with --onnx, default: the one the model was trained with.")
@click.option("--onnx", "onnx_path", default=None, type=click.Path(path_type=Path),
              help="A trained model from `latprof export`: time it against its budget and the table's prediction "
                   "(exit 1 when over budget).")
@click.option("--budget", default=None, help="With --onnx: the budget to compare with (default: the one it was trained for).")
@click.option("--configs", type=int, default=20, show_default=True, help="Random token schedules to validate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--on-grid", is_flag=True, help="Draw schedules among the kept counts solve and train choose from "
                                             "(blocks at measured token counts: nothing interpolated or transferred).")
@click.option("--calibrate", is_flag=True,
              help="Measure the per-call overhead, fit a scale and a constant and write <table>.<model>.overhead.json.")
@click.option("--alongside", type=click.IntRange(min=0), default=0, help="With --calibrate: also measure, interleaved in the same pass, "
              "the N schedules `validate --configs N` (seed 0) then compares, so the calibration sees the machine "
              "as they do; that run resumes them.")
@click.option("--stat", default=None, help="Sample statistic for table and end to end: median (default), min, q10, q25; "
                                          "with --onnx, default: the table's calibration's.")
@click.option("--no-overhead", is_flag=True, help="Compare with the plain sum of units.")
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Visits per whole model, its samples "
              "spread through the pass (default: the device config's measure.rounds, 3).")
@click.option("--again", is_flag=True, help="Measure every schedule anew, in a new pass, even where the results file "
              "has it (the earlier figures stay, and how well the models repeat them is printed). A pass of "
              "these schedules cut off before its end is finished first.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None,
              help="PNG of predicted vs measured (default <workdir>/validate/<device>-<model>.png).")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="The workdir the table was measured with (shares the tuning database).")
@click.option("--quiet", "-q", is_flag=True)
def validate(device, model, lut, onnx_path, budget, configs, seed, on_grid, calibrate, alongside, stat, no_overhead,
             rounds, again, plot_out, workdir, quiet):
    """Build, compile and measure the whole pruned MODEL for random schedules; compare with the table.
    With --onnx, time one trained, exported model against its budget instead."""
    from latprof.measure.runner import default_workdir
    from latprof.validate import format_validation, validate as run

    wd = Path(workdir or default_workdir())
    if onnx_path is not None:
        _validate_export(device, onnx_path, lut, budget, stat, no_overhead, wd, quiet, model)
        return
    if model is None or lut is None:
        raise UsageError("validate needs --model and --lut", "e.g. --model deit_t --lut luts/local.csv "
                         "(or --onnx FILE for a trained model)")
    if alongside and not calibrate:
        raise UsageError(f"--alongside {alongside} without --calibrate", "add --calibrate (the validation then resumes "
                         "the schedules measured alongside)")
    if alongside and seed == 0:
        raise UsageError("--alongside with --seed 0: the calibration would share the validation's schedules",
                         "calibrate with another seed, e.g. --seed 1")
    out = plot_out or wd / "validate" / f"{Path(device).stem}-{model}{'-calibration' if calibrate else ''}.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        out = None
        click.echo("matplotlib missing: no plot (pip install 'latprof[plot]')", err=True)
    result = run(device, model, lut, configs=configs, seed=seed, workdir=wd, calibrate=calibrate, plot=out,
                 progress=not quiet, echo=click.echo, use_overhead=not no_overhead, stat=stat or "median",
                 on_grid=on_grid, alongside=alongside, rounds=rounds, again=again)
    click.echo(format_validation(result))
    if calibrate and result.overhead is not None:
        from latprof.predict import overhead_path

        click.echo(f"calibration written to {overhead_path(lut, model)} (in-sample figures above; validate with another --seed)")
    click.echo(f"results in {result.results_path}" + (f", plot {result.plot_path}" if result.plot_path else ""))


def _validate_export(device, onnx_path, lut, budget, stat, no_overhead, wd, quiet, model):
    from latprof.deployed import format_deployed, measure_export
    from latprof.train.cli import parse_budget

    r = measure_export(device, onnx_path, lut, None if budget is None else parse_budget(budget), workdir=wd, stat=stat,
                       progress=not quiet, echo=click.echo, use_overhead=not no_overhead, model=model)
    click.echo(format_deployed(r))
    click.echo(f"samples in {r.results_path}")
    if r.over_budget:
        click.get_current_context().exit(1)


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


@click.command()
@click.option("--lut", "lut", required=True, type=click.Path(path_type=Path), help="Lookup table (luts/<device>.csv).")
@click.option("--model", required=True, help="Model name (see `latprof models`).")
@click.option("--budget", required=True, help="Latency budget in milliseconds, e.g. 26ms.")
@click.option("--engine", default=None, help="Rows of this engine, when the table holds several.")
@click.option("--every-count", is_flag=True, help="Consider every kept count, not only the table's measured grid.")
def solve(lut, model, budget, engine, every_count):
    """The token schedule that keeps the most tokens within a latency budget (`latprof train`'s
    keep-ratio solver, exact over the table's grid), with its predicted latency and MACs."""
    from latprof.lut.table import read_lut
    from latprof.models import get_model
    from latprof.predict import _depth, budget_on_sum, calibrated, format_prediction, model_macs, predict as run
    from latprof.train.cli import parse_budget
    from latprof.train.solver import solve_calibrated, solve_staged, solve_table

    spec = get_model(model)
    ms = parse_budget(budget)
    table = read_lut(lut)
    if engine:
        table = table.for_engine(engine)
    table, overhead = calibrated(lut, table, model)
    calls = len(spec.units)
    sum_budget = budget_on_sum(ms, overhead, calls)

    def solver(budget_ms):
        if spec.layout is not None:
            return solve_staged(table, spec, budget_ms, every_count)
        return solve_table(table, model, budget_ms, spec.max_tokens - 1, spec.pruning_locations, _depth(spec), every_count)

    r = solve_calibrated(solver, ms, overhead, calls, model)
    click.echo(f"budget {ms:g} ms" + (f" (a sum of units of {sum_budget:.4g} ms after the overhead correction)" if overhead else "")
               + f": kept {list(r.kept)}, sum of units {r.latency_ms:.4g} ms (fastest on the table {r.fastest_ms:.4g} ms"
               + (f", least pruning {r.dense_ms:.4g} ms)" if r.dense_ms else ")"))
    p = run(table, model, r.schedule, overhead)
    click.echo(format_prediction(p, breakdown=False))
    click.echo(f"dense {model}: {model_macs(spec) / 1e9:.3f} GMACs; this schedule {p.macs / model_macs(spec):.1%} of it")
