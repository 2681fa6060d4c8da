"""Weights from local files only: timm-format backbone checkpoints in, SPViT training checkpoints out
(atomic), and back in for --resume and export. Nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from latprof.errors import UsageError

CHECKPOINT_FORMAT = "latprof-spvit-checkpoint"
CHECKPOINT_VERSION = 1


def read_state_dict(path) -> dict:
    """A state dict from a local file: .safetensors, or a torch file holding a state dict (optionally
    under 'model' or 'state_dict', as DeiT's and timm's training checkpoints do)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist", "pass a local timm state-dict file (.pth/.safetensors)")
    try:
        if path.suffix == ".safetensors":
            from latprof.errors import require

            state = require("safetensors.torch", "train").load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except Exception as exc:  # torch raises several types for corrupt or non-weight files
        raise UsageError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}",
                         "pass a timm state dict saved with torch.save(model.state_dict(), FILE)") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise UsageError(f"checkpoint {path} holds no state dict", "save it with torch.save(model.state_dict(), FILE)")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def load_backbone(vit, path, log=print) -> None:
    """Load a timm-format checkpoint into a timm ViT: position embeddings are resampled to the model's
    grid (timm's own filter); a classifier of another class count is dropped and re-initialised."""
    state = read_state_dict(path)
    try:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, vit)
    except Exception:  # the filter is best effort; shape errors are reported below
        pass
    own = vit.state_dict()
    for key in [k for k in state if k.startswith("head.")]:
        if key in own and state[key].shape != own[key].shape:
            log(f"note: classifier in {path} has {state[key].shape[0]} classes, the data {own[key].shape[0]}: "
                "head re-initialised")
            del state[key]
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise UsageError(f"checkpoint {path} does not fit the model: shape of {bad[0]} is "
                         f"{tuple(state[bad[0]].shape)}, model has {tuple(own[bad[0]].shape)}",
                         "pass a checkpoint of the same architecture as --model")
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UsageError(f"checkpoint {path} does not fit the model ({what})",
                         "pass a timm checkpoint of the same architecture as --model")


def save_checkpoint(path, payload: dict) -> Path:
    """torch.save atomically: a crash leaves the previous checkpoint, never half of one."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no training checkpoint at {path}", "train first (latprof train ... --out DIR)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read training checkpoint {path}: {str(exc).splitlines()[0][:200]}",
                         "delete it and train again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a latprof training checkpoint", "pass DIR/last.pt written by `latprof train`")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UsageError(f"{path} has checkpoint version {ckpt.get('version')}, this latprof reads {CHECKPOINT_VERSION}",
                         "train again with this latprof version")
    return ckpt
