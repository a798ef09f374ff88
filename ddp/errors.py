"""The exception types that are not bugs: the CLI turns each into one line, without a traceback."""
import os


class UsageError(ValueError):
    """Bad input from the user: a flag, a config value, a dataset or a checkpoint. Exit code 2."""


def regular_file(path: str, what: str) -> None:
    """Refuse a FIFO, a device or a folder before it is opened for reading: a FIFO would hang the run."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f"{what} {path} is not a regular file")


class TrainingError(RuntimeError):
    """Training cannot go on (the loss diverged, a rank stalled, --debug found ranks disagreeing).
    Every rank raises it together where it can. Exit code 1."""


class NonFiniteError(TrainingError, FloatingPointError):
    """--debug found NaN or Inf on its way into a collective."""


class Stopped(Exception):
    """SIGTERM asked the run to stop: a checkpoint was saved at the current step (every rank raises it)."""

    exit_code = 143                      # 128 + SIGTERM, as a shell reports a process ended by it

    @classmethod
    def at(cls, step: int, path: str, writer: bool) -> "Stopped":
        """The exception for a stop at `step`; `writer`: this rank wrote the checkpoint at `path`."""
        where = f" to {path}; resume with: ddp train --resume {path}" if writer else ""
        return cls(f"stopped by SIGTERM at step {step}; checkpoint saved{where}")
