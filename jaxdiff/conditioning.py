"""What the UNet is conditioned on inside the program, and the model-function wrappers around it.

`Cond` is a pytree built once per request (after text encoding and image encoding) and passed to
every model evaluation. The function the sampler calls, `denoise(x, t) -> prediction`, is the plain
UNet wrapped in one place, k-diffusion style (innermost first):

    unet_fn      x, t, cond -> UNet(x, t, cond.context, cond.added)      the network
    concat       appends cond.concat channels to x (inpainting UNets)   x [R, h, w, C] -> [R, h, w, C + Cc]
    cfg          runs uncond / cond rows as one [2B] batch and mixes    x [B, ...] -> [B, ...]
                 them (guidance scale, optional rescale)

    denoise = bind(cfg(concat(unet_fn(module, params)), ...), cond)

With guidance, every row array in `cond` has 2B rows interleaved (u0, c0, u1, c1, ...; see `pair`),
so each device keeps its own rows' pairs and CFG never moves rows between devices. A ControlNet
adds its residuals through `Cond.control` and a wrapper between `concat` and `unet_fn` (the
ControlNet issue; the UNet already takes `down_residuals` / `mid_residual`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, "Cond"], jax.Array]


@flax.struct.dataclass
class Cond:
    """Per-request conditioning (a pytree; every array has R rows: B, or 2B with guidance).

    Attributes:
      context: float32 [R, L, D] text encoder states (cross-attention keys / values).
      added: SDXL added conditioning {"text_embeds": [R, P], "time_ids": [R, n]}, or None.
      concat: [R, h, w, Cc] channels appended to the latents (mask + masked-image latents), or None.
      control: ControlNet inputs, or None (no ControlNet is wired yet).
    """
    context: jax.Array
    added: Optional[dict] = None
    concat: Optional[jax.Array] = None
    control: Any = None


def pair(neg: jax.Array, pos: jax.Array) -> jax.Array:
    """[B, ...] x 2 -> [2B, ...] interleaved (u0, c0, u1, c1, ...)."""
    return jnp.stack([neg, pos], axis=1).reshape((2 * pos.shape[0],) + pos.shape[1:])


def unet_fn(module, params) -> ModelFn:
    """The UNet as a model function; its output in float32 (the sampler's carry stays float32)."""
    def fn(x, t, cond: Cond):
        return module.apply({"params": params}, x, t, cond.context, cond.added).astype(jnp.float32)
    return fn


def concat(fn: ModelFn) -> ModelFn:
    """Appends `cond.concat` to the latents' channels when the request has some."""
    def wrapped(x, t, cond: Cond):
        if cond.concat is not None:
            x = jnp.concatenate([x, cond.concat.astype(x.dtype)], axis=-1)
        return fn(x, t, cond)
    return wrapped


def cfg(fn: ModelFn, guidance: jax.Array, *, rescale: bool) -> ModelFn:
    """Classifier-free guidance over interleaved [2B] conditioning.

    Args:
      guidance: float32 [2] (guidance_scale, guidance_rescale), a traced argument (no recompiles).
      rescale: apply Lin et al. 2023's rescale (static: guidance_rescale > 0).
    """
    def wrapped(x, t, cond: Cond):
        b = x.shape[0]
        out = fn(pair(x, x), t, cond)
        out = out.reshape((b, 2) + out.shape[1:])
        uncond, text = out[:, 0], out[:, 1]
        guided = uncond + guidance[0] * (text - uncond)
        if rescale:
            # Lin et al. 2023 sec. 3.4 (diffusers' rescale_noise_cfg): match the text branch's per-image std.
            ratio = jnp.std(text, axis=(1, 2, 3), keepdims=True, ddof=1) / jnp.std(
                guided, axis=(1, 2, 3), keepdims=True, ddof=1)
            guided = guidance[1] * (guided * ratio) + (1.0 - guidance[1]) * guided
        return guided
    return wrapped


def bind(fn: ModelFn, cond: Cond) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`denoise(x, t)`, the signature samplers see."""
    return lambda x, t: fn(x, t, cond)
