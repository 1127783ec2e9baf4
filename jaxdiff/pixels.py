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


def control_images(image, height: int | None, width: int | None, factor: int, channels: int) -> np.ndarray:
    """A ControlNet's control image(s) as diffusers' `prepare_image` gives them to the model: resized to
    (height, width) (None: the image's own size rounded down to a multiple of `factor`, diffusers'
    get_default_height_width) with PIL's Lanczos filter (VaeImageProcessor's default `resample`), in
    [0, 1] and NOT normalised to [-1, 1] (the control processor has do_normalize=False).

    image: a PIL image, uint8 / float [0, 1] array [H, W, C] or [N, H, W, C], or a list of them.
    Returns float32 [N, height, width, channels] (grey images for 1-channel ControlNets: PIL's luma).
    """
    from PIL import Image
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    arrays = []
    for item in items:
        if isinstance(item, Image.Image):
            item = np.asarray(item.convert("RGB"))
        arr = as_images(item, "control_image")
        for a in arr:
            arrays.append(a)
    h0, w0 = arrays[0].shape[:2]
    height = height or h0 - h0 % factor
    width = width or w0 - w0 % factor
    out = []
    for a in arrays:
        a = rgb(a[None])[0]
        if a.shape[:2] != (height, width):
            # Through uint8 as a PIL image, as diffusers resizes a PIL input (numpy input goes the same way
            # once it is a PIL image); Lanczos (PIL_INTERPOLATION["lanczos"]).
            pil = Image.fromarray(np.round(a * 255.0).astype(np.uint8))
            a = np.asarray(pil.resize((width, height), resample=Image.LANCZOS)).astype(np.float32) / 255.0
        if channels == 1:
            a = (a @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        elif channels != 3:
            raise JaxdiffError(f"control_image: this ControlNet takes {channels}-channel images; jaxdiff "
                               f"prepares 1 or 3")
        out.append(a)
    return np.stack(out)
