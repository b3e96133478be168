"""Validation of ``run.json`` against ``schema.json`` (JSON Schema), naming the field that is wrong."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from cxrbench.errors import CxrError
from cxrbench.run.folder import RUN_JSON


@cache
def load_schema() -> dict[str, Any]:
    return json.loads(resources.files("cxrbench.run").joinpath("schema.json").read_text(encoding="utf-8"))


def _field(path) -> str:
    return ".".join(str(part) for part in path) or "(top level)"


def validate(run: dict[str, Any], origin: str | Path = RUN_JSON) -> None:
    """Raise :class:`CxrError` ``"run.json: backends.keras.status: 'done' is not one of [...]"``.

    The most specific error (deepest path) is reported, so a bad nested field is named exactly.
    """
    try:
        import jsonschema
    except ImportError:
        raise CxrError("validating run.json needs the jsonschema package (pip install 'cxrbench[test]')") from None
    validator = jsonschema.Draft202012Validator(load_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(run))
    if error is not None:
        raise CxrError(f"{origin}: {_field(error.absolute_path)}: {error.message}")
