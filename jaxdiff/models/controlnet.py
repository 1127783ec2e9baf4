"""ControlNetModel (Zhang et al. 2023) for SD 1.x / 2.x / SDXL, NHWC, sharing the UNet's trunk code.

A port of diffusers' `ControlNetModel` (diffusers/models/controlnets/controlnet.py). It is the UNet's
first half (`UNetTrunk`: embedding, conv_in, down blocks, mid block, with the same module names) plus:

  controlnet_cond [B, H, W, Cc] in [0, 1] (image space, H = 8 h)
    -> controlnet_cond_embedding: conv_in, silu, (conv, silu, stride-2 conv, silu) per extra level, conv_out
    -> added to conv_in(sample) [B, h, w, c_0]
  every down output (conv_in's first; diffusers' down_block_res_samples) -> 1x1 conv controlnet_down_blocks_i
  the mid block's output -> 1x1 conv controlnet_mid_block
  -> each residual * conditioning_scale (guess mode: * 10 ** linspace(-1, 0, n + 1)[i] * scale)
  -> global_pool_conditions: spatial mean (shuffle-style ControlNets)

The result feeds `UNet2DConditionModel(..., down_residuals=, mid_residual=)`. Param paths follow
diffusers' module names, so `convert.diffusers_layout` converts a ControlNet folder by the same rule.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.config_parsing import freeze
from jaxdiff.errors import ConfigError
from jaxdiff.models.configs import UNetConfig
from jaxdiff.models.layers import conv2d
from jaxdiff.models.unet import UNetTrunk

_MIRROR = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
# ControlNet config.json keys that are not UNet keys (diffusers ControlNetModel.__init__).
_CONTROLNET_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
                    "controlnet_conditioning_channel_order")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlNetConfig(UNetConfig):
    """diffusers' ControlNetModel config: the UNet trunk's fields (UNetConfig; the up-block fields are
    derived, a ControlNet has no up half) plus the control-image encoder.

    conditioning_channels: channels of the control image (3 RGB; 1 for some depth / mask models).
    conditioning_embedding_out_channels: widths of the control-image encoder's levels; each level after
      the first halves the resolution, so len - 1 must equal log2(the VAE factor) (3 for SD: 8x).
    global_pool_conditions: residuals are spatially averaged (the shuffle ControlNet).
    controlnet_conditioning_channel_order: "rgb", or "bgr" (the control image's channels are reversed).
    """
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    controlnet_conditioning_channel_order: str = "rgb"

    def __post_init__(self):
        # Not used by ControlNetModel; set to the mirror of the down half so UNetConfig's checks hold.
        object.__setattr__(self, "up_block_types", tuple(_MIRROR.get(t, t) for t in reversed(self.down_block_types)))
        object.__setattr__(self, "out_channels", self.in_channels)
        super().__post_init__()
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order={self.controlnet_conditioning_channel_order!r} "
                             f"must be 'rgb' or 'bgr'")
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels must not be empty")

    @property
    def image_factor(self) -> int:
        """Control-image pixels per latent pixel (8 for the stock (16, 32, 96, 256) encoder)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str) -> "ControlNetConfig":
        """Parse a diffusers ControlNetModel config.json: the trunk keys strictly as a UNet's, then the
        control keys."""
        raw = dict(raw)
        extra = {k: freeze(raw.pop(k)) for k in _CONTROLNET_KEYS if k in raw}
        if "conditioning_embedding_out_channels" in extra and extra["conditioning_embedding_out_channels"] is None:
            raise ConfigError(f"{source}: conditioning_embedding_out_channels=null is not a ControlNet "
                              f"diffusers can run either")
        for key in ("up_block_types", "out_channels", "center_input_sample", "time_embedding_dim"):
            if key in raw:
                raise ConfigError(f"{source}: unknown config key {key!r} for a ControlNetModel")
        raw["up_block_types"] = [_MIRROR.get(t, t) for t in reversed(raw.get("down_block_types", cls.down_block_types))]
        trunk = UNetConfig.from_dict(raw, source)
        fields = {f.name: getattr(trunk, f.name) for f in dataclasses.fields(UNetConfig)}
        try:
            return cls(**fields, **extra)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_unet(cls, unet: UNetConfig, **control) -> "ControlNetConfig":
        """The ControlNet diffusers' `ControlNetModel.from_unet` makes for this UNet (its trunk config)."""
        fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
        fields.update(in_channels=unet.in_channels, center_input_sample=False, time_embedding_dim=None)
        return cls(**fields, **control)


