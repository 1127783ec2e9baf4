"""jaxdiff's user-facing errors. Each message is one line that names the file and what to do."""


from convert.errors import CheckpointError, JaxdiffError  # noqa: F401  (the root lives in the leaf)


class ConfigError(JaxdiffError):
    """A config asks for something jaxdiff does not implement, or is malformed."""


class SamplerError(JaxdiffError):
    """An unknown sampler or schedule, an impossible combination, or bad steps / strength."""


class NonFiniteImageError(JaxdiffError):
    """The decoded image is NaN / inf even in float32: the weights or latents are broken (CLI exit 1)."""
