"""SDXL ensemble of experts: base (denoising_end, output_type="latent") -> refiner (image=latents,
denoising_start) against diffusers' StableDiffusionXLPipeline -> StableDiffusionXLImg2ImgPipeline on the
tiny sdxl / sdxl_refiner pipelines (Euler: no randomness after the start noise, which jaxdiff's seeded
noise supplies to diffusers as `latents=`). Latents within 1e-4 of their scale, images within 1/255.
"""
import jax
import numpy as np
import pytest
from diffusers import EulerDiscreteScheduler

from jaxdiff import rng, sharding
from jaxdiff.errors import JaxdiffError
from tests import helpers

H = W = 16
PROMPTS = ["a red panda", "a cat"]
STEPS, SWITCH = 5, 0.6


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh(jax.devices()[:1])


def test_base_to_refiner_matches_diffusers(tiny_pipeline, mesh1):
    ref_base, base, _ = tiny_pipeline("sdxl")
    ref_refiner, refiner, _ = tiny_pipeline("sdxl_refiner")
    for ref in (ref_base, ref_refiner):
        ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=False)
    noise = rng.request_noise(2, np.arange(2), (H // 2, W // 2, 4))["start"]
    kw = dict(steps=STEPS, sampler="euler", schedule=None, guidance_scale=5.0, mesh=mesh1)

    out = base(PROMPTS, height=H, width=W, seed=2, denoising_end=SWITCH, output_type="latent", **kw)
    want = ref_base(PROMPTS, height=H, width=W, num_inference_steps=STEPS, guidance_scale=5.0,
                    latents=helpers.nchw(noise), denoising_end=SWITCH, output_type="latent").images
    want = helpers.nhwc(want)
    assert out.images is None and out.latents.shape == want.shape
    err = np.abs(out.latents - want).max()
    assert err <= 1e-4 * np.abs(want).max(), err
    full = base(PROMPTS, height=H, width=W, seed=2, output_type="latent", **kw)
    assert np.abs(full.latents - out.latents).max() > 1e-2  # the base really stopped early

    final = refiner(PROMPTS, image=out.latents, denoising_start=SWITCH, seed=9, return_float=True, **kw)
    want_img = ref_refiner(PROMPTS, image=helpers.nchw(want), num_inference_steps=STEPS, guidance_scale=5.0,
                           denoising_start=SWITCH, output_type="np").images
    assert want_img.std() > 0.01
    assert np.abs(final.pixels - want_img).max() <= 1 / 255
    assert np.abs(final.images.astype(int) - (want_img * 255).round().astype(int)).max() <= 1


def test_handoff_errors(tiny_pipeline, mesh1):
    _, base, _ = tiny_pipeline("sdxl")
    with pytest.raises(JaxdiffError, match="denoising_end"):
        base("x", height=H, width=W, steps=2, denoising_end=1.5, mesh=mesh1)
    with pytest.raises(JaxdiffError, match="denoising_start needs image"):
        base("x", height=H, width=W, steps=2, denoising_start=0.5, mesh=mesh1)
    with pytest.raises(JaxdiffError, match="output_type"):
        base("x", height=H, width=W, steps=2, output_type="torch", mesh=mesh1)


def test_cli_refiner_writes_the_library_image(tiny_pipeline, tmp_path):
    from PIL import Image

    from jaxdiff import cli
    _, base, base_folder = tiny_pipeline("sdxl")
    _, refiner, refiner_folder = tiny_pipeline("sdxl_refiner")
    out_dir = tmp_path / "out"
    rc = cli.main(["generate", "a red panda", "--model", str(base_folder), "--refiner", str(refiner_folder),
                   "--refiner-switch", str(SWITCH), "--steps", "4", "--sampler", "euler", "--seed", "3",
                   "--out", str(out_dir), "--no-compile-cache", "--quiet"])
    assert rc == 0
    (png,) = sorted(out_dir.glob("*.png"))
    kw = dict(steps=4, sampler="euler", guidance_scale=7.5, seed=3)
    latents = base("a red panda", denoising_end=SWITCH, output_type="latent", **kw).latents
    want = refiner("a red panda", image=latents, denoising_start=SWITCH, **kw).images[0]
    got = np.asarray(Image.open(png).convert("RGB"))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
