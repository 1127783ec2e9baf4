"""The error root shared by jaxdiff and convert.

It lives here because convert/ is a leaf that never imports jaxdiff, while jaxdiff re-exports these
names (jaxdiff.errors), so `except jaxdiff.JaxdiffError` also catches a bad file found by convert/.
"""


class JaxdiffError(Exception):
    """Anything a user can fix (bad path, bad file, bad flag). The CLI prints it as one line."""


class CheckpointError(JaxdiffError):
    """A checkpoint file or folder is missing, truncated, mis-shaped or has tensors that do not fit."""
