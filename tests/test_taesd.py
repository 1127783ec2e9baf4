"""AutoencoderTiny (TAESD) against diffusers' AutoencoderTiny (float32, tiny random config written with
save_pretrained), and as a pipeline's VAE through `jaxdiff.load(base, vae=taesd_folder)`.
Tolerance: 1e-4 of the output's scale (the issue's acceptance), as every module parity test.
"""
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny as TorchAutoencoderTiny

import jaxdiff
from jaxdiff import sharding
from jaxdiff.components import TAESD_KIND, TinyVAE, kind_of
from tests import helpers


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """(folder, torch model): three levels (factor 4), every param perturbed (default inits hide mistakes)."""
    torch.manual_seed(0)
    model = TorchAutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                 num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(1, 2, 1)).eval()
    helpers.perturb(model, scale=0.2, seed=1)
    folder = tmp_path_factory.mktemp("taesd")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _close(got, want, what):
    got = np.asarray(got)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    assert scale > 1e-2 and err <= 1e-4 * scale, f"{what}: {err:.3g} vs scale {scale:.3g}"


def test_decode_and_encode_match_diffusers(taesd):
    folder, tmodel = taesd
    from jaxdiff.loading import _read_json
    config = TAESD_KIND.config_cls.from_dict(_read_json(folder / "config.json"), "config.json")
    assert config.downsample_factor == 4
    from convert.diffusers_layout import convert_state_dict
    from convert.formats import read_tensors
    params = convert_state_dict(read_tensors(folder / "diffusion_pytorch_model.safetensors"),
                                TAESD_KIND.param_shapes(config), source="taesd")
    comp = TAESD_KIND.component(config, params, jax.numpy.float32)
    z = np.random.default_rng(0).standard_normal((2, 5, 7, 4)).astype(np.float32) * 2
    images = np.random.default_rng(1).uniform(-1, 1, (2, 20, 28, 3)).astype(np.float32)
    with torch.no_grad():
        want_dec = helpers.nhwc(tmodel.decode(helpers.nchw(z)).sample)
        want_enc = helpers.nhwc(tmodel.encode(helpers.nchw(images)).latents)
    _close(comp.decode(z), want_dec, "decode")
    post = comp.encode(images)
    _close(post.mean, want_enc, "encode")
    assert float(np.asarray(post.std).max()) == 0.0  # the latents themselves, no spread


def test_pipeline_with_taesd_decodes_with_it(taesd, tiny_pipeline):
    folder, tmodel = taesd
    _, _, base = tiny_pipeline("sd1")  # factor-2 VAE; TAESD here has factor 4, so sizes follow TAESD
    pipe = jaxdiff.load(base, vae=folder)
    assert isinstance(pipe.vae, TinyVAE) and kind_of(pipe.vae) is TAESD_KIND
    assert pipe.family.vae_factor == 4 and pipe.vae.config.scaling_factor == 1.0
    mesh = sharding.make_mesh(jax.devices()[:1])
    out = pipe("a cat", height=32, width=32, steps=2, guidance_scale=1.0, mesh=mesh, return_float=True)
    with torch.no_grad():
        want = helpers.nhwc(tmodel.decode(helpers.nchw(out.latents)).sample)  # scaling_factor 1
    want = np.clip(want / 2 + 0.5, 0, 1)
    assert out.images.shape == (1, 32, 32, 3)
    # Pipeline level: images within 1/255 (the raw decode is already checked at 1e-4 of its scale above).
    assert np.abs(out.pixels - want).max() <= 1 / 255
    assert np.abs(out.images.astype(int) - (want * 255).round().astype(int)).max() <= 1
