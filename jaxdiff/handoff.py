"""The SDXL ensemble of experts (base -> refiner hand-off) with diffusers' semantics, host side.

    base = pipe(prompt, denoising_end=0.8, output_type="latent")        # stops at 80% of the noise
    image = refiner(prompt, image=base.latents, denoising_start=0.8)    # takes over from there

diffusers (pipeline_stable_diffusion_xl.py, "8.1 Apply denoising_end"): the base keeps the model
evaluations whose timestep t >= cutoff, cutoff = int(round(T - denoising_end * T)) with T the
scheduler's num_train_timesteps; with output_type="latent" it returns the (scaled) latents undecoded.
The img2img pipeline (`get_timesteps` with denoising_start) keeps the last n evaluations, n = #(t <
cutoff) (+1 for a second-order scheduler when n is even), starts the scheduler there and adds no noise
to the given latents: `image` with 4 (= latent) channels IS the starting latents.

jaxdiff builds the same tables: the base's plan cut after its n-th evaluation, the refiner's plan an
img2img start at the step where those n evaluations begin, with x_T = the latents as given.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError

OUTPUT_TYPES = ("np", "pil", "latent")


def check(denoising_start, denoising_end, output_type) -> None:
    for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if v is not None and not (isinstance(v, (int, float)) and 0.0 < float(v) < 1.0):
            raise JaxdiffError(f"{name}={v!r} must be a fraction in (0, 1) (diffusers' semantics)")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise JaxdiffError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
    if output_type not in OUTPUT_TYPES:
        raise JaxdiffError(f"output_type={output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")


def is_latents(image, latent_channels: int) -> bool:
    """diffusers' rule: an image array with the latent channel count is latents (here: float, NHWC)."""
    if isinstance(image, (list, tuple)):
        return False
    x = np.asarray(image)
    return np.issubdtype(x.dtype, np.floating) and x.ndim in (3, 4) and x.shape[-1] == latent_channels


def latent_rows(image, rows: int, per_prompt: int, latent_channels: int) -> np.ndarray:
    """[h, w, C] or [1 | P | B, h, w, C] latents -> float32 [B, h, w, C]."""
    from jaxdiff.pixels import per_row
    x = np.asarray(image, np.float32)
    x = x[None] if x.ndim == 3 else x
    if not np.all(np.isfinite(x)):
        raise JaxdiffError("image= latents hold NaN / inf")
    return per_row(x, rows, per_prompt, "image latents")


def _cutoff(sched, fraction: float) -> int:
    total = int(sched.default("num_train_timesteps", 1000))
    return int(round(total - fraction * total))


def cut_plan(plan, steps: int, sched, denoising_start, denoising_end, plan_for_strength: Callable):
    """The plan for this side of the hand-off (see the module docstring).

    plan: the full txt2img / img2img plan; plan_for_strength(strength) -> a plan that starts part-way.
    """
    t = np.asarray(plan.tables["t"], np.float64)
    if denoising_end is not None:
        n = int(np.sum(t >= _cutoff(sched, denoising_end)))
        if n < 1:
            raise JaxdiffError(f"denoising_end={denoising_end} with {steps} steps leaves no step; raise it")
        plan = plan.replace(tables={k: v[:n] for k, v in plan.tables.items()})
    if denoising_start is not None:
        full = plan_for_strength(1.0)
        if full.nfe != steps:
            raise JaxdiffError(f"denoising_start needs a sampler with one model evaluation per step "
                               f"(euler, ddim, dpmpp_2m, ...); {plan.kind} takes {full.nfe} for {steps} steps")
        n = int(np.sum(np.asarray(full.tables["t"], np.float64) < _cutoff(sched, denoising_start)))
        if n < 1:
            raise JaxdiffError(f"denoising_start={denoising_start} with {steps} steps leaves no step; lower it")
        # img2img_start(steps, s) = steps - int(steps * s): s = (n + 0.5) / steps gives exactly n steps.
        start_plan = full if n >= steps else plan_for_strength((n + 0.5) / steps)
        # diffusers adds no noise to latents handed over: x_T = 1 * latents + 0 * noise.
        plan = start_plan.replace(img2img=jnp.asarray([1.0, 0.0], jnp.float32))
        if denoising_end is not None:
            raise JaxdiffError("denoising_start and denoising_end together are not supported yet; use one")
    return plan
