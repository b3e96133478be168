"""Faults a shared machine produces, in process: a full disk, a corrupted cache, a stale lock, a closed pipe.

Every fault must end as one line naming the path, leave no partial file under a final name, and keep
what was written before it. The end-to-end versions (a real tmpfs, killed processes) are in
tests/test_faults_run.py (the example backend) and tests/test_faults_workers.py (a framework's worker).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cxrbench import files
from cxrbench.backend import canonical as weights
from cxrbench.backend.api import ExportInfo
from cxrbench.data import cache, nih
from cxrbench.deploy import onnx_file
from cxrbench.errors import CxrError, DataError, StorageError
from cxrbench.run import folder as run_folder
from cxrbench.run import keep, stages, store
from cxrbench.suite import Settings
from helpers.nih_files import Entry, entries, write_dataset

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
NO_SPACE = "no space left on the device: free space there or choose a folder on another disk"


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.rglob(".*tmp*")], "a temporary file was left behind"


# -- a full disk ---------------------------------------------------------------------------------


def _full_disk_after(monkeypatch, budget: int) -> None:
    """Every file opened for writing from now on takes ``budget`` bytes in all, then fails with ENOSPC."""
    written = [0]
    real_open = open

    class Limited:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data) -> int:
            if written[0] + len(data) > budget:
                self.handle.write(bytes(data)[: max(0, budget - written[0])])  # a partial write, as a real disk does
                written[0] = budget
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def limited_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Limited(handle) if "w" in mode else handle

    monkeypatch.setattr("builtins.open", limited_open)


def test_json_on_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    files.write_json(path, {"auroc": {"mean": 0.8}})
    _full_disk_after(monkeypatch, budget=10)

    with pytest.raises(StorageError) as caught:
        files.write_json(path, {"auroc": {"mean": 0.9}, "more": list(range(100))})

    message = str(caught.value)
    assert message == f"{path}: cannot write ({NO_SPACE})"
    assert "\n" not in message
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"auroc": {"mean": 0.8}}
    _no_temporaries(tmp_path)


def test_weights_on_a_full_disk_leave_no_partial_checkpoint(tmp_path, monkeypatch):
    good = weights.init_canonical((1, 1, 1, 1), seed=0)
    _full_disk_after(monkeypatch, budget=100_000)  # a fraction of the 0.8 MB file

    with pytest.raises(StorageError, match=r"weights_best\.npz: cannot write \(no space left"):
        weights.save(good, tmp_path / "weights_best.npz")

    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_a_big_write_is_refused_early_with_the_bytes_needed(tmp_path, monkeypatch):
    free = 1 << 20
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(total=free, used=0, free=free))
    needed = weights.nbytes((6, 12, 24, 16))

    with pytest.raises(StorageError) as caught:
        weights.save(weights.init_canonical((1, 1, 1, 1), 0), tmp_path / "w.npz")
    assert f"only {free:,} bytes are free" in str(caught.value) and "w.npz" in str(caught.value)
    with pytest.raises(StorageError, match=rf"needs {needed + files.SPACE_MARGIN_BYTES:,} bytes"):
        files.require_space(tmp_path / "run" / "pytorch", needed, "the ONNX export model.onnx")
    assert os.listdir(tmp_path) == []
    assert 27e6 < needed < 29e6  # DenseNet-121's 7.0 M float32 parameters: the 28 MB of each export and checkpoint


def _export_context(tmp_path: Path, exporter) -> stages.StageContext:
    hook = SimpleNamespace(cxrbench_export_onnx=lambda model, path, settings: exporter(Path(path), settings))
    settings = Settings().replace(**{"model.arch": "densenet-tiny"})
    return stages.StageContext(folder=tmp_path, backend="fake", hook=hook, settings=settings, recorder=None)


def _write_tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _info(path: Path) -> ExportInfo:
    return ExportInfo(
        path=str(path), layout="NCHW", opset=17, input_name="x", output_name="y", seconds=0.1, exporter="test"
    )


def test_an_export_cut_by_a_full_disk_leaves_nothing_under_the_final_name(tmp_path):
    def exporter(path, settings):
        path.write_bytes(b"\x08\x07" * 1000)  # 2 kB of a 28 MB model, then the disk is full
        Path(f"{path}.data").write_bytes(b"external")  # a side file an exporter derives from the name
        raise ENOSPC

    with pytest.raises(StorageError, match=r"init\.onnx: cannot write \(no space left"):
        stages.export_onnx(_export_context(tmp_path, exporter), tmp_path / "init.onnx")
    assert os.listdir(tmp_path) == []


def test_an_export_lands_under_its_final_name_only_once_checked(tmp_path):
    def broken(path, settings):
        path.write_bytes(b"not a model")
        return _info(path)

    with pytest.raises(CxrError) as caught:
        stages.export_onnx(_export_context(tmp_path, broken), tmp_path / "model.onnx")
    assert str(caught.value).startswith(f"{tmp_path / 'model.onnx'}: onnx.checker rejected the model")
    assert os.listdir(tmp_path) == []

    def good(path, settings):
        _write_tiny_onnx(path)
        return _info(path)

    info = stages.export_onnx(_export_context(tmp_path, good), tmp_path / "model.onnx")
    assert info.path == str(tmp_path / "model.onnx") and os.listdir(tmp_path) == ["model.onnx"]
    onnx_file.check_model(tmp_path / "model.onnx")
    assert oct((tmp_path / "model.onnx").stat().st_mode & 0o777) == oct(0o666 & ~files._umask())


def test_a_read_only_folder_is_one_line(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(StorageError, match=r"cannot write \(permission denied: make it writable or choose another"):
        files.write_json(folder / "run.json", {})


# -- the prepared cache --------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path):
    items = [Entry(e.name, e.labels, e.patient) for e in entries(24, 2, ["No Finding", "Mass", "Effusion|Nodule"])]
    return nih.read_index(write_dataset(tmp_path / "nih", items, test_patients=(2, 7), size=96))


def _flip(path: Path, offset: int, count: int = 5000) -> None:
    """Flip ``count`` bytes in place: same size, same mtime as far as the key is concerned."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = bytearray(handle.read(count))
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_silently_corrupted_cache_is_detected_on_open_and_rebuilt(dataset, tmp_path, capfd):
    prepared = cache.prepare(dataset, 64, cache_dir=tmp_path / "cache", workers=1)
    original = np.array(prepared.images)
    npy = Path(prepared.images.filename)
    del prepared
    _flip(npy, offset=len(original) * 64 * 64 // 2)

    again = cache.prepare(dataset, 64, cache_dir=tmp_path / "cache", workers=1)

    note = capfd.readouterr().err.strip()
    assert note.startswith(f"note: prepared cache {npy.parent}: block 1 of 1 of images.npy does not match its checksum")
    assert note.endswith(": rebuilding it from the images") and "\n" not in note
    np.testing.assert_array_equal(np.asarray(again.images), original)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_the_sampled_check_is_complemented_by_a_full_one_when_images_are_newer(dataset, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(cache, "CHECKSUM_BLOCK", 4096)  # 48 images of 64x64: 49 blocks
    monkeypatch.setattr(cache, "SAMPLE_BLOCKS", 2)  # the first and the last block only
    prepared = cache.prepare(dataset, 64, cache_dir=tmp_path / "cache", workers=1)
    folder = Path(prepared.images.filename).parent
    blocks = len(json.loads((folder / cache.MANIFEST_FILE).read_text())["checksum"]["blocks"])
    assert blocks == 49
    _flip(folder / cache.IMAGES_FILE, offset=20 * 4096 + 10, count=100)  # inside block 21

    assert cache.check_contents(folder, full=False) is None  # not in the sample
    cache.prepare(dataset, 64, cache_dir=tmp_path / "cache", workers=1)
    assert "rebuilding" not in capfd.readouterr().err

    old = time.time() - 3600
    os.utime(folder / cache.MANIFEST_FILE, (old, old))  # e.g. images copied in with later times
    cache.prepare(dataset, 64, cache_dir=tmp_path / "cache", workers=1)
    err = capfd.readouterr().err
    assert "block 21 of 49 of images.npy does not match its checksum" in err
    assert "an image is newer than the manifest, so every block was checked" in err
    assert cache.check_contents(folder, full=True) is None


def test_data_verify_checks_every_block_and_rebuilds_a_mismatch(dataset, tmp_path):
    prepared = cache.prepare(dataset, 64, cache_dir=tmp_path / "cache", workers=1)
    npy = Path(prepared.images.filename)
    command = [
        sys.executable,
        "-m",
        "cxrbench",
        "data",
        "verify",
        "--data",
        str(dataset.root),
        "--size",
        "64",
        "--cache",
        str(tmp_path / "cache"),
    ]

    ok = subprocess.run(command, capture_output=True, text=True)
    assert ok.returncode == 0
    assert ok.stdout == f"{npy.parent}: all 1 blocks match the checksum written when it was built\n"

    _flip(npy, offset=1000)
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr
    assert bad.stdout == (
        f"{npy.parent}: block 1 of 1 of images.npy does not match its checksum "
        "(the file was altered): rebuilt it from the images\n"
    )
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0

    _flip(npy, offset=1000)
    removed = subprocess.run([*command, "--no-rebuild"], capture_output=True, text=True)
    assert removed.returncode == 1 and "removed it" in removed.stdout and not npy.parent.exists()
    missing = subprocess.run(command, capture_output=True, text=True)
    assert missing.returncode == 2 and "no prepared cache of this data set at 64 px" in missing.stderr
    assert "Traceback" not in bad.stderr + removed.stderr + missing.stderr


@pytest.mark.serial  # a bound on wall time
def test_the_sampled_check_costs_milliseconds(dataset, tmp_path):
    """Not a timing assertion on speed: a bound two orders of magnitude above what it takes, to catch a full read."""
    prepared = cache.prepare(dataset, 64, cache_dir=tmp_path / "cache", workers=1)
    start = time.perf_counter()
    assert cache.check_contents(Path(prepared.images.filename).parent, full=False) is None
    assert time.perf_counter() - start < 1.0


def test_a_cache_on_a_full_disk_is_refused_before_decoding(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(total=1, used=1, free=1000))
    with pytest.raises(StorageError) as caught:
        cache.prepare(dataset, 64, cache_dir=tmp_path / "cache", workers=1)
    needed = len(dataset) * 64 * 64 + cache.CHECKSUM_BLOCK + files.SPACE_MARGIN_BYTES
    assert str(caught.value) == (
        f"{tmp_path / 'cache'}: the prepared cache needs {needed:,} bytes "
        f"({needed / 2**20:.0f} MiB)"
        " but only 1,000 bytes are free there: free space or choose a folder on another disk"
        " (the cache folder is $CXRBENCH_CACHE/prepared, or --cache)"
    )
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_verify_needs_a_prepared_cache(dataset, tmp_path):
    with pytest.raises(DataError, match="no prepared cache"):
        cache.verify(dataset, 64, cache_dir=tmp_path / "cache")


# -- stale state and the lock --------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_running_status_whose_process_is_gone_is_interrupted(tmp_path):
    status = store.BackendStatus(tmp_path, "pytorch")
    status.start(os.getpid())
    assert run_folder.current_status(status.data) == "running"
    status.data["pid"] = _dead_pid()
    assert run_folder.current_status(status.data) == "interrupted"
    status.data.update(pid=os.getpid(), started="2000-01-01T00:00:00+0000")  # our pid, reused since then
    assert run_folder.current_status(status.data) == "interrupted"
    status.data.update(pid=_dead_pid(), host="another-host")  # cannot be seen from here
    assert run_folder.current_status(status.data) == "running"


def test_the_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cxrbench.run.store import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        assert run_folder.run_is_active(tmp_path)
        with pytest.raises(CxrError) as caught:
            store.RunLock(tmp_path).acquire()
        expected = f"{tmp_path}: another cxrbench run is writing into this folder (pid {holder.pid} on "
        assert str(caught.value).startswith(expected)
        assert str(caught.value).endswith("; wait for it to end or use another --out")
    finally:
        holder.kill()
        holder.wait()

    assert not run_folder.run_is_active(tmp_path)  # the kernel dropped the dead holder's lock; its file remains
    lock = store.RunLock(tmp_path)
    note = lock.acquire()
    assert note.startswith(f"took over the lock {tmp_path / run_folder.LOCK_FILE} left by pid {holder.pid} on ")
    assert note.endswith("which is no longer running")
    assert json.loads((tmp_path / run_folder.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / run_folder.LOCK_FILE).exists()


# -- run.keep ------------------------------------------------------------------------------------


def _fake_run(run_dir: Path) -> None:
    for name in ("shared_init.npz", "equivalence_batch.npy", "run.json"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(b"x" * 100)
    for backend in ("pytorch", "keras"):
        for name in (
            "init.onnx",
            "model.onnx",
            "weights_best.npz",
            "metrics.json",
            "predictions.npz",
            "cams/001_Mass.png",
        ):
            path = run_dir / backend / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 10)


@pytest.mark.parametrize(
    ("value", "removed"),
    [
        ("all", []),
        ("results", ["keras/init.onnx", "pytorch/init.onnx"]),
        (
            "minimal",
            [
                "keras/init.onnx",
                "keras/model.onnx",
                "pytorch/init.onnx",
                "pytorch/model.onnx",
                "keras/weights_best.npz",
                "pytorch/weights_best.npz",
                "shared_init.npz",
                "equivalence_batch.npy",
            ],
        ),
    ],
)
def test_keep_removes_only_what_it_says(tmp_path, value, removed):
    _fake_run(tmp_path)
    before = keep.folder_bytes(tmp_path)
    kept = keep.prune(tmp_path, value, complete=True)
    assert sorted(kept["removed"]) == sorted(removed)
    assert kept["kept_bytes"] == keep.folder_bytes(tmp_path) == before - kept["removed_bytes"]
    assert all(not (tmp_path / name).exists() for name in removed)
    assert (tmp_path / "keras" / "metrics.json").is_file()
    assert (tmp_path / "pytorch" / "cams" / "001_Mass.png").is_file()


def test_an_incomplete_run_keeps_everything_for_resume(tmp_path):
    _fake_run(tmp_path)
    kept = keep.prune(tmp_path, "minimal", complete=False)
    assert kept["removed"] == [] and "--resume" in kept["note"] and (tmp_path / "shared_init.npz").is_file()


def test_keep_is_a_validated_setting():
    assert Settings().run.keep == "results"
    with pytest.raises(CxrError, match=r"run\.keep = 'some' is not allowed \(allowed: all, results, minimal\)"):
        Settings().replace(**{"run.keep": "some"})


# -- the command line ----------------------------------------------------------------------------


def _closed_pipe_run(*args: str) -> subprocess.CompletedProcess:
    read, write = os.pipe()
    os.close(read)  # the reader (`head`) has gone: the first write gets EPIPE
    try:
        return subprocess.run(
            [sys.executable, "-m", "cxrbench", *args], stdout=write, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write)


def test_a_closed_pipe_is_exit_141_without_a_traceback(dataset):
    for args in (("data", "check", "--data", str(dataset.root), "--json"), ("backends",), ("env",)):
        result = _closed_pipe_run(*args)
        assert result.returncode == 141, (args, result.stderr)
        assert result.stderr == ""


def test_ctrl_c_is_exit_130_with_one_line(dataset, tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; import cxrbench.cli as cli;"
            "cli._cmd_env = lambda args: (print('ready', flush=True), time.sleep(60));"
            "sys.exit(cli.main(['env']))",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "ready\n"
    process.send_signal(2)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and err == "cxrbench: interrupted\n"
