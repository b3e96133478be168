"""The one table of operation categories, on each framework's real operation names.

tests/fixtures/operation_paths.json holds every distinct path of real DenseNet-121 training steps as torch.profiler,
TensorFlow's profiler and jax.profiler recorded them through the backends' own profile hooks (regenerate with
``python tests/fixtures/record_operation_paths.py``). Every recorded operation must land in a category (the few
exceptions are listed with their reason), a sample of them in the category a reader would name by hand, and an
unknown name in "other", listed.
"""

import importlib
import json
import re
from pathlib import Path

import pytest

from cxrbench.backend.profiling import TraceEvent
from cxrbench.errors import CxrError
from cxrbench.metrics import step_profile
from cxrbench.metrics.operation_categories import (
    CATEGORY_KEYS,
    Classifier,
    OperationRule,
    category_rules,
    collect_rules,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "operation_paths.json").read_text())
MODULES = {
    "pytorch": "cxrbench_pytorch.operations",
    "keras": "cxrbench_keras.operations",
    "jax": "cxrbench_jax.operations",
}
#: XLA instructions without ``op_name`` metadata (XLA made them itself: kernel flips, index grids for max-pool
#: gradients, fused weight-gradient convolutions): nothing in the trace says which JAX operation they serve.
UNKNOWABLE = {"jax": {"ynn_fusion", "wrapped_iota", "wrapped_broadcast", "wrapped_reverse", "bitcast_broadcast_fusion"}}

#: (backend, a pattern that finds real recorded paths, the category a reader names by hand)
BY_HAND = [
    ("pytorch", r"^aten::conv2d/.*aten::mkldnn_convolution$", "conv_forward"),
    ("pytorch", r"ConvolutionBackward0/aten::convolution_backward$", "conv_backward"),
    ("pytorch", r"^aten::batch_norm/.*aten::native_batch_norm$", "batch_norm"),
    ("pytorch", r"NativeBatchNormBackward0/aten::native_batch_norm_backward$", "batch_norm"),
    ("pytorch", r"^aten::cat$", "concat_copy"),
    ("pytorch", r"CatBackward0/.*aten::(narrow|slice)", "concat_copy"),
    ("pytorch", r"ReluBackward0/aten::threshold_backward$", "elementwise"),
    ("pytorch", r"max_pool2d_with_indices_backward$", "pooling"),
    ("pytorch", r"AddmmBackward0/aten::mm$", "matmul"),
    ("pytorch", r"^aten::binary_cross_entropy_with_logits", "loss"),
    ("pytorch", r"^Optimizer\.step#Adam\.step/aten::(sqrt|lerp_|addcdiv_)$", "optimizer"),
    ("keras", r"/conv\d_block\d+_\d_conv_\d+/convolution/_MklNativeConv2D$", "conv_forward"),
    ("keras", r"gradient_tape/.*_conv_\d+/.*Conv2DBackpropFilter$", "conv_backward"),
    ("keras", r"/conv\d_block\d+_0_bn_\d+/moments/(Mean|SquaredDifference)", "batch_norm"),
    ("keras", r"gradient_tape/.*_bn_\d+/", "batch_norm"),
    ("keras", r"_concat_\d+/concat/ConcatV2$", "concat_copy"),
    ("keras", r"ReluGrad$", "elementwise"),
    ("keras", r"MaxPoolGrad$", "pooling"),
    ("keras", r"classifier_\d+/MatMul", "matmul"),
    ("keras", r"logistic_loss/Log1p", "loss"),
    ("keras", r"torch_adam/Sqrt", "optimizer"),
    ("jax", r"^jit\(step\)/jvp\(DenseNet\)/.*/conv_general_dilated/", "conv_forward"),
    ("jax", r"^jit\(step\)/transpose\(jvp\(DenseNet\)\)/.*_conv\d/conv_general_dilated/", "conv_backward"),
    ("jax", r"_norm\d/reduce_sum/", "batch_norm"),
    ("jax", r"jit\(relu\)/max/", "elementwise"),
    ("jax", r"/concatenate/concatenate$", "concat_copy"),
    ("jax", r"reduce_window_max/", "pooling"),
    ("jax", r"/classifier/dot_general/", "matmul"),
    ("jax", r"^jit\(step\)/jvp\(\)/", "loss"),
    ("jax", r"^jit\(step\)/(add|sub)/", "optimizer"),
]


def classifier_of(backend: str) -> Classifier:
    return Classifier(importlib.import_module(MODULES[backend]).OPERATION_RULES)


def with_its_backend(*rows) -> list:
    """Parameters whose first value is a backend, each marked as needing it (CI's full stage runs them)."""
    return [pytest.param(*row, marks=pytest.mark.backends(row[0])) for row in rows]


@pytest.mark.parametrize("backend", with_its_backend(*([name] for name in sorted(MODULES))))
def test_every_operation_of_a_real_trace_has_a_category(backend):
    classifier = classifier_of(backend)
    operations = [p for p in FIXTURE[backend]["paths"] if p["kind"] == "op"]
    assert len(operations) > 50  # DenseNet-121's step, forward, backward and update
    unmapped = {p["name"] for p in operations if classifier.category(p["path"]) == "other"}
    assert unmapped == UNKNOWABLE.get(backend, set())
    found = {classifier.category(p["path"]) for p in operations}
    assert found >= {"conv_forward", "conv_backward", "batch_norm", "concat_copy", "elementwise", "pooling"}
    assert found >= {"matmul", "loss", "optimizer"}


@pytest.mark.parametrize("backend, pattern, expected", with_its_backend(*BY_HAND))
def test_real_names_land_where_a_reader_would_put_them(backend, pattern, expected):
    classifier = classifier_of(backend)
    real = [p["path"] for p in FIXTURE[backend]["paths"] if re.search(pattern, p["path"])]
    assert real, f"no recorded {backend} path matches {pattern!r}"
    assert {classifier.category(path) for path in real} == {expected}


def test_an_unknown_operation_is_other_and_listed_by_name():
    events = [TraceEvent("cxrbench.profile", 0, 10, "main", "host"), TraceEvent("FancyNewOp", 2, 5, "main")]
    result = step_profile.analyse(events, Classifier(), steps=1)
    assert result["categories_ms"]["other"] == pytest.approx(0.005)
    assert [(op["name"], op["category"]) for op in result["unmapped"]] == [("FancyNewOp", "other")]


def test_a_plugins_rules_come_before_the_generic_ones():
    path = "StatefulPartitionedCall/densenet/conv2_block1_0_bn/moments/Mean/Mean"
    assert Classifier().category(path) == "conv_forward"  # the generic rule sees "conv" in the layer's name
    assert Classifier(category_rules("batch_norm", r"_bn/")).category(path) == "batch_norm"
    assert Classifier().category("cxrbench.input/aten::to") == "input"  # the core's annotation claims its content


def test_bad_rules_are_one_line_errors():
    with pytest.raises(CxrError, match="unknown category 'convolution'"):
        OperationRule("convolution", "conv")
    with pytest.raises(CxrError, match=r"'conv\(' \(conv_forward\): not a regular expression"):
        OperationRule("conv_forward", "conv(")
    with pytest.raises(CxrError, match="expected OperationRule objects"):
        collect_rules([[("conv_forward", "conv")]])
    assert set(CATEGORY_KEYS) >= {"input", "overhead", "other"}
