"""The tables shipped in luts/ load with today's schema and registry, carry their calibration, and predict
for their model: a change to the units or the table format that strands them fails here."""

from pathlib import Path

import pytest

from latprof.lut.table import read_lut
from latprof.models import get_model
from latprof.predict import model_macs, parse_keep, predict, read_overhead, table_statistic

LUTS = sorted((Path(__file__).resolve().parents[1] / "luts").glob("*.csv"))


def test_every_registered_family_has_a_shipped_table():
    models = {m for p in LUTS for m in read_lut(p).models}
    assert {"deit_t", "pit_xs", "pit_s", "swin_t", "swin_s"} <= models


@pytest.mark.parametrize("path", LUTS, ids=[p.stem for p in LUTS])
def test_a_shipped_table_predicts_its_model(path):
    table = read_lut(path)
    prov = table.provenance
    assert prov["engine"] == "tvm" and prov["tuning"].startswith("metaschedule:")
    assert {"measured_from", "measured_to", "device_info", "settings", "reference_drift"} <= set(prov)
    for model in table.models:
        spec = get_model(model)
        overhead = read_overhead(path, model, table)  # checked against the table's engine and tuning
        assert overhead is not None and overhead.model == model and overhead.n_configs >= 2
        assert 1.0 < overhead.scale < 1.5  # a whole model costs more than its units, never less
        t = table_statistic(table, overhead.statistic)
        n = len(spec.pruning_locations)
        light = parse_keep(",".join("0.9" for _ in range(n)), spec)
        heavy = parse_keep(",".join(f"{0.6 ** (i + 1):.3f}" for i in range(n)), spec)
        a, b = predict(t, model, light, overhead), predict(t, model, heavy, overhead)
        assert b.total_ms < a.total_ms and b.macs < a.macs < model_macs(spec)
        assert a.sum_ms < a.total_ms < overhead.scale * a.sum_ms  # the correction is applied, per-call cost off
