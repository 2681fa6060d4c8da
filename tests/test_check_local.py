"""A real regression check on `local`: measure a baseline, re-measure and check against it (passes),
then check a deliberately slowed candidate (measured while busy processes compete for every core: fails)."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from latprof.cli import main
from latprof.lut.build import build_and_write
from latprof.measure.runner import measure, store_path
from tests.conftest import write_config

SETTINGS = {"warmup": 3, "repeats": 25, "number": 0, "min_repeat_ms": 10, "reference_every": 0}


def test_check_against_fresh_baseline_and_slowed_candidate(workdir, tmp_path):
    # one thread: on a shared 2-vCPU CI host a 2-thread block waits for whichever core a neighbour holds
    # (a re-measure read +33% there once, seconds after its baseline)
    base_cfg = write_config(tmp_path / "base.yaml", name="chk", engine="onnxruntime", threads=1, measure=SETTINGS)
    measure(str(base_cfg), "deit_s", [197], units=["blocks.0"], progress=False)
    build_and_write(store_path(workdir, "chk"), tmp_path / "base.csv")

    # nothing changed: re-measured like the baseline, within a tolerance above this machine's drift
    out = CliRunner().invoke(main, ["check", "--device", str(base_cfg), "--model", "deit_s", "--baseline",
                                    str(tmp_path / "base.csv"), "--units", "blocks.0", "--tolerance", "median:50%"])
    assert out.exit_code == 0, out.output
    assert "blocks.0" in out.output

    # a deliberately slowed candidate: the same block while busy loops take every core (measured here:
    # +109%, ratio CI 1.59..2.76, so a 25% tolerance catches it with room)
    slow_store = tmp_path / "slow.jsonl"
    # each hog says when it is spinning and the measurement waits for all of them: it is short, and in CI
    # it once read a median only 2% over the baseline, most likely done before the hogs had started
    hogs = [subprocess.Popen([sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
                             stdout=subprocess.PIPE, text=True) for _ in range(2 * (os.cpu_count() or 2))]
    try:
        assert all(h.stdout.readline().strip() == "spinning" for h in hogs)
        measure(str(base_cfg), "deit_s", [197], units=["blocks.0"], progress=False, store=slow_store)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    build_and_write(slow_store, tmp_path / "slow.csv")
    out = CliRunner().invoke(main, ["check", "--device", str(base_cfg), "--model", "deit_s", "--baseline",
                                    str(tmp_path / "base.csv"), "--candidate", str(tmp_path / "slow.csv"),
                                    "--tolerance", "median:25%", "--format", "json"])
    assert out.exit_code == 1, out.output
    assert "regression" in out.output


def test_interleaved_check_of_two_builds(workdir, tmp_path):
    """--interleave: the baseline build's modules and the current ones, timed alternately in one job."""
    cfg = write_config(tmp_path / "base.yaml", name="chk", engine="onnxruntime", threads=1, measure=SETTINGS)
    measure(str(cfg), "deit_t", [50], units=["blocks.0"], progress=False)
    build_and_write(store_path(workdir, "chk"), tmp_path / "base.csv")
    out = CliRunner().invoke(main, ["check", "--device", str(cfg), "--model", "deit_t", "--baseline",
                                    str(tmp_path / "base.csv"), "--units", "blocks.0", "--interleave",
                                    "--baseline-build", str(workdir), "--tolerance", "median:25%", "--format", "json",
                                    "--output", str(tmp_path / "report.json")])
    assert out.exit_code == 0, out.output
    stores = sorted(p.name.split("-")[1] for p in (workdir / "samples").glob("interleave-*.jsonl"))
    assert stores == ["baseline", "candidate"]
    # the two alternated series are compared pair by pair: --repeats 40 samples per side (the default),
    # one run each (--number 1), not the table's 25 samples of >= 10 ms
    point, = json.loads((tmp_path / "report.json").read_text())["points"]
    assert point["method"] == "sign-test" and point["n_baseline"] == point["n_candidate"] == 40
