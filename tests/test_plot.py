"""Plots: per-unit latency curves of several tables, validation scatter, missing matplotlib."""

import sys

import pytest
from click.testing import CliRunner

from latprof.errors import DependencyError
from latprof.lut.table import write_lut
from latprof.train.synthetic import synthetic_table

PNG = b"\x89PNG\r\n\x1a\n"


def _tables(tmp_path):
    a = synthetic_table(tokens=[17, 50, 99, 197], selectors=True)
    a.provenance["device"] = "dev-a"
    b = synthetic_table(tokens=[17, 99, 197], selectors=True, seed=1, jitter=0.05)
    b.provenance["device"] = "dev-b"
    pa, pb = write_lut(a, tmp_path / "a.csv"), write_lut(b, tmp_path / "b.csv")
    return pa, pb


def test_plot_command_writes_png_for_two_tables(tmp_path):
    from latprof.cli import main

    pa, pb = _tables(tmp_path)
    out = tmp_path / "fig" / "cmp.png"
    res = CliRunner().invoke(main, ["plot", "--lut", str(pa), "--lut", str(pb), "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000  # five panels with curves, not an empty canvas


def test_plot_validation_png(tmp_path):
    from latprof.plot import plot_validation
    from latprof.validate import ConfigResult, ValidationResult

    cfgs = [ConfigResult(i, [100 - i, 80 - i, 50 - i], [], 10.0 + i, 10.1 + i, 10.0 + i * 1.02, 9.9 + i, 10.2 + i,
                         9.8 + i, 10.4 + i) for i in range(5)]
    v = ValidationResult("dev", "deit_t", "onnxruntime", "none", cfgs, None, tmp_path / "r.jsonl")
    assert 0 < v.within(0.05) <= 1
    path = plot_validation(v, tmp_path / "v.png")
    assert path.read_bytes().startswith(PNG)


def test_validation_plot_keeps_its_titles_on_the_canvas(tmp_path, monkeypatch):
    """A long tuning label (a cold run's) once pushed the left panel's title off the figure's edge."""
    import latprof.plot as plot
    from latprof.validate import ConfigResult, ValidationResult

    cfgs = [ConfigResult(i, [595, 159, 2], [], 60.0 + i, 61.0 + i, 59.0 + i, 58.0, 62.0, 59.5 + i, 61.5 + i)
            for i in range(3)]
    v = ValidationResult("fidelity-tvm-cold", "pit_s", "tvm", "metaschedule:16@32+192+704/transfer4/cold", cfgs,
                         None, tmp_path / "r.jsonl")
    titles = []  # (text, its box, the canvas), taken as the figure is saved
    real = plot._save

    def save(fig, plt, out):
        renderer = fig.canvas.get_renderer()
        for t in [t for t in [fig._suptitle, *(ax.title for ax in fig.axes)] if t is not None]:
            titles.append((t.get_text(), t.get_window_extent(renderer), fig.bbox))
        return real(fig, plt, out)

    monkeypatch.setattr(plot, "_save", save)
    plot.plot_validation(v, tmp_path / "v.png")
    assert any("metaschedule:16@32+192+704/transfer4/cold" in text for text, _, _ in titles)
    for text, box, canvas in titles:
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and box.y1 <= canvas.y1, text


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from latprof.cli import main

    pa, _ = _tables(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    from latprof.plot import plot_tables
    from latprof.lut.table import read_lut

    with pytest.raises(DependencyError, match=r"pip install 'latprof\[plot\]'"):
        plot_tables([read_lut(pa)], tmp_path / "x.png")
    res = CliRunner().invoke(main, ["plot", "--lut", str(pa), "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "latprof[plot]" in res.output and not (tmp_path / "x.png").exists()
