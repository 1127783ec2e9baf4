"""Tiled VAE (Pipeline.enable_vae_tiling) against diffusers' AutoencoderKL.enable_tiling().

The tiny sd1 pipeline's VAE (factor 2) with sample_size=16: 16-pixel / 8-latent tiles, stride 6
latents (12 pixels), blend 4 pixels; 20x28 latents give tiles cut short at both edges (four tile
shapes). The VAE alone agrees to 1e-4 of the output scale (float32 both sides); the pipelines' images
within 1/255 (uint8 within 1, as tests/test_generation.py).
"""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

import jaxdiff
from jaxdiff import generation, rng, sharding
from tests import helpers

H, W = 40, 56  # pixels: 20x28 latents
TILE = 16
PROMPTS = ["a red panda", "a cat"]


@pytest.fixture(scope="module")
def tiled(tiny_pipeline, tmp_path_factory):
    """(diffusers sd1 pipeline with a tiling VAE, jaxdiff pipeline with tiling on, folder)."""
    ref, _, base = tiny_pipeline("sd1")
    folder = tmp_path_factory.mktemp("tiling") / "sd1"
    shutil.copytree(base, folder)
    config_file = folder / "vae" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "sample_size": TILE}))
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    vae.enable_tiling()
    components = {**ref.components, "vae": vae,
                  "scheduler": EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=False)}
    torch_pipe = type(ref)(**components)
    torch_pipe.set_progress_bar_config(disable=True)
    pipe = jaxdiff.load(folder)
    pipe.enable_vae_tiling()
    return torch_pipe, pipe, folder


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh(jax.devices()[:1])


def _close(got, want, what):
    got = np.asarray(got)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    assert err <= 1e-4 * scale, f"{what}: {err:.3g} > 1e-4 * {scale:.3g}"


