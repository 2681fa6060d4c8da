"""Export: a profiling unit at N tokens -> an ONNX file, checked with onnxruntime against torch.

Graphs are content-addressed: the file name is the hash of the ONNX bytes, so equal graphs (DeiT's
twelve identical blocks) are exported, compiled and measured once.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latprof.errors import ExportError, require

OPSET = 17
TOLERANCE = 1e-3  # max abs error ORT vs torch, fp32
# a top-k score gap this small may be ordered differently by two runtimes: their activations agree only
# to about TOLERANCE (DeiT-T pruned to 165/137/71: a gap of 1.2e-4 after nine blocks, logits 7e-3 apart)
TIE_MARGIN = 1e-3
CHECK_INPUTS = 4  # inputs tried before a check on near-tied top-k selections is called inconclusive


@dataclass(frozen=True)
class Graph:
    """One exported graph: what to measure for a (model, shared unit, N)."""

    model: str
    shared: str
    tokens: int
    path: Path
    digest: str
    input_shape: tuple
    ort_max_abs_err: float

    def example_input(self) -> np.ndarray:
        rng = np.random.default_rng(int(self.digest[:8], 16))
        return rng.standard_normal(self.input_shape).astype("float32")


def export_unit(module, input_shape: tuple, out_dir: Path, model: str, shared: str, tokens: int) -> Graph:
    torch = require("torch", "models")
    onnx = require("onnx", "models")

    rng = np.random.default_rng(0)
    x = rng.standard_normal(input_shape).astype("float32")
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape asserts: shapes are static here
            torch.onnx.export(module, (torch.from_numpy(x),), buf, dynamo=False, opset_version=OPSET,
                              input_names=["x"], output_names=["y"])
    except Exception as exc:
        raise ExportError(f"{model}/{shared} at N={tokens}: ONNX export failed ({str(exc).splitlines()[0][:200]})",
                          "this unit uses an operator the exporter lacks; report it") from None
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    digest = hashlib.sha256(data).hexdigest()[:20]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{digest}.onnx"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    err, margin = compare_with_torch(module, data, input_shape)
    where = f"{model}/{shared} at N={tokens}: onnxruntime differs from torch by {err:.2e} (tolerance {TOLERANCE})"
    if not err <= TOLERANCE:  # NaN included
        if margin > TIE_MARGIN:
            raise ExportError(where, "the exported graph is wrong; report it with the ONNX file " + str(path))
        raise ExportError(where + f" on {CHECK_INPUTS} inputs, each with a top-k near-tie (score gap down to {margin:.1g})",
                          "the graph could not be checked: its selector's scores tie on every input tried; "
                          "report it with the ONNX file " + str(path))
    return Graph(model, shared, tokens, path, digest, tuple(input_shape), err)


def compare_with_torch(module, data: bytes, input_shape: tuple, tolerance: float = TOLERANCE) -> tuple[float, float]:
    """(max abs difference of onnxruntime's output from torch's, smallest top-k score gap) on random
    inputs (seeds 0, 1, ...), stopping at the first where they agree. A disagreement counts only on an
    input whose top-k selections are decisive: where scores nearly tie at the boundary, the runtimes may
    keep different tokens and both be right, so that input is set aside and the next one tried. The gap
    is inf unless the runtimes disagreed (it is not computed where it does not matter); a gap at or below
    TIE_MARGIN returned with a difference above `tolerance` means every input tried tied."""
    torch = require("torch", "models")
    ort = require("onnxruntime", "models")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    margin_of, margins = None, []
    for seed in range(CHECK_INPUTS):
        x = np.random.default_rng(seed).standard_normal(input_shape).astype("float32")
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        err = float(np.abs(got - want).max())
        if err <= tolerance:
            return err, float("inf")
        margin_of = margin_of or topk_margin(data)  # built at the first disagreement, reused
        margins.append(margin_of(x) if np.isfinite(err) else float("inf"))  # NaN or inf: wrong, tie or not
        if margins[-1] > TIE_MARGIN:
            return err, margins[-1]
    return err, min(margins)


def topk_margin(data: bytes):
    """A function of an input `x`: the smallest gap, over the graph's TopK nodes (per onnxruntime),
    between the k-th and (k+1)-th largest score; inf without a TopK. Where it is below TIE_MARGIN, two
    correct runtimes may keep different tokens (a near-uniform selector's scores), so their outputs
    cannot be compared; the static shapes, and the latency, are the same either way. The probe session
    is built once, for every input asked about."""
    import onnx

    ort = require("onnxruntime", "models")
    model = onnx.load_from_string(data)
    first, axes = len(model.graph.output), []
    for node in model.graph.node:
        if node.op_type == "TopK":
            model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in node.input[:2])
            axes.append(next((a.i for a in node.attribute if a.name == "axis"), -1))
    if not axes:
        return lambda x: float("inf")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def margin(x: np.ndarray) -> float:
        outs = sess.run(None, {sess.get_inputs()[0].name: x})[first:]  # each TopK's scores and k
        return min(_gap(s, int(np.asarray(k).ravel()[0]), axis) for (s, k), axis in zip(zip(outs[0::2], outs[1::2]), axes))

    return margin


def _gap(scores: np.ndarray, k: int, axis: int) -> float:
    """The smallest gap between the k-th and (k+1)-th largest score along `axis` (inf when all are kept)."""
    if k >= scores.shape[axis]:
        return float("inf")
    top = -np.sort(-scores, axis=axis)
    gap = np.take(top, k - 1, axis=axis) - np.take(top, k, axis=axis)
    return float(np.min(np.nan_to_num(gap, nan=np.inf)))  # nan: masked (-inf) scores on both sides
