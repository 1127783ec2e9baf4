"""AutoencoderKL: the SD 1.x / 2.x / SDXL VAE, NHWC, param names mirroring diffusers.

    images [B, H, W, 3] in [-1, 1] --encode--> DiagonalGaussian(mean, logvar)  each [B, H/f, W/f, 4]
    z [B, H/f, W/f, 4] (unscaled)  --decode--> images [B, H, W, 3] (roughly [-1, 1]; not clipped)

with f = config.downsample_factor (8 for SD). The UNet works on `z * config.scaling_factor`; encode and
decode never apply the scaling factor themselves, as in diffusers.

Module tree (every torch module path has the Flax path with `.i` -> `_i`):

    encoder/conv_in, encoder/down_blocks_i/resnets_j, encoder/down_blocks_i/downsamplers_0/conv,
    encoder/mid_block/{resnets_0, attentions_0, resnets_1}, encoder/conv_norm_out, encoder/conv_out,
    quant_conv, post_quant_conv,
    decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_i/resnets_j (layers_per_block + 1 of them),
    decoder/up_blocks_i/upsamplers_0/conv, decoder/conv_norm_out, decoder/conv_out

Every GroupNorm here uses eps 1e-6 (diffusers' Encoder / Decoder hard-code it). Usage:

    model = AutoencoderKL(VAEConfig.sd())
    posterior = model.apply({"params": params}, images, method=AutoencoderKL.encode)
    images = model.apply({"params": params}, z, method=AutoencoderKL.decode)
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.attention import attention
from jaxdiff.models.configs import VAEConfig
from jaxdiff.models.layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

Dtype = jnp.dtype

# diffusers' Encoder and Decoder pass eps=1e-6 to every ResnetBlock, attention and output GroupNorm.
VAE_NORM_EPS = 1e-6
# diffusers clamps the encoder's log-variance to this range before anything uses it.
LOGVAR_RANGE = (-30.0, 20.0)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z | x): independent Gaussians per latent element (a pytree).

    As diffusers' DiagonalGaussianDistribution, with `logvar` already clamped to [-30, 20].
    """
    mean: jax.Array     # [B, h, w, C]
    logvar: jax.Array   # [B, h, w, C]

    @property
    def std(self) -> jax.Array:
        return jnp.exp(jnp.asarray(0.5, self.logvar.dtype) * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        """The most likely latent, the mean. [B, h, w, C]"""
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * N(0, 1) drawn from `key`. [B, h, w, C]"""
        noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) summed over latent elements, as diffusers' `kl()`. [B]"""
        one = jnp.asarray(1.0, self.mean.dtype)
        terms = jnp.square(self.mean) + self.var - one - self.logvar
        return jnp.asarray(0.5, self.mean.dtype) * jnp.sum(terms, axis=(1, 2, 3))


class VAEAttention(nn.Module):
    """The VAE mid block's self-attention (diffusers `Attention` built with `_from_deprecated_attn_block`).

    One head whose width is all `C` channels, GroupNorm on the input only (the residual is the raw
    input), `to_out_0` projection, residual add, division by `rescale_output_factor`.
    Submodules: group_norm, to_q, to_k, to_v, to_out_0 (all Linear in diffusers >= 0.14).
    """
    groups: int = 32
    rescale_output_factor: float = 1.0
    attention_implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = x.reshape(b, h * w, c)                                       # [B, L, C]
        normed = GroupNorm(self.groups, VAE_NORM_EPS, name="group_norm", **kw)(tokens)
        q = nn.Dense(c, name="to_q", **kw)(normed)
        k = nn.Dense(c, name="to_k", **kw)(normed)
        v = nn.Dense(c, name="to_v", **kw)(normed)
        # diffusers' upcast_softmax=True: attention() always takes the softmax in float32 for
        # low-precision inputs, which is the same thing; scores stay in the compute dtype.
        out = attention(q, k, v, heads=1, implementation=self.attention_implementation)   # [B, L, C]
        out = nn.Dense(c, name="to_out_0", **kw)(out)
        out = out.reshape(b, h, w, c) + x.astype(out.dtype)
        if self.rescale_output_factor != 1.0:
            out = out / jnp.asarray(self.rescale_output_factor, out.dtype)
        return out


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D without time embedding: resnets_0, [attentions_0], resnets_1."""
    groups: int = 32
    add_attention: bool = True
    attention_implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock2D(groups=self.groups, eps=VAE_NORM_EPS, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, attention_implementation=self.attention_implementation,
                             name="attentions_0", **kw)(x)
        return ResnetBlock2D(groups=self.groups, eps=VAE_NORM_EPS, name="resnets_1", **kw)(x)


class ResnetStackBlock(nn.Module):
    """diffusers' DownEncoderBlock2D (resample="down") and UpDecoderBlock2D (resample="up"): `num_layers`
    ResnetBlocks, then a stride-2 conv, or nearest x2 + conv, or nothing (resample=None)."""
    out_channels: int
    num_layers: int
    groups: int = 32
    resample: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, Cin] -> [B, H/2, W/2, Cout] ("down"), [B, 2H, 2W, Cout] ("up") or [B, H, W, Cout]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, groups=self.groups, eps=VAE_NORM_EPS,
                              name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            # The encoder passes downsample_padding=0: pad bottom/right by one, then a valid conv.
            # Odd sizes therefore round down (H=9 -> 4), exactly as diffusers.
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


def _conv(features: int, kernel: int, name: Optional[str], dtype, param_dtype) -> nn.Conv:
    """torch Conv2d(k, padding=k // 2) in NHWC. name=None inside `setup` (Flax names it by attribute)."""
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((p, p), (p, p)), dtype=dtype,
                   param_dtype=param_dtype, name=name)


class Encoder(nn.Module):
    """diffusers' vae.Encoder with double_z: images -> [mean, logvar] moments before quant_conv."""
    config: VAEConfig
    attention_implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, in_channels] -> [B, H/f, W/f, 2 * latent_channels]."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = cfg.block_out_channels
        x = _conv(chans[0], 3, "conv_in", **kw)(x)
        for i, c in enumerate(chans):
            x = ResnetStackBlock(c, cfg.layers_per_block, cfg.norm_num_groups,
                                 resample="down" if i < len(chans) - 1 else None, name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_implementation,
                     name="mid_block", **kw)(x)
        x = GroupNorm(cfg.norm_num_groups, VAE_NORM_EPS, name="conv_norm_out", **kw)(x)
        return _conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
    """diffusers' vae.Decoder (norm_type "group"): latents -> images."""
    config: VAEConfig
    attention_implementation: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels]."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = tuple(reversed(cfg.block_out_channels))   # coarsest first
        x = _conv(chans[0], 3, "conv_in", **kw)(z)
        x = MidBlock(cfg.norm_num_groups, cfg.mid_block_add_attention, self.attention_implementation,
                     name="mid_block", **kw)(x)
        for i, c in enumerate(chans):
            x = ResnetStackBlock(c, cfg.layers_per_block + 1, cfg.norm_num_groups,
                                 resample="up" if i < len(chans) - 1 else None, name=f"up_blocks_{i}", **kw)(x)
        x = GroupNorm(cfg.norm_num_groups, VAE_NORM_EPS, name="conv_norm_out", **kw)(x)
        return _conv(cfg.out_channels, 3, "conv_out", **kw)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of Latent Diffusion (Rombach et al. 2022), as diffusers' AutoencoderKL.

    Attributes:
      config: the architecture.
      dtype: compute dtype (keep float32 where config.force_upcast says the VAE overflows in float16).
      param_dtype: storage dtype of the params.
      attention_implementation: kernel for the two mid-block attentions (see models/attention.py).
    """
    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str = "auto"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cfg = self.config
        self.encoder = Encoder(cfg, self.attention_implementation, **kw)
        self.decoder = Decoder(cfg, self.attention_implementation, **kw)
        # 1x1 convs around the latent bottleneck; some fine-tuned VAEs drop them.
        self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = (_conv(cfg.latent_channels, 1, None, **kw)
                                if cfg.use_post_quant_conv else None)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """images: [B, H, W, in_channels] in [-1, 1]; H, W multiples of f (otherwise each level floors).

        Returns the posterior with mean and logvar [B, H/f, W/f, latent_channels] (unscaled latents).
        """
        return posterior(self.encode_moments(images), self.config.latent_channels)

    def encode_moments(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, in_channels] -> [mean, logvar] before the clamp, [B, H/f, W/f, 2 * latent_channels]
        (what diffusers' tiled encode blends)."""
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, latent_channels] unscaled latents -> images [B, h*f, w*f, out_channels]."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruction: decode(sample of encode(images)), or of its mean when `key` is None.

        Also the method `init` traces, so it creates every param. [B, H, W, C] -> [B, H, W, C].
        """
        posterior = self.encode(images)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z)


def posterior(moments: jax.Array, latent_channels: int) -> DiagonalGaussian:
    """[B, h, w, 2C] moments -> the posterior (torch.chunk(moments, 2, dim=1): the mean comes first; logvar
    clamped as diffusers' DiagonalGaussianDistribution)."""
    mean, logvar = moments[..., :latent_channels], moments[..., latent_channels:]
    lo, hi = LOGVAR_RANGE
    logvar = jnp.clip(logvar, jnp.asarray(lo, logvar.dtype), jnp.asarray(hi, logvar.dtype))
    return DiagonalGaussian(mean=mean, logvar=logvar)


def init_params(config: VAEConfig, seed: int = 0, *, param_dtype: Dtype = jnp.float32) -> dict:
    """Random params for `config` (the `params` collection, without the outer {"params": ...}).

    Drawn on the host with numpy: kernels N(0, 1 / fan_in), biases 0, norm scales 1 (Flax's defaults
    up to truncation). `model.init` would give the same kind of tree, but tracing the forward pass plus
    one threefry draw per tensor costs tens of seconds of CPU compile even for a 3-level toy VAE; this
    takes milliseconds for toy configs (about 5 s for the full SD VAE).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
        elif name == "scale":
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return jnp.asarray(value, param_dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config, param_dtype=param_dtype))


def param_shapes(config: VAEConfig, *, param_dtype: Dtype = jnp.float32) -> dict:
    """The param tree as jax.ShapeDtypeStruct leaves, computed without allocating or running anything."""
    model = AutoencoderKL(config, param_dtype=param_dtype)
    f = config.downsample_factor
    images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
