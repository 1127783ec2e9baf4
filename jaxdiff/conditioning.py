"""What the UNet is conditioned on inside the program, and the model-function wrappers around it.

`Cond` is a pytree built once per request (after text encoding and image encoding) and passed to
every model evaluation. The function the sampler calls, `denoise(x, t) -> prediction`, is the plain
UNet wrapped in one place, k-diffusion style (innermost first):

    unet_fn      x, t, cond -> UNet(x, t, cond.context, cond.added)      the network
    concat       appends cond.concat channels to x (inpainting UNets)   x [R, h, w, C] -> [R, h, w, C + Cc]
    cfg          runs uncond / cond rows as one [2B] batch and mixes    x [B, ...] -> [B, ...]
                 them (guidance scale, optional rescale)

    denoise = bind(cfg(concat(unet_fn(module, params)), ...), cond)

    control      runs the ControlNets on the latents (x's first channels) and cond.control, and
                 hands their summed residuals to unet_fn

    denoise = bind(cfg(concat(control(unet_fn(module, params), nets, ...)), ...), cond)

With guidance, every row array in `cond` has 2B rows interleaved (u0, c0, u1, c1, ...; see `pair`),
so each device keeps its own rows' pairs and CFG never moves rows between devices. ControlNet inputs
(`ControlCond`) keep B rows and are paired inside `control`, because guess mode needs only the
conditional rows.
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
      control: ControlCond (ControlNet inputs), or inside `control`'s call to the UNet the
        ControlResiduals it computed; None without ControlNets.
    """
    context: jax.Array
    added: Optional[dict] = None
    concat: Optional[jax.Array] = None
    control: Any = None


@flax.struct.dataclass
class ControlCond:
    """ControlNet inputs of a request (B rows, never paired; see `control`).

    Attributes:
      images: one float32 [B, H, W, Cc] control image in [0, 1] per ControlNet.
      scale: float32 [B, N] controlnet_conditioning_scale per row and ControlNet.
      keep: float32 [N] this evaluation's guidance-window factor per ControlNet (0 or 1; diffusers'
        controlnet_keep[i]); `bind` sets it from the sampler's per-evaluation table.
    """
    images: tuple
    scale: jax.Array
    keep: jax.Array


@flax.struct.dataclass
class ControlResiduals:
    """What `control` hands the UNet: the summed ControlNet residuals, rows as x's."""
    down: tuple
    mid: jax.Array


def pair(neg: jax.Array, pos: jax.Array) -> jax.Array:
    """[B, ...] x 2 -> [2B, ...] interleaved (u0, c0, u1, c1, ...)."""
    return jnp.stack([neg, pos], axis=1).reshape((2 * pos.shape[0],) + pos.shape[1:])


def unet_fn(module, params) -> ModelFn:
    """The UNet as a model function; its output in float32 (the sampler's carry stays float32)."""
    def fn(x, t, cond: Cond):
        if isinstance(cond.control, ControlResiduals):
            return module.apply({"params": params}, x, t, cond.context, cond.added,
                                down_residuals=cond.control.down,
                                mid_residual=cond.control.mid).astype(jnp.float32)
        return module.apply({"params": params}, x, t, cond.context, cond.added).astype(jnp.float32)
    return fn


def control(fn: ModelFn, nets: tuple, params: tuple, *, guess_mode: bool) -> ModelFn:
    """Runs ControlNets (flax modules `nets` with `params`) on `cond.control` and passes the sum of
    their residuals to `fn` (MultiControlNet sums, diffusers' MultiControlNetModel.forward).

    The rows of x are B (no guidance) or 2B interleaved (guidance). Each ControlNet's scale is
    scale * keep (diffusers: cond_scale = controlnet_conditioning_scale * controlnet_keep[i]). Guess
    mode with guidance (diffusers' pipeline_controlnet.py, "Infer ControlNet only for the conditional
    batch"): the ControlNets see only the conditional rows and the unconditional rows get zero
    residuals; the geometric per-residual weights are the model's (ControlNetModel guess_mode).
    """
    def wrapped(x, t, cond: Cond):
        cc = cond.control
        if not isinstance(cc, ControlCond):
            return fn(x, t, cond)
        b = cc.scale.shape[0]
        paired = x.shape[0] == 2 * b
        scale = cc.scale * cc.keep[None, :].astype(jnp.float32)  # [B, N]
        only_cond = guess_mode and paired
        pick = (lambda a: a.reshape((b, 2) + a.shape[1:])[:, 1]) if only_cond else (lambda a: a)
        x_in, context = pick(x), pick(cond.context)
        added = None if cond.added is None else jax.tree_util.tree_map(pick, cond.added)
        down = mid = None
        for i, (net, p) in enumerate(zip(nets, params)):
            image, s = cc.images[i], scale[:, i]
            if paired and not only_cond:
                image, s = pair(image, image), pair(s, s)
            # A 9-channel inpainting UNet's ControlNet takes the latents alone (diffusers passes latents).
            d, m = net.apply({"params": p}, x_in[..., :net.config.in_channels], t, context, image, s, added,
                             guess_mode=guess_mode)
            down = d if down is None else [a + r for a, r in zip(down, d)]
            mid = m if mid is None else mid + m
        if only_cond:
            down = [pair(jnp.zeros_like(r), r) for r in down]
            mid = pair(jnp.zeros_like(mid), mid)
        return fn(x, t, cond.replace(control=ControlResiduals(down=tuple(down), mid=mid)))
    return wrapped


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


def bind(fn: ModelFn, cond: Cond) -> Callable[..., jax.Array]:
    """`denoise(x, t)`, the signature samplers see. Samplers pass `control_keep` (float32 [N], this
    evaluation's row of the plan's "control_keep" table) when the plan has one."""
    def denoise(x, t, control_keep=None):
        c = cond
        if control_keep is not None and isinstance(cond.control, ControlCond):
            c = cond.replace(control=cond.control.replace(keep=control_keep))
        return fn(x, t, c)
    return denoise
