"""Inpainting masks as A1111 users expect them, host side (numpy): kept soft, blurred, and the original
pixels pasted back over the part of the image the mask keeps.

  - soft: a grey mask value is a partial repaint (no 0.5 threshold; diffusers binarises, A1111 does not);
    the 9-channel UNet's masked image still keeps the pixels where mask < 0.5, as diffusers does;
  - mask_blur: A1111's Gaussian blur of the mask (modules/processing.py: cv2.GaussianBlur with kernel
    2 * int(2.5 * blur + 0.5) + 1 and sigma = blur; cv2's default border BORDER_REFLECT_101);
  - paste_back: A1111's apply_overlay: the generated image inside the (blurred) mask, the original
    image outside it: out = m * generated + (1 - m) * original.
"""
from __future__ import annotations

import numpy as np

from jaxdiff.errors import JaxdiffError


def blur(mask: np.ndarray, radius: float) -> np.ndarray:
    """[N, H, W, 1] float32 in [0, 1] -> the same, Gaussian-blurred over H and W (radius = sigma in pixels)."""
    if radius is None or radius == 0:
        return mask
    if not isinstance(radius, (int, float)) or radius < 0:
        raise JaxdiffError(f"mask_blur={radius!r} must be a number of pixels >= 0")
    half = int(2.5 * radius + 0.5)
    x = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / radius) ** 2)
    kernel /= kernel.sum()
    out = mask.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (half, half)
        padded = np.pad(out, pad, mode="reflect")  # numpy's reflect = cv2's BORDER_REFLECT_101
        out = sum(w * np.take(padded, np.arange(k, k + out.shape[axis]), axis=axis) for k, w in enumerate(kernel))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def paste_back(images: np.ndarray, pixels: np.ndarray | None, original: np.ndarray, mask: np.ndarray):
    """(uint8 [n, H, W, 3], float [n, H, W, 3] or None) with the original [n, H, W, 3] in [0, 1] kept where
    the mask [n, H, W, 1] is 0, blended where it is soft."""
    base = pixels if pixels is not None else images.astype(np.float32) / 255.0
    out = mask * base + (1.0 - mask) * original
    return np.round(out * 255.0).astype(np.uint8), (out.astype(np.float32) if pixels is not None else None)
