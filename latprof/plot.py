"""Figures: latency vs token count per unit for one or more tables, and validation scatter plots.

matplotlib is optional (`pip install 'latprof[plot]'`), imported here only, with the Agg backend (no
display needed).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from latprof.errors import DependencyError, UsageError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise DependencyError("plotting needs matplotlib, which is not installed", "pip install 'latprof[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(table, fallback: str) -> str:
    prov = table.provenance or {}
    dev = prov.get("device") or Path(table.path or fallback).stem
    engine = table.engine if table.frame["engine"].nunique() == 1 else "mixed"
    tuning = prov.get("tuning") or str(table.frame["tuning"].iloc[0])
    return f"{dev} / {engine} ({tuning})"


def plot_tables(tables: list, out: str | Path, model: str | None = None, labels: list[str] | None = None) -> Path:
    """One panel per unit kind (block, selector, merge, head, fixed units), latency vs N, one line per
    table with its interquartile band, so two devices or engines compare at a glance."""
    if not tables:
        raise UsageError("no table to plot", "pass --lut PATH (repeatable)")
    plt = _pyplot()
    model = model or tables[0].models[0]
    labels = labels or [_label(t, f"table{i}") for i, t in enumerate(tables)]
    panels: list[str] = []
    for t in tables:
        for unit in t.units(model):
            base = unit.split(".")[0]
            if base not in panels:
                panels.append(base)
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, base in zip(axes.flat, panels):
        for ti, (t, label) in enumerate(zip(tables, labels)):
            color = colors[ti % len(colors)]
            units = [u for u in t.units(model) if u.split(".")[0] == base]
            # draw each distinct curve once; members of one shared graph coincide
            seen = set()
            for j, unit in enumerate(units):
                tokens, med, q1, q3 = t.curve(model, unit)
                key = (tuple(tokens), tuple(med))
                if key in seen:
                    continue
                seen.add(key)
                style = "-" if j == 0 else "--"
                if t.kind(model, unit) == "fixed":
                    ax.errorbar(tokens, med, yerr=[med - q1, q3 - med], fmt="o", color=color,
                                label=label if j == 0 else None, capsize=3)
                else:
                    ax.plot(tokens, med, style, marker=".", color=color,
                            label=(label if j == 0 else f"{label}: {unit}"))
                    ax.fill_between(tokens, q1, q3, color=color, alpha=0.15)
        ax.set_title(f"{model}: {base}" + (" (all units of the kind)" if base in ("blocks", "selector", "merge") else ""))
        ax.set_xlabel("tokens N")
        ax.set_ylabel("latency (ms, median, IQR band)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, plt, out)


def plot_validation(result, out: str | Path) -> Path:
    """Predicted vs measured (with the ±5% band) and residuals vs measured."""
    plt = _pyplot()
    pred = [c.predicted_ms for c in result.configs]
    meas = [c.measured_ms for c in result.configs]
    raw = [c.sum_ms for c in result.configs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    lo, hi = min(pred + meas + raw) * 0.9, max(pred + meas + raw) * 1.1
    a.plot([lo, hi], [lo, hi], "k-", lw=1, label="y = x")
    a.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="green", alpha=0.15, label="±5%")
    xerr = [[max(c.measured_ms - c.measured_q1_ms, 0) for c in result.configs],
            [max(c.measured_q3_ms - c.measured_ms, 0) for c in result.configs]]
    yerr = [[max(c.predicted_ms - c.ci_low_ms, 0) for c in result.configs], [max(c.ci_high_ms - c.predicted_ms, 0) for c in result.configs]]
    a.errorbar(meas, pred, xerr=xerr, yerr=yerr, fmt="o", ms=4, capsize=2, label="prediction")
    if result.overhead is not None:
        a.plot(meas, raw, "x", color="grey", label="plain sum of units")
    stat = getattr(result, "statistic", "median")
    a.set_xlabel(f"measured end to end (ms, {stat}; bars: IQR)")
    a.set_ylabel("predicted (ms, 95% CI)")
    # the long description spans the figure: over one panel it ran off the canvas's left edge
    fig.suptitle(textwrap.fill(f"{result.model} on {result.device}, {result.engine} ({result.tuning}), "
                               f"statistic {stat}", 130), fontsize=10)
    a.set_title("predicted vs measured end to end", fontsize=10)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.axhline(0, color="k", lw=1)
    b.axhspan(-5, 5, color="green", alpha=0.15)
    b.plot(meas, [(p / m - 1) * 100 for p, m in zip(pred, meas)], "o", label="prediction")
    if result.overhead is not None:
        b.plot(meas, [(r / m - 1) * 100 for r, m in zip(raw, meas)], "x", color="grey", label="plain sum")
    b.set_xlabel("measured (ms)")
    b.set_ylabel("predicted / measured - 1 (%)")
    b.set_title(f"{result.within(0.05):.0%} within ±5%, {result.within(0.10):.0%} within ±10%", fontsize=10)
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, out)


def _save(fig, plt, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
