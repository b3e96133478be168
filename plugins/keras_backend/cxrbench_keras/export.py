"""ONNX export of the bare network (no uint8 preprocessing), NHWC, dynamic batch, logits and CAM features out.

The input stays NHWC, Keras' native layout: converting to NCHW would add transposes that neither
framework computes natively, and the metadata and ExportInfo state the layout. Keras 3's
The network's inference call is traced once as a ``tf.function`` and converted with tf2onnx's
``from_function`` (tf2onnx's ``from_keras`` has open bugs with Keras 3). Keras 3's own
``model.export(format="onnx")`` drives the same converter but first builds a SavedModel-style export
archive (tracing the model twice and walking every tracked resource): the same ONNX graph, about
30-45 % slower on 2 CPU cores. The exporter needs a float32 network, so mixed-precision models are
copied into a float32 one first.
"""

from __future__ import annotations

import time
from pathlib import Path

import keras
import tensorflow as tf

from cxrbench.backend import (
    FEATURES_OUTPUT,
    BackendError,
    ExportInfo,
    cam_metadata,
    first_line,
    model_metadata,
    stamp_metadata,
)
from cxrbench_keras.infer import FEATURE_LAYER, float32_network
from cxrbench_keras.model import KerasDenseNet

LAYOUT = "NHWC"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
EXPORTER = "tf2onnx.convert.from_function"


def _convert(network: keras.Model, signature: list[tf.TensorSpec], opset: int, path: Path) -> None:
    import tf2onnx

    both = keras.Model(network.inputs, [network.outputs[0], network.get_layer(FEATURE_LAYER).output])
    infer = tf.function(lambda image: both(image, training=False), input_signature=signature)
    tf2onnx.convert.from_function(infer, input_signature=signature, opset=opset, output_path=str(path))


def _rename_outputs(path: Path, names: list[str]) -> None:
    """tf2onnx names the outputs after TF's Identity ops; give them meaningful names (in output order)."""
    import onnx

    proto = onnx.load(str(path))
    renamed = {output.name: name for output, name in zip(proto.graph.output, names)}
    for node in proto.graph.node:
        node.output[:] = [renamed.get(out, out) for out in node.output]
    for output in proto.graph.output:
        output.name = renamed.get(output.name, output.name)
    onnx.save(proto, str(path))


def export_onnx(model: KerasDenseNet, path, settings) -> ExportInfo:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.image_size
    signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME)]
    start = time.perf_counter()
    network = float32_network(model)
    try:
        _convert(network, signature, settings.export.opset, path)
    except Exception as exc:  # tf2onnx raises many types; the user needs one line naming the file
        raise BackendError(f"{path}: ONNX export (opset {settings.export.opset}) failed: {first_line(exc)}") from None
    _rename_outputs(path, [OUTPUT_NAME, FEATURES_OUTPUT])
    kernel, bias = network.get_layer("classifier").get_weights()  # kernel (K, classes): the transpose of canonical
    classifier = cam_metadata(kernel.T, bias, LAYOUT)
    stamp_metadata(path, {**model_metadata(layout=LAYOUT, image_size=size, backend="keras"), **classifier})
    return ExportInfo(
        path=str(path),
        layout=LAYOUT,
        opset=settings.export.opset,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        seconds=time.perf_counter() - start,
        exporter=EXPORTER,
    )
