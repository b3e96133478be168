"""A cxrbench checkout made importable, entry points included, without installing anything.

For a machine that can install nothing (the GPU check's: no index, no setuptools build): each distribution's folder
goes on ``PYTHONPATH``, and a folder of generated ``<name>-<version>.dist-info`` records (``METADATA`` and
``entry_points.txt``, read from the distribution's own ``pyproject.toml``) lets ``importlib.metadata`` find it, so
the ``cxrbench`` entry-point group, package versions and the environment capture behave as after ``pip install -e``.
Standard library only: it runs before cxrbench itself can be imported.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import io
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TreeDistribution:
    """One distribution of the checkout, as its pyproject.toml declares it."""

    folder: Path  #: the folder holding pyproject.toml and the package (what goes on PYTHONPATH)
    name: str
    version: str
    entry_points: dict[str, dict[str, str]]  #: group -> entry-point name -> "module[:attr]"

    @property
    def dist_info(self) -> str:
        return f"{re.sub(r'[-_.]+', '_', self.name)}-{self.version}.dist-info"


def read(folder: Path) -> TreeDistribution:
    """The name, version and entry points (console scripts included) of the distribution in ``folder``."""
    project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {group: dict(points) for group, points in project.get("entry-points", {}).items()}
    if project.get("scripts"):
        groups["console_scripts"] = dict(project["scripts"])
    return TreeDistribution(folder.resolve(), project["name"], project["version"], groups)


def installed(name: str, checkout: Path) -> bool:
    """Whether ``name`` is installed for every process, not only seen from the checkout: a build leaves
    ``<name>.egg-info`` in the checkout, which ``importlib.metadata`` finds through the current folder while a child
    started elsewhere (a probe, a worker) cannot import the package."""
    try:
        found = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    location = Path(found.locate_file("")).resolve()
    return not (location == checkout.resolve() or checkout.resolve() in location.parents)


def write_record(site: Path, distribution: TreeDistribution) -> Path:
    """``site/<name>-<version>.dist-info`` with the two files ``importlib.metadata`` reads."""
    record = site / distribution.dist_info
    record.mkdir(parents=True, exist_ok=True)
    metadata = f"Metadata-Version: 2.1\nName: {distribution.name}\nVersion: {distribution.version}\n"
    (record / "METADATA").write_text(metadata, encoding="utf-8")
    points = configparser.ConfigParser(interpolation=None)
    points.optionxform = str  # entry-point names keep their case
    points.read_dict(distribution.entry_points)
    text = io.StringIO()
    points.write(text)
    (record / "entry_points.txt").write_text(text.getvalue(), encoding="utf-8")
    (record / "INSTALLER").write_text("cxrbench tools/tree_site.py (source tree, not installed)\n", encoding="utf-8")
    return record


def expose(distributions: list[TreeDistribution], site: Path) -> list[str]:
    """Write the records into ``site``; return the ``PYTHONPATH`` entries that make the distributions importable."""
    for distribution in distributions:
        write_record(site, distribution)
    return [str(site.resolve()), *dict.fromkeys(str(d.folder) for d in distributions)]
