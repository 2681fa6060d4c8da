import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from latprof.errors import UsageError
from latprof.lut.table import write_lut
from latprof.cli import main
from latprof.train.cli import export, parse_budget, train
from latprof.train.synthetic import synthetic_table

TINY = ["--model", "deit_t", "--img-size", "32", "--locations", "1,2,3", "--workers", "0", "--no-progress",
        "--model-kwargs", json.dumps(dict(embed_dim=32, depth=4, num_heads=2, patch_size=8))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
            d = root / "data" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(count):
                img = (rng.random((32, 32, 3)) * 50).astype(np.uint8) + np.array(colour, dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    write_lut(synthetic_table("deit_t", depth=4, patches=16, selectors=True), root / "lut.csv")
    return root


def base_args(w, out, budget="0.2ms"):
    return ["--lut", str(w / "lut.csv"), "--budget", budget, "--data", str(w / "data"), "--out", str(out),
            "--batch-size", "8", *TINY]


def test_parse_budget():
    assert parse_budget("26ms") == 26.0 and parse_budget("26") == 26.0 and parse_budget("2.5 ms") == 2.5
    for bad in ("fast", "-3", "0ms"):
        with pytest.raises(UsageError):
            parse_budget(bad)


def test_train_resume_export(workdir, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(train, base_args(workdir, out) + ["--random-init", "--epochs", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "kept patches" in res.output
    first = torch.load(out / "last.pt", weights_only=True)
    assert first["epoch"] == 1 and len(first["history"]) == 1
    sched = json.loads((out / "schedule.json").read_text())
    assert sched["predicted_ms"] <= 0.2 and sched["kept"] == sorted(sched["kept"], reverse=True)

    # the same --out without --resume is refused; with --resume it continues to epoch 2
    res = runner.invoke(train, base_args(workdir, out) + ["--random-init", "--epochs", "2"])
    assert res.exit_code != 0 and "--resume" in str(res.exception)
    res = runner.invoke(train, base_args(workdir, out) + ["--random-init", "--epochs", "2", "--resume"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    second = torch.load(out / "last.pt", weights_only=True)
    assert second["epoch"] == 2 and len(second["history"]) == 2
    assert second["history"][0] == first["history"][0]
    assert second["scheduler"]["last_epoch"] == 2 * first["scheduler"]["last_epoch"]
    changed = [k for k in first["model"] if not torch.equal(first["model"][k], second["model"][k])]
    assert changed  # training went on from the loaded state
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    onnx_path = tmp_path / "m.onnx"
    res = runner.invoke(export, ["--checkpoint", str(out / "last.pt"), "--out", str(onnx_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert onnx_path.stat().st_size > 10_000
    assert "onnxruntime max |diff|" in res.output
    # a structure the registry's tables do not describe cannot be timed against one
    res = runner.invoke(main, ["validate", "--device", "local", "--onnx", str(onnx_path), "--lut", str(workdir / "lut.csv")])
    assert res.exit_code == 2 and "trained with --model-kwargs" in res.output, res.output


def test_bf16_precision_trains_and_records_it(workdir, tmp_path):
    out = tmp_path / "bf16"
    res = CliRunner().invoke(train, base_args(workdir, out) + ["--random-init", "--epochs", "1", "--precision", "bf16",
                                                               "--max-steps", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["config"]["run"]["precision"] == "bf16"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())


def test_checkpoint_and_teacher_from_timm_state_dict(workdir, tmp_path):
    from latprof.train.trainer import create_backbone

    vit = create_backbone("deit_tiny_patch16_224", 1000, 32, dict(embed_dim=32, depth=4, num_heads=2, patch_size=8))
    torch.save({"model": vit.state_dict()}, tmp_path / "dense.pth")
    out = tmp_path / "run"
    res = CliRunner().invoke(train, base_args(workdir, out) + [
        "--checkpoint", str(tmp_path / "dense.pth"), "--teacher", str(tmp_path / "dense.pth"),
        "--epochs", "1", "--max-steps", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "head re-initialised" in res.output  # 1000 classes in the file, 2 in the data
    ckpt = torch.load(out / "last.pt", weights_only=True)
    # the loaded backbone weights arrived (changed only by two small steps)
    diff = (ckpt["model"]["vit.blocks.0.attn.qkv.weight"] - vit.state_dict()["blocks.0.attn.qkv.weight"]).abs().max()
    assert diff < 0.05


def test_a_calibrated_tables_budget_is_on_the_corrected_prediction(workdir, tmp_path):
    """With an overhead sidecar, train budgets what `predict` and `solve` say (scale x the sum of units),
    not the plain sum: otherwise the trained model misses its budget by the whole overhead."""
    from latprof.lut.table import read_lut
    from latprof.models import get_model
    from latprof.predict import Overhead, write_overhead

    lut = tmp_path / "cal.csv"
    table = synthetic_table("deit_t", depth=4, patches=16, selectors=True)
    write_lut(table, lut)
    t = read_lut(lut)
    write_overhead(lut, Overhead(per_call_ms=0.001, scale=1.5, model="deit_t", engine=t.engine, tuning=str(t.frame["tuning"].iloc[0])))
    calls = len(get_model("deit_t").units)
    def args(out, budget):
        a = base_args(workdir, out, budget=budget) + ["--random-init", "--epochs", "1", "--max-steps", "1"]
        a[a.index("--lut") + 1] = str(lut)
        return a

    res = CliRunner().invoke(train, args(tmp_path / "r", "0.3ms"), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    sched = json.loads((tmp_path / "r" / "schedule.json").read_text())
    assert sched["budget_on_sum_ms"] == pytest.approx(0.3 / 1.5 + (calls - 1) * 0.001)
    assert sched["sum_ms"] <= sched["budget_on_sum_ms"]
    assert sched["predicted_ms"] == pytest.approx(1.5 * (sched["sum_ms"] - (calls - 1) * 0.001)) and sched["predicted_ms"] <= 0.3
    (record,) = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert record["predicted_ms"] == pytest.approx(sched["predicted_ms"])
    # the plain sum's fastest schedule would pass; corrected, it does not
    res = CliRunner().invoke(train, args(tmp_path / "x", f"{sched['fastest_ms'] * 1.01}ms"))
    assert isinstance(res.exception, UsageError) and "with the overhead correction" in str(res.exception), res.output


@pytest.mark.parametrize("extra, message", [
    ([], "--random-init"),                                   # no checkpoint, no flag
    (["--random-init", "--budget", "0.01"], "fastest"),     # infeasible budget
    (["--random-init", "--data", "/nonexistent"], "does not exist"),
    (["--checkpoint", "/nonexistent.pth"], "does not exist"),
])
def test_bad_inputs_are_one_line_errors(workdir, tmp_path, extra, message):
    res = CliRunner().invoke(train, base_args(workdir, tmp_path / "r") + ["--epochs", "1"] + extra)
    assert res.exit_code != 0
    assert isinstance(res.exception, UsageError), res.exception
    assert message in str(res.exception)


def test_python_m_entry_point(workdir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "latprof.train", "--lut", str(workdir / "lut.csv"),
                           "--budget", "0.001", "--data", str(workdir / "data"), "--out", str(tmp_path / "r"),
                           "--random-init", *TINY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: budget") and "fix:" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_selector_and_merge_units():
    from latprof.train.units import selector_and_merge_modules

    units = selector_and_merge_modules("deit_t")
    sel, sel_in = units["selector"]
    merge, merge_in = units["merge"]
    for n in (10, 50):
        scores = sel(*sel_in(n))
        assert scores.shape == (1, n, 2)
        assert torch.allclose(scores.exp().sum(-1), torch.ones(1, n), atol=1e-5)
        assert merge(*merge_in(n)).shape == (1, 1, 192)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_torchrun(workdir, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "latprof.train", *base_args(workdir, out), "--random-init", "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    # 24 training images over 2 ranks: the reduced count covers them all
    assert ckpt["history"][0]["train_acc"] >= 0
    assert proc.stdout.count("done:") == 1  # rank 0 alone reports
