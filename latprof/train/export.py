"""Export a trained SPViT (static token schedule, real token removal, top-k) to ONNX."""

from __future__ import annotations

from pathlib import Path

from latprof.errors import ExportError, require


def export_onnx(checkpoint, out, kept=None, opset: int = 17, check: bool = True) -> dict:
    """Write the deployable model of a training checkpoint to `out`; with `check`, compare onnxruntime
    with torch on a random batch when onnxruntime is installed. Returns a summary dict."""
    torch = require("torch", "train")
    require("onnx", "models")
    from latprof.train.spvit import StaticSPViT
    from latprof.train.trainer import build_from_checkpoint
    from latprof.train.weights import load_checkpoint
    from latprof.schedule import TokenSchedule

    ckpt = load_checkpoint(checkpoint)
    model = build_from_checkpoint(ckpt)
    kept = tuple(kept) if kept else model.kept
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # the TorchScript ONNX exporter has no fused SDPA; the math is the same
    if hasattr(model, "layout"):  # PiT, Swin (latprof.train.staged)
        model.layout.schedule(kept)  # validates
        static = _deployed(model, kept)
        locations = list(model.layout.locations)
    else:
        TokenSchedule(model.patches, model.locations, kept, len(model.vit.blocks))  # validates
        static = StaticSPViT(model, kept).eval()
        locations = list(model.locations)
    size = ckpt["config"]["img_size"]
    example = torch.randn(1, 3, size, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(static, (example,), str(out), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"])
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0][:200]}",
                          "report it with the checkpoint's model name and torch version") from None
    summary = dict(path=str(out), kept=list(kept), locations=locations, img_size=size)
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            return summary
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = static(example).numpy()
        got = sess.run(None, {"images": example.numpy()})[0]
        diff = float(abs(ref - got).max())
        if diff > 1e-3:
            raise ExportError(f"onnxruntime disagrees with torch by {diff:.3g}", "report it with the checkpoint")
        summary["max_abs_diff"] = diff
    return summary



def _deployed(model, kept):
    """images -> logits of a hierarchical SPViT with its static schedule, tokens really removed."""
    from torch import nn

    class Deployed(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            return self.model(images, mode="topk", kept=tuple(kept)).logits

    return Deployed().eval()
