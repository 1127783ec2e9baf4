"""jaxdiff's user-facing errors. Each message is one line that names the file and what to do."""


class JaxdiffError(Exception):
    """Base class: anything a user can fix (bad path, bad file, bad flag). The CLI prints it as one line."""


class CheckpointError(JaxdiffError):
    """A checkpoint file or folder is missing, truncated, mis-shaped or has tensors that do not fit."""


class ConfigError(JaxdiffError):
    """A config asks for something jaxdiff does not implement, or is malformed."""
