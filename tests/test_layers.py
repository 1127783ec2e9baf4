"""Parity of the shared NHWC blocks and the attention reference against diffusers / torch (float32, CPU)."""
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from convert.diffusers_layout import convert_state_dict
from jaxdiff.models.attention import attention
from jaxdiff.models.layers import (BasicTransformerBlock, Downsample2D, GroupNorm, ResnetBlock2D,
                                   Transformer2DModel, Upsample2D, feed_forward_token_chunk,
                                   get_timestep_embedding, upsample_nearest)
from tests import helpers

# Larger weight noise than the UNet tests: single layers need it to move their outputs measurably.
perturb = functools.partial(helpers.perturb, scale=0.1)


def _tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _run(flax_module, torch_module, *inputs, **static):
    """Init the flax module for shapes, load the torch weights through the converter, apply.

    `static` keyword inputs (sizes) stay Python values, not traced arrays."""
    init = lambda rng, *a: flax_module.init(rng, *a, **static)
    target = jax.eval_shape(init, jax.random.PRNGKey(0), *inputs)["params"]
    params = convert_state_dict(_tensors(torch_module), target, source="test")
    return np.asarray(flax_module.apply({"params": params}, *inputs, **static))


def _assert_close(got, want, tol=1e-4):
    """Max abs error within tol * max|reference| (the common parity bar)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    assert err <= tol * float(np.max(np.abs(want))), f"max err {err:.3g}, ref scale {np.max(np.abs(want)):.3g}"


@pytest.mark.parametrize("dim,flip,shift,scale", [(32, True, 0, 1.0), (33, False, 1, 1.0), (256, True, 0, 1.0),
                                                 (16, False, 1, 2.5)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift, scale):
    from diffusers.models.embeddings import get_timestep_embedding as ref
    t = np.array([0, 1, 17, 250.5, 999], np.float32)
    want = ref(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale).numpy()
    got = np.asarray(get_timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip,
                                            downscale_freq_shift=shift, scale=scale))
    # Angles up to ~1000 rad: one float32 ulp of the frequency moves sin by ~6e-5; outputs are in [-1, 1].
    _assert_close(got, want)
    # Integer timesteps (the scheduler's) give the same embedding as their float values.
    got_int = np.asarray(get_timestep_embedding(jnp.array([0, 1, 17, 999]), dim, flip_sin_to_cos=flip,
                                                downscale_freq_shift=shift, scale=scale))
    np.testing.assert_array_equal(got_int, got[[0, 1, 2, 4]])


@pytest.mark.parametrize("lq,lk,heads,dim,upcast", [(16, 16, 2, 8, False), (12, 7, 4, 5, True), (9, 77, 1, 16, False)])
def test_attention_matches_sdpa(lq, lk, heads, dim, upcast):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, heads * dim)).astype(np.float32) for n in (lq, lk, lk))
    split = lambda a: torch.from_numpy(a).reshape(2, a.shape[1], heads, dim).transpose(1, 2)
    want = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, lq, -1).numpy()
    got = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), heads=heads, upcast=upcast))
    _assert_close(got, want)


def test_attention_bf16_close_to_float32_and_refuses_unknown_kernel():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 64, 32)), jnp.float32) for _ in range(3))
    ref = attention(q, k, v, heads=4)
    low = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), heads=4)
    assert low.dtype == jnp.bfloat16
    # bf16 inputs carry ~3 significant digits; a float32 softmax keeps the result at that level.
    assert float(jnp.max(jnp.abs(low.astype(jnp.float32) - ref))) < 3e-2
    with pytest.raises(ValueError, match="not available"):
        attention(q, k, v, heads=4, implementation="no_such_kernel")


def test_group_norm_matches_torch():
    torch_norm = perturb(torch.nn.GroupNorm(4, 32, eps=1e-6))
    x = torch.randn(2, 32, 5, 7) * 3 + 1
    got = _run(GroupNorm(4, 1e-6), torch_norm, jnp.asarray(helpers.nhwc(x)))
    _assert_close(got, helpers.nhwc(torch_norm(x)))


@pytest.mark.parametrize("cin,cout,with_temb", [(16, 32, True), (16, 16, False), (32, 16, False)])
def test_resnet_block_matches_diffusers(cin, cout, with_temb):
    from diffusers.models.resnet import ResnetBlock2D as Ref
    ref = perturb(Ref(in_channels=cin, out_channels=cout, temb_channels=24 if with_temb else None, groups=8,
                       eps=1e-6, output_scale_factor=2.0))
    x, temb = torch.randn(2, cin, 6, 5), torch.randn(2, 24)
    want = helpers.nhwc(ref(x, temb if with_temb else None))
    args = (jnp.asarray(helpers.nhwc(x)), jnp.asarray(temb.numpy()) if with_temb else None)
    got = _run(ResnetBlock2D(out_channels=cout, groups=8, eps=1e-6, output_scale_factor=2.0), ref, *args)
    _assert_close(got, want)


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_matches_diffusers(padding):
    from diffusers.models.downsampling import Downsample2D as Ref
    ref = perturb(Ref(8, use_conv=True, out_channels=8, padding=padding, name="op"))
    x = torch.randn(1, 8, 7, 6)   # odd height: checks the asymmetric pad
    _assert_close(_run(Downsample2D(8, padding=padding), ref, jnp.asarray(helpers.nhwc(x))), helpers.nhwc(ref(x)))


@pytest.mark.parametrize("size", [None, (7, 9)])
def test_upsample_matches_diffusers(size):
    from diffusers.models.upsampling import Upsample2D as Ref
    ref = perturb(Ref(8, use_conv=True, out_channels=4))
    x = torch.randn(1, 8, 4, 5)
    want = helpers.nhwc(ref(x, output_size=size))
    got = _run(Upsample2D(4), ref, jnp.asarray(helpers.nhwc(x)), output_size=size)
    _assert_close(got, want)


def test_upsample_nearest_general_size_matches_torch():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    for size in [(10, 14), (6, 9), (13, 11), (5, 7)]:
        want = helpers.nhwc(F.interpolate(x, size=size, mode="nearest"))
        np.testing.assert_array_equal(np.asarray(upsample_nearest(jnp.asarray(helpers.nhwc(x)), size)), want)


@pytest.mark.parametrize("chunk", [0, 4])
def test_transformer_block_matches_diffusers_with_the_feed_forward_whole_or_in_token_blocks(chunk):
    from diffusers.models.attention import BasicTransformerBlock as Ref
    ref = perturb(Ref(16, 2, 8, cross_attention_dim=12, activation_fn="geglu"))
    x, ctx = torch.randn(2, 12, 16), torch.randn(2, 5, 12)
    want = ref(x, encoder_hidden_states=ctx).detach().numpy()
    model = BasicTransformerBlock(heads=2, head_dim=8, ff_token_chunk=chunk)
    got = _run(model, ref, jnp.asarray(x.numpy()), jnp.asarray(ctx.numpy()))
    _assert_close(got, want)


def test_feed_forward_in_token_blocks_has_the_same_params_outputs_and_gradients():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8))
    ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 8))
    whole, blocks = (BasicTransformerBlock(heads=2, head_dim=4, ff_token_chunk=n) for n in (0, 4))
    params = whole.init(jax.random.PRNGKey(0), x, ctx)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)
    assert shapes(blocks.init(jax.random.PRNGKey(0), x, ctx)) == shapes(params)
    np.testing.assert_allclose(blocks.apply(params, x, ctx), whole.apply(params, x, ctx), rtol=1e-6, atol=1e-6)
    loss = lambda model: jax.grad(lambda p: jnp.sum(model.apply(p, x, ctx) ** 2))(params)
    for g_blocks, g_whole in zip(jax.tree_util.tree_leaves(loss(blocks)), jax.tree_util.tree_leaves(loss(whole))):
        np.testing.assert_allclose(g_blocks, g_whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide 16 tokens"):
        BasicTransformerBlock(heads=2, head_dim=4, ff_token_chunk=5).init(jax.random.PRNGKey(0), x, ctx)


def test_feed_forward_token_chunk_keeps_the_hidden_block_in_cache_on_cpu_only():
    # SD1.5 at 64x64 latents, batch 2 (CFG): 1024 tokens x 2 rows x 2560 hidden = 21 MB blocks.
    assert feed_forward_token_chunk("cpu", 2, 4096, 2560) == 1024
    assert feed_forward_token_chunk("cpu", 2, 1024, 5120) == 512
    assert feed_forward_token_chunk("cpu", 2, 256, 10240) == 0     # already one block
    assert feed_forward_token_chunk("cpu", 1, 4095, 2560) == 0     # odd: no power-of-two divisor
    assert feed_forward_token_chunk("gpu", 2, 4096, 2560) == 0
    assert feed_forward_token_chunk("tpu", 16, 4096, 2560) == 0


@pytest.mark.parametrize("linear", [False, True])
def test_transformer2d_matches_diffusers(linear):
    from diffusers.models.transformers.transformer_2d import Transformer2DModel as Ref
    ref = perturb(Ref(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2,
                       cross_attention_dim=12, norm_num_groups=4, use_linear_projection=linear,
                       upcast_attention=linear))
    x, ctx = torch.randn(2, 16, 4, 3), torch.randn(2, 5, 12)
    want = helpers.nhwc(ref(x, encoder_hidden_states=ctx).sample)
    model = Transformer2DModel(heads=2, num_layers=2, use_linear_projection=linear, norm_num_groups=4,
                               upcast=linear)
    got = _run(model, ref, jnp.asarray(helpers.nhwc(x)), jnp.asarray(ctx.numpy()))
    _assert_close(got, want)
