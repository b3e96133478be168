"""The built-in tracker: every backend's training curves as TensorBoard event files, ``RUN/tensorboard/<backend>/``.

``tensorboard --logdir RUN/tensorboard`` then shows the backends' curves on one chart (or several runs' folders
side by side). Written with the ``tensorboard`` package's own record writer and event protocol buffers over a
plain file: that needs no TensorFlow and imports no framework (its ``EventFileWriter`` opens files through
``tf.io.gfile``, which imports TensorFlow when installed, and tensorboardX imports torch when installed, so neither
is used). Without the package the run says once how to get the curves (``pip install -e ".[tensorboard]"``).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from cxrbench.hookspecs import hookimpl
from cxrbench.run.folder import TENSORBOARD_DIR

INSTALL_HINT = 'training curves for TensorBoard need the tensorboard package: pip install -e ".[tensorboard]"'


@hookimpl
def cxrbench_record_scalars(run_dir, backend, records):
    """Write ``records`` as one TensorBoard run named after the backend, replacing an earlier one (a resumed run)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return INSTALL_HINT
    root = Path(run_dir) / TENSORBOARD_DIR
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{backend}.", dir=root))
    try:
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.cxrbench"
        with open(building / name, "wb") as out:
            writer = RecordWriter(out)
            first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            writer.write(first.SerializeToString())
            for record in records:
                values = [summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in record["scalars"].items()]
                event = event_pb2.Event(
                    wall_time=record["wall_time"] or time.time(),
                    step=record["step"],
                    summary=summary_pb2.Summary(value=values),
                )
                writer.write(event.SerializeToString())
            out.flush()
            os.fsync(out.fileno())
        _replace(building, root / backend)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return None


def _replace(building: Path, folder: Path) -> None:
    """Put the new event files in place of the old ones, never leaving the folder half-written."""
    if folder.exists():
        aside = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(folder, aside)
        os.rename(building, folder)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(building, folder)