class ControlNetConditioningEmbedding(nn.Module):
    """The control-image encoder: [B, H, W, Cc] -> [B, H / 2**(n-1), W / 2**(n-1), out_channels]."""
    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.silu(conv2d(self.block_out_channels[0], 3, "conv_in", **kw)(x))
        for i, (c_in, c_out) in enumerate(zip(self.block_out_channels[:-1], self.block_out_channels[1:])):
            x = nn.silu(conv2d(c_in, 3, f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(conv2d(c_out, 3, f"blocks_{2 * i + 1}", stride=2, **kw)(x))
        return conv2d(self.out_channels, 3, "conv_out", **kw)(x)


def guess_mode_scales(n_down: int) -> jax.Array:
    """diffusers' guess-mode weights: torch.logspace(-1, 0, n_down + 1), 0.1 for conv_in's residual up
    to 1.0 for the mid block's. float32 [n_down + 1]."""
    return jnp.logspace(-1.0, 0.0, n_down + 1, dtype=jnp.float32)


class ControlNetModel(UNetTrunk):
    """Pure: `apply({"params": p}, sample, t, context, controlnet_cond, conditioning_scale, added_cond)`."""
    config: ControlNetConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 controlnet_cond: jax.Array, conditioning_scale: Any = 1.0,
                 added_cond: Optional[Mapping[str, jax.Array]] = None, *,
                 guess_mode: bool = False) -> tuple[list[jax.Array], jax.Array]:
        """The residuals for the UNet.

        Args:
          sample: [B, h, w, in_channels] latents (as the UNet gets them).
          timesteps: [B] or [] timesteps.
          encoder_hidden_states: [B, L, cross_attention_dim].
          controlnet_cond: [B, H, W, conditioning_channels] control image in [0, 1], H = image_factor * h.
          conditioning_scale: a scalar or float32 [B] (per row: 0 switches a row's residuals off).
          added_cond: SDXL {"text_embeds", "time_ids"} or class labels, as the UNet's.
          guess_mode: diffusers' guess mode weights (static).

        Returns:
          (down_residuals: one [B, h_i, w_i, c_i] per down output, mid_residual [B, h_n, w_n, c_n]);
          float32; [B, 1, 1, c] each with global_pool_conditions.
        """
        c = self.config
        b = sample.shape[0]
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[-1] != c.conditioning_channels:
            raise ValueError(f"controlnet_cond must be [B, H, W, {c.conditioning_channels}] (NHWC), "
                             f"got {controlnet_cond.shape}")
        if c.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        emb = self.embed(timesteps, dict(added_cond or {}), b)
        context = encoder_hidden_states.astype(self.dtype)
        x = self.conv_in(sample.astype(self.dtype))
        x = x + ControlNetConditioningEmbedding(c.block_out_channels[0], c.conditioning_embedding_out_channels,
                                                name="controlnet_cond_embedding", **self._kw())(
            controlnet_cond.astype(self.dtype))
        x, skips = self.down(x, emb, context)
        x = self.mid(x, emb, context)

        down = [conv2d(s.shape[-1], 1, f"controlnet_down_blocks_{i}", **self._kw())(s) for i, s in enumerate(skips)]
        mid = conv2d(x.shape[-1], 1, "controlnet_mid_block", **self._kw())(x)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        scale = scale.reshape((-1, 1, 1, 1)) if scale.ndim == 1 else scale
        if guess_mode and not c.global_pool_conditions:
            w = guess_mode_scales(len(down))
            down = [r.astype(jnp.float32) * (w[i] * scale) for i, r in enumerate(down)]
            mid = mid.astype(jnp.float32) * (w[-1] * scale)
        else:
            down = [r.astype(jnp.float32) * scale for r in down]
            mid = mid.astype(jnp.float32) * scale
        if c.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid


def example_inputs(config: ControlNetConfig, *, batch: int = 1, height: int = 8, width: int = 8, seq_len: int = 4):
    """Zero inputs for init / eval_shape: (sample, t, context, controlnet_cond, scale, added_cond)."""
    from jaxdiff.models.unet import example_inputs as unet_inputs
    sample, t, context, added = unet_inputs(config, batch=batch, height=height, width=width, seq_len=seq_len)
    f = config.image_factor
    cond = jnp.zeros((batch, f * height, f * width, config.conditioning_channels), jnp.float32)
    return sample, t, context, cond, jnp.ones((), jnp.float32), added
