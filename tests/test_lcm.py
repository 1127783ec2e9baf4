"""Latent Consistency Models against diffusers on tiny random models:

* UNets with `time_cond_proj_dim` (LCM-distilled): time_embedding.cond_proj and the `timestep_cond`
  input, float32 parity with diffusers' UNet2DConditionModel within 1e-4 of the output scale;
* LCM-LoRA: a PEFT LoRA file on the tiny SD1 UNet + the `lcm` sampler at guidance 1 (no CFG), image
  within 1/255 of diffusers' load_lora_weights + LCMScheduler.

Same noise on both sides: jaxdiff's start noise (`rng.request_noise`) goes to diffusers as `latents=`,
and LCMScheduler.step's re-noising draws (`randn_tensor` in diffusers' scheduling_lcm module, called
on every step but the last) are monkeypatched to jaxdiff's step noise, which the `lcm` sampler draws
for evaluation k as `samplers.core.step_noise(stream(root, STEP_NOISE), i, k)` (jaxdiff/rng.py).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxdiff
from convert.diffusers_layout import convert_state_dict
from convert.formats import read_tensors
from jaxdiff import rng, sharding
from jaxdiff.models.configs import UNetConfig
from jaxdiff.models.unet import UNet2DConditionModel, example_inputs, param_shapes
from jaxdiff.samplers.core import step_noise
from tests import helpers

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

H = W = 16   # the tiny VAE has factor 2: 8x8 latents
PROMPTS = ["a red panda, highly detailed", "a cat"]
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
LCM_UNET = dict(norm_num_groups=8, cross_attention_dim=24, layers_per_block=1, block_out_channels=(32, 64),
                attention_head_dim=4, time_cond_proj_dim=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_config_reads_time_cond_proj_dim():
    raw = dict(block_out_channels=[32, 64], norm_num_groups=8, time_cond_proj_dim=256,
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    config = UNetConfig.from_dict(raw, "unet/config.json")
    assert config.time_cond_proj_dim == 256
    assert param_shapes(config)["time_embedding"]["cond_proj"]["kernel"].shape == (256, 32)
    assert "bias" not in param_shapes(config)["time_embedding"]["cond_proj"]
    assert example_inputs(config)[3]["timestep_cond"].shape == (1, 256)
    assert "cond_proj" not in param_shapes(UNetConfig.tiny())["time_embedding"]


def test_unet_time_cond_proj_parity_with_diffusers(tmp_path):
    torch.manual_seed(0)
    ref = helpers.perturb(diffusers.UNet2DConditionModel(**LCM_UNET))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = UNetConfig.from_dict(json.loads((tmp_path / "config.json").read_text()), str(tmp_path))
    model = UNet2DConditionModel(config)
    g = np.random.default_rng(0)
    b = 2
    sample = g.standard_normal((b, 4, 8, 8)).astype(np.float32)
    context = g.standard_normal((b, 7, 24)).astype(np.float32)
    t = np.array([19, 759])
    cond = g.standard_normal((b, 16)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(sample), torch.as_tensor(t), torch.from_numpy(context),
                   timestep_cond=torch.from_numpy(cond)).sample.numpy().transpose(0, 2, 3, 1)
        without = ref(torch.from_numpy(sample), torch.as_tensor(t), torch.from_numpy(context),
                      timestep_cond=torch.zeros(b, 16)).sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(want - without).max() > 1e-3   # the condition matters: the test could fail

    args = (jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(context),
            {"timestep_cond": jnp.asarray(cond)})
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
    params = convert_state_dict(read_tensors(tmp_path / "diffusion_pytorch_model.safetensors"), target,
                                source=str(tmp_path))
    got = np.asarray(jax.jit(model.apply).lower({"params": params}, *args).compile(compiler_options=FAST)(
        {"params": params}, *args))
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(f"lcm unet: max|jax - torch| = {err:.3g}, max|torch| = {scale:.3g}")
    assert err <= 1e-4 * scale


def test_unet_without_timestep_cond_is_refused():
    config = UNetConfig(**{**UNetConfig.tiny().__dict__, "time_cond_proj_dim": 8})
    sample, t, context, _ = example_inputs(config)
    with pytest.raises(ValueError, match="timestep_cond"):
        jax.eval_shape(UNet2DConditionModel(config).init, jax.random.PRNGKey(0), sample, t, context, None)


def _lcm_noises(seed, b, steps, latent_shape):
    """jaxdiff's start noise and the lcm sampler's step noises 0 .. steps-2 (the last step adds none)."""
    start = rng.request_noise(seed, np.arange(b), latent_shape)["start"]
    key = rng.stream(rng.request_key(seed), rng.STEP_NOISE)
    idx = jnp.arange(b, dtype=jnp.int32)
    steps_noise = [np.asarray(step_noise(key, idx, jnp.int32(k), latent_shape)) for k in range(steps - 1)]
    return start, steps_noise


def _make_lcm_lora(folder, dst):
    """A random PEFT LoRA on the UNet (B non-zero), saved by diffusers' save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    torch.manual_seed(7)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                     init_lora_weights=False)
    ref.unet.add_adapter(cfg)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        dst, weight_name="lcm_lora.safetensors", unet_lora_layers=get_peft_model_state_dict(ref.unet),
        unet_lora_adapter_metadata=cfg.to_dict())
    return dst / "lcm_lora.safetensors"