def test_tiled_decode_and_encode_match_diffusers(tiled):
    torch_pipe, pipe, _ = tiled
    m = generation.models_of(pipe)
    z = np.random.default_rng(0).standard_normal((2, H // 2, W // 2, 4)).astype(np.float32)
    with torch.no_grad():
        want = helpers.nhwc(torch_pipe.vae.decode(helpers.nchw(z)).sample)
    decode = jax.jit(lambda p, z, tiles: generation.vae_decode(m, p, z, tiles=tiles, float32=False),
                     static_argnums=2)
    _close(decode(pipe.vae.params, z, True), want, "tiled decode")
    assert np.abs(np.asarray(decode(pipe.vae.params, z, False)) - want).max() > 1e-3  # tiling mattered

    images = np.random.default_rng(1).uniform(-1, 1, (2, H, W, 3)).astype(np.float32)
    with torch.no_grad():
        post = torch_pipe.vae.encode(helpers.nchw(images)).latent_dist
    got = jax.jit(lambda p, x: generation.vae_encode(m, p, x, tiles=True, float32=False))(pipe.vae.params, images)
    _close(got.mean, helpers.nhwc(post.mean), "tiled encode mean")
    _close(got.logvar, helpers.nhwc(post.logvar), "tiled encode logvar")


def _u8_diff(out, want) -> int:
    return int(np.abs(out.images.astype(int) - (want * 255).round().astype(int)).max())


def test_tiled_txt2img_matches_diffusers(tiled, mesh1):
    torch_pipe, pipe, _ = tiled
    noise = rng.request_noise(4, np.arange(2), (H // 2, W // 2, 4))["start"]
    out = pipe(PROMPTS, height=H, width=W, steps=2, sampler="euler", schedule=None, guidance_scale=7.5,
               seed=4, mesh=mesh1, return_float=True)
    want = torch_pipe(PROMPTS, height=H, width=W, num_inference_steps=2, guidance_scale=7.5,
                      latents=helpers.nchw(noise), output_type="np").images
    assert want.std() > 0.01
    assert _u8_diff(out, want) <= 1 and np.abs(out.pixels - want).max() <= 1 / 255


def test_tiled_img2img_matches_diffusers(tiled, mesh1, monkeypatch):
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as mod
    torch_pipe, pipe, _ = tiled
    i2i = StableDiffusionImg2ImgPipeline(**torch_pipe.components)
    i2i.set_progress_bar_config(disable=True)
    image = np.random.default_rng(2).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    noises = rng.request_noise(6, np.arange(2), (H // 2, W // 2, 4))
    for module, noise in ((mod, noises["start"]), (vae_mod, noises["image_posterior"])):
        queue = [noise]
        monkeypatch.setattr(module, "randn_tensor",
                            lambda shape, generator=None, device=None, dtype=None, layout=None, q=queue:
                            helpers.nchw(q.pop(0)).to(dtype or torch.float32))
    out = pipe(PROMPTS, image=image, strength=0.6, steps=3, sampler="euler", schedule=None, guidance_scale=7.5,
               seed=6, mesh=mesh1, return_float=True)
    want = i2i(PROMPTS, image=image.astype(np.float32) / 255.0, strength=0.6, num_inference_steps=3,
               guidance_scale=7.5, output_type="np").images
    assert _u8_diff(out, want) <= 1 and np.abs(out.pixels - want).max() <= 1 / 255


def test_oversize_request_is_refused_in_seconds_with_one_line(tiny_pipeline, tmp_path, capsys):
    import time

    from jaxdiff import cli
    _, _, folder = tiny_pipeline("sd1")
    capsys.readouterr()  # the fixture's own output
    start = time.monotonic()
    rc = cli.main(["generate", "a cat", "--model", str(folder), "--height", "65536", "--width", "65536",
                   "--out", str(tmp_path / "out"), "--no-compile-cache", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "65536x65536" in err and "largest square image that fits" in err and "VAE tiling" in err
    assert time.monotonic() - start < 30
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_memory_estimate_grows_with_size_and_tiling_bounds_the_vae(tiled):
    from jaxdiff import memory_guard
    _, pipe, _ = tiled
    small = memory_guard.estimate(pipe, 64, 64, 1, True, False, 1)
    big = memory_guard.estimate(pipe, 4096, 4096, 1, True, False, 1)
    tiled_big = memory_guard.estimate(pipe, 4096, 4096, 1, True, True, 1)
    assert small < big and tiled_big <= big  # tiny model (factor 2): the UNet term dominates here
    budget = memory_guard.estimate(pipe, 2048, 2048, 1, True, False, 1)
    side = memory_guard.largest_square(pipe, 1, True, False, 1, budget)
    assert 1984 <= side <= 2048


def test_request_that_fits_only_tiled_is_tiled(tiled, monkeypatch):
    from jaxdiff import memory_guard
    _, pipe, _ = tiled
    args = (pipe, 4096, 4096, 1, False)
    # The tiny UNet works at half the image size (VAE factor 2), so its term dominates; make it small so
    # the decode is the peak, as it is for SD's factor-8 VAE.
    monkeypatch.setattr(memory_guard, "UNET_LIVE", 1)
    untiled, with_tiles = memory_guard.estimate(*args, False, 1), memory_guard.estimate(*args, True, 1)
    assert with_tiles < untiled
    # A device between the two estimates: the request fits only tiled, and check() says so.
    monkeypatch.setattr(memory_guard, "device_bytes", lambda: (untiled + with_tiles) // 2)
    assert memory_guard.check(*args, False, 1) is True
    monkeypatch.setattr(memory_guard, "device_bytes", lambda: untiled)
    assert memory_guard.check(*args, False, 1) is False


def test_pipeline_tiles_automatically_when_only_tiles_fit(tiled, mesh1, monkeypatch):
    from jaxdiff import memory_guard
    _, pipe, _ = tiled
    kw = dict(height=H, width=W, steps=2, sampler="euler", schedule=None, guidance_scale=1.0, seed=4, mesh=mesh1)
    want = pipe("a cat", **kw).images  # tiling enabled by the fixture
    monkeypatch.setattr(memory_guard, "UNET_LIVE", 1)
    args = (pipe, H, W, 1, False)
    budget = (memory_guard.estimate(*args, False, 1) + memory_guard.estimate(*args, True, 1)) // 2
    monkeypatch.setattr(memory_guard, "device_bytes", lambda: budget)
    pipe.disable_vae_tiling()
    try:
        got = pipe("a cat", **kw).images
    finally:
        pipe.enable_vae_tiling()
    np.testing.assert_array_equal(got, want)
