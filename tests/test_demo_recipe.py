"""The demo-model recipe end to end at toy size: every stage runs, both losses fall, the folder loads.

The full recipe (scripts/train_demo_model.py without --quick) is a documented manual step; see
jaxdiff/demo/README.md for its run time.
"""
import json

import jax
import numpy as np
import pytest

import jaxdiff
from tests.scripts import load_script



def _recipe_module():
    return load_script("scripts/train_demo_model.py")


def test_quick_recipe_loss_falls_model_loads_and_stages_reuse(tmp_path):
    """Every stage runs and learns, the decoder fine-tuning leaves the encoder as it was; then --reuse of
    every stage but the last skips them and gives the same weights as the run that saved them."""
    recipe = _recipe_module()
    r = recipe.Recipe.quick()
    summary = recipe.run(r, tmp_path / "demo")
    vae_log = [e["loss"] for e in summary["log"] if e["stage"] == "vae"]
    decoder_log = [e["loss"] for e in summary["log"] if e["stage"] == "vae_decoder"]
    diff_log = [e["loss"] for e in summary["log"] if e["stage"] == "diffusion_layout"]
    detail_log = [e["loss"] for e in summary["log"] if e["stage"] == "diffusion_detail"]
    prompts_log = [e["loss"] for e in summary["log"] if e["stage"] == "diffusion_prompts"]
    polish_log = [e["loss"] for e in summary["log"] if e["stage"] == "diffusion_polish"]
    assert len(vae_log) == r.vae_steps // r.log_every and len(diff_log) == r.steps // r.log_every
    assert len(decoder_log) == r.decoder_steps // r.log_every and np.isfinite(decoder_log).all()
    assert len(detail_log) == r.detail_steps // r.log_every and np.isfinite(detail_log).all()
    assert len(prompts_log) == r.prompt_steps // r.log_every and np.isfinite(prompts_log).all()
    assert len(polish_log) == r.polish_steps // r.log_every and np.isfinite(polish_log).all()
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
    for stage in recipe.STAGES:
        assert (tmp_path / f".demo.{stage}.npz").exists(), stage
    # Decoder-only fine-tuning: the encoder (hence every cached latent) is bit for bit stage 2's.
    stage2 = dict(np.load(tmp_path / ".demo.vae.npz"))
    finetuned = dict(np.load(tmp_path / ".demo.decoder.npz"))
    assert any(k.startswith("encoder") for k in stage2)
    for k, v in stage2.items():
        if k.startswith(("encoder", "quant_conv")):
            np.testing.assert_array_equal(finetuned[k], v, err_msg=k)
    assert any(not np.array_equal(finetuned[k], v) for k, v in stage2.items() if k.startswith("decoder"))

    first = pipe
    reused = recipe.STAGES[:-1]
    summary = recipe.run(r, tmp_path / "demo", reuse=reused)
    stages = [e["stage"] for e in summary["log"]]
    for stage, logged in zip(reused, ("vae", "vae_decoder", *(f"diffusion_{s}" for s in reused[2:]))):
        assert {"stage": logged, "reused": str(tmp_path / f".demo.{stage}.npz")} in summary["log"]
        assert stages.count(logged) == 1, (logged, stages)
    second = jaxdiff.load(tmp_path / "demo")
    for a, b in zip(jax.tree.leaves((first.unet.params, first.vae.params)),
                    jax.tree.leaves((second.unet.params, second.vae.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reuse_of_a_stage_never_run_is_a_clear_error(tmp_path):
    recipe = _recipe_module()
    with pytest.raises(SystemExit, match=r"no saved \['.demo.layout.npz'\]"):
        recipe.run(recipe.Recipe.quick(), tmp_path / "demo", reuse=("layout",))
    with pytest.raises(SystemExit, match="unknown stage"):
        recipe.run(recipe.Recipe.quick(), tmp_path / "demo", reuse=("unet",))
    assert not any(tmp_path.iterdir())     # nothing written
