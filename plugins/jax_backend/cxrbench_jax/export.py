"""ONNX export: the canonical network written by the core's ONNX graph writer (``write_onnx``) from this model's
weights.

JAX has no ONNX exporter of its own. The route through TensorFlow (``jax2tf`` then ``tf2onnx``) would make the
JAX backend depend on TensorFlow and tf2onnx, whose releases trail both frameworks, and would export whatever
XLA lowering jax2tf emits. The canonical weights are exactly torchvision's layout, which is also ONNX's (Conv
O,I,H,W; BatchNormalization; Gemm), so the graph written from them is the same function, checked by the kit
against ``cxrbench_predict`` with onnxruntime.
"""

from __future__ import annotations

import time
from pathlib import Path

from cxrbench.backend import INPUT, OUTPUT, ExportInfo, Settings, model_metadata, stamp_metadata, write_onnx
from cxrbench_jax import weights as flax_weights
from cxrbench_jax.model import JaxModel

LAYOUT = "NCHW"
EXPORTER = "onnx.helper graph from canonical weights (cxrbench.backend.onnx_graph)"


def export_onnx(model: JaxModel, path: str | Path, settings: Settings, name: str) -> ExportInfo:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    weights = flax_weights.from_variables(model.host_variables(), model.block_config)
    size, opset = settings.data.image_size, settings.export.opset
    write_onnx(weights, model.block_config, size, opset, path, producer="cxrbench_jax")
    stamp_metadata(path, model_metadata(LAYOUT, size, name))
    return ExportInfo(
        path=str(path),
        layout=LAYOUT,
        opset=opset,
        input_name=INPUT,
        output_name=OUTPUT,
        seconds=time.perf_counter() - start,
        exporter=EXPORTER,
    )
