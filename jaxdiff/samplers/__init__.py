"""Samplers: `make_plan` builds host tables, `sample` runs them in one `lax.scan` (see core.py).

Importing the family modules registers their samplers; `SAMPLERS` lists the canonical names.
"""
from jaxdiff.samplers import comfy, kdiffusion, timesteps  # noqa: F401  (registration side effects)
from jaxdiff.samplers.core import (MODEL_FAMILIES, Plan, Tables, build_tables, initial_latents, make_plan,
                                   register, resolve, sample, sample_steps, sampler_names, sampler_state,
                                   sampler_table, step_noise, to_x0, x0_coefficients)

SAMPLERS: tuple[str, ...] = sampler_names()

__all__ = ["MODEL_FAMILIES", "SAMPLERS", "Plan", "Tables", "build_tables", "initial_latents", "make_plan", "register", "resolve",
           "sample", "sample_steps", "sampler_names", "sampler_state", "sampler_table", "step_noise", "to_x0", "x0_coefficients"]
