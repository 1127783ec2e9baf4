"""NHWC building blocks shared by the UNet and the VAE, named like diffusers' modules.

Every Flax submodule name equals the diffusers attribute name (numeric children joined by `_`), so a
diffusers state-dict key maps to a param path by rule: `resnets.0.conv1.weight` <->
`resnets_0/conv1/kernel`. Every torch Conv2d is an `nn.Conv`, every torch Linear an `nn.Dense`.

Dtypes: `dtype` is the compute dtype, `param_dtype` the storage dtype of the params. Normalisation
statistics and the timestep sinusoids are always computed in float32 (bf16 statistics drift).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import attention

Dtype = jnp.dtype


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, *, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: int = 10000) -> jax.Array:
    """Sinusoidal timestep embedding, operation for operation as diffusers' `get_timestep_embedding`.

    Args:
      timesteps: [N] int or float timesteps (fractional allowed).
      embedding_dim: output width; odd widths get one zero column appended, as diffusers.
      flip_sin_to_cos: output `[cos, sin]` instead of `[sin, cos]` (the UNets use True).
      downscale_freq_shift: frequency i is `exp(-log(max_period) * i / (half - shift))`.
      scale: multiplies the angles.
      max_period: the longest period.

    Returns:
      [N, embedding_dim] float32.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {timesteps.shape}")
    half = embedding_dim // 2
    # Same op order as diffusers in float32: (-log(P) * arange) / (half - shift), then exp.
    exponent = jnp.float32(-math.log(max_period)) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / jnp.float32(half - downscale_freq_shift)
    freqs = jnp.exp(exponent)                                          # [half]
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]   # [N, half]
    angles = jnp.float32(scale) * angles
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: `linear_2(silu(linear_1(x)))`. [B, Cin] -> [B, time_embed_dim].

    With `cond_proj_dim` (LCM-distilled UNets) a bias-free `cond_proj` Linear maps `condition`
    [B, cond_proj_dim] to [B, Cin] and adds it to x before linear_1, as diffusers' TimestepEmbedding does.
    """
    time_embed_dim: int
    out_dim: Optional[int] = None
    cond_proj_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, condition: Optional[jax.Array] = None) -> jax.Array:
        if self.cond_proj_dim is not None:
            if condition is None:
                raise ValueError(f"this time embedding takes a condition [B, {self.cond_proj_dim}] "
                                 "(added_cond['timestep_cond'], LCM's guidance embedding)")
            x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="cond_proj")(condition.astype(self.dtype))
        x = nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        x = nn.silu(x)
        return nn.Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="linear_2")(x)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over NHWC (or [B, L, C]) tensors, statistics in float32.

    Channels are split into `num_groups` contiguous groups, as torch does on NCHW, so a converted
    torch GroupNorm weight applies unchanged. Variance is the biased E[(x - mean)^2] like torch.
    Params: `scale` [C], `bias` [C]. Output has dtype `dtype`.
    """
    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        shape = x.shape
        b, g = shape[0], self.num_groups
        xf = x.astype(jnp.float32).reshape(b, -1, c)                              # [B, N, C]
        n = jnp.float32(xf.shape[1] * (c // g))                                  # elements per group
        # Two-pass mean / variance (exact, like torch), each pass one reduction over the pixels into
        # per-channel sums (the major axis, C contiguous), totalled per group on the small [B, C]:
        # measured 2x faster on CPU than reducing over the (N, C/G) axes of a [B, N, G, C/G] view.
        per_channel = lambda a: jnp.repeat(a, c // g, axis=-1)                   # [B, G] -> [B, C]
        group_sum = lambda a: jnp.sum(a.reshape(b, g, c // g), axis=-1)           # [B, C] -> [B, G]
        mean = per_channel(group_sum(jnp.sum(xf, axis=1)) / n)                    # [B, C]
        var = group_sum(jnp.sum(jnp.square(xf - mean[:, None, :]), axis=1)) / n   # [B, G]
        a = per_channel(jax.lax.rsqrt(var + jnp.float32(self.epsilon))) * scale.astype(jnp.float32)[None, :]
        # y = (x - mean) * rsqrt(var + eps) * scale + bias, as one multiply-add per element.
        offset = bias.astype(jnp.float32)[None, :] - mean * a
        y = xf * a[:, None, :] + offset[:, None, :]
        return y.reshape(shape).astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis, statistics in float32 (flax's LayerNorm promotes
    bf16 with float32 implicitly, which strict dtype promotion refuses). Params: `scale`, `bias` [C]."""
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + jnp.float32(self.epsilon))
        bshape = (1,) * (x.ndim - 1) + (c,)
        y = y * scale.astype(jnp.float32).reshape(bshape) + bias.astype(jnp.float32).reshape(bshape)
        return y.astype(self.dtype)


def conv2d(features: int, kernel: int, name: str, dtype, param_dtype, *, stride: int = 1,
          padding=None, use_bias: bool = True) -> nn.Conv:
    """A torch-style Conv2d: symmetric padding kernel//2 unless given, cross-correlation, NHWC."""
    if padding is None:
        padding = kernel // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D with time_embedding_norm="default" (the SD UNet and VAE block).

    out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))) / scale

    Submodules: norm1, conv1, time_emb_proj (only when `temb` is given), norm2, conv2, and
    conv_shortcut (1x1, only when in and out channels differ, or `use_in_shortcut=True`).
    Dropout is not modelled: SD inference and fine-tuning run with dropout 0.

    Attributes:
      out_channels: output channels; None keeps the input's.
      groups: GroupNorm groups for both norms.
      eps: GroupNorm epsilon (UNet 1e-5, VAE 1e-6 in the stock configs).
      output_scale_factor: the residual sum is divided by it (UNet mid block `mid_block_scale_factor`).
      use_in_shortcut: force (True) or forbid (False) conv_shortcut; None = when channels change.
    """
    out_channels: Optional[int] = None
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    use_in_shortcut: Optional[bool] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        """x: [B, H, W, Cin]; temb: [B, T] or None (the VAE has no time embedding). -> [B, H, W, Cout]."""
        cin = x.shape[-1]
        cout = self.out_channels or cin
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
        h = conv2d(cout, 3, "conv1", **kw)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(cout, name="time_emb_proj", **kw)(nn.silu(temb))   # [B, Cout]
            h = h + t[:, None, None, :].astype(h.dtype)
        h = GroupNorm(self.groups, self.eps, name="norm2", **kw)(h)
        h = conv2d(cout, 3, "conv2", **kw)(nn.silu(h))
        use_shortcut = cin != cout if self.use_in_shortcut is None else self.use_in_shortcut
        shortcut = conv2d(cout, 1, "conv_shortcut", **kw)(x) if use_shortcut else x.astype(h.dtype)
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / jnp.asarray(self.output_scale_factor, out.dtype)
        return out


class Downsample2D(nn.Module):
    """diffusers' Downsample2D(use_conv=True): a stride-2 3x3 conv named `conv`.

    Attributes:
      out_channels: None keeps the input's channels.
      padding: 1 (UNet) pads 1 on every side; 0 (VAE encoder) pads (0, 1, 0, 1) — right and bottom
        only — then convolves unpadded, exactly as diffusers does for padding=0.
    """
    out_channels: Optional[int] = None
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), Cout] (padding=1)."""
        cout = self.out_channels or x.shape[-1]
        if self.padding == 0:
            pad = ((0, 1), (0, 1))   # asymmetric: bottom/right only
        else:
            pad = ((self.padding, self.padding), (self.padding, self.padding))
        return conv2d(cout, 3, "conv", self.dtype, self.param_dtype, stride=2, padding=pad)(x)


def upsample_nearest(x: jax.Array, size: Optional[Sequence[int]] = None) -> jax.Array:
    """torch F.interpolate(mode="nearest") on NHWC: x2, or to `size` = (H_out, W_out).

    torch picks source index floor(dst * in / out) per axis; for x2 that is a plain repeat.
    """
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    ho, wo = size
    # torch computes the scale in float32 as in/out, then floor(dst * scale), clamped to in-1.
    iy = jnp.minimum(jnp.floor(jnp.arange(ho, dtype=jnp.float32) * jnp.float32(h / ho)).astype(jnp.int32), h - 1)
    ix = jnp.minimum(jnp.floor(jnp.arange(wo, dtype=jnp.float32) * jnp.float32(w / wo)).astype(jnp.int32), w - 1)
    return x[:, iy][:, :, ix]


class Upsample2D(nn.Module):
    """diffusers' Upsample2D(use_conv=True): nearest x2 (or to `output_size`), then a 3x3 conv `conv`."""
    out_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Optional[Sequence[int]] = None) -> jax.Array:
        """x: [B, H, W, C] -> [B, 2H, 2W, Cout] (or [B, *output_size, Cout])."""
        cout = self.out_channels or x.shape[-1]
        x = upsample_nearest(x, output_size)
        return conv2d(cout, 3, "conv", self.dtype, self.param_dtype)(x)


# --- Transformer2DModel (the UNet's spatial transformer) ---------------------------------------------

class Attention(nn.Module):
    """diffusers' Attention as the SD UNets use it: to_q / to_k / to_v without bias, to_out_0 with bias.

    Self-attention when `context` is None, cross-attention otherwise. [B, L, C] -> [B, L, C].
    """
    heads: int
    head_dim: int
    upcast: bool = False
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        """x: [B, L, C]; context: [B, S, D] or None -> [B, L, C]."""
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        q = nn.Dense(inner, use_bias=False, name="to_q", **kw)(x)
        k = nn.Dense(inner, use_bias=False, name="to_k", **kw)(context)
        v = nn.Dense(inner, use_bias=False, name="to_v", **kw)(context)
        out = attention(q, k, v, heads=self.heads, upcast=self.upcast, implementation=self.implementation)
        return nn.Dense(x.shape[-1], name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
    """`proj` to 2 * inner, then value * gelu(gate) with the exact (erf) GELU, as diffusers' GEGLU."""
    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


# CPU: the feed-forward runs over blocks of tokens whose GEGLU hidden activations, [B, chunk, 8C] float32,
# are at most this many elements (21 MB), so they stay in the L3 cache between the two matmuls instead of
# going to memory (84 MB at 64x64 latents, batch 2). Measured on the 2-core dev CPU (35 MB L3), min of
# 20 calls, the same results bit for bit: SD1.5's feed-forward at 64x64 (8192 rows x 320) 112-172 ms
# chunked by 2048 rows against 144-211 ms whole; 32x32 (2048 x 640) 108-134 against 123-161 ms by 1024.
_CPU_FF_BLOCK_ELEMENTS = 2048 * 2560


def feed_forward_token_chunk(backend: str, batch: int, tokens: int, hidden: int) -> int:
    """Tokens per block of the chunked feed-forward, or 0 to run it whole (every backend but CPU, or when
    one block would hold every token). A power of two dividing `tokens`; `hidden` = GEGLU's 2 * 4C."""
    if backend != "cpu":
        return 0
    chunk = tokens
    while chunk % 2 == 0 and batch * chunk * hidden > _CPU_FF_BLOCK_ELEMENTS:
        chunk //= 2
    return chunk if chunk < tokens else 0


class BasicTransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock (layer_norm type, GEGLU feed-forward, mult 4):

    x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).

    `ff_token_chunk`: run the feed-forward over blocks of this many tokens (a divisor of L), 0 whole,
    None as `feed_forward_token_chunk` picks for the default backend. Each token's output is the same
    either way; only the cache traffic changes.
    """
    heads: int
    head_dim: int
    upcast: bool = False
    implementation: str = "auto"
    ff_token_chunk: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: [B, L, C]; context: [B, S, D] -> [B, L, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, head_dim=self.head_dim, upcast=self.upcast,
                    implementation=self.implementation, **kw)
        norm = lambda name: LayerNorm(1e-5, name=name, **kw)
        x = x + Attention(name="attn1", **attn)(norm("norm1")(x))
        x = x + Attention(name="attn2", **attn)(norm("norm2")(x), context)
        h = norm("norm3")(x)
        ff = FeedForward(name="ff", **kw)
        b, length, c = h.shape
        chunk = self.ff_token_chunk
        if chunk is None:
            chunk = feed_forward_token_chunk(jax.default_backend(), b, length, 2 * ff.mult * c)
        if not chunk or chunk >= length:
            return x + ff(h)
        if length % chunk:
            raise ValueError(f"ff_token_chunk {chunk} does not divide {length} tokens")
        # Blocks along the tokens, not the batch: a batch-sharded h stays sharded, no device exchange.
        blocks = h.reshape(b, length // chunk, chunk, c).transpose(1, 0, 2, 3)     # [n, B, chunk, C]
        each_block = nn.scan(lambda module, carry, block: (carry, module(block)),
                             variable_broadcast="params", split_rngs={"params": False})
        _, out = each_block(ff, None, blocks)                                       # [n, B, chunk, C]
        return x + out.transpose(1, 0, 2, 3).reshape(b, length, c)


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation_fn="geglu"): `net_0` GEGLU to 4 * C, `net_2` Dense back to C."""
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
        return nn.Dense(x.shape[-1], name="net_2", **kw)(h)


class Transformer2DModel(nn.Module):
    """diffusers' Transformer2DModel on continuous NHWC input, as the SD UNets use it.

    GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or Dense when `use_linear_projection`) -> `num_layers`
    BasicTransformerBlocks over the H*W tokens -> proj_out -> + input. Head width = C // heads.
    """
    heads: int
    num_layers: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    upcast: bool = False
    implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: [B, H, W, C]; context: [B, S, D] -> [B, H, W, C]."""
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        # A 1x1 conv and a Dense are the same map; which one it is decides the checkpoint's weight shape.
        if self.use_linear_projection:
            h = nn.Dense(c, name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
        else:
            h = conv2d(c, 1, "proj_in", **kw)(h).reshape(b, hgt * wid, c)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, c // self.heads, self.upcast, self.implementation,
                                      name=f"transformer_blocks_{i}", **kw)(h, context)
        if self.use_linear_projection:
            h = nn.Dense(c, name="proj_out", **kw)(h).reshape(b, hgt, wid, c)
        else:
            h = conv2d(c, 1, "proj_out", **kw)(h.reshape(b, hgt, wid, c))
        return h + x.astype(h.dtype)
