"""Which backends this environment has, so tests that need one are skipped naming what to install.

CI runs the core's tests once in a framework-free environment: every test that needs a backend says so, with
``@pytest.mark.backends(...)`` (checked in conftest.py) or, in a module that imports the framework at the top,
with :func:`require` before those imports.
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


def missing(name: str) -> str | None:
    """Why backend ``name`` cannot run here (what to install), or None when it can."""
    module, framework, folder = TEST_BACKENDS[name]
    if importlib.util.find_spec(module) is None or importlib.util.find_spec(framework) is None:
        return f"needs the {name} backend: pip install -e {folder}"
    return None


def require(*names: str) -> None:
    """Skip the whole calling module unless every named backend is installed (call before framework imports)."""
    reasons = [reason for reason in map(missing, names) if reason]
    if reasons:
        pytest.skip("; ".join(reasons), allow_module_level=True)
