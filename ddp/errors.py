"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: a flag, a config value, a dataset or a checkpoint."""
