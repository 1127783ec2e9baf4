"""Scores the demo model on held-out caption combinations with the analytic detector.

    python scripts/eval_demo_model.py                        # the bundled model, 200 prompts -> JSON
    python scripts/eval_demo_model.py --model DIR --n 50 --out eval.json

Prompts are drawn from `shapes.make_dataset(seed, n, split="heldout")`: (colour, shape, position)
triples the model never saw in training, each with a random size and background. Each is generated at
25 steps of DPM++ 2M Karras (the defaults below), one image per prompt with seed = its index, and the
detector reads back shape colour, shape class, position (and background, size). The detector is also
run on the ground-truth renderings of the same scenes: its own accuracy bounds what the scores can mean.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

import jaxdiff  # noqa: E402
from jaxdiff.demo import detector, shapes  # noqa: E402

DEFAULT_MODEL = ROOT / "jaxdiff" / "assets" / "demo_model"
# What acceptance asks of the model over 200 held-out prompts.
TARGETS = {"color": 0.90, "shape": 0.80, "position": 0.80}


def evaluate(model: Path, n: int = 200, *, seed: int = 0, steps: int = 25, sampler: str = "dpmpp_2m",
             schedule: str = "karras", guidance: float = 7.5, batch: int = 50, save_grid: Path | None = None
             ) -> dict:
    """Generate and score n held-out prompts; returns the report dict (see main)."""
    truth, captions, scenes = shapes.make_dataset(seed, n, split="heldout")
    gt = [detector.detect(img) for img in truth]
    pipe = jaxdiff.load(model)
    t0 = time.time()
    images = []
    for i in range(0, n, batch):
        out = pipe(captions[i:i + batch], steps=steps, sampler=sampler, schedule=schedule,
                   guidance_scale=guidance, seed=seed, indices=list(range(i, min(i + batch, n))))
        images.append(out.images)
    images = np.concatenate(images)
    gen_s = time.time() - t0
    det = [detector.detect(img) for img in images]
    scores = detector.score(det, scenes)
    report = {
        "model": str(model), "prompts": n, "split": "heldout", "seed": seed, "steps": steps,
        "sampler": sampler, "schedule": schedule, "guidance": guidance,
        "scores": scores, "detector_on_ground_truth": detector.score(gt, scenes),
        "targets": TARGETS, "passed": all(scores[k] >= v for k, v in TARGETS.items()),
        "generation_s": round(gen_s, 1), "device": str(jax.devices()[0]),
        "failures": [{"prompt": c, "detected": {k: getattr(d, k) for k in ("color", "shape", "position",
                                                                           "background", "size")}}
                     for c, d, s in zip(captions, det, scenes)
                     if (d.color, d.shape, d.position) != (s.color, s.shape, s.position)][:20],
    }
    if save_grid is not None:
        _save_grid(images[:64], truth[:64], save_grid)
    return report


def _save_grid(images: np.ndarray, truth: np.ndarray, path: Path) -> None:
    """Generated images (rows of 8) above their ground-truth renderings."""
    from PIL import Image
    if images.shape[1] != truth.shape[1]:   # a model generating at another size: nearest-resize to match
        k = truth.shape[1] // images.shape[1]
        images = np.repeat(np.repeat(images, k, axis=1), k, axis=2)
    rows = lambda x: np.concatenate([np.concatenate(list(x[i:i + 8]), 1) for i in range(0, len(x) - 7, 8)], 0)  # noqa: E731
    Image.fromarray(np.concatenate([rows(images), rows(truth)], 0)).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--n", type=int, default=200, help="held-out prompts (default 200)")
    p.add_argument("--seed", type=int, default=0, help="data seed (the recipe's) and generation seed")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5, the CLI's)")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    p.add_argument("--grid", type=Path, help="save a PNG of generated (top) vs ground truth (bottom)")
    args = p.parse_args(argv)
    report = evaluate(args.model, args.n, seed=args.seed, steps=args.steps, guidance=args.guidance,
                      save_grid=args.grid)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
