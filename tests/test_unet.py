"""UNet2DConditionModel: float32 parity with diffusers on tiny random configs, full-size shape checks.

Tiny models go through the real path: diffusers `save_pretrained` (safetensors + config.json) ->
UNetConfig.from_dict + convert.formats.read_tensors + convert_state_dict -> jaxdiff. Full-size models
are only shapes: param counts from `jax.eval_shape`, and diffusers' full state dict (built on torch's
meta device, no memory) planned against jaxdiff's param tree with nothing missing or left over.
"""
import json

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from convert.diffusers_layout import convert_state_dict, plan_conversion
from convert.formats import read_tensors
from jaxdiff.errors import ConfigError
from jaxdiff.models.configs import UNetConfig
from jaxdiff.models.unet import UNet2DConditionModel, example_inputs, param_shapes
from tests import helpers

diffusers = pytest.importorskip("diffusers")

_TINY = dict(norm_num_groups=8, cross_attention_dim=24, layers_per_block=1)

# name -> (diffusers kwargs, latent (h, w), timestep kind, added-cond spec)
CASES = {
    "sd1": (dict(_TINY, block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
            (8, 8), "int", None),
    "sd2": (dict(_TINY, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 8), cross_attention_dim=40,
                 use_linear_projection=True, upcast_attention=True,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
            (8, 8), "scalar_float", None),
    # 10 x 6 latents are not multiples of 4: the up path must upsample to the skip sizes (upsample_size).
    "sdxl": (dict(_TINY, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
                  transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=16 + 6 * 8),
             (10, 6), "float", dict(text_embeds=16, time_ids=6)),
    # 9-channel inpainting input; also carries a "timestep" class embedding (one compile less).
    "inpaint9_class": (dict(_TINY, block_out_channels=(32, 64), in_channels=9, attention_head_dim=4,
                            class_embed_type="timestep",
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                       (8, 8), "int", dict(class_labels=0)),
    "refiner": (dict(_TINY, block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4),
                     transformer_layers_per_block=2, use_linear_projection=True,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=16 + 5 * 8),
                (8, 8), "int", dict(text_embeds=16, time_ids=5)),
    # Less common options at once: learnt class table, centred input, mid-block output scale, wider time
    # embedding, asymmetric-pad downsampling, per-level layers; 5 x 7 latents (odd up/down sizes).
    "options": (dict(_TINY, block_out_channels=(32, 32), attention_head_dim=2, num_class_embeds=10,
                     center_input_sample=True, mid_block_scale_factor=1.414, time_embedding_dim=48,
                     downsample_padding=0, layers_per_block=(1, 2),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                (5, 7), "int", dict(class_labels=0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name, tmp_path):
    kwargs, (h, w), t_kind, added_spec = CASES[name]
    torch.manual_seed(0)
    ref = helpers.perturb(diffusers.UNet2DConditionModel(**kwargs))
    ref.save_pretrained(tmp_path, safe_serialization=True)

    config = UNetConfig.from_dict(json.loads((tmp_path / "config.json").read_text()), str(tmp_path))
    tensors = read_tensors(tmp_path / "diffusion_pytorch_model.safetensors")
    model = UNet2DConditionModel(config)
    b = 2
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((b, config.in_channels, h, w)).astype(np.float32)
    context = rng.standard_normal((b, 7, config.cross_attention_dims[0])).astype(np.float32)
    t = {"int": np.array([3, 801]), "float": np.array([10.5, 999.0], np.float32),
         "scalar_float": np.float32(421.25)}[t_kind]
    added_np = {}
    if added_spec and "text_embeds" in added_spec:
        added_np["text_embeds"] = rng.standard_normal((b, added_spec["text_embeds"])).astype(np.float32)
        added_np["time_ids"] = np.tile(np.array([1024, 768, 0, 16, 1024, 1024][:added_spec["time_ids"]],
                                                np.float32), (b, 1))
    if added_spec and "class_labels" in added_spec:
        added_np["class_labels"] = np.array([5, 7])

    with torch.no_grad():
        want = ref(torch.from_numpy(sample), torch.as_tensor(t), torch.from_numpy(context),
                   class_labels=torch.as_tensor(added_np["class_labels"]) if "class_labels" in added_np else None,
                   added_cond_kwargs={k: torch.from_numpy(v) for k, v in added_np.items() if k != "class_labels"}
                   or None).sample.numpy().transpose(0, 2, 3, 1)

    x = jnp.asarray(sample.transpose(0, 2, 3, 1))
    args = (x, jnp.asarray(t), jnp.asarray(context), {k: jnp.asarray(v) for k, v in added_np.items()} or None)
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
    params = convert_state_dict(tensors, target, source=str(tmp_path))
    # Tiny shapes: XLA's optimisation passes cost more than they save (3x faster compile without).
    compiled = jax.jit(model.apply).lower({"params": params}, *args).compile(
        compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    got = np.asarray(compiled({"params": params}, *args))

    assert got.shape == want.shape == (b, h, w, config.out_channels)
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    print(f"{name}: max|jax - torch| = {err:.3g}, max|torch| = {scale:.3g}")
    assert err <= 1e-4 * scale, f"{name}: max err {err:.3g} vs scale {scale:.3g}"


# Published diffusers configs of the full-size UNets (numerics-relevant keys; the rest are defaults).
FULL = {
    "sd15": (UNetConfig.sd15, 859.52e6, dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)),
    "sd21": (UNetConfig.sd21, 865.91e6, dict(sample_size=96, cross_attention_dim=1024,
                                             attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                                             upcast_attention=True)),
    "sdxl": (UNetConfig.sdxl, 2567.46e6, dict(
        sample_size=128, block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)),
    "sdxl_refiner": (UNetConfig.sdxl_refiner, None, dict(
        sample_size=128, block_out_channels=[384, 768, 1536, 1536], attention_head_dim=[6, 12, 24, 24],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=4, cross_attention_dim=1280, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560)),
}


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_shapes_match_diffusers(name):
    preset, want_params, kwargs = FULL[name]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**kwargs)
    # Every key diffusers writes into config.json parses, and gives exactly the preset.
    config = UNetConfig.from_dict(json.loads(ref.to_json_string()), name)
    assert config == preset()
    shapes = param_shapes(config)
    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
    assert n_params == sum(p.numel() for p in ref.parameters())
    if want_params is not None:   # shared/reference/numbers.md, to the 10k
        assert round(n_params, -4) == round(want_params)
    plan = plan_conversion({k: tuple(v.shape) for k, v in ref.state_dict().items()}, shapes, source=name)
    assert len(plan) == len(ref.state_dict())


def test_example_inputs_time_ids_per_preset():
    assert example_inputs(UNetConfig.sdxl())[3]["time_ids"].shape == (1, 6)
    assert example_inputs(UNetConfig.sdxl_refiner())[3]["time_ids"].shape == (1, 5)
    assert example_inputs(UNetConfig.sd15())[3] is None


@pytest.mark.parametrize("key,value", [("dual_cross_attention", True), ("resnet_time_scale_shift", "scale_shift"),
                                       ("only_cross_attention", True), ("time_embedding_type", "fourier"),
                                       ("conv_in_kernel", 7), ("addition_embed_type", "text_image"),
                                       ("class_embeddings_concat", True), ("encoder_hid_dim", 1024),
                                       ("num_attention_heads", 8), ("some_future_option", 1)])
def test_unsupported_config_is_refused_naming_the_key(key, value):
    raw = dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8, **{key: value})
    with pytest.raises(ConfigError, match=key):
        UNetConfig.from_dict(raw, "unet/config.json")


def test_inconsistent_config_is_refused():
    with pytest.raises(ConfigError, match="heads"):
        UNetConfig.from_dict(dict(block_out_channels=[32, 64], attention_head_dim=[3, 4], norm_num_groups=8,
                                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]), "unet/config.json")
    with pytest.raises(ConfigError, match="UNetMidBlock2DSimpleCrossAttn"):
        UNetConfig.from_dict(dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "unet/config.json")


def test_bfloat16_compute_runs_strict_and_stays_close():
    """bf16 activations and params under strict dtype promotion: output float32, close to the f32 run."""
    config = UNetConfig(**{**UNetConfig.tiny().__dict__, "use_linear_projection": True, "upcast_attention": True,
                           "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                           "projection_class_embeddings_input_dim": 16 + 6 * 8})
    rng = np.random.default_rng(0)
    sample, _, context, added = example_inputs(config, batch=2, seq_len=5, text_embeds_dim=16)
    args = (jnp.asarray(rng.standard_normal(sample.shape), jnp.float32), jnp.array([10, 900]),
            jnp.asarray(rng.standard_normal(context.shape), jnp.float32), added)
    shapes = param_shapes(config)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape) / np.sqrt(max(1, np.prod(s.shape[:-1]))),
                              jnp.float32), shapes)
    opts = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    outs = []
    # (compute dtype, stored param dtype): float32 reference, all-bf16, and bf16 compute over float32
    # params (mixed precision as in training / `jaxdiff.load(dtype=...)` with float32 weights).
    for dtype, param_dtype in ((jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                               (jnp.bfloat16, jnp.float32)):
        p = jax.tree_util.tree_map(lambda a: a.astype(param_dtype), params)
        fn = jax.jit(UNet2DConditionModel(config, dtype=dtype).apply)
        outs.append(fn.lower({"params": p}, *args).compile(compiler_options=opts)({"params": p}, *args))
    scale = float(jnp.max(jnp.abs(outs[0])))
    for out in outs[1:]:
        assert out.dtype == jnp.float32
        err = float(jnp.max(jnp.abs(out - outs[0])))
        print(f"bf16 vs f32: max err {err:.3g}, scale {scale:.3g}")
        # bf16 keeps ~3 significant digits per op; measured 0.4% of the scale here, bound at 2%.
        assert err < 2e-2 * scale, err


def test_remat_keeps_param_paths_and_differentiates():
    """Gradient checkpointing changes no param path, and the backward pass traces (static upsample size)."""
    config = UNetConfig.tiny()
    sample, t, context, added = example_inputs(config, batch=1, height=6, width=6, seq_len=3)
    shapes = param_shapes(config)
    model = UNet2DConditionModel(config, remat=True)
    assert jax.tree_util.tree_structure(jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, t, context,
                                                       added)["params"]) == jax.tree_util.tree_structure(shapes)
    loss = lambda p: jnp.sum(model.apply({"params": p}, sample, t, context, added) ** 2)
    grads = jax.eval_shape(jax.grad(loss), shapes)
    assert jax.tree_util.tree_map(lambda g: g.shape, grads) == jax.tree_util.tree_map(lambda s: s.shape, shapes)


