"""--python BACKEND=PATH: a backend's worker in an interpreter of its own, asked before any work."""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

from cxrbench.cli import main
from cxrbench.errors import BackendError, CxrError
from cxrbench.run import environments


def test_python_options_are_checked_one_line_each(tmp_path):
    assert environments.parse_python_options([f"keras={sys.executable}"]) == {"keras": sys.executable}
    with pytest.raises(CxrError, match=r"--python 'keras': expected BACKEND=PATH"):
        environments.parse_python_options(["keras"])
    with pytest.raises(CxrError, match=rf"--python keras={tmp_path}/none: no executable Python interpreter there"):
        environments.parse_python_options([f"keras={tmp_path}/none"])
    with pytest.raises(CxrError, match="--python keras: given twice"):
        environments.parse_python_options([f"keras={sys.executable}", f"keras={sys.executable}"])


@pytest.mark.backends("numpy")
def test_the_interpreter_is_asked_which_backends_it_has():
    found = environments.probe(sys.executable)
    assert "numpy" in found["backends"] and found["backends"]["numpy"]["plugin"] == "cxrbench_numpy_example"
    assert environments.backend_info("numpy", sys.executable).framework == "numpy"
    with pytest.raises(
        BackendError, match=r"backend 'nosuch' is not installed in that environment \(installed there: "
    ):
        environments.backend_info("nosuch", sys.executable)


def test_an_environment_without_the_core_says_to_install_it(tmp_path, monkeypatch):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)  # not the checkout, whose cxrbench/ the interpreter would import from its folder

    with pytest.raises(
        CxrError,
        match=r"cannot import cxrbench there \(ModuleNotFoundError: No module named "
        r"'cxrbench'\); install the core in that environment too",
    ):
        environments.probe(str(tmp_path / "bare" / "bin" / "python"))


def _second_environment(root: Path) -> Path:
    """The interpreter of a real second environment with this one's packages: a venv of its own (its own prefix and
    pyvenv.cfg, so it works whether the tests run in a venv or not), whose .pth file adds this environment's
    site-packages with their own .pth files (editable installs). A bare symlink to a venv's python would start the
    base interpreter instead, without the venv's packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    [site_packages] = root.glob("lib/python3*/site-packages")
    lines = [f"import site; site.addsitedir({path!r})" for path in site.getsitepackages()]
    (site_packages / "this_environment.pth").write_text("\n".join(lines) + "\n")
    return root / "bin" / "python"


@pytest.mark.backends("numpy")
def test_the_worker_runs_with_the_named_interpreter(tmp_path, capsys):
    other = _second_environment(tmp_path / "env")
    out = tmp_path / "run"

    code = main(
        [
            "run",
            "--backend",
            "numpy",
            "--python",
            f"numpy={other}",
            "--set",
            "train.max_steps=4",
            "--set",
            "train.warmup_steps=1",
            "--set",
            "train.window_steps=1",
            "--set",
            'run.stages=["train"]',
            "--out",
            str(out),
        ]
    )

    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["pythons"] == {"numpy": str(other)}
    assert f"[numpy] python {other} (cxrbench " in (out / "numpy" / "log.txt").read_text()
