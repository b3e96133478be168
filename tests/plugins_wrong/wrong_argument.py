"""A backend whose prediction hook takes an argument the hookspec does not pass (``imgs`` for ``images``)."""

from cxrbench.backend.api import BackendInfo
from cxrbench.hookspecs import hookimpl


@hookimpl
def cxrbench_backend_info():
    return BackendInfo(name="wrong-argument", framework="numpy", version="0")


@hookimpl
def cxrbench_predict(model, imgs, settings):
    return "never reached"
