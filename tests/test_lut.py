"""The table file: round trip, validation of malformed tables, interpolation."""

import numpy as np
import pandas as pd
import pytest

from latprof.errors import LutError
from latprof.lut.build import median_ci
from latprof.lut.table import COLUMNS, LutTable, read_lut, write_lut


def make_table(points=((1, 1.0), (50, 2.0), (197, 5.0))) -> LutTable:
    rows = [{"model": "deit_t", "unit": "patch_embed", "kind": "fixed", "position": 0, "tokens": 197,
             "median_ms": 0.7, "q1_ms": 0.6, "q3_ms": 0.8, "ci_low_ms": 0.6, "ci_high_ms": 0.8, "n_samples": 3,
             "engine": "tvm", "tuning": "untuned", "graph": "g0", "samples_ms": "0.6 0.7 0.8"}]
    for n, ms in points:
        rows.append({"model": "deit_t", "unit": "blocks.0", "kind": "tokens", "position": 1, "tokens": n,
                     "median_ms": ms, "q1_ms": ms * 0.9, "q3_ms": ms * 1.1, "ci_low_ms": ms * 0.9,
                     "ci_high_ms": ms * 1.1, "n_samples": 3, "engine": "tvm", "tuning": "untuned", "graph": f"g{n}",
                     "samples_ms": f"{ms*0.9} {ms} {ms*1.1}"})
    return LutTable(pd.DataFrame(rows, columns=COLUMNS), {"device": "x"})


def test_round_trip_and_queries(tmp_path):
    path = write_lut(make_table(), tmp_path / "t.csv")
    t = read_lut(path)
    assert t.provenance == {"device": "x"}
    assert t.units("deit_t") == ["patch_embed", "blocks.0"]
    assert t.latency_ms("deit_t", "blocks.0", 50) == pytest.approx(2.0)
    # linear between measured counts: never overshoots its neighbours
    assert t.latency_ms("deit_t", "blocks.0", 123.5) == pytest.approx(3.5)
    assert t.latency_ms("deit_t", "patch_embed", 10) == pytest.approx(0.7)
    assert list(t.samples("deit_t", "blocks.0", 50)) == pytest.approx([1.8, 2.0, 2.2])


def test_outside_range_is_an_error(tmp_path):
    t = read_lut(write_lut(make_table(((10, 1.0), (100, 2.0))), tmp_path / "t.csv"))
    with pytest.raises(LutError, match="outside the measured range 10..100"):
        t.latency_ms("deit_t", "blocks.0", 150)
    with pytest.raises(LutError, match="no unit 'blocks.7'"):
        t.latency_ms("deit_t", "blocks.7", 50)


@pytest.mark.parametrize("mutate, message", [
    (lambda text: text.replace("# latprof-lut schema=1", "# latprof-lut schema=9"), "schema 9"),
    (lambda text: text.replace("# latprof-lut schema=1\n", ""), "not a latprof table"),
    (lambda text: text.replace(",median_ms,", ",median,"), "missing columns"),
    (lambda text: text.replace("fixed", "weird"), "unknown kind"),
    (lambda text: text.replace("deit_t,blocks.0,tokens,1,50,2,", "deit_t,blocks.0,tokens,1,50,abc,"), "non-numeric"),
    (lambda text: text + text.splitlines()[-1] + "\n", "duplicate row"),
])
def test_malformed_tables_are_refused(tmp_path, mutate, message):
    path = write_lut(make_table(), tmp_path / "t.csv")
    path.write_text(mutate(path.read_text()))
    with pytest.raises(LutError, match=message):
        read_lut(path)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = write_lut(make_table(), tmp_path / "t.csv")
    before = path.read_text()
    bad = make_table()
    bad.frame.loc[1, "median_ms"] = -1.0
    with pytest.raises(LutError):
        write_lut(bad, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_median_ci_covers_the_median():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):
        s = rng.lognormal(0, 0.3, size=25)
        lo, hi = median_ci(s)
        hits += lo <= 1.0 <= hi  # true median of lognormal(0, .) is 1
    assert 0.92 <= hits / 400 <= 0.995


def _sample(time: str, tokens: int, ms: float, unit: str = "block", reference: bool = False) -> dict:
    return {"device": "d", "engine": "tvm", "target": "t", "tuning": "untuned", "settings": {"threads": 1},
            "model": "deit_t", "unit": unit, "tokens": tokens, "graph": f"g{tokens}", "reference": reference,
            "time": f"2026-11-23T21:{time}+00:00", "samples_ms": [ms * 0.99, ms, ms * 1.01], "info": {}}


def test_build_lut_corrects_points_by_the_references_around_them(tmp_path):
    """Points measured while the machine was slow (its reference unit slower around them) are scaled to
    the run's median reference; --raw keeps them as measured. Here the reference ran 3.0 ms for the
    first points and 4.0 ms for the later ones (two runs, minutes apart, as seen on this host)."""
    from latprof.lut.build import build_lut
    from latprof.measure.samples import SampleStore

    store = SampleStore(tmp_path / "s.jsonl")
    for rec in [_sample("00:00", 197, 3.0, reference=True), _sample("00:01", 49, 1.0), _sample("00:02", 197, 3.0),
                _sample("00:03", 197, 3.0, reference=True),
                _sample("10:00", 197, 4.0, reference=True), _sample("10:01", 97, 8.0 / 3.0),
                _sample("10:02", 197, 4.0, reference=True)]:
        store.append(rec)

    def row(table, n):
        f = table.frame
        return float(f[(f["unit"] == "blocks.0") & (f["tokens"] == n)]["median_ms"].iloc[0])

    fixed, raw = build_lut(store.path), build_lut(store.path, drift_correction=False)
    assert row(raw, 49) == pytest.approx(1.0) and row(raw, 97) == pytest.approx(8 / 3)
    # the median reference is 3.5 ms: the fast stretch is scaled up by 3.5/3, the slow one down by 3.5/4
    assert row(fixed, 49) == pytest.approx(3.5 / 3.0)
    assert row(fixed, 97) == pytest.approx(8 / 3 * 3.5 / 4.0)
    assert row(fixed, 97) / row(fixed, 49) == pytest.approx(2.0)
    assert fixed.provenance["drift_correction"] == {"factor_min": 0.875, "factor_max": pytest.approx(1.1667, abs=1e-4)}
    assert raw.provenance["drift_correction"] is None
