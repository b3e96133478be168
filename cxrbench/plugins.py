"""The plugin manager: built-ins, entry points (group ``cxrbench``) and ``--plugin MODULE``.

The built-in backends are found through their entry points, exactly like a third party's. A plugin
that fails to import is reported by name with its error, and the others still load. A worker's
manager holds the core's plugins, every non-backend plugin and exactly one backend, so plain
``firstresult`` hook calls reach that backend.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from types import ModuleType

import pluggy

from cxrbench import hookspecs
from cxrbench.api import BackendInfo
from cxrbench.errors import BackendError, CxrError

ENTRY_POINT_GROUP = "cxrbench"
#: The core's own plugins: data sets and AUROC evaluation.
BUILTIN_MODULES = ("cxrbench.builtin",)


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
    :param backend: when set, register only this backend (a worker); unknown names raise
        :class:`~cxrbench.errors.BackendError` listing the installed ones.
    """
    pm = _new_manager()
    plugins = Plugins(pm)
    loaded, plugins.failures = _load_candidates(extra_modules)
    for name, module in loaded:
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
        raise BackendError(_unknown_backend_message(backend, plugins))
    return plugins


def _unknown_backend_message(backend: str, plugins: Plugins) -> str:
    installed = ", ".join(plugins.backends) or "none"
    message = f"unknown backend {backend!r} (installed: {installed})"
    broken = [f.name for f in plugins.failures]
    if broken:
        message += f"; plugins that failed to load: {', '.join(broken)}"
    return message


def require_answer(value, hook_name: str, backend: str):
    """Fail clearly when the selected backend does not implement a hook the core needs."""
    if value is None:
        raise CxrError(f"backend {backend!r} does not implement {hook_name}")
    return value
