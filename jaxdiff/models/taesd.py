"""AutoencoderTiny (TAESD, madebyollin): a small, fast VAE that shares SD's latent space. NHWC, param
names mirroring diffusers' AutoencoderTiny.

    images [B, H, W, 3] in [-1, 1] --encode--> latents [B, H/8, W/8, 4] (a point: no posterior spread)
    latents [B, h, w, 4]           --decode--> images [B, 8h, 8w, 3] in about [-1, 1]

diffusers (models/autoencoders/vae.py EncoderTiny / DecoderTiny, unets/unet_2d_blocks.py
AutoencoderTinyBlock): the encoder maps [-1, 1] to [0, 1], then `layers`: conv 3x3, blocks, and per
later level a bias-free stride-2 conv and blocks, then conv 3x3 to the latent channels. The decoder clamps
with tanh(x / 3) * 3, then conv 3x3 + activation, per level blocks, x2 nearest upsample (not after the
last level) and a conv (bias only on the last, which gives the image channels), and maps [0, 1] to
[-1, 1]. A block is relu(conv(act(conv(act(conv(x))))) + skip(x)), skip a bias-free 1x1 conv when the
widths differ. Sequential indices are kept: encoder/layers_{i}, decoder/layers_{i}, block conv_0 /
conv_2 / conv_4 / skip. scaling_factor is 1.0 for the released TAESD weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.config_parsing import parse_config
from jaxdiff.models.vae import DiagonalGaussian

ACTIVATIONS = {"relu": nn.relu, "silu": nn.silu, "swish": nn.silu, "gelu": lambda x: nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyVAEConfig:
    """diffusers' AutoencoderTiny config.json fields (defaults as diffusers')."""
    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    act_fn: str = "relu"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    latent_magnitude: float = 3.0      # only diffusers' forward() (uint8 round trip) uses these two
    latent_shift: float = 0.5
    force_upcast: bool = False
    scaling_factor: float = 1.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str) -> "TinyVAEConfig":
        # diffusers writes block_out_channels too, a copy of decoder_block_out_channels.
        config = parse_config(cls, raw, source=source, ignored=frozenset({"block_out_channels"}), only_values={
            "upsample_fn": ("nearest",), "shift_factor": (0.0, None), "act_fn": tuple(ACTIVATIONS)})
        if config.upsampling_scaling_factor ** (len(config.decoder_block_out_channels) - 1) != config.downsample_factor:
            from jaxdiff.errors import ConfigError
            raise ConfigError(f"{source}: the decoder does not undo the encoder's downsampling; not a TAESD config")
        return config

    @classmethod
    def tiny(cls) -> "TinyVAEConfig":
        """For tests: two levels (factor 2), 8 channels."""
        return cls(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                   num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))


def _conv(features: int, name: str, *, kernel: int = 3, stride: int = 1, bias: bool = True, dtype, param_dtype):
    p = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)), use_bias=bias,
                   dtype=dtype, param_dtype=param_dtype, name=name)


class TinyBlock(nn.Module):
    """diffusers' AutoencoderTinyBlock: [B, H, W, Cin] -> [B, H, W, Cout]."""
    features: int
    act_fn: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = ACTIVATIONS[self.act_fn]
        h = act(_conv(self.features, "conv_0", **kw)(x))
        h = act(_conv(self.features, "conv_2", **kw)(h))
        h = _conv(self.features, "conv_4", **kw)(h)
        skip = x if x.shape[-1] == self.features else _conv(self.features, "skip", kernel=1, bias=False, **kw)(x)
        return nn.relu(h + skip)


class TinyEncoder(nn.Module):
    """diffusers' EncoderTiny (after its [-1, 1] -> [0, 1] map): [B, H, W, 3] -> [B, H/f, W/f, C]."""
    config: TinyVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw, i = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype), 0
        for level, (c, n) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            x = _conv(c, f"layers_{i}", stride=1 if level == 0 else 2, bias=level == 0, **kw)(x)
            i += 1
            for _ in range(n):
                x = TinyBlock(c, cfg.act_fn, name=f"layers_{i}", **kw)(x)
                i += 1
        return _conv(cfg.latent_channels, f"layers_{i}", **kw)(x)


class TinyDecoder(nn.Module):
    """diffusers' DecoderTiny between its clamp and its [0, 1] -> [-1, 1] map: [B, h, w, C] -> [B, fh, fw, 3]."""
    config: TinyVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act, s = ACTIVATIONS[cfg.act_fn], cfg.upsampling_scaling_factor
        x = act(_conv(cfg.decoder_block_out_channels[0], "layers_0", **kw)(x))   # layers 0, 1 (activation)
        i, last = 2, len(cfg.decoder_block_out_channels) - 1
        for level, (c, n) in enumerate(zip(cfg.decoder_block_out_channels, cfg.num_decoder_blocks)):
            for _ in range(n):
                x = TinyBlock(c, cfg.act_fn, name=f"layers_{i}", **kw)(x)
                i += 1
            if level != last:   # nn.Upsample(nearest): no params, one index
                b, h, w, ch = x.shape
                x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, s, w, s, ch)).reshape(b, h * s, w * s, ch)
                i += 1
            x = _conv(c if level != last else cfg.out_channels, f"layers_{i}", bias=level == last, **kw)(x)
            i += 1
        return x


class AutoencoderTiny(nn.Module):
    """TAESD. Same methods as jaxdiff.models.vae.AutoencoderKL: encode (a DiagonalGaussian of zero spread,
    so a posterior sample is the latents themselves) and decode."""
    config: TinyVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = TinyEncoder(self.config, **kw)
        self.decoder = TinyDecoder(self.config, **kw)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """images [B, H, W, 3] in [-1, 1] -> latents as a zero-spread posterior, [B, H/f, W/f, C]."""
        x = self.encoder((images.astype(self.dtype) + 1) / 2)
        return DiagonalGaussian(mean=x, logvar=jnp.full_like(x, -jnp.inf))

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, h, w, C] (already in the UNet's latent space: scaling_factor 1) -> images [B, fh, fw, 3]."""
        return self.decoder(jnp.tanh(z.astype(self.dtype) / 3) * 3) * 2 - 1

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction (what `init` traces, creating every param)."""
        return self.decode(self.encode(images).mean)
