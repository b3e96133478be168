"""A minimal backend used to test selection: it answers discovery and one firstresult hook."""

from cxrbench.backend.api import BackendInfo
from cxrbench.hookspecs import hookimpl


@hookimpl
def cxrbench_backend_info():
    return BackendInfo(name="echo", framework="numpy", version="0")


@hookimpl
def cxrbench_predict(model, images, settings):
    return "echo"
