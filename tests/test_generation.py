"""pipe(...) end to end against diffusers' pipelines on tiny random models, plus compile counting.

The same noise goes into both sides: txt2img passes jaxdiff's seeded start noise (from
`rng.request_noise`, the public noise derivation) to diffusers as `latents=`; img2img and
inpainting monkeypatch diffusers' `randn_tensor` (in the pipeline module for the start noise, in the
VAE module for posterior samples) to hand back jaxdiff's noises in diffusers' call order. Images are
compared as diffusers' float output (`output_type="np"`) and as uint8 with diffusers' conversion
`(x * 255).round()`: uint8 within 1, float within FLOAT_ATOL.

Every case runs on a one-device mesh (sharding has its own tests) at 16x16 pixels (the tiny VAE has
factor 2: 8x8 latents) with 2-4 steps, one compile per case.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline)

import jaxdiff
from jaxdiff import rng, sharding
from jaxdiff.errors import CheckpointError, JaxdiffError
from jaxdiff.pipeline import Pipeline
from tests import helpers
from tests.helpers import one_torch_thread  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
# Float images in [0, 1]: per-module parity is 1e-4 of the output scale; a few UNet evaluations, CFG
# (x7.5 amplification of the cond - uncond difference) and the VAE decode stay well inside 1e-4 here
# (measured max 2e-6 .. 1e-5; the report lists them).
FLOAT_ATOL = 1e-4
H = W = 16
PROMPTS = ["a red panda, highly detailed", "a cat"]
NEGATIVES = ["blurry", ""]


# conftest.py already runs XLA with most optimisations off; references use one torch thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def models(tiny_pipeline):
    """name -> (diffusers pipeline, jaxdiff pipeline, folder), from the session's shared tiny pipelines."""
    return {name: tiny_pipeline(name) for name in ("sd1", "sd1_inpaint", "sd2", "sdxl")}


def _scheduler(ref, sampler):
    cfg = ref.scheduler.config  # may be an earlier test's DPM++ Karras: switch karras off explicitly
    if sampler == "euler":
        return EulerDiscreteScheduler.from_config(cfg, use_karras_sigmas=False)
    if sampler == "ddim":
        return DDIMScheduler.from_config(cfg)
    return DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True)  # dpmpp_2m karras


SCHEDULE = {"euler": None, "ddim": None, "dpmpp_2m": "karras"}


def _compare(out, want, what):
    """uint8 within 1 and float within FLOAT_ATOL; returns the float max abs diff (for the report)."""
    want_u8 = (want * 255).round().astype(np.int16)
    u8 = np.abs(out.images.astype(np.int16) - want_u8).max()
    fl = float(np.abs(out.pixels - want).max())
    print(f"{what}: float max|jax - diffusers| = {fl:.2e}, uint8 max diff = {u8}")
    assert out.images.dtype == np.uint8 and out.images.shape == want.shape
    assert u8 <= 1, what
    assert fl <= FLOAT_ATOL, what
    assert want.std() > 0.01  # not a flat image: the comparison means something
    return fl


