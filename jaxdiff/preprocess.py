"""Control-image preprocessors (numpy only, no OpenCV): what a user runs on a photo before a ControlNet.

    edges = jaxdiff.preprocess.canny(image, 100, 200)   # uint8 [H, W, 3], 255 on edges
    pipe(prompt, control_image=edges)

`canny` is OpenCV's `cv2.Canny(image, low, high)` (L1 gradient, 3x3 Sobel), the preprocessor the
canny ControlNets were trained with and diffusers' ControlNet docs use; tests/test_controlnet.py checks
it pixel for pixel against OpenCV.
"""
from __future__ import annotations

import numpy as np

from jaxdiff.errors import JaxdiffError

# OpenCV canny.cpp: tan(22.5 deg) in 15-bit fixed point (TG22 = 0.4142135623730950488 * (1 << 15)).
_SHIFT = 15
_TG22 = 13573


def _sobel(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of int32 [H, W] with replicated borders (Canny's BORDER_REPLICATE)."""
    p = np.pad(img, 1, mode="edge")
    smooth_y = p[:-2] + 2 * p[1:-1] + p[2:]       # [H, W + 2]: vertical [1, 2, 1]
    dx = smooth_y[:, 2:] - smooth_y[:, :-2]
    smooth_x = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # [H + 2, W]
    dy = smooth_x[2:] - smooth_x[:-2]
    return dx, dy


def canny(image, low: float = 100, high: float = 200) -> np.ndarray:
    """Canny edges as OpenCV's `cv2.Canny(image, low, high)` computes them.

    Args:
      image: uint8 [H, W] grey or [H, W, 3] (a multi-channel image uses, per pixel, the channel with the
        largest gradient, as OpenCV does), or a PIL image.
      low, high: hysteresis thresholds on the L1 gradient |dx| + |dy| (floored to integers, as OpenCV).

    Returns:
      uint8 [H, W, 3]: 255 on edges, 0 elsewhere (3 channels, ready as a control image).
    """
    x = np.asarray(image)
    if x.dtype != np.uint8 or x.ndim not in (2, 3):
        raise JaxdiffError(f"canny: expected a uint8 [H, W] or [H, W, C] image, got {x.dtype} {x.shape}")
    if low > high:
        low, high = high, low  # OpenCV swaps them too
    low_i, high_i = int(np.floor(low)), int(np.floor(high))
    chans = x[..., None] if x.ndim == 2 else x
    grads = [_sobel(chans[..., c].astype(np.int32)) for c in range(chans.shape[-1])]
    mags = np.stack([np.abs(dx) + np.abs(dy) for dx, dy in grads])
    pick = np.argmax(mags, axis=0)  # first channel with the largest magnitude
    dx = np.take_along_axis(np.stack([g[0] for g in grads]), pick[None], 0)[0]
    dy = np.take_along_axis(np.stack([g[1] for g in grads]), pick[None], 0)[0]
    mag = np.take_along_axis(mags, pick[None], 0)[0]

    h, w = mag.shape
    m = np.pad(mag, 1)  # magnitudes outside the image are 0
    c = m[1:-1, 1:-1]
    left, right = m[1:-1, :-2], m[1:-1, 2:]
    up, down = m[:-2, 1:-1], m[2:, 1:-1]
    up_left, up_right = m[:-2, :-2], m[:-2, 2:]
    down_left, down_right = m[2:, :-2], m[2:, 2:]
    xs, ys = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64)
    tg22x = xs * _TG22
    y = ys << _SHIFT
    tg67x = tg22x + (xs << (_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # OpenCV: s = (dx ^ dy) < 0 ? -1 : 1; compares row above at j - s, below at j + s
    diag_max = np.where(same_sign, (c > up_left) & (c > down_right), (c > up_right) & (c > down_left))
    local_max = ((horizontal & (c > left) & (c >= right)) | (vertical & (c > up) & (c >= down))
                 | (diagonal & diag_max))
    candidate = local_max & (c > low_i)
    strong = candidate & (c > high_i)

    # Hysteresis: candidates 8-connected to a strong pixel (a flood fill over the candidates only).
    edges = strong.copy()
    stack = list(zip(*np.nonzero(strong)))
    while stack:
        i, j = stack.pop()
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                a, b = i + di, j + dj
                if 0 <= a < h and 0 <= b < w and candidate[a, b] and not edges[a, b]:
                    edges[a, b] = True
                    stack.append((a, b))
    out = edges.astype(np.uint8) * 255
    return np.repeat(out[..., None], 3, axis=-1)
