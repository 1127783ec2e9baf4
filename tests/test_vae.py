"""AutoencoderKL parity against diffusers (float32, tiny random configs) and full-size shape checks.

The torch model is written with `save_pretrained` (safetensors) and read back through the same path a
user's checkpoint takes: config.json -> VAEConfig.from_dict, weights -> convert.formats.read_tensors ->
convert.diffusers_layout.convert_state_dict. Tolerance: max|jax - torch| <= 1e-4 * max|torch| (float32).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from convert.diffusers_layout import convert_state_dict, plan_conversion
from convert.formats import read_tensors
from jaxdiff.errors import ConfigError
from jaxdiff.models.configs import VAEConfig
from jaxdiff.models.vae import AutoencoderKL, DiagonalGaussian, init_params, param_shapes

RTOL = 1e-4  # of the torch output's max |value|; float32 on CPU on both sides

SD_VAE_PARAMS = 83_653_863  # shared/reference/numbers.md: 83.65M for the whole SD AutoencoderKL


def _diffusers_kwargs(block_out_channels, **kw):
    levels = len(block_out_channels)
    return dict(block_out_channels=tuple(block_out_channels),
                down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, **kw)


# (id, diffusers kwargs, image [H, W]). Image sizes are rectangular so a swapped H / W fails, and the
# 3-level case uses sizes that are not multiples of 4 to exercise the encoder's asymmetric padding.
CASES = [
    ("tiny", _diffusers_kwargs((8, 16), layers_per_block=1, norm_num_groups=4), (16, 12)),
    ("3level_lpb2", _diffusers_kwargs((8, 16, 16), layers_per_block=2, norm_num_groups=4), (18, 10)),
    ("no_attn_no_quant", _diffusers_kwargs((8, 16), layers_per_block=1, norm_num_groups=4,
                                           mid_block_add_attention=False, use_quant_conv=False,
                                           use_post_quant_conv=False, latent_channels=3), (8, 12)),
]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter: default inits leave norms at 1 / 0, which would hide a mis-mapped norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _check(name: str, got, want: np.ndarray) -> float:
    got = np.asarray(got)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    assert err <= RTOL * scale, f"{name}: max err {err:.3g} > {RTOL} * {scale:.3g}"
    return err / scale


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """case id -> (folder written by save_pretrained, torch model)."""
    out = {}
    for i, (case, kwargs, _) in enumerate(CASES):
        torch.manual_seed(i)
        model = TorchAutoencoderKL(**kwargs).eval()
        _randomize(model, seed=100 + i)
        if model.quant_conv is not None:
            # Push logvar channels 0 / 1 far outside [-30, 20] so parity covers diffusers' clamp.
            with torch.no_grad():
                model.quant_conv.bias[model.config.latent_channels:][:2] = torch.tensor([1e3, -1e3])
        folder = tmp_path_factory.mktemp(f"vae_{case}")
        model.save_pretrained(folder, safe_serialization=True)
        out[case] = (folder, model)
    return out


@pytest.mark.parametrize("case,kwargs,hw", CASES, ids=[c[0] for c in CASES])
def test_parity_with_diffusers(saved_models, case, kwargs, hw):
    folder, tmodel = saved_models[case]
    config = VAEConfig.from_dict(json.loads((folder / "config.json").read_text()), str(folder))
    weights = folder / "diffusion_pytorch_model.safetensors"
    params = convert_state_dict(read_tensors(weights), param_shapes(config), source=str(weights))
    model = AutoencoderKL(config)
    variables = {"params": jax.tree.map(jnp.asarray, params)}

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, *hw, 3)).astype(np.float32)          # NHWC
    with torch.no_grad():
        posterior = tmodel.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        t_mean = posterior.mean.permute(0, 2, 3, 1).numpy()
        t_logvar = posterior.logvar.permute(0, 2, 3, 1).numpy()
    # Decode an independent latent (not the encoder's output) so a decoder bug cannot hide behind
    # an encoder bug; its spatial size is the encoder's.
    z = rng.standard_normal(t_mean.shape).astype(np.float32)
    with torch.no_grad():
        t_images = tmodel.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()

    got = jax.jit(lambda v, x: model.apply(v, x, method=AutoencoderKL.encode))(variables, images)
    assert isinstance(got, DiagonalGaussian)
    assert got.mean.shape[-1] == config.latent_channels
    errs = {"mean": _check("mean", got.mean, t_mean)}
    logvar = np.asarray(got.logvar)
    if config.use_quant_conv:   # channels 0 / 1 are clamped on both sides (see saved_models)
        assert np.all(logvar[..., 0] == 20.0) and np.all(t_logvar[..., 0] == 20.0)
        assert np.all(logvar[..., 1] == -30.0) and np.all(t_logvar[..., 1] == -30.0)
        assert np.all(np.isfinite(np.asarray(got.std)))
        logvar, t_logvar = logvar[..., 2:], t_logvar[..., 2:]   # compare the rest at their own scale
    errs["logvar"] = _check("logvar", logvar, t_logvar)
    dec = jax.jit(lambda v, x: model.apply(v, x, method=AutoencoderKL.decode))(variables, z)
    errs["decode"] = _check("decode", dec, t_images)
    f = config.downsample_factor
    h, w = hw
    for _ in range(len(config.block_out_channels) - 1):
        h, w = h // 2, w // 2   # pad right/bottom by 1, valid stride-2 conv: odd sizes round down
    assert got.mean.shape[1:3] == (h, w)
    assert dec.shape == (2, got.mean.shape[1] * f, got.mean.shape[2] * f, config.out_channels)
    print(f"\n{case}: relative max errors {errs}")


def test_norm_eps_matches_diffusers():
    """With near-zero activations GroupNorm's variance is ~eps, so only eps=1e-6 (not torch's 1e-5
    default) agrees: the parity cases above, with O(1) activations, would not notice the difference."""
    kwargs = CASES[0][1]
    torch.manual_seed(7)
    tmodel = TorchAutoencoderKL(**kwargs).eval()
    _randomize(tmodel, seed=8)
    with torch.no_grad():   # no bias before the first norms: their inputs scale with the tiny inputs
        for conv in (tmodel.encoder.conv_in, tmodel.post_quant_conv, tmodel.decoder.conv_in):
            conv.bias.zero_()
    config = VAEConfig.from_dict(dict(tmodel.config), "tiny")
    tensors = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    variables = {"params": convert_state_dict(tensors, param_shapes(config))}
    model = AutoencoderKL(config)
    rng = np.random.default_rng(1)
    images = (1e-3 * rng.uniform(-1, 1, (1, 8, 8, 3))).astype(np.float32)
    z = (1e-3 * rng.standard_normal((1, 4, 4, 4))).astype(np.float32)
    with torch.no_grad():
        t_mean = tmodel.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
        t_dec = tmodel.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
    _check("mean", model.apply(variables, images, method=AutoencoderKL.encode).mean,
           t_mean.permute(0, 2, 3, 1).numpy())
    _check("decode", model.apply(variables, z, method=AutoencoderKL.decode), t_dec.permute(0, 2, 3, 1).numpy())


def _meta_model(config_kwargs):
    with torch.device("meta"):
        return TorchAutoencoderKL(**config_kwargs)


@pytest.mark.parametrize("preset,scaling", [("sd", 0.18215), ("sdxl", 0.13025)])
def test_full_size_layout_matches_diffusers(preset, scaling):
    """Shape-only: every tensor of the full-size diffusers VAE maps one to one onto jaxdiff's params."""
    tmodel = _meta_model(_diffusers_kwargs((128, 256, 512, 512), layers_per_block=2,
                                           scaling_factor=scaling, sample_size={"sd": 512, "sdxl": 1024}[preset]))
    config = getattr(VAEConfig, preset)()
    # The config diffusers would write parses to the preset.
    raw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in tmodel.config.items()}
    assert VAEConfig.from_dict(raw, "meta") == config
    source_shapes = {k: tuple(v.shape) for k, v in tmodel.state_dict().items()}
    target = param_shapes(config)
    plan = plan_conversion(source_shapes, target, source="meta")   # raises on missing / left over
    assert len(plan) == len(source_shapes) == len(jax.tree.leaves(target))
    n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(target))
    assert n_jax == sum(v.numel() for v in tmodel.state_dict().values()) == SD_VAE_PARAMS
    assert round(n_jax / 1e6, 2) == 83.65


