"""Which backends this environment has, so tests that need one are skipped naming what to install.

CI runs the tests in two environments (.ci/run): a framework-free one, then one with every backend. Every test that
needs a backend says so, with ``@pytest.mark.backends(...)`` (checked in conftest.py) or, in a module that imports
the framework at the top, with ``pytestmark = require(...)`` before those imports. The numpy example backend counts:
a test that runs it says ``backends("numpy")``.
"""

from __future__ import annotations

import importlib.util

import pytest

#: The backends the tests use: plugin module, the framework it needs, and the folder to install it from.
TEST_BACKENDS = {
    "pytorch": ("cxrbench_pytorch", "torch", "plugins/pytorch_backend"),
    "keras": ("cxrbench_keras", "tensorflow", "plugins/keras_backend"),
    "numpy": ("cxrbench_numpy_example", "numpy", "tests/example_plugin"),
    "jax": ("cxrbench_jax", "jax", "plugins/jax_backend"),
}
#: Backends that bring no framework: their tests run in CI's framework-free stage.
FRAMEWORK_FREE = frozenset({"numpy"})


def missing(name: str) -> str | None:
    """Why backend ``name`` cannot run here (what to install), or None when it can."""
    module, framework, folder = TEST_BACKENDS[name]
    if importlib.util.find_spec(module) is None or importlib.util.find_spec(framework) is None:
        return f"needs the {name} backend: pip install -e {folder}"
    return None


def require(*names: str) -> pytest.MarkDecorator:
    """Skip the whole calling module unless every named backend is installed (call before framework imports);
    otherwise the ``backends`` mark to assign to the module's ``pytestmark``, so CI knows which stage runs it."""
    reasons = [reason for reason in map(missing, names) if reason]
    if reasons:
        pytest.skip("; ".join(reasons), allow_module_level=True)
    return pytest.mark.backends(*names)


def needed(item: pytest.Item) -> set[str]:
    """Every backend a collected test declares (its marks, its module's and class's)."""
    return {name for mark in item.iter_markers("backends") for name in mark.args}


def in_full_stage(item: pytest.Item) -> bool:
    """Whether CI runs a collected test in its full stage, the one with everything installed: the test needs a
    framework's backend, Debian's chromium (``browser``), or it is a benchmark (kept in one file, measured with every
    backend installed). Every other test runs in the framework-free core stage."""
    needs_a_framework = bool(needed(item) - FRAMEWORK_FREE)
    return needs_a_framework or item.get_closest_marker("browser") is not None or "benchmark" in item.fixturenames
