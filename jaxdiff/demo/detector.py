"""An analytic detector for jaxdiff.demo.shapes images: reads shape, colours and position from pixels.

No learning, so its verdicts on generated images mean something by themselves:

1. background colour: the median of the border pixels (a shape covers well under half the border),
   named by the nearest background colour in the palette;
2. shape colour: the median colour of pixels far from the background, named by the nearest shape
   colour;
3. coverage alpha per pixel: the projection of (pixel - background) onto (shape colour - background),
   clipped to [0, 1]; centroid and area are alpha-weighted;
4. position: the nearest of the 9 grid points to the centroid;
5. shape class: each class's template is rendered with the measured centroid and the side that gives
   the measured area; the class whose template overlaps alpha best (soft IoU) wins;
6. size: small / large by the winning template's side, split between the two size ranges.

    d = detect(image)     # image uint8 [H, W, 3]
    d.shape, d.color, d.background, d.position, d.size
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxdiff.demo import shapes as S

_PALETTE = {k: np.asarray(v, np.float32) / 255 for k, v in S.PALETTE.items()}
# Pixels this far (RGB, [0, 1] units) from the background count as shape for the colour estimate:
# a third of the smallest distance between a shape colour and a background it may be drawn on.
_FG_THRESHOLD = min(float(np.linalg.norm(_PALETTE[c] - _PALETTE[b]))
                    for c in S.COLORS for b in S.BACKGROUNDS if c != b) / 3
# Between the largest small and the smallest large bounding-box side (fraction of the image side).
_SIZE_SPLIT = 0.5 * (S.SIZES["small"][1] + S.SIZES["large"][0]) / 64


@dataclasses.dataclass(frozen=True)
class Detection:
    """What the detector read. shape / color are None when no shape pixels were found."""
    shape: str | None
    color: str | None
    background: str
    position: str | None
    size: str | None
    cx: float            # centroid, fraction of the width (nan when empty)
    cy: float
    area: float          # alpha-weighted shape area, fraction of the image
    score: float         # soft IoU of the winning template (0 when empty)


def _nearest(rgb: np.ndarray, names) -> str:
    return min(names, key=lambda n: float(np.sum((_PALETTE[n] - rgb) ** 2)))


def detect(image: np.ndarray) -> Detection:
    """image: uint8 [H, W, 3] (square) -> Detection."""
    img = np.asarray(image, np.float32) / 255
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square RGB image [R, R, 3], got {img.shape}")
    r = img.shape[0]
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, S.BACKGROUNDS)
    dist = np.linalg.norm(img - bg_rgb, axis=-1)
    fg = dist > _FG_THRESHOLD
    if fg.sum() < 4:
        return Detection(None, None, background, None, None, np.nan, np.nan, 0.0, 0.0)
    fg_rgb = np.median(img[fg], axis=0)
    color = _nearest(fg_rgb, [c for c in S.COLORS if c != background])
    # Coverage relative to the measured colours (not the palette's: generated colours drift a little).
    axis = fg_rgb - bg_rgb
    alpha = np.clip(((img - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    alpha = np.where(dist > _FG_THRESHOLD / 2, alpha, 0.0)   # ignore faint background noise
    area = float(alpha.sum())
    ys, xs = np.mgrid[0:r, 0:r].astype(np.float32) + 0.5
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    position = min(S.POSITIONS, key=lambda p: (S.POSITIONS[p][0][0] * r - cx) ** 2
                   + (S.POSITIONS[p][0][1] * r - cy) ** 2)
    best, best_score = None, -1.0
    for shape in S.SHAPES:
        side = np.sqrt(area / S.UNIT_AREA[shape])
        tmpl = S.coverage(shape, cx, cy, side, r)
        score = float(np.minimum(alpha, tmpl).sum() / max(np.maximum(alpha, tmpl).sum(), 1e-6))
        if score > best_score:
            best, best_score = shape, score
    side = np.sqrt(area / S.UNIT_AREA[best]) / r
    size = "small" if side < _SIZE_SPLIT else "large"
    return Detection(best, color, background, position, size, cx / r, cy / r, area / (r * r), best_score)


def score(detections, scenes) -> dict[str, float]:
    """Fraction of images whose detected attribute equals the scene's, per attribute."""
    n = len(scenes)
    if n == 0 or len(detections) != n:
        raise ValueError(f"need as many detections as scenes (got {len(detections)} and {n})")
    out = {}
    for attr in ("color", "shape", "position", "background", "size"):
        out[attr] = sum(getattr(d, attr) == getattr(s, attr) for d, s in zip(detections, scenes)) / n
    return out
