"""Errors that reach the user as one line, never as a traceback."""


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


class TrainingDiverged(CxrError):
    """The loss became NaN or infinite; names the epoch and step so the run can be diagnosed."""

    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"training diverged: loss is {loss} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.loss = epoch, step, loss


class MetricsError(CxrError):
    """Labels, scores, heat maps or boxes given to a metric have the wrong shape or values."""
