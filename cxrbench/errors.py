"""Errors that reach the user as one line, never as a traceback."""

import errno
from collections.abc import Iterator
from contextlib import contextmanager


def first_line(exc: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if with_type else lines[0]


class CxrError(Exception):
    """A problem the user can fix; the CLI prints ``str(error)`` on one line and exits non-zero.

    Messages name the file (or setting) and the problem, e.g.
    ``data/Data_Entry_2017.csv: missing column 'Finding Labels'``.
    """


class DataError(CxrError):
    """A data set file is missing, malformed or inconsistent."""


class SuiteError(CxrError):
    """A suite file or command-line override is invalid."""


class WeightsError(CxrError):
    """A weights file or canonical weight dict is missing a tensor, has a wrong shape, or is corrupt."""


class BackendError(CxrError):
    """A backend cannot do what was asked (unknown backend, image too small, out of memory...)."""


class UnsupportedSetting(BackendError):
    """A setting the backend does not implement, by design (bf16 in a backend that computes in fp32 only): a
    refusal, not a fault. A sweep records such a cell as ``refused`` rather than ``failed``."""


def out_of_memory(device: str, batch_size: int, doing: str) -> BackendError:
    """The one message every backend gives when its device runs out of memory, naming what to lower."""
    return BackendError(
        f"out of memory on {device} while {doing} at batch size {batch_size} (train.batch_size): "
        "lower train.batch_size or data.image_size"
    )


#: Allocation failures libraries report as their own errors, not as the framework's out-of-memory type (cuDNN and
#: cuBLAS workspaces, CUDA driver calls, XLA's allocator): their messages carry one of these.
ALLOCATION_FAILURES = (
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "cudaErrorMemoryAllocation",
    "RESOURCE_EXHAUSTED",
)


def is_out_of_memory(
    error: BaseException, framework_error: type[BaseException] | tuple[type[BaseException], ...]
) -> bool:
    """The framework's out-of-memory type, or another error whose message names a failed device allocation."""
    return isinstance(error, framework_error) or any(marker in str(error) for marker in ALLOCATION_FAILURES)


@contextmanager
def out_of_memory_as_error(
    framework_error: type[BaseException] | tuple[type[BaseException], ...], device: str, batch_size: int, doing: str
) -> Iterator[None]:
    """Turn running out of device memory (:func:`is_out_of_memory`), and only that, into :func:`out_of_memory`'s
    one line; any other error passes unchanged."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error, framework_error):
            raise
        raise out_of_memory(device, batch_size, doing) from None


class TrainingDiverged(CxrError):
    """The loss became NaN or infinite; names the epoch and step so the run can be diagnosed."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"training diverged: loss is {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


class MetricsError(CxrError):
    """Labels, scores, heat maps or boxes given to a metric have the wrong shape or values."""


class StorageError(CxrError):
    """A file could not be written: the disk is full, over quota, read-only, or the folder is not writable."""


#: errno -> what the user can do about it; any other OSError is a bug to report, not a storage fault.
_STORAGE_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space there or choose a folder on another disk",
    errno.EDQUOT: "disk quota exceeded: free space there or choose a folder on another disk",
    errno.EROFS: "read-only file system: choose a writable folder",
    errno.EACCES: "permission denied: make it writable or choose another folder",
    errno.EPERM: "operation not permitted: make it writable or choose another folder",
}


def is_storage_fault(exc: BaseException) -> bool:
    """True for the OSErrors a full, read-only or foreign disk produces (not for missing files or bugs)."""
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ADVICE


def storage_error(exc: OSError, path: object = None) -> StorageError:
    """One line naming the path and what to do about an out-of-space or permission error."""
    where = path if path is not None else (exc.filename or "a file")
    return StorageError(f"{where}: cannot write ({_STORAGE_ADVICE[exc.errno]})")
