"""The exception types that are not bugs: the CLI turns each into one line, without a traceback."""


class UsageError(ValueError):
    """Bad input from the user: a flag, a config value, a dataset or a checkpoint. Exit code 2."""


class TrainingError(RuntimeError):
    """Training cannot go on (the loss diverged, a rank stalled, --debug found ranks disagreeing).
    Every rank raises it together where it can. Exit code 1."""