def test_lcm_lora_with_lcm_sampler_matches_diffusers(tiny_pipeline, tmp_path, monkeypatch):
    """LCM-LoRA: a LoRA on a plain SD1 UNet, the `lcm` sampler, guidance 1 (no CFG), 4 steps."""
    _, _, folder = tiny_pipeline("sd1")
    lora = _make_lcm_lora(folder, tmp_path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.tokenizer.model_max_length = 77
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    base, _ = _run_both(ref, lambda *a, **k: None, monkeypatch, guidance=1.0)
    ref.load_lora_weights(str(lora))
    pipe = jaxdiff.load(folder)   # its own pipeline: the session's shared one keeps its weights
    pipe.load_lora_weights(lora)
    want, out = _run_both(ref, pipe, monkeypatch, guidance=1.0)
    _assert_image_parity(out, want, "lcm-lora")
    assert np.abs(want - base).max() > 4 / 255   # the LoRA changes the image: the test could fail


def test_guidance_scale_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline
    from jaxdiff.request import guidance_scale_embedding
    for w, dim in ((7.5, 16), (0.0, 256), (3.0, 9)):
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, torch.tensor([w - 1.0]), embedding_dim=dim).numpy()[0]
        # diffusers computes in float32: its sine arguments (up to 1000 w ~ 1e4) carry rounding of ~1e-3.
        np.testing.assert_allclose(guidance_scale_embedding(w - 1.0, dim), want, rtol=0, atol=2e-3)


@pytest.fixture(scope="module")
def lcm_distilled(tmp_path_factory):
    """A tiny LCM-distilled SD1 pipeline (UNet with time_cond_proj_dim, LCMScheduler), as diffusers'
    LatentConsistencyModelPipeline, written with save_pretrained and loaded by jaxdiff."""
    from tests import tiny_pipelines as tp
    folder = tmp_path_factory.mktemp("lcm_distilled")
    torch.manual_seed(0)
    unet = helpers.perturb(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, time_cond_proj_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8), scale=0.02)
    ref = diffusers.LatentConsistencyModelPipeline(
        vae=tp.vae(), text_encoder=tp.text_encoder(), tokenizer=tp.tokenizer(), unet=unet,
        scheduler=diffusers.LCMScheduler.from_config(tp.STOCK_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    ref.save_pretrained(folder, safe_serialization=True)
    ref.tokenizer.model_max_length = 77
    ref.set_progress_bar_config(disable=True)
    return ref, jaxdiff.load(folder)


def _run_both(ref, pipe, monkeypatch, *, guidance, steps=4, seed=5, mesh=None):
    """(diffusers float images, jaxdiff output) for PROMPTS with shared start and step noise."""
    b = len(PROMPTS)
    start, noises = _lcm_noises(seed, b, steps, (H // 2, W // 2, 4))
    import diffusers.schedulers.scheduling_lcm as lcm_mod  # LCMScheduler.step re-noises through it
    left = helpers.patch_randn(monkeypatch, lcm_mod, noises)
    want = ref(PROMPTS, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
               latents=helpers.nchw(start), output_type="np").images
    assert left == []
    out = pipe(PROMPTS, height=H, width=W, steps=steps, sampler="lcm", schedule=None, guidance_scale=guidance,
               seed=seed, mesh=mesh or sharding.make_mesh(jax.devices()[:1]), return_float=True)
    return want, out


def _assert_image_parity(out, want, what):
    u8 = np.abs(out.images.astype(np.int16) - (want * 255).round().astype(np.int16)).max()
    fl = float(np.abs(out.pixels - want).max())
    print(f"{what}: float max|jax - diffusers| = {fl:.2e}, uint8 max diff = {u8}")
    assert want.std() > 0.01   # not a flat image: the comparison means something
    assert u8 <= 1 and fl <= 1 / 255, what


def test_lcm_distilled_pipeline_matches_diffusers(lcm_distilled, monkeypatch):
    """LatentConsistencyModelPipeline semantics: the guidance scale goes in as `timestep_cond`, one UNet
    pass per step (no CFG); two scales (the second on all 8 devices, batch padded) give two images."""
    from jaxdiff import request
    ref, pipe = lcm_distilled
    assert pipe.family.guidance_embedding_dim == 32
    spec = request.build(pipe, PROMPTS, height=H, width=W, steps=4, sampler="lcm", guidance_scale=8.5).spec
    assert not spec.cfg
    want_a, out_a = _run_both(ref, pipe, monkeypatch, guidance=8.5)
    _assert_image_parity(out_a, want_a, "lcm-distilled w=8.5")
    want_b, out_b = _run_both(ref, pipe, monkeypatch, guidance=1.5, mesh=sharding.make_mesh(jax.devices()))
    _assert_image_parity(out_b, want_b, "lcm-distilled w=1.5, 8 devices")
    # the embedding changes the image by several times the parity tolerance: the test could fail
    assert np.abs(want_a - want_b).max() > 4 / 255
