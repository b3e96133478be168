"""The house's rules: backends import only the public surface, old module paths still work (warning), the package map
in ``cxrbench/__init__.py`` names every top-level part, and the one list of first-party backends feeds the rest."""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import cxrbench
import cxrbench.backend as surface
from cxrbench import _moved
from cxrbench.plugins import FIRST_PARTY_BACKENDS, FRAMEWORKS

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_PACKAGES = [
    ROOT / backend.folder / backend.module for backend in FIRST_PARTY_BACKENDS.values()
]  # the three backends and the numpy example
ALLOWED_MODULES = ("cxrbench.backend", "cxrbench.testing")


def _core_imports(tree: ast.AST):
    """(line, module, names) of every absolute import of a ``cxrbench`` module in a parsed file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "cxrbench" or alias.name.startswith("cxrbench."):
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == "cxrbench" or node.module.startswith("cxrbench."):
                yield node.lineno, node.module, [alias.name for alias in node.names]


def test_backend_plugins_import_only_the_public_surface():
    assert all(package.is_dir() for package in PLUGIN_PACKAGES)
    offences = []
    for package in PLUGIN_PACKAGES:
        for path in sorted(package.rglob("*.py")):
            for line, module, names in _core_imports(ast.parse(path.read_text(), str(path))):
                where = f"{path.relative_to(ROOT)}:{line}"
                if module not in ALLOWED_MODULES:
                    offences.append(f"{where} imports {module}")
                elif module == "cxrbench.backend":
                    offences += [
                        f"{where} imports {name}, not in __all__" for name in names if name not in surface.__all__
                    ]
    assert offences == []


def test_the_surface_resolves_every_public_name_and_nothing_else():
    for name in surface.__all__:
        assert getattr(surface, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'WindowTimer'"):
        surface.WindowTimer  # noqa: B018  (the window timer is machinery, reached through Recorder.timed)
    assert len(set(surface.__all__)) == len(surface.__all__)


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_module_path_gives_the_new_module_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {_moved.MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(_moved.MOVED[old])
    sys.modules.pop(old, None)  # the next import warns again


def test_nothing_in_the_repository_imports_an_old_path():
    offences = []
    for path in sorted(ROOT.glob("**/*.py")):
        if any(part in {".git", "build", ".venv"} or part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        if path.name == "_moved.py" or path == Path(__file__).resolve():
            continue
        for line, module, names in _core_imports(ast.parse(path.read_text(), str(path))):
            paths = [module] + [f"{module}.{name}" for name in names]
            offences += [f"{path.relative_to(ROOT)}:{line}: {p}" for p in paths if p in _moved.MOVED]
    assert offences == []


def test_the_package_map_names_every_top_level_part():
    package = Path(cxrbench.__file__).parent
    parts = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    parts |= {p.name + "/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    doc = cxrbench.__doc__
    missing = sorted(part for part in parts if f"``{part}``" not in doc)
    assert missing == []
    assert len(parts) <= 18  # the grouped core: 25 flat modules and 8 folders before


def test_first_party_backends_are_the_one_list():
    from cxrbench.machine.env import PACKAGES
    from cxrbench.testing.conformance import HEAVY_MODULES

    for backend in FIRST_PARTY_BACKENDS.values():
        pyproject = (ROOT / backend.folder / "pyproject.toml").read_text()
        assert f'name = "{backend.distribution}"' in pyproject
        assert f'{backend.name} = "{backend.module}"' in pyproject  # its entry point
        assert (backend.distribution in PACKAGES) == (not backend.example)  # every real backend's version recorded
        assert set(backend.frameworks) <= HEAVY_MODULES
    assert set(FRAMEWORKS) <= set(PACKAGES)


def test_the_old_paths_warn_only_when_used():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        importlib.reload(cxrbench)  # importing the package itself never warns
