"""A backend whose prediction hook is misspelt (``cxrbench_predcit``). pluggy alone would register it and
never call it; the plugin manager must refuse the plugin at discovery, naming it and the hook."""

from cxrbench.backend.api import BackendInfo
from cxrbench.hookspecs import hookimpl


@hookimpl
def cxrbench_backend_info():
    return BackendInfo(name="misspelt", framework="numpy", version="0")


@hookimpl
def cxrbench_predcit(model, images, settings):
    return "never reached"
