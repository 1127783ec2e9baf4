"""jaxdiff: Stable Diffusion (SD 1.x, 2.x, SDXL) in JAX and Flax.

    import jaxdiff
    pipe = jaxdiff.load("path/to/diffusers-or-jaxdiff-folder", dtype="bfloat16")
"""
from jaxdiff.errors import CheckpointError, ConfigError, JaxdiffError


def load(path, dtype="float32", *, param_dtype=None):
    """Loads a diffusers folder or a jaxdiff native folder. See jaxdiff.loading.load."""
    from jaxdiff.loading import load as _load  # keeps `import jaxdiff` light (no model code, no jit)
    return _load(path, dtype, param_dtype=param_dtype)


__all__ = ["load", "JaxdiffError", "CheckpointError", "ConfigError"]
