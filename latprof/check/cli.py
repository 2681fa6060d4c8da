"""`latprof check`: fail CI when a change makes a model slower on a device, and only then.

A thin layer over :func:`latprof.check.run.run_check`; the `latprof` group registers :data:`check`.
Exit codes: 0 no regression, 1 regression (or noisy with --strict), 2 usage or setup error.
"""

from __future__ import annotations

import sys

import click

from latprof.errors import LatprofError, UsageError

# benchmarks/regress.py (docs/ci.md): interleaved and paired, 3% catches 90% of 5% slowdowns with no false
# alarm in 300 runs; measured at different times, 3% raises false alarms from the machine's drift alone
SEQUENTIAL_TOLERANCE = "median:5%"
INTERLEAVED_TOLERANCE = "median:3%"


@click.command("check")
@click.option("--device", help="Device config name (must match the baseline's device).")
@click.option("--model", "models", multiple=True, help="Model(s) to check; default: every model of the baseline.")
@click.option("--baseline", required=True, type=click.Path(dir_okay=False), help="Baseline table, e.g. luts/s20.csv.")
@click.option("--candidate", type=click.Path(dir_okay=False),
              help="Compare with this existing table instead of measuring now.")
@click.option("--tolerance", default=None,
              help="How much slower is allowed, e.g. median:5%, mean:3%, median:0.2ms. Default: median:5%, or "
                   "median:3% with --interleave (drift between runs is then out of the comparison, and a "
                   "tolerance below 5% is what catches 5% slowdowns).")
@click.option("--alpha", default=0.01, show_default=True, type=float,
              help="Family-wise false-alarm level of the significance test over all compared points.")
@click.option("--units", multiple=True, help="Units to check (comma-separated or repeated); default: all.")
@click.option("--tokens", help="Token counts to check, comma-separated; default: all of the baseline's.")
@click.option("--interleave", is_flag=True,
              help="Re-measure the baseline build too, alternating with the candidate (needs --baseline-build).")
@click.option("--baseline-build", type=click.Path(), help="Compiled modules of the baseline (for --interleave).")
@click.option("--rounds", default=10, show_default=True, type=int, help="Alternation rounds for --interleave; each round takes repeats/rounds samples per side, and "
                   "samples taken in the same round are compared pair by pair.")
@click.option("--repeats", type=click.IntRange(min=2), default=40, show_default=True,
              help="With --interleave: samples per build and point, spread over the rounds.")
@click.option("--number", type=click.IntRange(min=0), default=1, show_default=True,
              help="With --interleave: runs averaged into one sample (0: the table's own setting). Short samples "
                   "let the median drop the ones another process stalled; long averages keep every stall.")
@click.option("--strict", is_flag=True, help="Fail on noisy points too.")
@click.option("--format", "fmt", default="terminal", show_default=True,
              type=click.Choice(["terminal", "markdown", "junit", "json"]))
@click.option("--output", type=click.Path(dir_okay=False), help="Write the report here (default: stdout).")
@click.option("--save-candidate", type=click.Path(dir_okay=False), help="Write the freshly measured table here.")
def check(device, models, baseline, candidate, tolerance, alpha, units, tokens, interleave, baseline_build,
          rounds, repeats, number, strict, fmt, output, save_candidate):
    """Re-measure and compare with a baseline table; exit 1 on a significant regression beyond the tolerance."""
    try:
        code = _check(device, models, baseline, candidate, tolerance, alpha, units, tokens, interleave,
                      baseline_build, rounds, strict, fmt, output, save_candidate, repeats, number)
    except LatprofError as exc:
        click.echo(exc.one_line(), err=True)
        sys.exit(exc.exit_code)
    sys.exit(code)


def _check(device, models, baseline_path, candidate_path, tolerance, alpha, units, tokens, interleave,
           baseline_build, rounds, strict, fmt, output, save_candidate, repeats=40, number=1) -> int:
    from latprof.check import report, stats
    from latprof.check.compat import check_device
    from latprof.check.run import _split, run_check
    from latprof.lut.table import read_lut, write_lut

    if tolerance is None:
        tolerance = INTERLEAVED_TOLERANCE if interleave else SEQUENTIAL_TOLERANCE
    tol = stats.parse_tolerance(tolerance)  # fail on a bad expression before measuring anything
    token_list = _tokens(tokens)
    base = read_lut(baseline_path)
    check_device(base, device)
    model_list, unit_list = _split(list(models)), _split(list(units))
    if candidate_path and interleave:
        raise UsageError("--candidate and --interleave exclude each other",
                         "--candidate compares two existing tables; --interleave measures both builds now")
    if candidate_path:
        cand = read_lut(candidate_path)
    else:
        if not device or not model_list:
            raise UsageError("measuring a candidate needs --device and --model",
                             "add --device NAME --model NAME, or compare an existing table with --candidate FILE")
        base, cand = _measure(base, device, model_list, unit_list, interleave, baseline_build, rounds, repeats,
                              number)
        if save_candidate:
            write_lut(cand, save_candidate)
    result = run_check(base, cand, tol, alpha, units=unit_list or None, models=model_list or None,
                       tokens=token_list, strict=strict, paired=bool(interleave) and not candidate_path)
    text = report.render(result, fmt)
    if output:
        from pathlib import Path

        from latprof.lut.table import atomic_write_text

        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        click.echo(result.summary(), err=fmt != "terminal")
    else:
        click.echo(text, nl=False)
    return result.exit_code


def _tokens(text):
    if not text:
        return None
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"bad --tokens '{text}'", "give comma-separated integers, e.g. --tokens 50,100,197") from None


def _measure(base, device, models, units, interleave, baseline_build, rounds, repeats=None, number=None):
    """Measure the candidate like the baseline was measured; with --interleave, both builds alternately.
    Returns (baseline table to compare against, candidate table)."""
    try:
        from latprof.measure import runner
    except ImportError as exc:
        raise UsageError(f"measurement is not available in this installation ({exc})",
                         "compare an existing table with --candidate FILE") from None
    if interleave:
        if not baseline_build:
            raise UsageError("--interleave needs the baseline's compiled build",
                             "pass --baseline-build DIR (the baseline commit's build), or drop --interleave")
        from latprof.measure.interleave import remeasure_interleaved

        fresh_base, cand = remeasure_interleaved(base, device, models, units or None, baseline_build=baseline_build,
                                                 rounds=rounds, repeats=repeats, number=number or None)
        return fresh_base, cand
    fn = getattr(runner, "remeasure_like", None)
    if fn is None:
        raise UsageError("this latprof cannot re-measure a table yet",
                         "compare an existing table with --candidate FILE")
    tables = [fn(base, device, model, units or None) for model in models]
    if len(tables) == 1:
        return base, tables[0]
    import pandas as pd

    from latprof.lut.table import LutTable

    return base, LutTable(pd.concat([t.frame for t in tables], ignore_index=True), tables[0].provenance)
