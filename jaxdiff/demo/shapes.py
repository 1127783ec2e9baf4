"""Synthetic captioned shapes: the data the bundled demo model is trained and evaluated on.

One flat-coloured shape on a flat background per image, anti-aliased, captioned in plain words:

    scene = sample_scenes(np.random.default_rng(0), 1)[0]
    caption(scene)   # "a small green triangle in the top left on a white background"
    render(scene)    # uint8 [64, 64, 3]

Every attribute is discrete (shape, colour, background, one of 9 positions, small / large) plus a small
seeded jitter of the exact size and position, so an analytic detector (jaxdiff.demo.detector) can read
the attributes back from pixels. A scene's position is the shape's area centroid (a triangle's bounding
box sits higher than its centroid), which is what the detector measures.

Evaluation uses caption combinations never seen in training: `held_out_triples(seed)` is a seeded set
of (colour, shape, position) triples; `split="train"` never draws them and `split="heldout"` only
draws them. Everything is a pure function of the seed.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
# Named colours, RGB uint8. Shape and background colours share one table (blue is both).
PALETTE = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 170, 70),
    "blue": (40, 80, 225), "purple": (145, 55, 195), "white": (245, 245, 245), "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")          # shape colours
BACKGROUNDS = ("white", "black", "gray", "blue", "green")               # background colours
SIZES = {"small": (19.0, 22.0), "large": (28.0, 32.0)}                  # bbox side range, pixels at 64
# 3 x 3 grid of centroid targets, (x, y) as fractions of the image side; the phrase each caption uses.
POSITIONS = {
    "top left": ((0.25, 0.25), "in the top left"), "top": ((0.5, 0.25), "at the top"),
    "top right": ((0.75, 0.25), "in the top right"), "left": ((0.25, 0.5), "on the left"),
    "center": ((0.5, 0.5), "in the center"), "right": ((0.75, 0.5), "on the right"),
    "bottom left": ((0.25, 0.75), "in the bottom left"), "bottom": ((0.5, 0.75), "at the bottom"),
    "bottom right": ((0.75, 0.75), "in the bottom right"),
}
JITTER = 2.0 / 64          # max centroid offset from the grid point, fraction of the side
HELDOUT_FRACTION = 0.1     # of the 216 (colour, shape, position) triples
SUPERSAMPLE = 4            # sub-pixels per pixel side for anti-aliased coverage
# Area of a shape with a bounding box of side 1; the detector uses it to size its templates.
UNIT_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One image's content. cx, cy: centroid, and side: bounding-box side, as fractions of the image."""
    shape: str
    color: str
    background: str
    position: str
    size: str
    cx: float
    cy: float
    side: float

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.color, self.shape, self.position)


def caption(scene: Scene, *, size: bool = True, position: bool = True) -> str:
    """'a {size} {color} {shape} {where} on a {background} background'; size=False / position=False leave
    that phrase out ("a red circle on a blue background")."""
    words = ["a"] + ([scene.size] if size else []) + [scene.color, scene.shape]
    words += [POSITIONS[scene.position][1]] if position else []
    return " ".join(words + [f"on a {scene.background} background"])


