"""The GPU machine's image, imitated for a test's child processes: put this folder on PYTHONPATH.

That image has no TensorFlow, Keras, tf2onnx, GPUtil, FastAPI, uvicorn or pydicom, and cxrbench is not installed. Here
those are hidden from the import system itself, which is all the GPU check and cxrbench consult: ``import``,
``importlib.util.find_spec`` (None) and ``importlib.metadata`` (no distribution, no entry point). cxrbench's own
installed copy goes too (its editable finders, its ``.dist-info`` and modules in site-packages), so only what the
check itself puts on PYTHONPATH from the checkout can be imported, as on that machine. Python runs this module at
start-up in every process of the tree (workers, probes, spawned DDP ranks), because they inherit PYTHONPATH.
"""

import importlib.abc
import re
import site
import sys
from pathlib import Path

#: Top-level modules the image lacks.
HIDDEN_MODULES = frozenset({"tensorflow", "keras", "tf_keras", "tf2onnx", "GPUtil", "fastapi", "uvicorn", "pydicom"})
#: Their distributions (normalised names).
HIDDEN_DISTRIBUTIONS = frozenset(
    {"tensorflow", "tensorflow-cpu", "keras", "tf-keras", "tf2onnx", "gputil", "fastapi", "uvicorn", "pydicom"}
)
#: Where this interpreter's installed packages live: cxrbench found there counts as installed, so it is hidden.
INSTALLED = [Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]]


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_here(location: str | None) -> bool:
    if not location:
        return False
    path = Path(location).resolve()
    return any(path.is_relative_to(root) for root in INSTALLED)


class Hiding(importlib.abc.MetaPathFinder):
    """Wraps one finder of ``sys.meta_path``: what it would find of the hidden packages is not found."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in HIDDEN_MODULES:
            return None
        spec = self.inner.find_spec(name, path, target)
        if spec is not None and top.startswith("cxrbench") and _installed_here(spec.origin):
            return None
        return spec

    def find_distributions(self, *args, **kwargs):
        finder = getattr(self.inner, "find_distributions", None)
        for distribution in finder(*args, **kwargs) if finder else ():
            name = _normalised(distribution.metadata["Name"] or "")
            if name in HIDDEN_DISTRIBUTIONS:
                continue
            if name.startswith("cxrbench") and _installed_here(str(distribution.locate_file(""))):
                continue
            yield distribution

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


def _is_cxrbench_editable(finder) -> bool:
    """setuptools' editable-install finders (``__editable___cxrbench_..._finder``) map cxrbench to a checkout."""
    return getattr(finder, "__module__", "").startswith("__editable___cxrbench")


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path if not _is_cxrbench_editable(finder)]
sys.path[:] = [entry for entry in sys.path if not entry.startswith("__editable__.cxrbench")]
for name in [m for m in sys.modules if m.partition(".")[0] in HIDDEN_MODULES]:
    del sys.modules[name]
