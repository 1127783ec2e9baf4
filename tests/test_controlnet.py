"""ControlNet: the model against diffusers' ControlNetModel (made with from_unet, zero convs perturbed
to non-zero), read through a diffusers folder written by save_pretrained."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers
import jax
import jax.numpy as jnp

from tests import helpers
from tests.helpers import one_torch_thread  # noqa: F401 (fixture)

import jaxdiff
from jaxdiff.errors import ConfigError

# conftest.py already runs XLA with most optimisations off; references use one torch thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


_TINY = dict(layers_per_block=1, norm_num_groups=8, sample_size=8, cross_attention_dim=32)
MODEL_CASES = {
    # SD1-style trunk, stock 4-level control encoder (8x), scale 0.5.
    "sd1": (dict(_TINY, block_out_channels=(32, 64), attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
            dict(conditioning_embedding_out_channels=(8, 8, 16, 16)), dict(conditioning_scale=0.5)),
    # SDXL-style: text_time embedding, linear projections, 2 transformer layers; guess mode, 1-channel
    # control image in BGR order (a flip of nothing, but exercises the path), 2-level encoder (2x).
    "sdxl_guess": (dict(_TINY, block_out_channels=(32, 64), attention_head_dim=(2, 4), cross_attention_dim=64,
                        transformer_layers_per_block=(1, 2), use_linear_projection=True,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                        addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=16 + 6 * 8),
                   dict(conditioning_embedding_out_channels=(8, 16), conditioning_channels=1,
                        controlnet_conditioning_channel_order="bgr"),
                   dict(conditioning_scale=0.7, guess_mode=True)),
    # SD2-style, global pooling (the shuffle ControlNet).
    "sd2_pool": (dict(_TINY, block_out_channels=(32, 64), attention_head_dim=(2, 4), use_linear_projection=True,
                      upcast_attention=True, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
                 dict(conditioning_embedding_out_channels=(8, 16)), dict(conditioning_scale=1.3)),
}


def make_controlnet(unet_kwargs, control_kwargs, seed=0, global_pool=False):
    """diffusers' ControlNetModel.from_unet(tiny random UNet), every weight perturbed (zero convs too)."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**unet_kwargs)
    net = diffusers.ControlNetModel.from_unet(unet, **control_kwargs)
    if global_pool:
        net.register_to_config(global_pool_conditions=True)
    return helpers.perturb(net, seed=seed + 1)


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_controlnet_model_parity_with_diffusers(case, tmp_path):
    unet_kwargs, control_kwargs, call = MODEL_CASES[case]
    ref = make_controlnet(unet_kwargs, control_kwargs, global_pool=case.endswith("pool"))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    net = jaxdiff.load_controlnet(tmp_path)
    cfg = net.config
    assert cfg.global_pool_conditions == case.endswith("pool")

    b, h, w = 2, 8, 6
    f = cfg.image_factor
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((b, 4, h, w)).astype(np.float32)
    cond = rng.uniform(0, 1, (b, cfg.conditioning_channels, f * h, f * w)).astype(np.float32)
    context = rng.standard_normal((b, 5, cfg.cross_attention_dims[0])).astype(np.float32)
    t = np.array([11, 700])
    added = None
    if cfg.takes_text_time:
        added = {"text_embeds": rng.standard_normal((b, 16)).astype(np.float32),
                 "time_ids": rng.uniform(0, 64, (b, 6)).astype(np.float32)}
    with torch.no_grad():
        down, mid = ref(torch.from_numpy(sample), torch.as_tensor(t), torch.from_numpy(context),
                        torch.from_numpy(cond), added_cond_kwargs=None if added is None else
                        {k: torch.from_numpy(v) for k, v in added.items()}, return_dict=False, **call)
    want = [d.numpy().transpose(0, 2, 3, 1) for d in down] + [mid.numpy().transpose(0, 2, 3, 1)]

    got_down, got_mid = net(jnp.asarray(sample.transpose(0, 2, 3, 1)), t, jnp.asarray(context),
                            jnp.asarray(cond.transpose(0, 2, 3, 1)), call["conditioning_scale"], added,
                            guess_mode=call.get("guess_mode", False))
    got = [np.asarray(a) for a in got_down] + [np.asarray(got_mid)]
    assert len(got) == len(want)
    for i, (g, r) in enumerate(zip(got, want)):
        assert g.shape == r.shape, (i, g.shape, r.shape)
        scale = float(np.max(np.abs(r)))
        assert scale > 1e-3  # perturbed zero convs: real residuals
        assert float(np.max(np.abs(g - r))) <= 1e-4 * scale, (i, float(np.max(np.abs(g - r))), scale)