def test_controlnet_residuals_parity_with_diffusers(tmp_path):
    """down_residuals / mid_residual land where diffusers adds down_block_additional_residuals and
    mid_block_additional_residual (the seam ControlNet plugs into)."""
    kwargs, (h, w), _, _ = CASES["sd1"]
    torch.manual_seed(0)
    ref = helpers.perturb(diffusers.UNet2DConditionModel(**kwargs))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = UNetConfig.from_dict(json.loads((tmp_path / "config.json").read_text()), str(tmp_path))
    model = UNet2DConditionModel(config)
    b, rng = 2, np.random.default_rng(1)
    # diffusers' down_block_res_samples: conv_in's output, then each resnet's and downsampler's output.
    shapes, (hh, ww) = [(b, config.block_out_channels[0], h, w)], (h, w)
    for i, c in enumerate(config.block_out_channels):
        shapes += [(b, c, hh, ww)] * config.layers_per_level[i]
        if i < config.levels - 1:
            hh, ww = (hh + 1) // 2, (ww + 1) // 2
            shapes.append((b, c, hh, ww))
    down = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    mid = rng.standard_normal((b, config.block_out_channels[-1], hh, ww)).astype(np.float32)
    sample = rng.standard_normal((b, 4, h, w)).astype(np.float32)
    context = rng.standard_normal((b, 7, config.cross_attention_dims[0])).astype(np.float32)
    t = np.array([3, 801])
    with torch.no_grad():
        want = ref(torch.from_numpy(sample), torch.as_tensor(t), torch.from_numpy(context),
                   down_block_additional_residuals=tuple(torch.from_numpy(d) for d in down),
                   mid_block_additional_residual=torch.from_numpy(mid)).sample.numpy().transpose(0, 2, 3, 1)
        plain = ref(torch.from_numpy(sample), torch.as_tensor(t),
                    torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    args = (nhwc(sample), jnp.asarray(t), jnp.asarray(context))
    params = convert_state_dict(read_tensors(tmp_path / "diffusion_pytorch_model.safetensors"),
                                jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"],
                                source=str(tmp_path))
    apply = jax.jit(lambda p, d, m: model.apply({"params": p}, *args, down_residuals=d, mid_residual=m))
    got = np.asarray(apply(params, [nhwc(d) for d in down], nhwc(mid)))
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(want - plain))) > 0.1 * scale  # the residuals change the output
    assert float(np.max(np.abs(got - want))) <= 1e-4 * scale
    with pytest.raises(ValueError, match="down_residuals has 2 arrays"):
        model.apply({"params": params}, *args, down_residuals=[nhwc(d) for d in down[:2]])
