"""Shared test set-up: every test writes into temporary folders, never into the user's cache.

Tests that need a backend say so with ``@pytest.mark.backends("pytorch", ...)`` (or ``pytestmark``); they are
skipped, naming what to install, in an environment without that backend, such as CI's framework-free core run.
"""

import os
import tempfile

# Extension modules that register protobuf descriptors abort the interpreter when imported twice.
# pytester's in-process runs (the conformance kit's tests) drop every module first imported inside
# them, so anything such a run may import is imported here, once, for the whole session.
import onnx  # noqa: E402,F401
import onnxruntime  # noqa: E402,F401
import pytest

from helpers import backends

try:
    # torch must be imported before tensorflow in a process that holds both (the cross-backend tests,
    # the conformance kit's reference): importing torch._dynamo after tensorflow segfaults in
    # triton/knobs.py with torch 2.14.1 + tensorflow 2.21. Workers hold one framework each.
    import torchvision  # noqa: F401
except ImportError:
    pass

# Before any cxrbench module reads it: generated data sets and prepared caches go to a throw-away folder.
os.environ.setdefault("CXRBENCH_CACHE", tempfile.mkdtemp(prefix="cxrbench-test-cache-"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache folder for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CXRBENCH_CACHE", str(path))
    return path


def pytest_runtest_setup(item):
    for mark in item.iter_markers("backends"):
        reasons = [reason for reason in map(backends.missing, mark.args) if reason]
        if reasons:
            pytest.skip("; ".join(reasons))
