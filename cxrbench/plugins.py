"""The plugin manager: built-ins, entry points (group ``cxrbench``) and ``--plugin MODULE``.

The built-in backends are found through their entry points, exactly like a third party's. A plugin
that fails to import, or whose hooks pluggy rejects (a misspelt hook name such as ``cxrbench_predcit``,
an argument the hookspec lacks), is reported by name with its error and not registered at all; the
others still load. A worker's manager holds the core's plugins, every non-backend plugin and exactly
one backend, so plain ``firstresult`` hook calls reach that backend.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType

import pluggy
from pluggy import PluginValidationError

from cxrbench import hookspecs
from cxrbench.backend.api import BackendInfo
from cxrbench.errors import BackendError, CxrError

ENTRY_POINT_GROUP = "cxrbench"
#: The core's own plugins: data sets and AUROC evaluation; the training curves for TensorBoard.
BUILTIN_MODULES = ("cxrbench.builtin", "cxrbench.report.tensorboard")


@dataclass(frozen=True)
class FirstPartyBackend:
    """A backend this repository ships as a distribution of its own, installed exactly like a third party's.

    :data:`FIRST_PARTY_BACKENDS` is the one list of them: install hints, the environment capture's package list,
    the framework-free checks (CI's core-only stage, the conformance kit, the tests' backend markers) derive from it.
    """

    name: str  #: its ``--backend`` name (the name of its entry point in the group ``cxrbench``)
    module: str  #: the plugin module its entry point names
    distribution: str  #: its distribution name, e.g. ``"cxrbench-keras"``
    folder: str  #: its source folder in a cxrbench checkout
    frameworks: tuple[str, ...]  #: the framework distributions it brings (each imports under the same name)
    example: bool = False  #: the example backend (plain numpy, for plugin authors and the core's own tests)

    def install_hint(self) -> str:
        return f"pip install -e {self.folder} (the distribution {self.distribution}) from a cxrbench checkout"


#: Every first-party backend by ``--backend`` name. Third-party backends are found by entry point alone.
FIRST_PARTY_BACKENDS = {
    backend.name: backend
    for backend in (
        FirstPartyBackend(
            "pytorch", "cxrbench_pytorch", "cxrbench-pytorch", "plugins/pytorch_backend", ("torch", "torchvision")
        ),
        FirstPartyBackend(
            "keras", "cxrbench_keras", "cxrbench-keras", "plugins/keras_backend", ("tensorflow", "keras", "tf2onnx")
        ),
        FirstPartyBackend(
            "jax", "cxrbench_jax", "cxrbench-jax", "plugins/jax_backend", ("jax", "jaxlib", "flax", "optax")
        ),
        FirstPartyBackend(
            "numpy", "cxrbench_numpy_example", "cxrbench-numpy-example", "tests/example_plugin", (), example=True
        ),
    )
}
#: The frameworks of the first-party backends: what ``import cxrbench`` (and backend discovery) must never load.
FRAMEWORKS = tuple(name for backend in FIRST_PARTY_BACKENDS.values() for name in backend.frameworks)


@dataclass
class PluginFailure:
    name: str  #: entry-point name or module name
    error: str  #: ``ExceptionType: message``

    def __str__(self) -> str:
        return f"plugin {self.name!r} failed to load: {self.error}"


@dataclass
class Plugins:
    """A ready plugin manager plus what discovery found."""

    manager: pluggy.PluginManager
    backends: dict[str, BackendInfo] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    @property
    def hook(self):
        return self.manager.hook

    def backend_names(self) -> list[str]:
        return list(self.backends)


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _hook_problem(module: ModuleType, name: str) -> str | None:
    """Let pluggy check ``module`` on a scratch manager before it joins the real one; ``None`` when it passes.

    Registration checks each implementation's arguments against its hookspec; ``check_pending``
    then finds implementations that match no hookspec at all, which pluggy would otherwise ignore
    silently (a backend with ``cxrbench_predcit`` would fail only hours later, at prediction time).
    """
    pm = _new_manager()
    try:
        pm.register(module, name=name)
        pm.check_pending()
    except PluginValidationError as exc:
        unknown = [caller.name for caller in pm.get_hookcallers(module) or () if not caller.has_spec()]
        return "; ".join(map(_unknown_hook, unknown)) or " ".join(str(exc).split())
    return None


def _unknown_hook(name: str) -> str:
    """The misspelt hook, with the hookspec it most likely meant."""
    specs = [spec for spec in vars(hookspecs) if spec.startswith(f"{hookspecs.PROJECT}_")]
    close = difflib.get_close_matches(name, specs, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    return f"hook implementation {name!r} matches no hookspec{guess}"


def _backend_info(module: ModuleType) -> BackendInfo | None:
    info_hook = getattr(module, "cxrbench_backend_info", None)
    if info_hook is None:
        return None
    info = info_hook()
    return replace(info, plugin=module.__name__) if info is not None else None


def _load_candidates(extra_modules: Iterable[str]) -> tuple[list[tuple[str, ModuleType]], list[PluginFailure]]:
    loaded: list[tuple[str, ModuleType]] = []
    failures: list[PluginFailure] = []
    for name in BUILTIN_MODULES:
        loaded.append((name, importlib.import_module(name)))
    seen = {module for _, module in loaded}
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    sources = [(ep.name, ep.load) for ep in sorted(entry_points, key=lambda ep: ep.name)]
    sources += [(name, lambda name=name: importlib.import_module(name)) for name in extra_modules]
    for name, load in sources:
        try:
            module = load()
        except Exception as exc:  # a broken plugin must not take the others down
            failures.append(PluginFailure(name, f"{type(exc).__name__}: {exc}"))
            continue
        if module not in seen:
            seen.add(module)
            loaded.append((name, module))
    return loaded, failures


def load_plugins(extra_modules: Iterable[str] = (), backend: str | None = None) -> Plugins:
    """Discover and register plugins.

    :param extra_modules: module names given with ``--plugin``.
    :param backend: when set, register only this backend (a worker); a name not installed raises
        :class:`~cxrbench.errors.BackendError` (:func:`missing_backend_message`).
    """
    pm = _new_manager()
    plugins = Plugins(pm)
    loaded, plugins.failures = _load_candidates(extra_modules)
    for name, module in loaded:
        problem = _hook_problem(module, name)
        if problem is not None:
            plugins.failures.append(PluginFailure(name, problem))
            continue
        try:
            info = _backend_info(module)
        except Exception as exc:
            plugins.failures.append(PluginFailure(name, f"cxrbench_backend_info failed: {type(exc).__name__}: {exc}"))
            continue
        if info is not None:
            if info.name in plugins.backends:
                other = plugins.backends[info.name].plugin
                plugins.failures.append(PluginFailure(name, f"backend name {info.name!r} already taken by {other}"))
                continue
            plugins.backends[info.name] = info
            if backend is not None and info.name != backend:
                continue
        pm.register(module, name=name)
    if backend is not None and backend not in plugins.backends:
        raise BackendError(missing_backend_message(backend, plugins))
    return plugins


def missing_backend_message(backend: str, plugins: Plugins) -> str:
    """Why ``--backend NAME`` is not available: a built-in backend that is not installed names what to
    install; any other name gets the installed ones. Plugins that failed to load are named with their errors."""
    installed = ", ".join(plugins.backends) or "none"
    known = FIRST_PARTY_BACKENDS.get(backend)
    if known is None or backend in {failure.name for failure in plugins.failures}:
        message = f"unknown backend {backend!r} (installed: {installed})"
    else:
        message = f"backend {backend!r} is not installed: {known.install_hint()} (installed: {installed})"
    if plugins.failures:
        broken = ", ".join(f"{f.name} ({f.error})" for f in plugins.failures)
        message += f"; plugins that failed to load: {broken}"
    return message


def no_backend_message() -> str:
    """What to do when no backend is installed at all: the built-in ones to install, or a third party's."""
    choices = " or ".join(f"pip install -e {b.folder}" for b in FIRST_PARTY_BACKENDS.values() if not b.example)
    return (
        f"no backend is installed: from a cxrbench checkout, {choices}; any distribution with a "
        f"{ENTRY_POINT_GROUP!r} entry point is a backend too, and --plugin MODULE loads one that is not installed"
    )


def require_answer(value, hook_name: str, backend: str):
    """Fail clearly when the selected backend does not implement a hook the core needs."""
    if value is None:
        raise CxrError(f"backend {backend!r} does not implement {hook_name}")
    return value
