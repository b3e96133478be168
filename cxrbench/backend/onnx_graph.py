"""DenseNet-BC as an ONNX graph written with ``onnx.helper`` straight from canonical weights.

For backends whose framework has no ONNX exporter (the numpy example; JAX): the graph is the canonical
network, so it needs only the weights and the block configuration, never the framework.
Input ``input``: float32 NCHW ``(batch, 3, S, S)``, already ImageNet-normalised, batch dynamic.
Outputs ``logits``: ``(batch, 14)``, and ``features``: the final feature map after the last BatchNorm and
ReLU, NCHW ``(batch, K, h, w)``, so a class activation map needs only onnxruntime. Canonical weights become
the graph's initializers unchanged, because ONNX's Conv, BatchNormalization and Gemm use torchvision's layouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cxrbench.backend.canonical import BN_EPSILON
from cxrbench.data.classes import NUM_CLASSES
from cxrbench.deploy.onnx_file import FEATURES_OUTPUT, cam_metadata

#: The written graph's input: NCHW float32 images, ImageNet-normalised, three channels.
INPUT = "input"
#: The written graph's logits output (the other output is ``FEATURES_OUTPUT``, the final feature map).
OUTPUT = "logits"


class GraphBuilder:
    """Appends nodes; each method returns the name of the tensor it produced."""

    def __init__(self, weights: Mapping[str, np.ndarray]):
        from onnx import helper

        self.helper, self.weights = helper, weights
        self.nodes: list = []
        self.used: list[str] = []

    def _node(self, op: str, inputs: list[str], name: str, **attributes) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def _weight(self, name: str) -> str:
        self.used.append(name)
        return name

    def conv(self, x: str, prefix: str, stride: int = 1, pad: int = 0) -> str:
        kernel = self.weights[f"{prefix}.weight"].shape[2:]
        return self._node(
            "Conv",
            [x, self._weight(f"{prefix}.weight")],
            prefix,
            kernel_shape=list(kernel),
            strides=[stride, stride],
            pads=[pad] * 4,
        )

    def bn_relu(self, x: str, prefix: str) -> str:
        parts = [self._weight(f"{prefix}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        y = self._node("BatchNormalization", [x, *parts], prefix, epsilon=BN_EPSILON)
        return self._node("Relu", [y], f"{prefix}.relu")

    def dense_layer(self, x: str, prefix: str) -> str:
        y = self.conv(self.bn_relu(x, f"{prefix}.norm1"), f"{prefix}.conv1")
        y = self.conv(self.bn_relu(y, f"{prefix}.norm2"), f"{prefix}.conv2", pad=1)
        return self._node("Concat", [x, y], f"{prefix}.concat", axis=1)

    def transition(self, x: str, prefix: str) -> str:
        y = self.conv(self.bn_relu(x, f"{prefix}.norm"), f"{prefix}.conv")
        return self._node("AveragePool", [y], f"{prefix}.pool", kernel_shape=[2, 2], strides=[2, 2])

    def densenet(self, block_config: tuple[int, ...]) -> str:
        x = self.conv(INPUT, "features.conv0", stride=2, pad=3)
        x = self.bn_relu(x, "features.norm0")
        x = self._node("MaxPool", [x], "features.pool0", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
        for b, layers in enumerate(block_config, start=1):
            for k in range(1, layers + 1):
                x = self.dense_layer(x, f"features.denseblock{b}.denselayer{k}")
            if b != len(block_config):
                x = self.transition(x, f"features.transition{b}")
        x = self._node("Identity", [self.bn_relu(x, "features.norm5")], FEATURES_OUTPUT)
        x = self._node("Flatten", [self._node("GlobalAveragePool", [x], "pool")], "flatten")
        weight, bias = self._weight("classifier.weight"), self._weight("classifier.bias")
        return self._node("Gemm", [x, weight, bias], OUTPUT, transB=1)


def write_onnx(
    weights: Mapping[str, np.ndarray],
    block_config: tuple[int, ...],
    image_size: int,
    opset: int,
    path: Path,
    producer: str = "cxrbench",
) -> None:
    """Build and save the graph with the classifier in its metadata (:func:`cam_metadata`: the graph's own
    weights, so CAMs from its ``features`` output always match); the caller stamps :func:`model_metadata`
    and the core runs ``onnx.checker``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    builder = GraphBuilder(weights)
    builder.densenet(block_config)
    graph = helper.make_graph(
        builder.nodes,
        f"densenet_{'_'.join(map(str, block_config))}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [
            helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", NUM_CLASSES]),
            helper.make_tensor_value_info(
                FEATURES_OUTPUT, TensorProto.FLOAT, ["batch", weights["classifier.weight"].shape[1], "height", "width"]
            ),
        ],
        initializer=[numpy_helper.from_array(np.asarray(weights[n], dtype=np.float32), n) for n in builder.used],
    )
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets), producer_name=producer
    )
    classifier = cam_metadata(weights["classifier.weight"], weights["classifier.bias"], "NCHW")
    helper.set_model_props(model, classifier)
    onnx.save(model, str(path))
