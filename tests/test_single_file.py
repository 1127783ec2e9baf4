"""Single-file checkpoints: tiny random pipelines of each family written in the original layout by
convert.original_layout, proven by diffusers' `from_single_file` to hold exactly the weights they were
written from, then read by `jaxdiff.load(file)` and compared with diffusers on the same file.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from_single_file must never reach the Hub

import json
import zipfile

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler

import jaxdiff
from convert import original_layout
from convert.export import to_torch_state_dict
from convert.formats import read_safetensors, write_safetensors
from jaxdiff import cli, rng, sharding
from tests import helpers
from jaxdiff.errors import JaxdiffError
from jaxdiff.single_file import export_single_file
from tests import tiny_single_file as T

RTOL = 1e-4  # modules in float32, relative to the output's scale (DESIGN.md, Tests)
FAMILIES = ("sd1", "sd2", "sd1_inpaint", "sdxl", "sdxl_refiner")
PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                  "sd1_inpaint": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLPipeline",
                  "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}


@pytest.fixture(scope="module", autouse=True)
def fast_cpu():
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (torch pipeline the file was written from, its diffusers folder, the .safetensors file,
    diffusers' from_single_file of that file)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name in FAMILIES:
        folder = root / name
        pipe = T.BUILDERS[name](folder)
        path = T.write_single_file(pipe, folder, root / f"{name}.safetensors")
        ref = type(pipe).from_single_file(str(path), config=str(folder))
        for tok in ("tokenizer", "tokenizer_2"):  # the test tokenizers carry no model_max_length
            if getattr(ref, tok, None) is not None:
                getattr(ref, tok).model_max_length = 77
        out[name] = (pipe, folder, path, ref)
    return out


@pytest.fixture(scope="module")
def loaded(models):
    return {name: jaxdiff.load(path) for name, (_, _, path, _) in models.items()}


def assert_close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
    assert err <= RTOL, f"{what}: max |jax - torch| / max |torch| = {err:.2e}"


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_sd(component, kind):
    """A jaxdiff component's params as a diffusers state dict (numpy, float32)."""
    return to_torch_state_dict(jax.tree_util.tree_map(np.asarray, component.params), kind=kind, dtype=np.float32)


def _assert_same_weights(got: dict, module, what):
    want = T.state_dict(module)
    assert set(got) == set(want), f"{what}: keys differ {sorted(set(got) ^ set(want))[:4]}"
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what} {k}")


# ------------------------------------------------------------------------------------ the writer

@pytest.mark.parametrize("name", FAMILIES)
def test_written_file_holds_exactly_its_weights_per_from_single_file(models, name):
    pipe, _, _, ref = models[name]
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        src = getattr(pipe, comp, None)
        if src is None:
            continue
        got = T.state_dict(getattr(ref, comp))
        _assert_same_weights(got, src, f"{name} {comp}")


# ------------------------------------------------------------------------------------ the reader

