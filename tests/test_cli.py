"""The command contract: one-line errors with exit code 2, no traceback."""

import pytest
from click.testing import CliRunner

from latprof.cli import main
from tests.conftest import write_config


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_models_and_devices_list():
    out = run("models")
    assert out.exit_code == 0
    assert "deit_t" in out.output and "blocks.0 .. blocks.11 (12 units, one graph)" in out.output
    out = run("devices")
    assert out.exit_code == 0 and "local" in out.output


@pytest.mark.parametrize("args, message", [
    (["measure", "--device", "local", "--model", "resnet50"], "unknown model 'resnet50'"),
    (["measure", "--device", "phone9", "--model", "deit_t"], "unknown device 'phone9'"),
    (["measure", "--device", "local", "--model", "deit_t", "--tokens", "0,400"], "must lie within 1..197"),
    (["measure", "--device", "local", "--model", "deit_t", "--tokens", "a,b"], "bad token counts"),
    (["build-lut", "--device", "never-measured"], "no raw samples"),
])
def test_bad_input_is_one_line(workdir, args, message):
    out = run(*args)
    assert out.exit_code == 2, out.output
    assert message in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1


def test_malformed_config_is_one_line(workdir, tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", measure={"warmup": -1})
    out = run("measure", "--device", str(cfg), "--model", "deit_t")
    assert out.exit_code == 2 and "measure.warmup" in out.output and "Traceback" not in out.output


def test_measure_and_build_lut_commands(workdir, tmp_path):
    cfg = write_config(tmp_path / "dev.yaml", engine="onnxruntime", name="clidev")
    out = run("measure", "--device", str(cfg), "--model", "deit_t", "--tokens", "9", "-q")
    assert out.exit_code == 0, out.output
    assert "points measured, 0 already there" in out.output
    out = run("build-lut", "--device", "clidev")
    assert out.exit_code == 0, out.output
    assert (tmp_path / "luts" / "clidev.csv").exists()


def test_clean_frees_graphs_and_a_rerun_measures_nothing(workdir, tmp_path):
    cfg = write_config(tmp_path / "dev.yaml", engine="onnxruntime", name="clidev")
    assert run("measure", "--device", str(cfg), "--model", "deit_t", "--tokens", "9", "-q").exit_code == 0
    graphs = sorted(p.name for p in (workdir / "graphs").glob("*.onnx"))
    samples = (workdir / "samples" / "clidev.jsonl").read_bytes()
    out = run("clean", "--dry-run")
    assert out.exit_code == 0 and "graphs/: would free" in out.output and f"in {len(graphs) + 1} files" in out.output
    assert sorted(p.name for p in (workdir / "graphs").glob("*.onnx")) == graphs
    out = run("clean")
    assert out.exit_code == 0 and "graphs/: freed" in out.output, out.output
    assert not (workdir / "graphs").exists() and (workdir / "samples" / "clidev.jsonl").read_bytes() == samples
    out = run("measure", "--device", str(cfg), "--model", "deit_t", "--tokens", "9", "-q")
    assert out.exit_code == 0 and "0 points measured" in out.output, out.output
    # exported again to the same content-addressed names
    assert sorted(p.name for p in (workdir / "graphs").glob("*.onnx")) == graphs
    assert run("clean", "--only", "libs").output.strip().endswith("nothing to clean")


def test_clean_refuses_a_workdir_in_use_and_a_folder_that_is_none(workdir, tmp_path):
    import subprocess
    import sys

    (workdir / "graphs").mkdir(parents=True)
    (workdir / "graphs" / "x.onnx").write_bytes(b"0" * 10)
    user = subprocess.Popen([sys.executable, "-c", "import sys, time; from latprof.measure.workdir import hold; "
                             f"hold({str(workdir)!r}); print('held', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert user.stdout.readline().strip() == "held"
        out = run("clean")
        assert out.exit_code == 2 and "a latprof run is using" in out.output and "Traceback" not in out.output
        assert (workdir / "graphs" / "x.onnx").exists()
    finally:
        user.kill()
        user.wait()
    out = run("clean")
    assert out.exit_code == 0 and not (workdir / "graphs").exists(), out.output
    out = run("clean", "--workdir", str(tmp_path / "elsewhere"))
    assert out.exit_code == 2 and "is not a latprof workdir" in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_benchmark_scripts_keep_the_one_line_contract(tmp_path):
    """A benchmark given an unknown model says so in one line, exit 2, no traceback (fidelity.py once
    printed a traceback for a CompileError)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"
    out = subprocess.run([sys.executable, str(bench), "--model", "resnet50", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: unknown model 'resnet50'") and "fix:" in line