def all_triples() -> list[tuple[str, str, str]]:
    return [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def held_out_triples(seed: int) -> frozenset[tuple[str, str, str]]:
    """The (colour, shape, position) triples reserved for evaluation: a seeded 10% of all 216."""
    triples = all_triples()
    rng = np.random.default_rng([seed, 7])
    n = int(round(HELDOUT_FRACTION * len(triples)))
    return frozenset(triples[i] for i in rng.choice(len(triples), n, replace=False))


def sample_scenes(rng: np.random.Generator, n: int, *,
                  triples: Sequence[tuple[str, str, str]] | None = None) -> list[Scene]:
    """n random scenes; `triples` restricts (colour, shape, position) to that list (default: all)."""
    triples = list(triples) if triples is not None else all_triples()
    scenes = []
    for _ in range(n):
        color, shape, position = triples[rng.integers(len(triples))]
        backgrounds = [b for b in BACKGROUNDS if b != color]
        background = backgrounds[rng.integers(len(backgrounds))]
        size = ("small", "large")[rng.integers(2)]
        lo, hi = SIZES[size]
        side = rng.uniform(lo, hi) / 64
        (gx, gy), _ = POSITIONS[position]
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        scenes.append(Scene(shape, color, background, position, size, gx + dx, gy + dy, side))
    return scenes


def split_triples(seed: int, split: str) -> list[tuple[str, str, str]]:
    """"train": every triple not held out; "heldout": the held-out ones; "all": every triple."""
    held = held_out_triples(seed)
    if split == "train":
        return [t for t in all_triples() if t not in held]
    if split == "heldout":
        return sorted(held)
    if split == "all":
        return all_triples()
    raise ValueError(f"split={split!r}: expected train, heldout or all")


def coverage(shape: str, cx: float, cy: float, side: float, resolution: int) -> np.ndarray:
    """Anti-aliased coverage [R, R] float32 in [0, 1] of a shape with centroid (cx, cy) and bounding-box
    side `side` (all in pixels), by SUPERSAMPLE x SUPERSAMPLE sub-pixel sampling of its window only."""
    half = side / 2
    # Bounding-box centre: a triangle (apex up) has its centroid 2/3 of the way down its box.
    bx, by = cx, (cy - side / 6 if shape == "triangle" else cy)
    x0, x1 = max(int(np.floor(bx - half)) - 1, 0), min(int(np.ceil(bx + half)) + 1, resolution)
    y0, y1 = max(int(np.floor(by - half)) - 1, 0), min(int(np.ceil(by + half)) + 1, resolution)
    out = np.zeros((resolution, resolution), np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    k = SUPERSAMPLE
    xs = x0 + (np.arange((x1 - x0) * k) + 0.5) / k - bx       # sub-pixel centres, box-relative
    ys = y0 + (np.arange((y1 - y0) * k) + 0.5) / k - by
    x, y = xs[None, :], ys[:, None]
    if shape == "circle":
        inside = x * x + y * y <= half * half
    elif shape == "square":
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":   # apex at the top centre, base along the bottom edge
        inside = (y >= -half) & (y <= half) & (np.abs(x) <= (y + half) / 2)
    elif shape == "diamond":
        inside = np.abs(x) + np.abs(y) <= half
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cov = inside.astype(np.float32).reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = cov
    return out


def render(scene: Scene, resolution: int = 64) -> np.ndarray:
    """uint8 [R, R, 3]: the scene, shape blended over the background by its coverage."""
    a = coverage(scene.shape, scene.cx * resolution, scene.cy * resolution, scene.side * resolution,
                 resolution)[..., None]
    bg = np.asarray(PALETTE[scene.background], np.float32)
    fg = np.asarray(PALETTE[scene.color], np.float32)
    return np.clip(np.rint(bg * (1 - a) + fg * a), 0, 255).astype(np.uint8)


def make_dataset(seed: int, n: int, *, split: str = "train", resolution: int = 64
                 ) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n scenes of `split` drawn from `seed`: (images uint8 [n, R, R, 3], captions, scenes).

    The same (seed, n, split, resolution) always gives the same arrays; different splits of one seed
    use different streams and never share a (colour, shape, position) triple.
    """
    stream = {"train": 0, "heldout": 1, "all": 2}[split] if split in ("train", "heldout", "all") else None
    if stream is None:
        raise ValueError(f"split={split!r}: expected train, heldout or all")
    rng = np.random.default_rng([seed, stream])
    scenes = sample_scenes(rng, n, triples=split_triples(seed, split))
    images = np.stack([render(s, resolution) for s in scenes]) if scenes else np.zeros(
        (0, resolution, resolution, 3), np.uint8)
    return images, [caption(s) for s in scenes], scenes
