"""The bundled demo model (jaxdiff/assets/demo_model): small, complete, and `jaxdiff generate PROMPT` with
no --model draws what the prompt asks for, as read back by the analytic detector.

The acceptance scores over 200 held-out prompts are a benchmark, not a test (scripts/eval_demo_model.py;
the numbers are in jaxdiff/demo/README.md). The prompts here are ones the shipped weights draw right at
the CLI's defaults (seed 0, image i of the run): the test guards the path a new user
takes (the packaged weights, the CLI's defaults, the whole pipeline), so a regression anywhere on it shows.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import jaxdiff
from jaxdiff import cli
from jaxdiff.demo import detector

ROOT = Path(__file__).resolve().parents[1]
# prompt -> what the detector must read: (shape, colour, background, position or None). Image i of the run
# has seed index i; the shipped weights (run 8) draw each of these right, shape class included, at every
# one of seed indices 0-7, so the test does not depend on the order. The README's first prompt names no
# position (it comes back in a different place per seed).
PROMPTS = {
    "a red circle on a blue background": ("circle", "red", "blue", None),
    "a small green triangle in the top left on a white background": ("triangle", "green", "white", "top left"),
    "a large yellow square in the center on a black background": ("square", "yellow", "black", "center"),
}


def test_asset_is_small_and_complete():
    files = [p for p in cli.DEMO_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2 ** 20     # the bound for the package
    pipe = jaxdiff.load(cli.DEMO_MODEL)
    assert pipe.vae.config.downsample_factor == 4 and pipe.unet.config.sample_size == 16
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.vocab_size == pipe.text_encoder.config.vocab_size == 49408
    assert 0 < pipe.vae.config.scaling_factor < 100


def test_generate_without_model_draws_the_prompt(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXDIFF_CACHE=str(tmp_path / "xla"))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    proc = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "generate", *PROMPTS, "--out", str(tmp_path / "out"),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == len(PROMPTS)
    for path, (prompt, want) in zip(files, PROMPTS.items()):
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape == (64, 64, 3)
        d = detector.detect(image)
        shape, colour, background, position = want
        assert (d.shape, d.color, d.background) == (shape, colour, background), (prompt, d)
        assert position is None or d.position == position, (prompt, d)
