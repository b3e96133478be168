"""Prediction and CAMs are the IEEE float32 function of the weights whatever the training numerics were.

TF32 is a process-wide switch in both frameworks and a mixed-precision Keras network computes in bf16/fp16: left
alone, either would make the equivalence (1e-4) and ONNX parity checks fail on recent GPUs. No GPU is needed to
check the switches are off inside inference and restored after, nor that a bf16 Keras model predicts in float32.
"""

from __future__ import annotations

import numpy as np

from helpers.backends import require

pytestmark = require("pytorch", "keras")

import torch  # torch before tensorflow in one process

import cxrbench_keras as keras_backend
import cxrbench_pytorch as torch_backend
from cxrbench.testing.conformance import kit_settings, random_canonical, random_images

SIZE = 32


def test_pytorch_inference_runs_ieee_float32_and_restores_tf32():
    settings = kit_settings(SIZE, **{"numerics.tf32": True})
    model = torch_backend.cxrbench_build_model(
        settings=settings, weights=random_canonical(settings.model.block_config, seed=1)
    )
    seen = []
    model.net.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cuda.matmul.fp32_precision))
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # what numerics.tf32 = true set for training

    torch_backend.cxrbench_predict(model=model, images=random_images(3, SIZE), settings=settings)
    torch_backend.cxrbench_cam(model=model, images=random_images(2, SIZE), classes=[0, 3], settings=settings)

    assert seen and set(seen) == {"ieee"}
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"


def test_keras_mixed_precision_model_predicts_the_float32_function_without_tf32(monkeypatch):
    import keras
    import tensorflow as tf

    from cxrbench_keras import infer

    weights = random_canonical(kit_settings(SIZE).model.block_config, seed=2)
    images = random_images(4, SIZE)
    reference_settings = kit_settings(SIZE)
    reference = keras_backend.cxrbench_build_model(settings=reference_settings, weights=weights)
    expected = keras_backend.cxrbench_predict(model=reference, images=images, settings=reference_settings)

    mixed_settings = kit_settings(SIZE, **{"numerics.precision": "bf16", "numerics.tf32": True})
    flags = []
    batched = infer._batched
    monkeypatch.setattr(
        infer,
        "_batched",
        lambda *args: flags.append(tf.config.experimental.tensor_float_32_execution_enabled()) or batched(*args),
    )
    try:
        mixed = keras_backend.cxrbench_build_model(settings=mixed_settings, weights=weights)
        assert mixed.network.dtype_policy.name == "mixed_bfloat16"
        logits = keras_backend.cxrbench_predict(model=mixed, images=images, settings=mixed_settings)
        cam = keras_backend.cxrbench_cam(model=mixed, images=images, classes=[1, 5], settings=mixed_settings)
        assert tf.config.experimental.tensor_float_32_execution_enabled()  # restored for training
    finally:
        keras.config.set_dtype_policy("float32")
        tf.config.experimental.enable_tensor_float_32_execution(False)

    assert flags == [False, False]
    assert logits.dtype == np.float32 and np.abs(logits - expected).max() < 1e-5  # bf16 would be ~1e-2 off
    assert np.abs(cam.maps.mean((2, 3)) + cam.bias - expected[:, [1, 5]]).max() < 1e-4
