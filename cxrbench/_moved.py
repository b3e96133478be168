"""The module paths of cxrbench 0.1's flat layout, kept importable for one release with a DeprecationWarning.

``import cxrbench.env`` (an old path) gives the very module object of its new path (``cxrbench.machine.env``), so a
third party's imports, attribute reads and monkeypatches keep working while the warning names the new path. Nothing
in this repository imports an old path (a test checks); delete this module and its install in ``__init__`` in the
release after next.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Old module path -> new module path.
MOVED = {
    "cxrbench.api": "cxrbench.backend.api",
    "cxrbench.training": "cxrbench.backend.training",
    "cxrbench.recorder": "cxrbench.backend.recorder",
    "cxrbench.timing": "cxrbench.backend.timing",
    "cxrbench.weights": "cxrbench.backend.canonical",
    "cxrbench.initial_weights": "cxrbench.backend.initial_weights",
    "cxrbench.checkpoints": "cxrbench.backend.checkpoints",
    "cxrbench.model_inputs": "cxrbench.backend.model_inputs",
    "cxrbench.numerics_record": "cxrbench.backend.numerics_record",
    "cxrbench.onnx_graph": "cxrbench.backend.onnx_graph",
    "cxrbench.budget": "cxrbench.machine.budget",
    "cxrbench.env": "cxrbench.machine.env",
    "cxrbench.devices": "cxrbench.machine.devices",
    "cxrbench.device_check": "cxrbench.machine.framework_devices",
    "cxrbench.monitor": "cxrbench.machine.monitor",
    "cxrbench.monitor.gpu": "cxrbench.machine.monitor.gpu",
    "cxrbench.monitor.noise": "cxrbench.machine.monitor.noise",
    "cxrbench.monitor.sampler": "cxrbench.machine.monitor.sampler",
    "cxrbench.monitor.summary": "cxrbench.machine.monitor.summary",
    "cxrbench.checks": "cxrbench.deploy",
    "cxrbench.checks.onnx": "cxrbench.deploy.onnx_file",
    "cxrbench.checks.ort_benchmark": "cxrbench.deploy.ort_benchmark",
    "cxrbench.checks.equivalence": "cxrbench.metrics.equivalence",
    "cxrbench.run_folder": "cxrbench.run.folder",
    "cxrbench.run.cross_checks": "cxrbench.run.comparison",
    "cxrbench.run.cam_files": "cxrbench.cam.files",
    "cxrbench.cam_overlay": "cxrbench.cam.overlay",
    "cxrbench.classes": "cxrbench.data.classes",
    "cxrbench.deploy.tables": "cxrbench.results",
    "cxrbench.deploy.cam": "cxrbench.cam.overlay",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path first (before the file system) and loads it as its new module, warning once per import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder module; exec_module swaps in the real one

    def exec_module(self, module) -> None:
        old, new = module.__name__, MOVED[module.__name__]
        warnings.warn(f"{old} moved to {new}; the old path goes in the next release", DeprecationWarning, stacklevel=2)
        # The import system returns what sys.modules holds after exec_module: the new module itself.
        sys.modules[old] = importlib.import_module(new)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), so an old path never loads a second copy of a module."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())