def test_controlnet_config_refuses_unknown_keys(tmp_path):
    from jaxdiff.models.controlnet import ControlNetConfig
    raw = dict(_class_name="ControlNetModel", block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], attention_head_dim=4,
               cross_attention_dim=32, conditioning_embedding_out_channels=[8, 16])
    assert ControlNetConfig.from_dict(raw, "x").image_factor == 2
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        ControlNetConfig.from_dict({**raw, "resnet_time_scale_shift": "scale_shift"}, "x")
    with pytest.raises(ConfigError, match="channel_order"):
        ControlNetConfig.from_dict({**raw, "controlnet_conditioning_channel_order": "gbr"}, "x")


# --- the pipeline against diffusers' StableDiffusionControlNetPipeline ----------------------------------

H = W = 16  # the tiny VAE has factor 2: 8x8 latents; control encoders (8, 16) downsample 2x
PROMPTS = ["a red panda", "a cat"]
SD1_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                attention_head_dim=4, norm_num_groups=8)


@pytest.fixture(scope="module")
def control_setup(tiny_pipeline, tmp_path_factory):
    """(diffusers sd1 pipeline, jaxdiff sd1 pipeline, two ControlNets as (torch, folder), control images)."""
    ref, pipe, _ = tiny_pipeline("sd1")
    root = tmp_path_factory.mktemp("controlnets")
    nets = []
    for seed in (5, 6):
        net = make_controlnet(SD1_UNET, dict(conditioning_embedding_out_channels=(8, 16)), seed=seed)
        net.save_pretrained(root / f"cn{seed}", safe_serialization=True)
        nets.append((net, root / f"cn{seed}"))
    from PIL import Image
    rng = np.random.default_rng(0)
    # 24x20 images: both sides resize to 16x16 (diffusers' prepare_image; jaxdiff.pixels.control_images).
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(2)]
    return ref, pipe, nets, images