@pytest.mark.parametrize("name", FAMILIES)
def test_components_match_from_single_file(models, loaded, name):
    _, _, path, ref = models[name]
    pipe = loaded[name]
    assert pipe.pipeline_class == PIPELINE_CLASS[name]
    assert pipe.scheduler_config["prediction_type"] == ref.scheduler.config.prediction_type
    assert pipe.vae.config.scaling_factor == ref.vae.config.scaling_factor
    rng = np.random.default_rng(0)
    for enc, tok, ref_enc, ref_tok in (
            (pipe.text_encoder, pipe.tokenizer, getattr(ref, "text_encoder", None), getattr(ref, "tokenizer", None)),
            (pipe.text_encoder_2, pipe.tokenizer_2, getattr(ref, "text_encoder_2", None),
             getattr(ref, "tokenizer_2", None))):
        if ref_enc is None:
            assert enc is None
            continue
        ids = tok(["a red panda, highly detailed", ""])
        want_ids = ref_tok(["a red panda, highly detailed", ""], padding="max_length", max_length=77,
                           truncation=True).input_ids
        np.testing.assert_array_equal(ids, np.asarray(want_ids))
        with torch.no_grad():
            want = ref_enc(torch.from_numpy(np.asarray(ids, np.int64)), output_hidden_states=True)
        got = enc(ids)
        assert_close(got.hidden_states[-2], want.hidden_states[-2], f"{name} penultimate")
        assert_close(got.last_hidden_state, want.last_hidden_state, f"{name} last_hidden_state")
        if hasattr(want, "text_embeds"):
            assert_close(got.text_embeds, want.text_embeds, f"{name} text_embeds")

    cfg = pipe.unet.config
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    t = np.array([981, 1], np.int32)
    ctx = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    added = ref_added = None
    if cfg.addition_embed_type == "text_time":
        n_ids = 5 if name == "sdxl_refiner" else 6
        pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
        added = {"text_embeds": rng.standard_normal((2, pooled)).astype(np.float32),
                 "time_ids": rng.uniform(0, 64, (2, n_ids)).astype(np.float32)}
        ref_added = {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        want = ref.unet(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), added_cond_kwargs=ref_added).sample
    assert_close(pipe.unet(x, t, ctx, added), _nhwc(want), f"{name} unet")

    images = np.tanh(rng.standard_normal((1, 16, 16, 3))).astype(np.float32)
    with torch.no_grad():
        post = ref.vae.encode(_nchw(images)).latent_dist
        decoded = ref.vae.decode(post.mean).sample
    assert_close(pipe.vae.encode(images).mean, _nhwc(post.mean), f"{name} vae mean")
    assert_close(pipe.vae.decode(_nhwc(post.mean)), _nhwc(decoded), f"{name} vae decode")


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_two_step_image_matches_diffusers(models, loaded, name):
    _, _, _, ref = models[name]
    pipe = loaded[name]
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    H = W = 32
    noise = rng.request_noise(3, np.arange(1), (H // 2, W // 2, 4))["start"]
    out = pipe(["a red panda"], ["blurry"], height=H, width=W, steps=2, sampler="euler", schedule=None,
               guidance_scale=5.0, seed=3, mesh=sharding.make_mesh(jax.devices()[:1]), return_float=True)
    kw = dict(original_size=(H, W), target_size=(H, W)) if name == "sdxl" else {}
    want = ref(["a red panda"], negative_prompt=["blurry"], height=H, width=W, num_inference_steps=2,
               guidance_scale=5.0, latents=_nchw(noise), output_type="np", **kw).images
    assert want.std() > 0.01
    assert np.abs(out.pixels - want).max() <= 1 / 255, f"{name}: image differs from diffusers"


def test_two_step_inpaint_and_refiner_images_match_diffusers(models, loaded, monkeypatch):
    """The 9-channel inpainting file (strength 1) and the refiner file (img2img, 2 of 4 steps)."""
    import diffusers.models.autoencoders.vae as vae_mod
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_mod
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as xl_mod
    H = W = 32
    image = np.random.default_rng(5).integers(0, 256, (1, H, W, 3), dtype=np.uint8)
    mask = np.zeros((1, H, W, 1), np.float32)
    mask[:, 8:24, 12:28] = 1.0
    mesh = sharding.make_mesh(jax.devices()[:1])
    common = dict(guidance_scale=5.0, mesh=mesh, return_float=True, sampler="euler", schedule=None)

    ref, pipe = models["sd1_inpaint"][3], loaded["sd1_inpaint"]
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    noises = rng.request_noise(7, np.arange(1), (H // 2, W // 2, 4))
    helpers.patch_randn(monkeypatch, inpaint_mod, [noises["start"]])
    helpers.patch_randn(monkeypatch, vae_mod, [noises["masked_posterior"]])  # strength 1: no init-image encode
    out = pipe(["a red panda"], ["blurry"], image=image, mask=mask, steps=2, seed=7, **common)
    want = ref(["a red panda"], negative_prompt=["blurry"], image=image.astype(np.float32) / 255.0,
               mask_image=mask, height=H, width=W, num_inference_steps=2, guidance_scale=5.0,
               output_type="np").images
    assert want.std() > 0.01 and np.abs(out.pixels - want).max() <= 1 / 255, "inpaint"

    ref, pipe = models["sdxl_refiner"][3], loaded["sdxl_refiner"]
    noises = rng.request_noise(8, np.arange(1), (H // 2, W // 2, 4))
    helpers.patch_randn(monkeypatch, xl_mod, [noises["start"]])
    helpers.patch_randn(monkeypatch, vae_mod, [noises["image_posterior"]])
    out = pipe(["a red panda"], ["blurry"], image=image, strength=0.5, steps=4, seed=8, **common)
    want = ref(["a red panda"], negative_prompt=["blurry"], image=image.astype(np.float32) / 255.0,
               strength=0.5, num_inference_steps=4, guidance_scale=5.0, output_type="np").images
    assert want.std() > 0.01 and np.abs(out.pixels - want).max() <= 1 / 255, "refiner"


# ------------------------------------------------------------------------------- file variants

def _params_equal(a, b):
    fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def test_ckpt_lightning_flat_and_float16(models, loaded, tmp_path):
    pipe, folder, _, _ = models["sd1"]
    base = loaded["sd1"]
    for wrap in ("lightning", None):
        path = T.write_single_file(pipe, folder, tmp_path / f"{wrap}.ckpt", wrap=wrap)
        got = jaxdiff.load(path)
        for name, comp in base.components().items():
            _params_equal(got.components()[name].params, comp.params)
    half = T.write_single_file(pipe, folder, tmp_path / "half.safetensors", dtype=np.float16)
    ref16 = type(pipe).from_single_file(str(half), config=str(folder), torch_dtype=torch.float16)
    got = jaxdiff.load(half, dtype="float16")
    assert got.unet.params["conv_in"]["kernel"].dtype == np.float16
    for name, kind in (("unet", "unet"), ("vae", "vae"), ("text_encoder", "clip")):
        sd = _torch_sd(getattr(got, name), kind)
        want = {k: v.float().numpy() for k, v in getattr(ref16, name).state_dict().items()}
        want = {k if k.startswith("text_model.") or kind != "clip" else "text_model." + k: v for k, v in want.items()
                if not k.endswith("position_ids")}
        assert set(sd) == set(want)
        for k in want:
            np.testing.assert_array_equal(sd[k], want[k], err_msg=k)


def test_ema_and_non_ema(models, tmp_path):
    """model.* is the default (as diffusers, A1111, ComfyUI); prefer_ema=True takes model_ema.*, whose
    names diffusers' own converter (extract_ema=True) reads back to the EMA weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    pipe, folder, _, _ = models["sd1"]
    torch.manual_seed(99)
    ema = type(pipe.unet).from_config(pipe.unet.config).eval()
    path = T.write_single_file(pipe, folder, tmp_path / "ema.safetensors", ema_unet=ema)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(path).items()}
    unet_keys = [k for k in tensors if k.startswith("model.diffusion_model.")]
    assert all(original_layout.ema_key(k) in tensors for k in unet_keys) and len(unet_keys) > 100
    theirs = convert_ldm_unet_checkpoint(tensors, dict(pipe.unet.config), extract_ema=True)
    _assert_same_weights({k: v.numpy() for k, v in theirs.items()}, ema, "diffusers extract_ema")
    _assert_same_weights(_torch_sd(jaxdiff.load(path).unet, "unet"), pipe.unet, "default (model.*)")
    _assert_same_weights(_torch_sd(jaxdiff.load(path, prefer_ema=True).unet, "unet"), ema, "prefer_ema")
    with pytest.raises(JaxdiffError, match="no EMA"):
        jaxdiff.load(models["sd1"][2], prefer_ema=True)


def test_separate_vae_file_and_folder(models, tmp_path):
    pipe, folder, path, _ = models["sd1"]
    torch.manual_seed(7)
    other = T.vae(0.18215)
    other.save_pretrained(tmp_path / "vae_folder")
    bare = original_layout.vae_from_diffusers(T.state_dict(other), 2)
    write_safetensors(tmp_path / "vae.safetensors", bare)
    theirs = AutoencoderKL.from_single_file(str(tmp_path / "vae.safetensors"), config=str(folder / "vae"))
    _assert_same_weights(T.state_dict(theirs), other, "from_single_file vae")
    for vae in (tmp_path / "vae.safetensors", tmp_path / "vae_folder"):
        got = jaxdiff.load(path, vae=vae)
        _assert_same_weights(_torch_sd(got.vae, "vae"), other, f"vae={vae.name}")
        assert got.vae.config.scaling_factor == 0.18215
    # A VAE .ckpt with the Lightning wrapper, the first_stage_model. prefix and LPIPS loss entries.
    sd = {"first_stage_model." + k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bare.items()}
    sd["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd}, tmp_path / "vae.ckpt")
    _assert_same_weights(_torch_sd(jaxdiff.load(path, vae=tmp_path / "vae.ckpt").vae, "vae"), other, "vae.ckpt")


def test_prediction_type_override_and_sd2_default(models, tmp_path):
    """SD2 defaults to v-prediction except at SD2-base's global_step 875000 (diffusers' legacy rule)."""
    assert jaxdiff.load(models["sd2"][2]).scheduler_config["prediction_type"] == "v_prediction"
    sd = {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(models["sd2"][2]).items()}
    torch.save({"state_dict": sd, "global_step": 875000}, tmp_path / "base.ckpt")
    base = jaxdiff.load(tmp_path / "base.ckpt")
    assert base.scheduler_config["prediction_type"] == "epsilon" and base.unet.config.sample_size == 64
    pipe = jaxdiff.load(models["sd2"][2], prediction_type="epsilon")
    assert pipe.scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(JaxdiffError, match="prediction_type"):
        jaxdiff.load(models["sd2"][2], prediction_type="sample")


def test_bin_diffusers_folder(models, tmp_path):
    pipe, _, _, _ = models["sd1"]
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert list((tmp_path / "bin" / "unet").glob("*.bin"))
    # transformers 5 writes safetensors whatever it is asked; older folders hold pytorch_model.bin.
    te = tmp_path / "bin" / "text_encoder"
    for f in te.glob("*.safetensors"):
        f.unlink()
    torch.save({k: torch.from_numpy(v) for k, v in T.state_dict(pipe.text_encoder).items()}, te / "pytorch_model.bin")
    got = jaxdiff.load(tmp_path / "bin")
    _assert_same_weights(_torch_sd(got.unet, "unet"), pipe.unet, "bin unet")
    _assert_same_weights(_torch_sd(got.text_encoder, "clip"), pipe.text_encoder, "bin text encoder")


# ---------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_native_to_single_file_round_trip(models, loaded, tmp_path, name):
    pipe, folder, _, _ = models[name]
    loaded[name].save(tmp_path / "native")
    out = tmp_path / "out.safetensors"
    export_single_file(jaxdiff.load(tmp_path / "native"), out)
    ref = type(pipe).from_single_file(str(out), config=str(folder))
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, comp, None) is not None:
            _assert_same_weights(T.state_dict(getattr(ref, comp)),
                                 getattr(pipe, comp), f"{name} {comp}")


def test_cli_convert_to_single_file_and_generate_with_vae(models, tmp_path, capsys):
    pipe, folder, path, _ = models["sd1"]
    out = tmp_path / "cli.safetensors"
    assert cli.main(["convert", str(path), str(out), "--to", "single-file"]) == 0
    np.testing.assert_array_equal(read_safetensors(out)["model.diffusion_model.out.2.weight"],
                                  read_safetensors(path)["model.diffusion_model.out.2.weight"])
    assert cli.main(["convert", str(path), str(tmp_path / "diffusers"), "--to", "diffusers"]) == 0
    assert json.loads((tmp_path / "diffusers" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionPipeline"
    rc = cli.main(["generate", "x", "--model", str(path), "--vae", str(tmp_path / "missing.safetensors")])
    assert rc == 2 and "--vae" in capsys.readouterr().err
    # --vae reaches the library: a VAE file of the wrong shape is refused, naming that file.
    write_safetensors(tmp_path / "bad_vae.safetensors", {"encoder.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32)})
    rc = cli.main(["generate", "x", "--model", str(path), "--vae", str(tmp_path / "bad_vae.safetensors"),
                   "--no-compile-cache", "--quiet", "--steps", "1", "--out", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad_vae.safetensors" in err and len(err.strip().splitlines()) == 1, err


# --------------------------------------------------------------------------------------- errors

def _one_line_naming(e, path):
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg


def test_bad_files_fail_with_one_line_naming_the_file(models, tmp_path):
    _, _, path, _ = models["sd1"]
    raw = path.read_bytes()
    cases = {}
    cases["truncated.safetensors"] = raw[: len(raw) // 2]
    marker = tmp_path / "pwned"
    payload = b"\x80\x02cposix\nsystem\n(X" + len(f"touch {marker}").to_bytes(4, "little") + \
        f"touch {marker}".encode() + b"tR."
    with zipfile.ZipFile(tmp_path / "hostile.ckpt", "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    tensors = read_safetensors(path)
    write_safetensors(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": np.zeros((4, 8), np.float32)})
    write_safetensors(tmp_path / "missing_key.safetensors",
                      {k: v for k, v in tensors.items() if k != "model.diffusion_model.out.2.weight"})
    write_safetensors(tmp_path / "vae_only.safetensors",
                      {k: v for k, v in tensors.items() if k.startswith("first_stage_model.")})
    for name, match in (("truncated.safetensors", "truncated"), ("hostile.ckpt", "posix.system"),
                        ("lora.safetensors", "not a Stable Diffusion checkpoint"),
                        ("missing_key.safetensors", "out.2"), ("vae_only.safetensors", "model.diffusion_model")):
        with pytest.raises(JaxdiffError, match=match) as e:
            jaxdiff.load(tmp_path / name)
        _one_line_naming(e, tmp_path / name)
    assert not marker.exists()
