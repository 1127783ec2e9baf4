"""A request's peak device memory, estimated on the host before anything is compiled, and the one-line
refusal of a request that cannot fit.

The estimate is a formula over the largest live activations, not XLA's memory analysis: lowering an
oversize request (a tiled 65536^2 decode unrolls tens of thousands of tiles) would itself take minutes.
Per device, for the rows it holds (CFG doubles the UNet's rows):

  params      every component's params, as stored
  unet        rows * h * w * C0 * bytes * UNET_LIVE        (C0 = the UNet's first block width; the skip
                                                           connections of every level stay live)
  vae decode  rows * H * W * C0' * 4 * VAE_LIVE            (C0' = the VAE decoder's last width, float32 when
                                                           upcast; tiled: one tile instead of H * W, plus
                                                           the stacked tiles and the output)
Attention is assumed memory-efficient (flash / chunked kernels: jaxdiff.models.attention), so no
(h w)^2 term. The factors are deliberately generous: the guard is for requests that are orders of
magnitude too big, and names the largest square size the same formula accepts.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError

UNET_LIVE = 24   # activations of width C0 (or their equivalent at coarser levels) live at the peak
VAE_LIVE = 6     # decoder tensors of the finest level live at once (input, norm, conv out, residual, ...)
TILE_OUTPUT_LIVE = 4  # tiled decode: stacked tiles (~1.8x the image with 25% overlap), blend, output


class MemoryError_(JaxdiffError):  # noqa: N801  (not the builtin MemoryError: a user error, exit 2)
    """The request cannot fit the device's memory."""


def device_bytes() -> int | None:
    """Memory of one accelerator (bytes_limit), or the host's RAM shared by every CPU device."""
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001  (backends without stats raise various errors)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _param_bytes(pipe) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(pipe.params))


def estimate(pipe, height: int, width: int, rows: int, cfg: bool, tiled: bool, devices: int) -> int:
    """Bytes one device needs for `rows` images of height x width (see the module docstring)."""
    f = pipe.family.vae_factor
    per_device = math.ceil(rows / devices) if jax.local_devices()[0].platform != "cpu" else rows
    unet_cfg, vae_cfg = pipe.unet.config, pipe.vae.config
    unet_bytes = jnp.dtype(pipe.unet.module.dtype).itemsize
    unet = (2 if cfg else 1) * per_device * (height // f) * (width // f) * unet_cfg.block_out_channels[0] \
        * unet_bytes * UNET_LIVE
    c_vae = getattr(vae_cfg, "block_out_channels", None) or getattr(vae_cfg, "decoder_block_out_channels")
    width_vae = c_vae[0] if hasattr(vae_cfg, "block_out_channels") else c_vae[-1]
    sample = getattr(vae_cfg, "sample_size", None)
    if tiled and sample is not None:
        tile = int(sample[0] if isinstance(sample, (tuple, list)) else sample)
        vae = per_device * (tile * tile * width_vae * 4 * VAE_LIVE + height * width * 3 * 4 * TILE_OUTPUT_LIVE)
    else:
        vae = per_device * height * width * width_vae * 4 * VAE_LIVE
    return _param_bytes(pipe) + max(unet, vae)


def largest_square(pipe, rows: int, cfg: bool, tiled: bool, devices: int, budget: int) -> int:
    """The largest side (a multiple of 64) whose square image the estimate fits in `budget` (0: none)."""
    lo, hi = 0, 1 << 20
    while hi - lo > 64:
        mid = (lo + hi) // 2 // 64 * 64
        if mid <= lo:
            break
        if estimate(pipe, mid, mid, rows, cfg, tiled, devices) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def check(pipe, height: int, width: int, rows: int, cfg: bool, tiled: bool, devices: int) -> bool:
    """Raises a one-line error when the request cannot fit (nothing is compiled or allocated first).

    Returns True when it fits only with a tiled VAE (the caller then tiles: the issue's automatic tiling)."""
    budget = device_bytes()
    if budget is None:
        return False
    need = estimate(pipe, height, width, rows, cfg, tiled, devices)
    if need <= budget:
        return False
    tileable = getattr(pipe.vae.config, "sample_size", None) is not None
    if not tiled and tileable and estimate(pipe, height, width, rows, cfg, True, devices) <= budget:
        return True
    gib = 1024 ** 3
    side = largest_square(pipe, rows, cfg, tiled, devices, budget)
    hint = ""
    if not tiled and tileable:
        hint = (f"; with VAE tiling (pipe.enable_vae_tiling(), --vae-tiling) about "
                f"{largest_square(pipe, rows, cfg, True, devices, budget)}^2")
    raise MemoryError_(f"a {height}x{width} request ({rows} image(s)) needs about {need / gib:.1f} GiB per device "
                       f"but the device has {budget / gib:.1f} GiB; the largest square image that fits is about "
                       f"{side}x{side}{hint}")