def _run_both(control_setup, which, call, mesh):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline
    from jaxdiff import rng as jrng
    ref, pipe, nets, images = control_setup
    torch_nets = [nets[i][0] for i in which]
    cpipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in ref.components.items() if k not in ("image_encoder",)},
        controlnet=torch_nets[0] if len(which) == 1 else torch_nets)
    cpipe.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=False)
    cpipe.set_progress_bar_config(disable=True)
    ctrl = images[0] if len(which) == 1 else [images[i] for i in which]
    noise = jrng.request_noise(3, np.arange(2), (H // 2, W // 2, 4))["start"]
    torch_call = {k: v for k, v in call.items()}
    want = cpipe(PROMPTS, image=ctrl, height=H, width=W, num_inference_steps=4, guidance_scale=7.5,
                 latents=helpers.nchw(noise), output_type="np", **torch_call).images
    jpipe = pipe.with_controlnet([jaxdiff.load_controlnet(nets[i][1]) for i in which])
    out = jpipe(PROMPTS, control_image=ctrl, height=H, width=W, steps=4, sampler="euler", schedule=None,
                guidance_scale=7.5, seed=3, mesh=mesh, return_float=True, **call)
    return out, want


CONTROL_CASES = {
    "scale_0.5_window_0_0.5": ((0,), dict(controlnet_conditioning_scale=0.5, control_guidance_start=0.0,
                                          control_guidance_end=0.5)),
    "guess_mode": ((0,), dict(controlnet_conditioning_scale=0.8, guess_mode=True)),
    "two_controlnets": ((0, 1), dict(controlnet_conditioning_scale=[0.6, 1.2], control_guidance_start=[0.0, 0.25],
                                     control_guidance_end=[1.0, 1.0])),
}


@pytest.mark.parametrize("case", list(CONTROL_CASES))
def test_controlnet_pipeline_parity_with_diffusers(case, control_setup):
    from jaxdiff import sharding
    which, call = CONTROL_CASES[case]
    mesh = sharding.make_mesh(jax.devices()[:1])
    out, want = _run_both(control_setup, which, call, mesh)
    ref, pipe, _, _ = control_setup
    plain = pipe(PROMPTS, height=H, width=W, steps=4, sampler="euler", schedule=None, guidance_scale=7.5, seed=3,
                 mesh=mesh, return_float=True)
    fl = float(np.abs(out.pixels - want).max())
    u8 = int(np.abs(out.images.astype(np.int16) - (want * 255).round().astype(np.int16)).max())
    effect = float(np.abs(plain.pixels - want).max())
    print(f"{case}: float max|jax - diffusers| = {fl:.2e}, uint8 max diff = {u8}, control effect {effect:.3f}")
    assert effect > 5 / 255  # the ControlNets change the image: the comparison tests them
    assert u8 <= 1 and fl <= 1e-4, (fl, u8)


# --- the ControlNet 1.x single-file layout ------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_single_file_controlnet_matches_folder_and_diffusers_reads_it(prefix, tmp_path):
    """A file written in the cldm layout (ControlNet 1.0 / 1.1 release names) from a diffusers folder:
    diffusers' ControlNetModel.from_single_file reads it back to exactly the folder's weights, and
    jaxdiff.load_controlnet(file) gives exactly the params of load_controlnet(folder)."""
    import json
    from safetensors.numpy import save_file
    from convert.original_layout import controlnet_from_diffusers
    from convert.formats import read_tensors
    # SD1 family rules: 8 heads (what a file without a config implies), stock 4-level hint encoder.
    unet = dict(_TINY, block_out_channels=(32, 64), attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
    ref = make_controlnet(unet, dict(conditioning_embedding_out_channels=(8, 8, 16, 16)), seed=4)
    folder = tmp_path / "folder"
    ref.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    state = read_tensors(folder / "diffusion_pytorch_model.safetensors")
    single = {k: np.ascontiguousarray(v) for k, v in controlnet_from_diffusers(state, config, prefix=prefix).items()}
    assert "input_hint_block.14.weight" in {k[len(prefix):] for k in single}
    file = tmp_path / "control_v11p_sd15_tiny.safetensors"
    save_file(single, str(file))

    back = diffusers.ControlNetModel.from_single_file(str(file), config=str(folder))
    want = ref.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    a = jaxdiff.load_controlnet(folder)
    b = jaxdiff.load_controlnet(file)
    assert a.config == b.config
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)


def test_controlnet_that_does_not_fit_is_refused(control_setup, tmp_path):
    from jaxdiff.errors import CheckpointError
    _, pipe, _, _ = control_setup
    wide = dict(SD1_UNET, cross_attention_dim=48)
    make_controlnet(wide, dict(conditioning_embedding_out_channels=(8, 16))).save_pretrained(
        tmp_path / "w", safe_serialization=True)
    with pytest.raises(CheckpointError, match="cross-attention width is 48"):
        pipe.with_controlnet(jaxdiff.load_controlnet(tmp_path / "w"))
    eight = dict(conditioning_embedding_out_channels=(8, 8, 16, 16))
    make_controlnet(SD1_UNET, eight).save_pretrained(tmp_path / "f", safe_serialization=True)
    with pytest.raises(CheckpointError, match="downsamples 8x, the VAE 2x"):
        pipe.with_controlnet(tmp_path / "f")
    with pytest.raises(jaxdiff.JaxdiffError, match="control_image needs a ControlNet"):
        pipe("x", control_image=np.zeros((16, 16, 3), np.uint8), height=H, width=W, steps=1)


def test_sdxl_controlnet_pipeline_parity_with_diffusers(tiny_pipeline, tmp_path):
    """StableDiffusionXLControlNetPipeline: the ControlNet gets the pooled text and time ids too."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
    from jaxdiff import rng as jrng, sharding
    ref, pipe, _ = tiny_pipeline("sdxl")
    torch.manual_seed(7)
    net = helpers.perturb(diffusers.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 16)),
                          seed=8)
    net.save_pretrained(tmp_path / "cn", safe_serialization=True)
    cpipe = StableDiffusionXLControlNetPipeline(**ref.components, controlnet=net)
    cpipe.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=False)
    cpipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    noise = jrng.request_noise(4, np.arange(2), (H // 2, W // 2, 4))["start"]
    want = cpipe(PROMPTS, image=image.astype(np.float32)[None] / 255.0, height=H, width=W, num_inference_steps=3,
                 guidance_scale=5.0, controlnet_conditioning_scale=0.7, latents=helpers.nchw(noise),
                 output_type="np").images
    jpipe = pipe.with_controlnet(tmp_path / "cn")
    mesh = sharding.make_mesh(jax.devices()[:1])
    out = jpipe(PROMPTS, control_image=image, height=H, width=W, steps=3, sampler="euler", schedule=None,
                guidance_scale=5.0, controlnet_conditioning_scale=0.7, seed=4, mesh=mesh, return_float=True)
    plain = pipe(PROMPTS, height=H, width=W, steps=3, sampler="euler", schedule=None, guidance_scale=5.0, seed=4,
                 mesh=mesh, return_float=True)
    fl = float(np.abs(out.pixels - want).max())
    print(f"sdxl controlnet: float max diff {fl:.2e}, control effect {float(np.abs(plain.pixels - want).max()):.3f}")
    assert float(np.abs(plain.pixels - want).max()) > 5 / 255
    assert fl <= 1e-4
    assert int(np.abs(out.images.astype(np.int16) - (want * 255).round().astype(np.int16)).max()) <= 1


def test_controlnet_img2img_parity_with_diffusers(control_setup, monkeypatch):
    """StableDiffusionControlNetImg2ImgPipeline: init image posterior and start noise fed to diffusers."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as mod
    from jaxdiff import rng as jrng, sharding
    ref, pipe, nets, images = control_setup
    cpipe = StableDiffusionControlNetImg2ImgPipeline(**ref.components, controlnet=nets[1][0])
    cpipe.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    cpipe.set_progress_bar_config(disable=True)
    init = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    noises = jrng.request_noise(3, np.arange(2), (H // 2, W // 2, 4))
    queues = []
    for module, items in ((mod, [noises["start"]]), (vae_mod, [noises["image_posterior"]])):
        queue = list(items)

        def fake(shape, generator=None, device=None, dtype=None, layout=None, _q=queue):
            return helpers.nchw(_q.pop(0)).to(dtype or torch.float32)
        monkeypatch.setattr(module, "randn_tensor", fake)
        queues.append(queue)
    want = cpipe(PROMPTS, image=init.astype(np.float32)[None] / 255.0, control_image=images[1], height=H, width=W,
                 strength=0.6, num_inference_steps=4, guidance_scale=7.5, controlnet_conditioning_scale=0.9,
                 output_type="np").images
    assert queues == [[], []]
    mesh = sharding.make_mesh(jax.devices()[:1])
    jpipe = pipe.with_controlnet(nets[1][1])
    out = jpipe(PROMPTS, image=init, control_image=images[1], strength=0.6, steps=4, sampler="ddim", schedule=None,
                guidance_scale=7.5, controlnet_conditioning_scale=0.9, seed=3, mesh=mesh, return_float=True)
    fl = float(np.abs(out.pixels - want).max())
    print(f"controlnet img2img: float max diff {fl:.2e}")
    assert fl <= 1e-4


def test_canny_matches_opencv():
    """jaxdiff.preprocess.canny == cv2.Canny pixel for pixel (grey and RGB, integer and fractional thresholds)."""
    cv2 = pytest.importorskip("cv2")
    from jaxdiff.preprocess import canny
    rng = np.random.default_rng(0)
    for trial in range(3):
        h, w = 67, 91
        img = cv2.resize(rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        img[10:40, 20:50] = 250
        for im in (img, np.ascontiguousarray(img[..., 0])):
            for lo, hi in ((50, 100), (100, 200), (20.7, 60.2)):
                want = cv2.Canny(im, lo, hi)
                got = canny(im, lo, hi)
                assert got.shape == (h, w, 3) and got.dtype == np.uint8
                assert want.any()
                np.testing.assert_array_equal(got[..., 0], want)


def test_cli_controlnet_flags_reach_the_library_and_the_png(tmp_path, capsys, monkeypatch):
    """--controlnet / --control-* wiring with the pipeline and ControlNet loading replaced (no compile):
    images resized to the output size, canny applied, per-ControlNet values, A1111-style PNG fields."""
    from PIL import Image
    from jaxdiff import cli, images
    from jaxdiff.preprocess import canny
    from tests.test_cli import _FakePipeline, main_in_process

    class Fake(_FakePipeline):
        def with_controlnet(self, nets):
            self.nets = nets
            return self

    fake = Fake()
    fake.embeddings = type("NoEmbeddings", (), {"hashes": staticmethod(lambda: "")})()
    monkeypatch.setattr(cli, "_load", lambda path, dtype: fake)
    monkeypatch.setattr(cli, "_load_controlnet", lambda path, dtype: f"net:{path.name}")
    photo = np.zeros((30, 50, 3), np.uint8)
    photo[8:20, 10:30] = 255
    Image.fromarray(photo).save(tmp_path / "a.png")
    Image.fromarray(photo[::-1]).save(tmp_path / "b.png")
    for name in ("model", "cn_canny", "cn_depth"):
        (tmp_path / name).mkdir()
    rc, err = main_in_process(capsys, "generate", "a box", "--model", tmp_path / "model", "--out", tmp_path / "out",
                              "--controlnet", tmp_path / "cn_canny", "--control-image", tmp_path / "a.png",
                              "--controlnet", tmp_path / "cn_depth", "--control-image", tmp_path / "b.png",
                              "--control-scale", 0.5, "--control-scale", 1.25, "--control-end", 0.6,
                              "--control-preprocess", "canny", "--control-preprocess", "none",
                              "--no-compile-cache", "--quiet")
    assert rc == 0, err
    kw = fake.kwargs
    assert fake.nets == ["net:cn_canny", "net:cn_depth"]
    assert (kw["height"], kw["width"]) == (24, 48)  # the first control image's size, rounded down to 8
    first, second = kw["control_image"]
    np.testing.assert_array_equal(first, canny(images.read_image(tmp_path / "a.png", (24, 48)), 100, 200))
    np.testing.assert_array_equal(second, images.read_image(tmp_path / "b.png", (24, 48)))
    assert kw["controlnet_conditioning_scale"] == [0.5, 1.25]
    assert (kw["control_guidance_start"], kw["control_guidance_end"], kw["guess_mode"]) == ([0.0, 0.0], [0.6, 0.6], False)
    text = images.read_parameters(sorted((tmp_path / "out").iterdir())[0])
    assert ('ControlNet 0: "Module: canny, Model: cn_canny, Weight: 0.5, Guidance Start: 0.0, Guidance End: 0.6, '
            'Threshold A: 100.0, Threshold B: 200.0"') in text
    assert 'ControlNet 1: "Module: none, Model: cn_depth, Weight: 1.25, Guidance Start: 0.0, Guidance End: 0.6"' in text

    rc, err = main_in_process(capsys, "generate", "a box", "--model", tmp_path / "model",
                              "--controlnet", tmp_path / "cn_canny", "--no-compile-cache", "--quiet")
    assert rc == 2 and "1 --controlnet and 0 --control-image" in err


def test_controlnet_inpaint_parity_with_diffusers(control_setup, monkeypatch):
    """StableDiffusionControlNetInpaintPipeline on a 4-channel UNet (known region blended back each step);
    noises in diffusers' order: init-image posterior, start noise, masked-image posterior."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetInpaintPipeline
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.controlnet.pipeline_controlnet_inpaint as mod
    from jaxdiff import rng as jrng, sharding
    ref, pipe, nets, images = control_setup
    cpipe = StableDiffusionControlNetInpaintPipeline(**ref.components, controlnet=nets[0][0])
    cpipe.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=False)
    cpipe.set_progress_bar_config(disable=True)
    init = np.random.default_rng(5).integers(0, 256, (2, H, W, 3), dtype=np.uint8)
    mask = np.zeros((2, H, W, 1), np.float32)
    mask[:, 4:12, 6:14] = 1.0
    noises = jrng.request_noise(6, np.arange(2), (H // 2, W // 2, 4))
    queues = []
    for module, items in ((mod, [noises["start"]]), (vae_mod, [noises["image_posterior"], noises["masked_posterior"]])):
        queue = list(items)

        def fake(shape, generator=None, device=None, dtype=None, layout=None, _q=queue):
            return helpers.nchw(_q.pop(0)).to(dtype or torch.float32)
        monkeypatch.setattr(module, "randn_tensor", fake)
        queues.append(queue)
    want = cpipe(PROMPTS, image=init.astype(np.float32) / 255.0, mask_image=mask, control_image=images[0], height=H,
                 width=W, strength=0.75, num_inference_steps=4, guidance_scale=7.5, controlnet_conditioning_scale=0.8,
                 output_type="np").images
    assert queues == [[], []]
    mesh = sharding.make_mesh(jax.devices()[:1])
    out = pipe.with_controlnet(nets[0][1])(
        PROMPTS, image=init, mask=mask, control_image=images[0], strength=0.75, steps=4, sampler="euler",
        schedule=None, guidance_scale=7.5, controlnet_conditioning_scale=0.8, seed=6, mesh=mesh, return_float=True)
    fl = float(np.abs(out.pixels - want).max())
    print(f"controlnet inpaint: float max diff {fl:.2e}")
    assert fl <= 1e-4


def test_new_scale_window_and_weights_compile_nothing(control_setup):
    """The guidance window is a per-evaluation table and the scales are row data: a new window, scale or
    ControlNet weights (params=) run on the executable already compiled."""
    from jaxdiff import sharding
    _, pipe, nets, images = control_setup
    mesh = sharding.make_mesh(jax.devices()[:1])
    jpipe = pipe.with_controlnet(nets[0][1])
    kw = dict(control_image=images[0], height=H, width=W, steps=4, sampler="euler", schedule=None,
              guidance_scale=7.5, seed=3, mesh=mesh)
    first = jpipe(PROMPTS, controlnet_conditioning_scale=0.5, control_guidance_end=0.5, **kw)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration"
        else None)
    size = jpipe.runner(mesh).cache_size()
    other = jaxdiff.load_controlnet(nets[1][1])
    second = jpipe(PROMPTS, controlnet_conditioning_scale=1.1, control_guidance_start=0.25, **kw)
    third = jpipe(PROMPTS, params={"controlnet": (other.params,)}, **kw)
    assert compiles == [] and jpipe.runner(mesh).cache_size() == size
    assert np.abs(first.images.astype(int) - second.images.astype(int)).max() > 0
    assert np.abs(second.images.astype(int) - third.images.astype(int)).max() > 0


def test_single_file_sdxl_controlnet_family_from_keys(tmp_path):
    """An SDXL ControlNet file (label_emb, linear projections, 64-channel heads) reads back with no config."""
    import json
    from safetensors.numpy import save_file
    from convert.original_layout import controlnet_from_diffusers
    from convert.formats import read_tensors
    unet = dict(layers_per_block=1, norm_num_groups=32, sample_size=8, cross_attention_dim=64,
                block_out_channels=(64, 128), attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
                use_linear_projection=True, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                addition_time_embed_dim=256, projection_class_embeddings_input_dim=16 + 6 * 256)
    ref = make_controlnet(unet, dict(conditioning_embedding_out_channels=(8, 8, 16, 16)), seed=9)
    ref.save_pretrained(tmp_path / "folder", safe_serialization=True)
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    state = read_tensors(tmp_path / "folder" / "diffusion_pytorch_model.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in controlnet_from_diffusers(state, config).items()},
              str(tmp_path / "cn_xl.safetensors"))
    a = jaxdiff.load_controlnet(tmp_path / "folder")
    b = jaxdiff.load_controlnet(tmp_path / "cn_xl.safetensors")
    assert b.config.takes_text_time and b.config == a.config
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)
    # A file missing a tensor: one line naming the file and what is missing.
    single = {k: np.ascontiguousarray(v) for k, v in controlnet_from_diffusers(state, config).items()
              if k != "control_model.middle_block_out.0.weight"}
    save_file(single, str(tmp_path / "cut.safetensors"))
    with pytest.raises(jaxdiff.CheckpointError, match=r"cut.safetensors.*missing.*controlnet_mid_block") as e:
        jaxdiff.load_controlnet(tmp_path / "cut.safetensors")
    assert "\n" not in str(e.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(jaxdiff.CheckpointError, match="junk.safetensors"):
        jaxdiff.load_controlnet(tmp_path / "junk.safetensors")


def test_sharded_over_8_devices_equals_one_device(control_setup):
    """Control images and per-row scales are batch rows like the rest: padded and split over the mesh."""
    from jaxdiff import sharding
    _, pipe, nets, images = control_setup
    jpipe = pipe.with_controlnet([nets[0][1], nets[1][1]])
    kw = dict(control_image=[images[0], images[1]], controlnet_conditioning_scale=[0.7, 0.4], height=H, width=W,
              steps=2, sampler="euler", schedule=None, guidance_scale=7.5, seed=11, guess_mode=True)
    one = jpipe(PROMPTS + ["a third"], mesh=sharding.make_mesh(jax.devices()[:1]), **kw)
    many = jpipe(PROMPTS + ["a third"], mesh=sharding.make_mesh(jax.devices()), **kw)
    assert len(jax.devices()) == 8
    # As tests/test_generation_sharded.py: O(1) latents, kernel rounding differs with rows per device
    # (measured 1.8e-5 here).
    np.testing.assert_allclose(many.latents, one.latents, rtol=0, atol=1e-4)
    assert np.abs(many.images.astype(int) - one.images.astype(int)).max() <= 1
