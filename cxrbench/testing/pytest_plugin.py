"""The pytest plugin behind ``pytest --cxrbench-backend NAME``: the conformance kit for backends.

Registered under the ``pytest11`` entry point, so it loads in every pytest run. It stays inert
(it only adds its options) unless ``--cxrbench-backend`` is given; then, when no test paths are
named on the command line, the session collects only :mod:`cxrbench.testing.conformance`, from any
directory. Naming paths or node ids still works (e.g. ``pytest --cxrbench-backend numpy
--pyargs cxrbench.testing.conformance -k cam``). The options reach the kit's tests through its fixtures
(``kit``: :class:`cxrbench.testing.conformance.KitOptions`), never through module state. No framework is imported
here: the backend imports its own, inside its hooks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

KIT = Path(__file__).with_name("conformance.py")

# The kit's plain asserts get pytest's detailed failure messages even if imported early.
pytest.register_assert_rewrite("cxrbench.testing.conformance")


def pytest_addoption(parser: pytest.Parser) -> None:
    from cxrbench.suite import ARCHITECTURES

    group = parser.getgroup("cxrbench", "cxrbench backend conformance kit")
    group.addoption(
        "--cxrbench-backend",
        metavar="NAME",
        default=None,
        help="run the conformance kit against this cxrbench backend (only the kit, unless paths are given)",
    )
    group.addoption(
        "--cxrbench-reference",
        metavar="NAME",
        default=None,
        help="backend the kit compares logits with on shared weights (default: pytorch when installed)",
    )
    group.addoption(
        "--cxrbench-arch",
        metavar="ARCH",
        default=None,
        choices=sorted(ARCHITECTURES),
        help="model.arch of every kit model (default densenet-tiny; densenet121 is the full network, much slower)",
    )
    group.addoption(
        "--cxrbench-plugin",
        metavar="MODULE",
        action="append",
        default=[],
        help="also load this module as a cxrbench plugin (like `cxrbench --plugin`); repeatable",
    )


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("cxrbench_backend")
    if name is None:
        return
    _check_installed(config, name, "--cxrbench-backend")
    reference = config.getoption("cxrbench_reference")
    if reference is not None:
        _check_installed(config, reference, "--cxrbench-reference")
    if config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args = [str(KIT)]
        config.args_source = pytest.Config.ArgsSource.ARGS


def _check_installed(config: pytest.Config, name: str, option: str) -> None:
    """A wrong name is a usage error on one line, not a kit full of errors."""
    from cxrbench.errors import BackendError
    from cxrbench.plugins import load_plugins

    try:
        load_plugins(config.getoption("cxrbench_plugin"), backend=name)
    except BackendError as exc:
        raise pytest.UsageError(f"{option} {name}: {exc}") from None


def pytest_report_header(config: pytest.Config) -> str | None:
    name = config.getoption("cxrbench_backend")
    if name is None:
        return None
    from cxrbench.testing.conformance import DEFAULT_ARCH

    reference = config.getoption("cxrbench_reference") or "pytorch (default)"
    arch = config.getoption("cxrbench_arch") or f"{DEFAULT_ARCH} (default)"
    return f"cxrbench conformance kit: backend {name!r}, reference {reference!r}, arch {arch!r}"
