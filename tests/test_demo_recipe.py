"""The demo-model recipe end to end at toy size: every stage runs, both losses fall, the folder loads.

The full recipe (scripts/train_demo_model.py without --quick) is a documented manual step; see
jaxdiff/demo/README.md for its run time.
"""
import json

import jax
import numpy as np

import jaxdiff
from tests.scripts import load_script



def _recipe_module():
    return load_script("scripts/train_demo_model.py")


def test_quick_recipe_loss_falls_model_loads_and_stages_reuse(tmp_path):
    """Every stage runs and learns; then --reuse-vae / --reuse-layout / --reuse-detail skip stage 2 and
    the first two diffusion phases and give the same weights as the run that saved them."""
    recipe = _recipe_module()
    r = recipe.Recipe.quick()
    summary = recipe.run(r, tmp_path / "demo")
    vae_log = [e["loss"] for e in summary["log"] if e["stage"] == "vae"]
    diff_log = [e["loss"] for e in summary["log"] if e["stage"] == "diffusion_layout"]
    detail_log = [e["loss"] for e in summary["log"] if e["stage"] == "diffusion_detail"]
    prompts_log = [e["loss"] for e in summary["log"] if e["stage"] == "diffusion_prompts"]
    assert len(vae_log) == r.vae_steps // r.log_every and len(diff_log) == r.steps // r.log_every
    assert len(detail_log) == r.detail_steps // r.log_every and np.isfinite(detail_log).all()
    assert len(prompts_log) == r.prompt_steps // r.log_every and np.isfinite(prompts_log).all()
    # Mean loss of the last logging window vs the first: both objectives must have learnt something.
    assert vae_log[-1] < 0.8 * vae_log[0], vae_log
    assert diff_log[-1] < 0.8 * diff_log[0], diff_log
    assert np.isfinite(summary["scaling_factor"]) and summary["scaling_factor"] > 0
    saved = json.loads((tmp_path / "demo" / "training_log.json").read_text())
    assert saved["diffusion_loss"] == summary["diffusion_loss"]
    pipe = jaxdiff.load(tmp_path / "demo")
    assert pipe.vae.config.scaling_factor == summary["scaling_factor"]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == pipe.tokenizer.vocab_size == 49408
    ids = pipe.tokenizer(["a small red circle in the center on a white background"])
    assert ids.shape == (1, 77) and ids[0, 0] == 49406
    for name in (".demo.vae.npz", ".demo.layout.npz", ".demo.detail.npz"):
        assert (tmp_path / name).exists()
    first = pipe
    summary = recipe.run(r, tmp_path / "demo", reuse_vae=True, reuse_layout=True, reuse_detail=True)
    stages = [e["stage"] for e in summary["log"]]
    assert {"stage": "vae", "reused": str(tmp_path / ".demo.vae.npz")} in summary["log"]
    assert {"stage": "diffusion_layout", "reused": str(tmp_path / ".demo.layout.npz")} in summary["log"]
    assert {"stage": "diffusion_detail", "reused": str(tmp_path / ".demo.detail.npz")} in summary["log"]
    assert stages.count("vae") == 1 and stages.count("diffusion_layout") == stages.count("diffusion_detail") == 1
    second = jaxdiff.load(tmp_path / "demo")
    for a, b in zip(jax.tree.leaves(first.unet.params), jax.tree.leaves(second.unet.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