def test_full_size_shapes_without_compute():
    """eval_shape of SD encode at 512^2 and decode of its 64^2 latents: no FLOPs spent."""
    model = AutoencoderKL(VAEConfig.sd())
    params = param_shapes(VAEConfig.sd())
    images = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
    post = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode),
                          params, images)
    assert post.mean.shape == post.logvar.shape == (2, 64, 64, 4)
    out = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode),
                         params, post.mean)
    assert out.shape == (2, 512, 512, 3) and out.dtype == jnp.float32
    # bfloat16 compute over float32 params traces under strict dtype promotion, and stays bfloat16.
    bf16 = AutoencoderKL(VAEConfig.sd(), dtype=jnp.bfloat16)
    recon = jax.eval_shape(lambda p, x, k: bf16.apply({"params": p}, x, k), params, images,
                           jax.random.PRNGKey(0))
    assert recon.shape == (2, 512, 512, 3) and recon.dtype == jnp.bfloat16


def test_init_params_fills_the_model_tree():
    config = VAEConfig(block_out_channels=(32, 64), norm_num_groups=8)
    params, shapes = init_params(config, seed=3), param_shapes(config)
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    assert all(p.shape == s.shape and p.dtype == s.dtype
               for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)))
    kernel = np.asarray(params["decoder"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"])   # [3, 3, 64, 64]
    assert abs(kernel.std() * np.sqrt(9 * 64) - 1.0) < 0.05
    assert np.all(np.asarray(params["encoder"]["conv_norm_out"]["scale"]) == 1.0)
    other = init_params(config, seed=4)
    assert not np.array_equal(np.asarray(other["quant_conv"]["kernel"]), np.asarray(params["quant_conv"]["kernel"]))


def _sd_raw():
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in
               _diffusers_kwargs((128, 256, 512, 512), layers_per_block=2).items()},
            "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512,
            "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
            "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
            "mid_block_add_attention": True, "in_channels": 3, "out_channels": 3}


def test_config_accepts_old_and_new_diffusers_files():
    assert VAEConfig.from_dict(_sd_raw(), "vae/config.json") == VAEConfig.sd()
    # SD1.5's vae/config.json (diffusers 0.6) predates scaling_factor and friends: defaults apply.
    old = {k: v for k, v in _sd_raw().items() if k not in (
        "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "use_quant_conv",
        "use_post_quant_conv", "mid_block_add_attention")}
    assert VAEConfig.from_dict(old, "vae/config.json") == VAEConfig.sd()
    assert VAEConfig.sd().downsample_factor == 8 and VAEConfig.tiny().downsample_factor == 2


@pytest.mark.parametrize("key,value", [
    ("act_fn", "relu"),
    ("shift_factor", 0.0609),
    ("latents_mean", [0.0, 0.0, 0.0, 0.0]),
    ("latents_std", [1.0, 1.0, 1.0, 1.0]),
    ("down_block_types", ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"] * 3),
    ("norm_num_groups", 48),
    ("use_tiling_magic", True),
])
def test_bad_config_is_refused_naming_the_key(key, value):
    raw = dict(_sd_raw(), **{key: value})
    with pytest.raises(ConfigError, match=key):
        VAEConfig.from_dict(raw, "vae/config.json")