def test_sd1_txt2img_euler_cfg_negative_prompts(models, mesh1):
    ref, pipe, _ = models["sd1"]
    ref.scheduler = _scheduler(ref, "euler")
    noise = rng.request_noise(5, np.arange(2), (H // 2, W // 2, 4))["start"]
    out = pipe(PROMPTS, NEGATIVES, height=H, width=W, steps=3, sampler="euler", schedule=None,
               guidance_scale=7.5, seed=5, mesh=mesh1, return_float=True)
    want = ref(PROMPTS, negative_prompt=NEGATIVES, height=H, width=W, num_inference_steps=3, guidance_scale=7.5,
               latents=helpers.nchw(noise), output_type="np").images
    _compare(out, want, "sd1 euler txt2img")
    np.testing.assert_array_equal(out.indices, [0, 1])
    assert out.latents.shape == (2, H // 2, W // 2, 4) and out.latents.dtype == np.float32


def test_second_call_compiles_nothing(models, mesh1):
    """Same shapes / sampler / steps as the test above (other seed, prompts, guidance): no compile."""
    _, pipe, _ = models["sd1"]
    kw = dict(height=H, width=W, steps=3, sampler="euler", schedule=None, mesh=mesh1, return_float=True)
    pipe(PROMPTS, NEGATIVES, guidance_scale=7.5, seed=5, **kw)  # compiled already if run after the parity test
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration"
        else None)
    size = pipe.runner(mesh1).cache_size()
    a = pipe(["another prompt", "x"], ["y", "z"], guidance_scale=3.0, seed=6, **kw)
    b = pipe(["another prompt", "x"], ["y", "z"], guidance_scale=3.0, seed=6, **kw)
    assert compiles == [] and pipe.runner(mesh1).cache_size() == size
    np.testing.assert_array_equal(a.images, b.images)


def test_progress_reports_every_evaluation_and_same_images(models, mesh1):
    """progress= gets (done, total) for each model evaluation, in order, and changes no pixel."""
    _, pipe, _ = models["sd1"]
    kw = dict(height=H, width=W, steps=3, sampler="euler", schedule=None, mesh=mesh1, guidance_scale=7.5, seed=5)
    seen = []
    with_bar = pipe(PROMPTS, NEGATIVES, progress=lambda done, total: seen.append((done, total)), **kw)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_array_equal(with_bar.images, pipe(PROMPTS, NEGATIVES, **kw).images)


def test_sd1_dpmpp_2m_karras_rescale_clip_skip(models, mesh1, monkeypatch):
    """guidance_rescale and clip_skip=1 (diffusers' clip_skip=1: penultimate layer + final LayerNorm).
    diffusers encodes the negative prompt without clip skip; jaxdiff skips for both, so the diffusers
    side gets the negative embeddings computed the same way through torch. (transformers 5 dropped
    CLIPTextModel.text_model, which diffusers' clip_skip path still reads: the test restores the alias.)"""
    ref, pipe, _ = models["sd1"]
    import types
    monkeypatch.setattr(ref.text_encoder, "text_model",
                        types.SimpleNamespace(final_layer_norm=ref.text_encoder.final_layer_norm), raising=False)
    ref.scheduler = _scheduler(ref, "dpmpp_2m")
    noise = rng.request_noise(1, np.arange(2), (H // 2, W // 2, 4))["start"]
    out = pipe(PROMPTS, NEGATIVES, height=H, width=W, steps=4, sampler="dpmpp_2m", schedule="karras",
               guidance_scale=6.0, guidance_rescale=0.7, clip_skip=1, seed=1, mesh=mesh1, return_float=True)
    with torch.no_grad():
        ids = ref.tokenizer(NEGATIVES, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
        hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        negative_embeds = ref.text_encoder.final_layer_norm(hidden)
    want = ref(PROMPTS, negative_prompt_embeds=negative_embeds, height=H, width=W, num_inference_steps=4,
               guidance_scale=6.0, guidance_rescale=0.7, clip_skip=1, latents=helpers.nchw(noise), output_type="np").images
    _compare(out, want, "sd1 dpmpp_2m karras rescale clip_skip")
    plain = pipe(PROMPTS, NEGATIVES, height=H, width=W, steps=4, sampler="dpmpp_2m", schedule="karras",
                 guidance_scale=6.0, guidance_rescale=0.7, seed=1, mesh=mesh1, return_float=True)
    assert np.abs(plain.pixels - out.pixels).max() > 1e-3  # clip skip changes the image


def _image(seed, n=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def _mask(n=2):
    m = np.zeros((n, H, W, 1), np.float32)
    m[:, 4:12, 6:14] = 1.0
    return m


def test_sd1_img2img_ddim(models, mesh1, monkeypatch):
    ref, pipe, _ = models["sd1"]
    i2i = StableDiffusionImg2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    i2i.scheduler = _scheduler(ref, "ddim")
    image = _image(0)
    noises = rng.request_noise(3, np.arange(2), (H // 2, W // 2, 4))
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as mod
    left_pipe = helpers.patch_randn(monkeypatch, mod, [noises["start"]])
    left_vae = helpers.patch_randn(monkeypatch, vae_mod, [noises["image_posterior"]])
    out = pipe(PROMPTS, NEGATIVES, image=image, strength=0.6, steps=4, sampler="ddim", schedule=None,
               guidance_scale=7.5, seed=3, mesh=mesh1, return_float=True)
    want = i2i(PROMPTS, negative_prompt=NEGATIVES, image=image.astype(np.float32) / 255.0, strength=0.6,
               num_inference_steps=4, guidance_scale=7.5, output_type="np").images
    assert left_pipe == [] and left_vae == []
    _compare(out, want, "sd1 img2img ddim")


def test_sd1_inpaint_4_channel_blend_euler(models, mesh1, monkeypatch):
    ref, pipe, _ = models["sd1"]
    inp = StableDiffusionInpaintPipeline(**ref.components)
    inp.set_progress_bar_config(disable=True)
    inp.scheduler = _scheduler(ref, "euler")
    image, mask = _image(1), _mask()
    noises = rng.request_noise(4, np.arange(2), (H // 2, W // 2, 4))
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as mod
    # diffusers' order: init-image posterior, start noise, masked-image posterior (unused by a 4-ch UNet)
    helpers.patch_randn(monkeypatch, mod, [noises["start"]])
    helpers.patch_randn(monkeypatch, vae_mod, [noises["image_posterior"], noises["masked_posterior"]])
    out = pipe(PROMPTS, NEGATIVES, image=image, mask=mask, strength=0.75, steps=4, sampler="euler",
               schedule=None, guidance_scale=7.5, seed=4, mesh=mesh1, return_float=True)
    want = inp(PROMPTS, negative_prompt=NEGATIVES, image=image.astype(np.float32) / 255.0, mask_image=mask,
               height=H, width=W, strength=0.75, num_inference_steps=4, guidance_scale=7.5, output_type="np").images
    _compare(out, want, "sd1 inpaint 4-channel euler")


def test_sd1_inpaint_9_channel_ddim(models, mesh1, monkeypatch):
    ref, pipe, _ = models["sd1_inpaint"]
    assert pipe.unet.config.in_channels == 9
    ref.scheduler = _scheduler(ref, "ddim")
    image, mask = _image(2), _mask()
    noises = rng.request_noise(7, np.arange(2), (H // 2, W // 2, 4))
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as mod
    helpers.patch_randn(monkeypatch, mod, [noises["start"]])
    helpers.patch_randn(monkeypatch, vae_mod, [noises["masked_posterior"]])  # strength 1: no init-image encode
    out = pipe(PROMPTS, NEGATIVES, image=image, mask=mask, steps=3, sampler="ddim", schedule=None,
               guidance_scale=7.5, seed=7, mesh=mesh1, return_float=True)
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=image.astype(np.float32) / 255.0, mask_image=mask,
               height=H, width=W, num_inference_steps=3, guidance_scale=7.5, output_type="np").images
    _compare(out, want, "sd1 inpaint 9-channel ddim")
    with pytest.raises(JaxdiffError, match="inpainting model"):
        pipe("x", height=H, width=W, steps=2, mesh=mesh1)


def test_sd2_v_prediction_ddim(models, mesh1):
    ref, pipe, _ = models["sd2"]
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    noise = rng.request_noise(2, np.arange(2), (H // 2, W // 2, 4))["start"]
    out = pipe(PROMPTS, NEGATIVES, height=H, width=W, steps=3, sampler="ddim", schedule=None, guidance_scale=5.0,
               seed=2, mesh=mesh1, return_float=True)
    want = ref(PROMPTS, negative_prompt=NEGATIVES, height=H, width=W, num_inference_steps=3, guidance_scale=5.0,
               latents=helpers.nchw(noise), output_type="np").images
    _compare(out, want, "sd2 v-prediction ddim")


def test_sdxl_time_ids_zero_negative_and_negative_prompt(models, mesh1):
    """SDXL: two encoders, pooled text_embeds, original / crop / target time ids; no negative prompt gives
    zero negative embeddings (force_zeros_for_empty_prompt), a negative prompt is encoded. Same program."""
    ref, pipe, _ = models["sdxl"]
    ref.scheduler = _scheduler(ref, "euler")
    noise = rng.request_noise(9, np.arange(2), (H // 2, W // 2, 4))["start"]
    sizes = dict(original_size=(24, 40), crops_coords_top_left=(2, 4), target_size=(16, 16))
    for neg in (None, NEGATIVES):
        out = pipe(PROMPTS, neg, height=H, width=W, steps=3, sampler="euler", schedule=None, guidance_scale=5.0,
                   seed=9, mesh=mesh1, return_float=True, **sizes)
        want = ref(PROMPTS, negative_prompt=neg, height=H, width=W, num_inference_steps=3, guidance_scale=5.0,
                   latents=helpers.nchw(noise), output_type="np", **sizes).images
        _compare(out, want, f"sdxl euler negative={neg}")


def test_request_errors(models, mesh1):
    _, pipe, _ = models["sd1"]
    for kwargs, match in ((dict(height=20), "multiple of 8"), (dict(gather="some"), "gather"),
                          (dict(strength=0.5), "strength"), (dict(clip_skip=5), "clip_skip"),
                          (dict(latents=np.zeros((1, 2, 2, 4))), "latents"), (dict(seed=-1), "seed"),
                          (dict(mask=_mask(1)), "mask needs")):
        with pytest.raises(JaxdiffError, match=match):
            pipe("x", steps=2, mesh=mesh1, **{"height": H, "width": W, **kwargs})
    with pytest.raises(JaxdiffError, match="negative_prompt"):
        pipe(["a", "b"], ["1", "2", "3"], height=H, width=W, mesh=mesh1)


def test_from_parts_needs_a_text_encoder(models):
    _, pipe, _ = models["sdxl"]
    nets = pipe.components()
    refiner_like = {k: v for k, v in nets.items() if k != "text_encoder"}
    with pytest.raises(CheckpointError, match="unet expects context width"):  # 64 != 32: not the missing-encoder error
        Pipeline.from_parts(refiner_like, {"tokenizer_2": pipe.tokenizer_2}, None, source="x")
    with pytest.raises(CheckpointError, match="no text_encoder"):
        Pipeline.from_parts({"unet": nets["unet"], "vae": nets["vae"]}, {}, None, source="x")


CACHE_SCRIPT = """
import json, sys, time
import jax
jax.config.update("jax_disable_most_optimizations", True)
import numpy as np
import jaxdiff
from jaxdiff import generation, sharding
from jax import monitoring
events = {}
monitoring.register_event_listener(lambda name, **_: events.__setitem__(name, events.get(name, 0) + 1))
generation.enable_compilation_cache(sys.argv[2])
pipe = jaxdiff.load(sys.argv[1])
t = time.time()
out = pipe("a red panda", height=16, width=16, steps=2, sampler="euler", guidance_scale=1.0, seed=0,
           mesh=sharding.make_mesh(jax.devices()[:1]))
print(json.dumps({"hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0),
                  "seconds": time.time() - t, "image": out.images.tolist()}))
"""


def test_persistent_compilation_cache_fresh_process_compiles_nothing(models, tmp_path):
    folder = models["sd1"][2]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(folder), str(tmp_path / "cache")],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    first, second = runs
    print(f"persistent cache: first run {first['seconds']:.1f}s ({first['misses']} misses), "
          f"second {second['seconds']:.1f}s ({second['hits']} hits, {second['misses']} misses)")
    assert first["misses"] >= 1
    assert second["misses"] == 0 and second["hits"] >= 1
    assert first["image"] == second["image"]


def test_sdxl_refiner_img2img_aesthetic_score(tiny_pipeline, mesh1, monkeypatch):
    """The refiner: text_encoder_2 only, 5 time ids with the aesthetic scores, img2img."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as mod
    import diffusers.models.autoencoders.vae as vae_mod
    ref, pipe, _ = tiny_pipeline("sdxl_refiner")
    ref.scheduler = _scheduler(ref, "euler")
    assert pipe.text_encoder is None and pipe.family.is_refiner
    image = _image(5)
    noises = rng.request_noise(8, np.arange(2), (H // 2, W // 2, 4))
    helpers.patch_randn(monkeypatch, mod, [noises["start"]])
    helpers.patch_randn(monkeypatch, vae_mod, [noises["image_posterior"]])
    kw = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0)
    out = pipe(PROMPTS, NEGATIVES, image=image, strength=0.5, steps=4, sampler="euler", schedule=None,
               guidance_scale=5.0, seed=8, mesh=mesh1, return_float=True, **kw)
    want = ref(PROMPTS, negative_prompt=NEGATIVES, image=image.astype(np.float32) / 255.0, strength=0.5,
               num_inference_steps=4, guidance_scale=5.0, output_type="np", **kw).images
    _compare(out, want, "sdxl refiner img2img")
