"""The run folder's one definition (cxrbench/run/folder.py), the import rule that keeps it below run/, and a real
run's files against it."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrbench.files import read_json
from cxrbench.report.load import load_run
from cxrbench.run import folder as run_folder
from cxrbench.run.cluster import JOBS_DIR
from cxrbench.run.schema import load_schema
from helpers.fake_run import make_fake_run
from helpers.tiny_run import TINY_RUN

PACKAGE = Path(run_folder.__file__).resolve().parents[1]  # cxrbench/
ROOT = PACKAGE.parent
#: Modules outside cxrbench/run/ that may import it, and why.
MAY_IMPORT_RUN = {
    "cxrbench/cli.py": "the command line dispatches `cxrbench run` to it",
    "cxrbench/testing/conformance.py": "the kit checks a backend against the evaluate stage's own helper",
}
#: The one module of run/ the rest may import: the run folder's format, which report/ and cam/ read and write by.
FORMAT = "cxrbench.run.folder"
#: The modules everything else writes and reads files through: they import no other part of cxrbench but errors.
LOW_LEVEL = ("cxrbench/files.py", "cxrbench/run/folder.py", "cxrbench/cam/overlay.py")


def imported_modules(source: str, module: str) -> set[str]:
    """Every module ``source`` (the text of ``module``, dotted) imports, absolute, with ``from a import b`` also
    giving ``a.b`` (b may be a submodule); imports inside functions count too."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: -node.level]
                base = ".".join(package + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _imports_run(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "cxrbench.run" or m.startswith("cxrbench.run."))


def _package_files() -> dict[str, Path]:
    return {path.relative_to(ROOT).as_posix(): path for path in sorted(PACKAGE.rglob("*.py"))}


def _module_name(relative: str) -> str:
    return relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def test_the_import_check_sees_every_form_of_import():
    absolute = (
        "import cxrbench.run.store\nfrom cxrbench import run\ndef f():\n    from cxrbench.run.store import RunLock\n"
    )
    assert _imports_run(imported_modules(absolute, "cxrbench.machine.monitor.noise")) == [
        "cxrbench.run",
        "cxrbench.run.store",
        "cxrbench.run.store.RunLock",
    ]
    relative = "from . import store\nfrom ..run import keep\n"
    assert _imports_run(imported_modules(relative, "cxrbench.run.worker")) == [
        "cxrbench.run",
        "cxrbench.run.keep",
        "cxrbench.run.store",
    ]
    assert _imports_run(imported_modules(relative, "cxrbench.report.load")) == ["cxrbench.run", "cxrbench.run.keep"]
    assert _imports_run(imported_modules("from cxrbench import run_folder\nimport cxrbench.runner\n", "m")) == []


def _beyond_the_format(run_imports: list[str]) -> list[str]:
    """What of run/ an import list reaches besides the folder format (``from cxrbench.run import folder`` is fine)."""
    beyond = [m for m in run_imports if not (m == FORMAT or m.startswith(f"{FORMAT}."))]
    return [] if beyond == ["cxrbench.run"] and len(beyond) < len(run_imports) else beyond


def test_the_format_is_the_only_part_of_run_the_rest_may_import():
    assert _beyond_the_format(["cxrbench.run", "cxrbench.run.folder"]) == []
    assert _beyond_the_format(["cxrbench.run.folder", "cxrbench.run.folder.RUN_JSON"]) == []
    assert _beyond_the_format(["cxrbench.run", "cxrbench.run.folder", "cxrbench.run.stages"]) == [
        "cxrbench.run",
        "cxrbench.run.stages",
    ]
    assert _beyond_the_format(["cxrbench.run"]) == ["cxrbench.run"]


def test_nothing_below_run_imports_it_monitor_and_report_included():
    """run/ sits on top: monitor/, report/, the data, metrics and I/O modules never import it (no upward import),
    except its folder format (run/folder.py), which the report reads by."""
    offenders = {}
    for relative, path in _package_files().items():
        if relative.startswith("cxrbench/run/") or relative in MAY_IMPORT_RUN:
            continue
        upward = _beyond_the_format(
            _imports_run(imported_modules(path.read_text(encoding="utf-8"), _module_name(relative)))
        )
        if upward:
            offenders[relative] = upward
    assert not offenders
    checked = _package_files()
    for package in ("cxrbench/machine/monitor/", "cxrbench/report/"):
        assert any(r.startswith(package) for r in checked)


def test_the_low_level_modules_import_no_other_part_of_cxrbench():
    for relative in LOW_LEVEL:
        source = (ROOT / relative).read_text(encoding="utf-8")
        ours = {m for m in imported_modules(source, _module_name(relative)) if m.startswith("cxrbench")}
        assert all(m == "cxrbench.errors" or m.startswith("cxrbench.errors.") for m in ours), (relative, ours)


def test_schema_json_states_the_schema_version_of_run_folder():
    schema = load_schema()
    assert schema["properties"]["schema_version"]["const"] == run_folder.SCHEMA_VERSION
    assert f"schema_version {run_folder.SCHEMA_VERSION}" in schema["title"]


def test_the_runs_page_describes_every_file_and_folder_of_the_run_folder():
    page = (ROOT / "docs" / "runs.md").read_text(encoding="utf-8")
    block = page[page.index("reports/<timestamp>-<suite>/") :]
    block = block[: block.index("```")]
    # a file inside <backend>/ or tensorboard/<backend>/ is described by its name after the placeholder
    found = re.findall(r"[\w*/.-]+\.(?:jsonl|json|npz|npy|onnx|txt|html|csv|lock|tfevents\.\*)", block)
    described = [pattern.lstrip("/") for pattern in found]
    files = (
        *run_folder.RUN_FILES,
        *run_folder.BACKEND_FILES,
        run_folder.CROP_BOXES_CSV,
        run_folder.IMPORTED_INIT,
        run_folder.INIT_ONNX,
        run_folder.LOCK_FILE,
        run_folder.SWEEP_CSV,
        run_folder.TENSORBOARD_EVENTS,
        run_folder.RANKS_JSON,
        run_folder.OVERHEAD_JSON,
        run_folder.IDIOMATIC_JSON,
    )
    missing = [
        name
        for name in files
        if not any(fnmatch.fnmatch(name, pattern) or fnmatch.fnmatch(Path(name).name, pattern) for pattern in described)
    ]
    assert not missing
    folders = (
        run_folder.PROFILE_DIR,
        run_folder.REPEATS_DIR,
        run_folder.OVERHEAD_DIR,
        run_folder.SWEEP_DIR,
        run_folder.TENSORBOARD_DIR,
        JOBS_DIR,
        run_folder.gpus_folder(Path(), "", 2, 1).name.replace("2", "<N>"),
        run_folder.nodes_folder(Path(), "", 2, 1).name.replace("2", "<N>"),
    )
    assert [name for name in folders if f"{name}/" not in block] == []


def test_writer_and_reader_take_a_backend_summary_from_the_same_files(tmp_path):
    """report/load.py fills what run.json lacks from the files :data:`BACKEND_FEEDS` names, as the orchestrator does."""
    run_dir = make_fake_run(tmp_path / "run", backends=("pytorch",))
    folder = run_dir / "pytorch"
    metrics = read_json(folder / run_folder.METRICS_JSON)
    (folder / run_folder.METRICS_JSON).write_text(json.dumps({**metrics, "extra_metric": {"value": 1.5}}))
    data = json.loads((run_dir / run_folder.RUN_JSON).read_text())
    data["backends"] = {}
    (run_dir / run_folder.RUN_JSON).write_text(json.dumps(data))

    merged = run_folder.backend_results(folder, read_json)
    loaded = load_run(run_dir).backends["pytorch"].summary
    assert {feed.key for feed in run_folder.BACKEND_FEEDS} <= set(loaded)
    for feed in run_folder.BACKEND_FEEDS:
        assert loaded[feed.key] == merged[feed.key], feed.key
    assert merged["auroc"] == metrics["auroc"] and merged["metrics"] == {"extra_metric": {"value": 1.5}}
    assert merged["history"] == read_json(folder / run_folder.HISTORY_JSON)

    empty = run_folder.backend_results(tmp_path / "nothing-here", read_json)
    assert empty["history"] == [] and empty["metrics"] == {} and empty["auroc"] is None and empty["onnx"] is None


def test_paths_of_repeats_gpu_counts_sweeps_and_shared_weights(tmp_path):
    assert run_folder.repeat_folder(tmp_path, "keras", 1) == tmp_path / "keras"
    assert run_folder.repeat_folder(tmp_path, "keras", 3) == tmp_path / "keras" / "repeats" / "r3"
    assert run_folder.gpus_folder(tmp_path, "keras", 2, 1) == tmp_path / "keras" / "gpus-2"
    assert run_folder.sweep_folder(tmp_path, "p", "keras") == tmp_path / "sweep" / "p" / "keras"
    assert run_folder.shared_init_path(tmp_path, 8, 7).match(run_folder.SHARED_INIT_FILES)
    assert run_folder.log_of("keras") == "keras/log.txt"


TINY = ["--backend", "numpy", *TINY_RUN, "--epochs", "1"]


@pytest.mark.backends("numpy")
@pytest.mark.slow
def test_a_real_run_writes_exactly_the_files_run_folder_lists(tmp_path):
    """The example NumPy backend's run (every stage, default run.keep): each listed file exists and nothing else
    is there but the CAM PNGs (their names depend on the data)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cxrbench", "run", "--out", str(run_dir), *TINY],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    pngs = {f for f in found if re.fullmatch(rf"numpy/{run_folder.CAMS_DIR}/[^/]+\.png", f)}
    events = {f for f in found if fnmatch.fnmatch(f, run_folder.TENSORBOARD_EVENTS)}
    assert len(events) == (1 if importlib.util.find_spec("tensorboard") else 0)  # without the package: a note only
    expected = set(run_folder.RUN_FILES) | {f"numpy/{name}" for name in run_folder.BACKEND_FILES}
    assert pngs and found - pngs - events == expected
    index = read_json(run_dir / "numpy" / run_folder.CAMS_INDEX)
    assert {f"numpy/{run_folder.CAMS_DIR}/{entry['file']}" for entry in index} == pngs
    assert np.load(run_dir / "numpy" / run_folder.CAMS_NPZ)["maps"].shape[0] == len(index)
