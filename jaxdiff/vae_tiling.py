"""Tiled VAE decode and encode with diffusers' AutoencoderKL rules (`enable_tiling()`), traced into the
generation program.

diffusers (models/autoencoders/autoencoder_kl.py, `tiled_decode` / `_tiled_encode`):
  - the tile is `config.sample_size` pixels (sample_size / f latents), tiles start every 75% of a tile
    (overlap factor 0.25) and the last ones in each direction are cut short by the edge;
  - each tile goes through the whole decoder (post_quant_conv included) or encoder (+ quant_conv);
  - going row by row, left to right, a tile's first `blend` output rows are a linear blend with the
    bottom rows of the (already blended) tile above, then its first columns with the (already
    blended) tile to its left: weight y / blend for the tile itself;
  - each tile keeps its top-left `limit` x `limit` outputs (limit = output tile - blend) and the kept
    parts are concatenated.
Tiling applies only when the input is larger than one tile in some direction.

Here the tiles of one shape (interior, right edge, bottom edge, corner: at most four shapes) are stacked
and run through `lax.map`, one tile at a time: one compiled program whose peak memory is one tile's
activations plus the output, whatever the image size.

    decode_tiled(decode_fn, z, config)      # z [B, h, w, C] unscaled latents -> images [B, H, W, 3]
    encode_moments_tiled(moments_fn, x, config)  # images [B, H, W, 3] -> moments [B, h, w, 2C]
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

OVERLAP_FACTOR = 0.25  # diffusers' tile_overlap_factor


@dataclasses.dataclass(frozen=True)
class Tiling:
    """One direction of diffusers' tiling, in input units (tile, stride) and output units (blend, limit)."""
    tile: int
    stride: int
    blend: int
    limit: int


def tile_sizes(config) -> tuple[int, int]:
    """(tile in pixels, tile in latents): diffusers' tile_sample_min_size and tile_latent_min_size."""
    sample = config.sample_size[0] if isinstance(config.sample_size, (tuple, list)) else config.sample_size
    return int(sample), int(sample / config.downsample_factor)


def decode_tiling(config) -> Tiling:
    sample, latent = tile_sizes(config)
    blend = int(sample * OVERLAP_FACTOR)
    return Tiling(tile=latent, stride=int(latent * (1 - OVERLAP_FACTOR)), blend=blend, limit=sample - blend)


def encode_tiling(config) -> Tiling:
    sample, latent = tile_sizes(config)
    blend = int(latent * OVERLAP_FACTOR)
    return Tiling(tile=sample, stride=int(sample * (1 - OVERLAP_FACTOR)), blend=blend, limit=latent - blend)


def needs_tiles(size: tuple[int, int], tiling: Tiling) -> bool:
    """diffusers tiles only inputs larger than one tile along some side."""
    return size[0] > tiling.tile or size[1] > tiling.tile


def decode_tiled(decode_fn: Callable, z: jax.Array, config) -> jax.Array:
    """decode_fn: [B, th, tw, C] -> [B, th*f, tw*f, 3]. z: [B, h, w, C] -> [B, ~h*f, ~w*f, 3]."""
    return _tiled(decode_fn, z, decode_tiling(config))


def encode_moments_tiled(moments_fn: Callable, images: jax.Array, config) -> jax.Array:
    """moments_fn: [B, th, tw, 3] -> [B, th/f, tw/f, 2C] (before the logvar clamp). -> [B, ~h, ~w, 2C]."""
    return _tiled(moments_fn, images, encode_tiling(config))


def _tiled(fn: Callable, x: jax.Array, t: Tiling) -> jax.Array:
    starts_h = list(range(0, x.shape[1], t.stride))
    starts_w = list(range(0, x.shape[2], t.stride))
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i in starts_h:
        for j in starts_w:
            shape = (min(t.tile, x.shape[1] - i), min(t.tile, x.shape[2] - j))
            by_shape.setdefault(shape, []).append((i, j))
    done: dict[tuple[int, int], jax.Array] = {}
    for (th, tw), where in by_shape.items():
        stack = jnp.stack([x[:, i:i + th, j:j + tw] for i, j in where])   # [G, B, th, tw, C]
        out = jax.lax.map(fn, stack)                                     # one tile at a time
        for k, ij in enumerate(where):
            done[ij] = out[k]
    rows = [[done[(i, j)] for j in starts_w] for i in starts_h]
    kept_rows = []
    for a in range(len(rows)):
        kept = []
        for b in range(len(rows[a])):
            tile = rows[a][b]
            if a > 0:
                tile = _blend(rows[a - 1][b], tile, t.blend, axis=1)
            if b > 0:
                tile = _blend(rows[a][b - 1], tile, t.blend, axis=2)
            rows[a][b] = tile  # diffusers blends in place: later neighbours see the blended tile
            kept.append(tile[:, :t.limit, :t.limit])
        kept_rows.append(jnp.concatenate(kept, axis=2))
    return jnp.concatenate(kept_rows, axis=1)


def _blend(prev: jax.Array, tile: jax.Array, extent: int, axis: int) -> jax.Array:
    """tile's first `extent` entries along `axis` = prev's last ones * (1 - y/extent) + tile's * y/extent
    (diffusers' blend_v / blend_h)."""
    extent = min(prev.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    # torch computes 1 - y / extent and y / extent in double and multiplies float32 by them as float32.
    w = np.arange(extent, dtype=np.float64) / extent
    shape = [1] * tile.ndim
    shape[axis] = extent
    w_new = jnp.asarray(w.reshape(shape), tile.dtype)
    w_old = jnp.asarray((1.0 - w).reshape(shape), tile.dtype)
    head = jax.lax.slice_in_dim(tile, 0, extent, axis=axis)
    tail = jax.lax.slice_in_dim(prev, prev.shape[axis] - extent, prev.shape[axis], axis=axis)
    blended = tail * w_old + head * w_new
    return jax.lax.dynamic_update_slice_in_dim(tile, blended, 0, axis=axis)
