"""Export a trained SPViT (static token schedule, real token removal, top-k) to ONNX."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from latprof.errors import ExportError, UsageError, require

METADATA_KEY = "latprof"  # ONNX metadata_props: what `latprof validate --onnx` needs to time it against its budget


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
        if model.layout.family == "swin":  # the graph the table's units and `validate` measure (StaticSwin)
            from latprof.models.swin_nn import StaticSwin

            static = StaticSwin(model.backbone, model.layout, kept, selectors=model.selectors).eval()
        else:
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
    buf = io.BytesIO()
    try:
        torch.onnx.export(static, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["logits"])
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {str(exc).splitlines()[0][:200]}",
                          "report it with the checkpoint's model name and torch version") from None
    c = ckpt["config"]
    trained = dict(model=c["model"], kept=list(kept), locations=locations, img_size=size, budget_ms=c.get("budget_ms"),
                   lut=c.get("lut"), trained_kept=list(c["kept"]), model_kwargs=c.get("model_kwargs") or {})
    data = fold_shapes(buf.getvalue())
    summary = dict(path=str(out), kept=list(kept), locations=locations, img_size=size)
    if check:
        summary.update(check_export(static, data, size))
    write_export(out, data, trained)  # after the check: a failed export writes nothing
    return summary


CHECK_ATOL = 1e-3  # on logits


def check_export(static, data: bytes, size: int) -> dict:
    """Compare onnxruntime's logits with torch's on random images (when onnxruntime is installed).

    A disagreement is an error only on an input where every top-k selection is decisive. Where selector
    scores nearly tie at the boundary (an early checkpoint's near-uniform selector), the runtimes may keep
    different tokens and both be right; such an input is set aside and another drawn."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    from latprof.export import CHECK_INPUTS, TIE_MARGIN, compare_with_torch

    diff, margin = compare_with_torch(static, data, (1, 3, size, size), CHECK_ATOL)
    if diff <= CHECK_ATOL:
        return {"max_abs_diff": diff}
    if margin > TIE_MARGIN:
        raise ExportError(f"onnxruntime disagrees with torch by {diff:.3g} on an input whose top-k selections "
                          f"are decisive (score margin {margin:.2g})", "report it with the checkpoint")
    return {"check_inconclusive": f"on {CHECK_INPUTS} random images the selector scores nearly tie at a top-k "
                                  f"boundary (margin down to {margin:.1g}), where the runtimes may keep "
                                  f"different tokens; logits were not compared"}


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


FOLD_MAX_ELEMENTS = 4096  # a folded value larger than this stays computed (no big constants baked in)


def fold_shapes(data: bytes) -> bytes:
    """The graph with its shape arithmetic replaced by constants. The schedule is static, but the traced
    models compute shapes at run time (tensor.new_ones(B, N), expand, Swin's padding), and TVM's
    importer cannot follow those. Every value that does not depend on the input's values (shapes of
    the fixed-size input, constants, weights) and is small is replaced by its value, read from one
    onnxruntime run; compute nodes stay as traced, so TVM compiles the same operators as for the units."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    ort = require("onnxruntime", "models")
    model = onnx.load_from_string(data)
    graph = model.graph
    fixed = {t.name for t in graph.initializer}
    folded = set()
    for node in graph.node:  # topological: a value is fixed when every input is (Shape: the input's shape is)
        ins = [i for i in node.input if i]
        if node.op_type == "Shape" or all(i in fixed for i in ins):
            fixed.update(o for o in node.output if o)
            if node.op_type != "Constant":
                folded.update(o for o in node.output if o)
    if not folded:
        return data
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in sorted(folded))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    names = [o.name for o in sess.get_outputs()]
    values = {n: v for n, v in zip(names, sess.run(None, {x.name: np.zeros(shape, np.float32)}))
              if n in folded and np.size(v) <= FOLD_MAX_ELEMENTS}
    nodes = [n for n in graph.node if not (n.output and all(o in values for o in n.output if o))]
    live = {i for n in nodes if n.op_type != "Constant" for i in n.input} | {o.name for o in graph.output}
    constants = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v), name))
                 for name, v in values.items() if name in live]
    del graph.node[:]
    graph.node.extend(constants + [n for n in nodes if n.op_type != "Constant" or n.output[0] in live])
    for t in [t for t in graph.initializer if t.name not in live]:  # e.g. a class token folded into a constant
        graph.initializer.remove(t)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_export(out: Path, data: bytes, trained: dict) -> None:
    """The ONNX bytes with the training facts in its metadata, written atomically."""
    import onnx

    m = onnx.load_from_string(data)
    onnx.helper.set_model_props(m, {METADATA_KEY: json.dumps(trained)})
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, out)


def read_export(path) -> dict:
    """The training facts `latprof export` stored in an ONNX file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no ONNX file at {path}", "give the file `latprof export --out` wrote")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UsageError(f"{path} is not an ONNX model ({str(exc).splitlines()[0][:120]})",
                         "give the file `latprof export --out` wrote") from None
    props = {p.key: p.value for p in m.metadata_props}
    if METADATA_KEY not in props:
        raise UsageError(f"{path} carries no latprof training metadata (model, kept counts, budget)",
                         "export it with `latprof export --checkpoint DIR/last.pt --out FILE`")
    return json.loads(props[METADATA_KEY])
