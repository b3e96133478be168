"""A backend that reuses the PyTorch backend but gets one layer wrong: the final BatchNorm's epsilon
is 0.1 instead of 1e-5 (the kind of slip a port between frameworks makes). Registered as its own
backend, ``pytorch-wrong-bn``, through ``--plugin plugins_wrong.wrong_bn``."""

from __future__ import annotations

import dataclasses

import cxrbench_pytorch
from cxrbench.hookspecs import hookimpl

NAME = "pytorch-wrong-bn"
WRONG_EPSILON = 0.1


@hookimpl
def cxrbench_backend_info():
    return dataclasses.replace(cxrbench_pytorch.cxrbench_backend_info(), name=NAME)


@hookimpl
def cxrbench_build_model(settings, weights):
    model = cxrbench_pytorch.cxrbench_build_model(settings, weights)
    model.net.features.norm5.eps = WRONG_EPSILON
    return model


@hookimpl
def cxrbench_predict(model, images, settings):
    return cxrbench_pytorch.cxrbench_predict(model, images, settings)


@hookimpl
def cxrbench_export_onnx(model, path, settings):
    return cxrbench_pytorch.cxrbench_export_onnx(model, path, settings)
