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
    ort = require("onnxruntime", "models")

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
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    err = float(np.abs(got - want).max())
    if not np.isfinite(err) or err > TOLERANCE:
        raise ExportError(f"{model}/{shared} at N={tokens}: onnxruntime differs from torch by {err:.2e} (tolerance {TOLERANCE})",
                          "the exported graph is wrong; report it with the ONNX file " + str(path))
    return Graph(model, shared, tokens, path, digest, tuple(input_shape), err)
