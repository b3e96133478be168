"""docs/writing-a-backend.md against the code (datasette's documented-hooks test, for cxrbench's backend guide).

Every hookspec has a section in the guide with its exact signature, read from cxrbench.hookspecs with inspect;
every hookspec is exercised by the conformance kit; every field the guide gives for the plain types exists, in the
dataclass's order. A renamed argument or field fails here, naming the hook or the type.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from cxrbench import hookspecs
from cxrbench.backend import api, training
from cxrbench.data import prepared
from cxrbench.testing import conformance

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-backend.md"
HOOKS = {name: function for name, function in vars(hookspecs).items() if hasattr(function, f"{hookspecs.PROJECT}_spec")}
#: The plain types a backend builds or reads, by the name the guide uses.
TYPES = {
    cls.__name__: cls
    for cls in (
        api.BackendInfo,
        api.ExportInfo,
        api.CamResult,
        api.IdiomaticLoop,
        training.EpochOutcome,
        prepared.Batch,
    )
}


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


def signature(name: str) -> str:
    return f"{name}({', '.join(inspect.signature(HOOKS[name]).parameters)})"


def calls_of(text: str, name: str) -> list[str]:
    """The argument texts of every ``name(...)`` in ``text`` (balanced parentheses, across lines)."""
    found = []
    for match in re.finditer(rf"\b{re.escape(name)}\(", text):
        depth, start = 1, match.end()
        for end in range(start, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                found.append(text[start:end])
                break
    return found


def argument_names(arguments: str) -> list[str]:
    """``a, b=f(x, y), **rest`` -> ``["a", "b"]``: the names of the top-level arguments, keyword or bare."""
    names, depth, part = [], 0, ""
    for char in arguments + ",":
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            name = re.match(r"\s*([A-Za-z_]\w*)\s*(=|$)", part)
            if name:
                names.append(name.group(1))
            part = ""
        else:
            part += char
    return names


def test_the_guide_knows_every_hook():
    assert len(HOOKS) >= 10, sorted(HOOKS)  # the marker test really finds the hookspecs


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_has_a_section_with_its_signature(guide: str, hook: str):
    expected = signature(hook)
    headings = [line for line in guide.splitlines() if line.startswith("#") and f"`{hook}(" in line]
    assert headings, f"docs/writing-a-backend.md has no section for {hook}: add a heading `{expected}`"
    for documented in calls_of(guide, hook):
        assert f"{hook}({documented})" == expected, (
            f"docs/writing-a-backend.md gives {hook}({documented}) but cxrbench/hookspecs.py has {expected}"
        )


def test_the_guide_names_no_hook_that_does_not_exist(guide: str):
    named = set(re.findall(rf"\b({hookspecs.PROJECT}_\w+)\(", guide))
    assert named <= set(HOOKS), f"not hookspecs: {sorted(named - set(HOOKS))}"


def names_used(tree: ast.AST) -> set[str]:
    """Hooks a module reaches in code: attributes (``hook.cxrbench_evaluate``), hook names passed as strings
    (``call("cxrbench_predict", ...)``) and the same inside the Python scripts it runs in child processes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in HOOKS:
                names.add(node.value)
            elif "\n" in node.value:
                names |= names_used(python_or_nothing(node.value))
    return names


def python_or_nothing(text: str) -> ast.AST:
    try:
        return ast.parse(text)
    except SyntaxError:  # prose (a docstring, a message), not a script
        return ast.Module(body=[], type_ignores=[])


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_is_exercised_by_the_conformance_kit(hook: str):
    kit = names_used(ast.parse(Path(conformance.__file__).read_text(encoding="utf-8")))
    assert hook in kit, f"cxrbench/testing/conformance.py never calls {hook}"


@pytest.mark.parametrize("type_name", sorted(TYPES))
def test_documented_fields_exist_in_order(guide: str, type_name: str):
    """Every ``Type(...)`` in the guide names real fields, in the dataclass's order; one of them names them all."""
    fields = [f.name for f in dataclasses.fields(TYPES[type_name])]
    documented = [argument_names(arguments) for arguments in calls_of(guide, type_name)]
    assert fields in documented, f"docs/writing-a-backend.md never gives {type_name}({', '.join(fields)})"
    for names in documented:
        unknown = [name for name in names if name not in fields]
        assert not unknown, f"docs/writing-a-backend.md gives {type_name} fields {unknown} that it does not have"
        assert names == sorted(names, key=fields.index), f"{type_name}({', '.join(names)}): fields out of order"


def test_names_used_sees_calls_not_prose():
    code = (
        'call("cxrbench_predict")\nx.cxrbench_cam\nrun("import m\\nm.cxrbench_train()\\n")\n'
        '"""cxrbench_dataset is prose\n"""\n'
    )
    assert names_used(ast.parse(code)) & set(HOOKS) == {"cxrbench_predict", "cxrbench_cam", "cxrbench_train"}


def test_argument_names_reads_keywords_and_bare_names():
    assert argument_names('name="numpy", version=v("numpy", 1), extra={"a": 1, "b": 2}, ...') == [
        "name",
        "version",
        "extra",
    ]
    assert argument_names("maps, bias, logits") == ["maps", "bias", "logits"]
