"""Image arrays as users pass them (uint8 or float, one image or a batch, PIL images, masks in any common
layout) -> float32 batches the request builder can check and repeat per row. numpy only.
"""
from __future__ import annotations

import numpy as np

from jaxdiff.errors import JaxdiffError


def as_images(image, what: str) -> np.ndarray:
    """uint8 / float [0, 1] image(s) (arrays, PIL images or a list of them) -> float32 [N, H, W, C]."""
    if isinstance(image, (list, tuple)):
        arrays = [np.asarray(i) for i in image]
        if len({a.shape for a in arrays}) != 1:
            raise JaxdiffError(f"{what}: all images must have the same size, got {[a.shape for a in arrays]}")
        image = np.stack(arrays)
    x = np.asarray(image)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0  # as diffusers' pil_to_numpy
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise JaxdiffError(f"{what}: float images must be in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    else:
        raise JaxdiffError(f"{what}: expected uint8 or float pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise JaxdiffError(f"{what}: expected [H, W, 3] or [N, H, W, 3] pixels, got shape {np.shape(image)}")
    return x


def rgb(x: np.ndarray) -> np.ndarray:
    """[N, H, W, 1 | 3 | 4] -> [N, H, W, 3]: grey repeated, alpha dropped."""
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def as_mask(mask, *, soft: bool = True) -> np.ndarray:
    """A mask in any common layout -> float32 [N, H, W, 1] in [0, 1] (1 = repaint); soft=False binarises
    it at 0.5 as diffusers' mask processor does (soft: kept as given, A1111's behaviour)."""
    x = np.asarray(mask[0] if isinstance(mask, (list, tuple)) and len(mask) == 1 else mask)
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] not in (1, 3, 4)):
        x = x[..., None]  # [H, W] or [N, H, W]
    x = as_images(x, "mask")
    if x.shape[-1] >= 3:  # RGB(A): luma as PIL's convert("L"), which diffusers' mask processor uses
        x = (x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    return x if soft else (x >= 0.5).astype(np.float32)


def per_row(x: np.ndarray, rows: int, per_prompt: int, what: str) -> np.ndarray:
    """[1 | P | B, ...] -> [B, ...]: one for all, one per prompt (repeated N times), or one per image."""
    n = x.shape[0]
    if n == 1:
        return np.repeat(x, rows, axis=0)
    if n == rows:
        return x
    if n * per_prompt == rows:
        return np.repeat(x, per_prompt, axis=0)
    raise JaxdiffError(f"{what}: got {n} of them for {rows} images; pass 1, one per prompt or one per image")
