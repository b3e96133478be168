"""Shared test set-up: every test writes into temporary folders, never into the user's cache.

A test says what it needs, so that it runs (once) in the leanest environment that holds it and is skipped, naming
what to install, everywhere else:

* ``@pytest.mark.backends("pytorch", ...)``, or ``pytestmark = require(...)`` (tests/helpers/backends.py) in a
  module that imports a framework at the top. The numpy example backend counts: a test running it says so.
* ``--stage core`` keeps the tests that need no framework (no backend, or only the numpy example): CI runs them in a
  framework-free venv. ``--stage full`` keeps the others: those needing a framework, Debian's chromium (``browser``)
  or a benchmark (helpers/backends.py: in_full_stage). No ``--stage``: everything.
* ``@pytest.mark.serial``: the test must not share the machine (a timing bound, a measurement, a deliberate CPU
  hog). CI runs the other tests two at a time (pytest-xdist), then these alone; every benchmark is serial.
* The ``smoke_run`` fixture: the smoke suite run once per session (tests/helpers/smoke_run.py), for every test that
  reads a whole run's results; tests using it need its backends and carry the ``smoke_run`` mark (both added here),
  so CI runs them alone in a stage of their own (``-m smoke_run``), and they share one xdist worker elsewhere.
* Under pytest-xdist each worker keeps to its own share of the cores (:func:`_keep_to_this_workers_cores`).
"""

import os
import shutil
import signal
import tempfile

# Extension modules that register protobuf descriptors abort the interpreter when imported twice.
# pytester's in-process runs (the conformance kit's tests) drop every module first imported inside
# them, so anything such a run may import is imported here, once, for the whole session.
import onnx  # noqa: E402,F401
import onnxruntime  # noqa: E402,F401
import pytest

from helpers import backends
from helpers.smoke_run import SMOKE_BACKENDS, SmokeRun, run_smoke_suite

try:
    # torch must be imported before tensorflow in a process that holds both (the cross-backend tests,
    # the conformance kit's reference): importing torch._dynamo after tensorflow segfaults in
    # triton/knobs.py with torch 2.14.1 + tensorflow 2.21. Workers hold one framework each.
    import torchvision  # noqa: F401
except ImportError:
    pass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
#: Throw-away folders this process made, removed when its session ends.
_MADE: list[str] = []


def _throw_away_folder(variable: str, prefix: str) -> None:
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        _MADE.append(os.environ[variable])


# XLA compilations are kept for the session (its child processes and xdist workers inherit the variable), so a
# JAX program compiled once is loaded the next time; CI sets one folder for all its pytest runs.
_throw_away_folder("JAX_COMPILATION_CACHE_DIR", "cxrbench-test-jax-cache-")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stage",
        choices=("core", "full"),
        default=None,
        help="CI's stages: core = tests needing no framework; full = the others (frameworks, chromium, benchmarks)",
    )
    parser.addoption(
        "--deselected-to",
        metavar="FILE",
        default=None,
        help="write the node ids --stage deselects to FILE (CI checks that every test ran in exactly one stage)",
    )


def _keep_to_this_workers_cores() -> None:
    """An xdist worker runs on its own share of the usable cores (gw0 the first, gw1 the second on 2 cores).

    Every process a test starts inherits the affinity mask, and torch's, TensorFlow's and XLA's thread pools and
    cxrbench's thread budget (cxrbench.machine.budget) all size themselves to it: two tests side by side then run
    one thread per core instead of two threads each spinning on the same two cores, which made a 2-thread torch
    training several times slower.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count and hasattr(os, "sched_setaffinity")):
        return
    cores, index, count = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw")), int(count)
    if count <= len(cores):
        os.sched_setaffinity(0, cores[index::count])


def pytest_configure(config: pytest.Config) -> None:
    _keep_to_this_workers_cores()
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # A shell's background job (`cmd &`, as many CI runners start steps) begins with SIGINT ignored and passes
        # that on to every child, which then cannot be interrupted: the Ctrl-C tests need it as from a terminal.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not _is_xdist_controller(config):
        # Generated data sets and prepared caches go to a throw-away folder, one per test process (each xdist
        # worker its own), set before any test runs cxrbench.
        _throw_away_folder("CXRBENCH_CACHE", "cxrbench-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    for folder in _MADE:
        shutil.rmtree(folder, ignore_errors=True)


def _is_xdist_controller(config: pytest.Config) -> bool:
    """True in the process that hands tests to xdist workers (it runs none itself)."""
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "smoke_run" in item.fixturenames:
            item.add_marker(pytest.mark.smoke_run)
            item.add_marker(pytest.mark.backends(*SMOKE_BACKENDS))
            item.add_marker(pytest.mark.xdist_group("smoke-run"))
        if "benchmark" in item.fixturenames:
            item.add_marker(pytest.mark.serial)
    stage = config.getoption("stage")
    if stage is not None:
        keep = [item for item in items if backends.in_full_stage(item) == (stage == "full")]
        dropped = [item for item in items if backends.in_full_stage(item) != (stage == "full")]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        _write_deselected(config, dropped)
        items[:] = keep
    _longest_first(items)


def _longest_first(items: list[pytest.Item]) -> None:
    """The smoke run's tests, then the modules holding slow tests, then the rest, each module kept whole (its
    fixtures are made once): xdist hands tests out in this order, so no long test starts last."""
    slow_modules = {item.nodeid.partition("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(
        key=lambda item: ("smoke_run" not in item.fixturenames, item.nodeid.partition("::")[0] not in slow_modules)
    )


def _write_deselected(config: pytest.Config, dropped: list[pytest.Item]) -> None:
    path = config.getoption("deselected_to")
    if path and os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":  # every worker collects the same
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(f"{item.nodeid}\n" for item in dropped)


def pytest_runtest_setup(item: pytest.Item) -> None:
    reasons = [reason for reason in map(backends.missing, sorted(backends.needed(item))) if reason]
    if reasons:
        pytest.skip("; ".join(reasons))
    if "PYTEST_XDIST_WORKER" in os.environ and item.get_closest_marker("serial"):
        pytest.skip("serial: must not share the machine, so it runs without -n (CI runs it alone)")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache folder for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CXRBENCH_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """The smoke suite's run with its backends (tests/helpers/smoke_run.py), shared by every test of the session."""
    return run_smoke_suite(tmp_path_factory.mktemp("smoke") / "run")
