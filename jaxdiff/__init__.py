"""jaxdiff: Stable Diffusion (SD 1.x, 2.x, SDXL) in JAX and Flax.

    import jaxdiff
    pipe = jaxdiff.load("path/to/diffusers-or-jaxdiff-folder", dtype="bfloat16")
    jaxdiff.SAMPLERS     # canonical sampler names; A1111 / ComfyUI / diffusers aliases are accepted too
"""
from jaxdiff import xla_flags as _xla_flags
from jaxdiff.errors import CheckpointError, ConfigError, JaxdiffError, SamplerError

# Before JAX creates its backends: XLA reads XLA_FLAGS once (CPU convolution kernels; see xla_flags.py).
_xla_flags.apply_defaults()


def load(path, dtype="float32", *, param_dtype=None, vae=None, controlnet=None, prediction_type=None,
         prefer_ema=False):
    """Loads a diffusers folder, a jaxdiff native folder or a single-file checkpoint, optionally with
    ControlNet(s). See jaxdiff.loading.load."""
    from jaxdiff.loading import load as _load  # keeps `import jaxdiff` light (no model code, no jit)
    return _load(path, dtype, param_dtype=param_dtype, vae=vae, controlnet=controlnet,
                 prediction_type=prediction_type, prefer_ema=prefer_ema)


def load_controlnet(path, dtype="float32", *, param_dtype=None):
    """Loads a ControlNet (diffusers ControlNetModel folder or ControlNet 1.x single file). See
    jaxdiff.loading.load_controlnet."""
    from jaxdiff.loading import load_controlnet as _load_controlnet
    return _load_controlnet(path, dtype, param_dtype=param_dtype)


def __getattr__(name):
    # Imported on first use so that `import jaxdiff` (and the CLI's --help) stay fast.
    if name == "SAMPLERS":
        from jaxdiff.samplers import SAMPLERS
        return SAMPLERS
    if name == "preprocess":  # control-image preprocessors (canny)
        import importlib
        return importlib.import_module("jaxdiff.preprocess")
    if name == "Pipeline":
        from jaxdiff.pipeline import Pipeline
        return Pipeline
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


__all__ = ["load", "load_controlnet", "Pipeline", "SAMPLERS", "JaxdiffError", "CheckpointError", "ConfigError", "SamplerError"]
