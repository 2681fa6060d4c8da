"""Click commands `train` and `export` (registered into the `latprof` group by latprof.cli; also run
by `python -m latprof.train ...`, which is what `torchrun --nproc_per_node K -m latprof.train` needs).

Each command is a thin layer over `latprof.train.trainer.run` / `latprof.train.export.export_onnx`."""

from __future__ import annotations

import json
import re

import click

from latprof.errors import UsageError


def parse_budget(text: str) -> float:
    """'26ms', '26 ms', '26' -> 26.0 (milliseconds)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"cannot read budget '{text}'", "give milliseconds like --budget 26ms or --budget 26")
    return float(m.group(1))


def parse_ints(text: str | None, what: str):
    if text in (None, ""):
        return None
    try:
        return tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"cannot read {what} '{text}'", f"give comma-separated integers, e.g. --{what} 3,6,9") from None


@click.command("train")
@click.option("--lut", required=True, type=click.Path(dir_okay=False), help="Lookup table (luts/<device>.csv).")
@click.option("--budget", required=True, help="Latency budget in ms, e.g. 26ms.")
@click.option("--model", default="deit_t", show_default=True, help="Registry model name (latprof models).")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="ImageFolder: DIR/<class>/<img> or DIR/train, DIR/val.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local timm state dict of the dense model.")
@click.option("--random-init", is_flag=True, help="Start from random weights (no --checkpoint).")
@click.option("--teacher", type=click.Path(dir_okay=False), help="Local timm state dict of a dense teacher (distillation).")
@click.option("--epochs", default=30, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (last.pt, metrics.jsonl, schedule.json).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Per process.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Selector learning rate.")
@click.option("--backbone-lr-scale", default=0.01, show_default=True, type=float, help="Backbone LR = lr x this.")
@click.option("--weight-decay", default=0.05, show_default=True, type=float)
@click.option("--latency-weight", default=2.0, show_default=True, type=float, help="Weight of the latency-sparsity loss.")
@click.option("--distill-weight", default=0.5, show_default=True, type=float)
@click.option("--locations", help="Pruning locations (block indices), default the model's (3,6,9 for DeiT).")
@click.option("--img-size", type=int, help="Input resolution, default the model's.")
@click.option("--model-kwargs", default="{}", help="JSON of extra timm.create_model arguments (e.g. tiny test configs).")
@click.option("--every-count", is_flag=True, help="Solve over every kept count, not only the table's grid.")
@click.option("--engine", help="Table engine, when the table mixes several.")
@click.option("--workers", default=2, show_default=True, type=int, help="Data-loader workers.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-steps", type=int, help="Stop each epoch after this many steps (smoke runs).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast mixed precision (GPU).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (faster steps on a GPU after a warm-up).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(**opts):
    """Train SPViT against a latency lookup table and a budget."""
    from latprof.train.trainer import TrainConfig, run

    try:
        kwargs = json.loads(opts["model_kwargs"])
        assert isinstance(kwargs, dict)
    except (ValueError, AssertionError):
        raise UsageError(f"--model-kwargs '{opts['model_kwargs']}' is not a JSON object",
                         "pass e.g. --model-kwargs '{\"depth\": 4}'") from None
    cfg = TrainConfig(
        lut=opts["lut"], budget_ms=parse_budget(opts["budget"]), data=opts["data"], out=opts["out"],
        model=opts["model"], checkpoint=opts["checkpoint"], random_init=opts["random_init"],
        teacher=opts["teacher"], epochs=opts["epochs"], resume=opts["resume"], batch_size=opts["batch_size"],
        lr=opts["lr"], backbone_lr_scale=opts["backbone_lr_scale"], weight_decay=opts["weight_decay"],
        latency_weight=opts["latency_weight"], distill_weight=opts["distill_weight"],
        locations=parse_ints(opts["locations"], "locations"), img_size=opts["img_size"], model_kwargs=kwargs,
        every_count=opts["every_count"], engine=opts["engine"], workers=opts["workers"], seed=opts["seed"],
        max_steps=opts["max_steps"], progress=not opts["no_progress"], precision=opts["precision"],
        compile=opts["compile_"])
    result = run(cfg, log=click.echo)
    if result["rank"] == 0:
        click.echo(f"done: {result['out']}/last.pt, kept {list(result['kept'])}, "
                   f"predicted {result['predicted_ms']:.4g} ms")


@click.command("export")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Training checkpoint (DIR/last.pt).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--kept", help="Override the static kept patch counts per stage, e.g. 137,96,67.")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--no-check", is_flag=True, help="Skip the onnxruntime-vs-torch check.")
def export(checkpoint, out, kept, opset, no_check):
    """Export the trained pruned model (static top-k schedule, real token removal) to ONNX."""
    from latprof.train.export import export_onnx

    s = export_onnx(checkpoint, out, kept=parse_ints(kept, "kept"), opset=opset, check=not no_check)
    extra = f", onnxruntime max |diff| {s['max_abs_diff']:.2g}" if "max_abs_diff" in s else ""
    click.echo(f"wrote {s['path']} (kept {s['kept']} at locations {s['locations']}{extra})")
    if "check_inconclusive" in s:
        click.echo(f"warning: onnxruntime-vs-torch check inconclusive: {s['check_inconclusive']}", err=True)


@click.group("latprof-train")
def group():
    """SPViT training (the same commands as `latprof train` / `latprof export`)."""


group.add_command(train)
group.add_command(export)


def main(argv=None) -> int:
    """`python -m latprof.train [train] ARGS`: LatprofError -> one line on stderr, its exit code."""
    import sys

    from latprof.errors import LatprofError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in group.commands and args[0] not in ("--help", "-h"):
        args = ["train"] + args  # `python -m latprof.train --lut ...` means train
    try:
        group.main(args, prog_name="python -m latprof.train", standalone_mode=False)
    except LatprofError as exc:
        click.echo(exc.one_line(), err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0
