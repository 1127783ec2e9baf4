"""UNet2DConditionModel for SD 1.x / 2.x / SDXL / SDXL refiner / inpainting, NHWC, in Flax linen.

A port of diffusers' `UNet2DConditionModel` restricted to what those checkpoints use (UNetConfig refuses
the rest). Module names follow diffusers so a state dict converts by rule: `down_blocks.1.attentions.0.
transformer_blocks.0.attn1.to_q.weight` <-> `down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/
kernel`. The model is pure: `model.apply({"params": params}, sample, t, context, added_cond)`.

Data flow (channels c_i = block_out_channels[i], n levels):
  t -> sinusoid(c_0) -> time_embedding -> emb [B, 4 c_0] (+ class / text_time embeddings)
  sample [B,h,w,Cin] -> conv_in -> down_blocks_0..n-1 (resnets, transformers, stride-2 conv but last)
  -> mid_block (resnet, transformer, resnet) -> up_blocks_0..n-1 (each resnet eats one skip, concat on C;
  nearest x2 + conv but last) -> conv_norm_out -> silu -> conv_out -> [B,h,w,Cout]
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.configs import UNetConfig
from jaxdiff.models.layers import (
    Downsample2D, GroupNorm, ResnetBlock2D, TimestepEmbedding, Transformer2DModel, Upsample2D, conv2d,
    get_timestep_embedding)

Dtype = jnp.dtype


class _BlockArgs(nn.Module):
    """Fields shared by the three block kinds (kept in one place so blocks stay in step)."""
    config: UNetConfig
    level: int                      # index into the down-order per-level config tuples
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str = "auto"

    def _resnet(self, name: str, out_channels: int, scale: float = 1.0) -> ResnetBlock2D:
        c = self.config
        return ResnetBlock2D(out_channels=out_channels, groups=c.norm_num_groups, eps=c.norm_eps,
                             output_scale_factor=scale, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=name)

    def _transformer(self, name: str, num_layers: int) -> Transformer2DModel:
        c = self.config
        return Transformer2DModel(heads=c.heads_per_level[self.level], num_layers=num_layers,
                                  use_linear_projection=c.use_linear_projection,
                                  norm_num_groups=c.norm_num_groups, upcast=bool(c.upcast_attention),
                                  implementation=self.attention_implementation, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)


class DownBlock(_BlockArgs):
    """CrossAttnDownBlock2D (`cross_attention=True`) or DownBlock2D, at down level `level`."""
    cross_attention: bool = True
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x, temb, context):
        """x: [B, H, W, Cin] -> (x [B, H', W', C], skips: tuple of [B, *, *, C], one per resnet + downsampler)."""
        c = self.config
        out_channels = c.block_out_channels[self.level]
        skips = []
        for j in range(c.layers_per_level[self.level]):
            x = self._resnet(f"resnets_{j}", out_channels)(x, temb)
            if self.cross_attention:
                x = self._transformer(f"attentions_{j}", c.transformer_layers_per_level[self.level])(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(out_channels, padding=c.downsample_padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(_BlockArgs):
    """CrossAttnUpBlock2D or UpBlock2D. `level` is the DOWN-order level this block mirrors
    (up block i mirrors level n-1-i), so heads / layers / context dims read the same tuples."""
    cross_attention: bool = True
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        """x: [B, H, W, C']; skips: the last (layers + 1) down outputs, consumed from the end."""
        c = self.config
        out_channels = c.block_out_channels[self.level]
        skips = list(skips)
        for j in range(c.layers_per_level[self.level] + 1):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)   # torch.cat([h, skip], dim=1)
            x = self._resnet(f"resnets_{j}", out_channels)(x, temb)
            if self.cross_attention:
                x = self._transformer(f"attentions_{j}", c.transformer_layers_per_level[self.level])(x, context)
        if self.add_upsample:
            x = Upsample2D(out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="upsamplers_0")(x, upsample_size)
        return x


class MidBlock(_BlockArgs):
    """UNetMidBlock2DCrossAttn: resnet, transformer (transformer_layers of the last level), resnet."""

    @nn.compact
    def __call__(self, x, temb, context):
        c = self.config
        ch = c.block_out_channels[-1]
        x = self._resnet("resnets_0", ch, c.mid_block_scale_factor)(x, temb)
        x = self._transformer("attentions_0", c.transformer_layers_per_level[-1])(x, context)
        return self._resnet("resnets_1", ch, c.mid_block_scale_factor)(x, temb)


class UNetTrunk(nn.Module):
    """The UNet's first half, shared with ControlNet: time (+ class / text_time) embedding, conv_in, the
    down blocks and the mid block, with diffusers' module names (`time_embedding`, `add_embedding`,
    `conv_in`, `down_blocks_i`, `mid_block`), so a ControlNet made with diffusers' `from_unet` converts
    by the same naming rule. Subclasses call these methods from their `@nn.compact __call__`.

    Attributes:
      config: the architecture (UNetConfig).
      dtype: compute dtype (activations, matmuls); norms and sinusoids run in float32 regardless.
      param_dtype: dtype params are created in by `init` (converted checkpoints keep their own).
      attention_implementation: kernel name for models.attention.attention ("auto": per backend and shape).
      remat: recompute each down / mid / up block in the backward pass (gradient checkpointing):
        activation memory of one block instead of all, for ~1/3 more compute. Params are unchanged.
    """
    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_implementation: str = "auto"
    remat: bool = False

    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _blocks(self) -> dict:
        return dict(config=self.config, attention_implementation=self.attention_implementation, **self._kw())

    def _block_classes(self):
        # nn.remat keeps module names (and so param paths); upsample_size (arg 5 counting self) is static.
        if self.remat:
            return nn.remat(DownBlock), nn.remat(MidBlock), nn.remat(UpBlock, static_argnums=(5,))
        return DownBlock, MidBlock, UpBlock

    def embed(self, timesteps: jax.Array, added_cond: Mapping[str, jax.Array], b: int) -> jax.Array:
        """Timesteps [B] or [] (+ class labels / SDXL text_time) -> emb [B, time_embed_dim]."""
        c = self.config
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0 or timesteps.shape == (1,):
            timesteps = jnp.broadcast_to(timesteps.reshape(()), (b,))
        t_emb = get_timestep_embedding(timesteps, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                       downscale_freq_shift=c.freq_shift).astype(self.dtype)
        emb = TimestepEmbedding(c.time_embed_dim, cond_proj_dim=c.time_cond_proj_dim, name="time_embedding",
                                **self._kw())(t_emb, added_cond.get("timestep_cond"))
        class_emb = self._class_embedding(added_cond.get("class_labels"), b)
        if class_emb is not None:
            emb = emb + class_emb.astype(emb.dtype)
        if c.takes_text_time:
            emb = emb + self._text_time_embedding(added_cond, b).astype(emb.dtype)
        return emb

    def conv_in(self, x: jax.Array) -> jax.Array:
        """[B, h, w, in_channels] -> [B, h, w, c_0]."""
        c = self.config
        if c.center_input_sample:
            x = 2 * x - 1
        return conv2d(c.block_out_channels[0], 3, "conv_in", **self._kw())(x)

    def down(self, x: jax.Array, emb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """conv_in's output through the down blocks -> (x, skips): skips[0] is conv_in's output, then one
        per resnet and downsampler (diffusers' down_block_res_samples, in the same order)."""
        c = self.config
        down_cls = self._block_classes()[0]
        skips = [x]
        for i in range(c.levels):
            x, res = down_cls(level=i, cross_attention=c.has_cross_attention_down[i],
                              add_downsample=i < c.levels - 1, name=f"down_blocks_{i}",
                              **self._blocks())(x, emb, context)
            skips.extend(res)
        return x, skips

    def mid(self, x: jax.Array, emb: jax.Array, context: jax.Array) -> jax.Array:
        """The mid block (identity when the config has none)."""
        c = self.config
        if c.mid_block_type is None:
            return x
        return self._block_classes()[1](level=c.levels - 1, name="mid_block", **self._blocks())(x, emb, context)

    def _class_embedding(self, labels: Optional[jax.Array], b: int) -> Optional[jax.Array]:
        """diffusers' get_class_embed: [B] labels (or [B, D] vectors) -> [B, time_embed_dim], or None."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kind = c.class_embed_type
        if kind is None and c.num_class_embeds is None:
            return None
        if labels is None:
            raise ValueError("this UNet is class-conditioned: pass added_cond={'class_labels': ...}")
        if kind is None:
            return nn.Embed(c.num_class_embeds, c.time_embed_dim, param_dtype=self.param_dtype,
                            name="class_embedding")(labels.astype(jnp.int32)).astype(self.dtype)
        if kind == "timestep":
            labels = get_timestep_embedding(labels, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                            downscale_freq_shift=c.freq_shift)
            return TimestepEmbedding(c.time_embed_dim, name="class_embedding", **kw)(labels.astype(self.dtype))
        if kind == "identity":
            return labels
        if kind == "projection":
            return TimestepEmbedding(c.time_embed_dim, name="class_embedding", **kw)(labels.astype(self.dtype))
        # "simple_projection"
        return nn.Dense(c.time_embed_dim, name="class_embedding", **kw)(labels.astype(self.dtype))

    def _text_time_embedding(self, added_cond: Mapping[str, Any], b: int) -> jax.Array:
        """SDXL: add_embedding(concat(text_embeds, sinusoid(time_ids) flattened)) -> [B, time_embed_dim]."""
        c = self.config
        if "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError("SDXL-style UNet (addition_embed_type='text_time') needs "
                             "added_cond={'text_embeds': [B, D], 'time_ids': [B, n]}")
        text_embeds = added_cond["text_embeds"]
        time_ids = added_cond["time_ids"]
        n_ids = time_ids.shape[-1]
        width = text_embeds.shape[-1] + n_ids * c.addition_time_embed_dim
        if width != c.projection_class_embeddings_input_dim:
            raise ValueError(f"text_embeds {text_embeds.shape} + {n_ids} time ids x {c.addition_time_embed_dim} = "
                             f"{width} features; this UNet expects {c.projection_class_embeddings_input_dim}")
        t = get_timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim,
                                   flip_sin_to_cos=c.flip_sin_to_cos, downscale_freq_shift=c.freq_shift)
        t = t.reshape(b, n_ids * c.addition_time_embed_dim)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), t], axis=-1).astype(self.dtype)
        return TimestepEmbedding(c.time_embed_dim, name="add_embedding", dtype=self.dtype,
                                 param_dtype=self.param_dtype)(add)


class UNet2DConditionModel(UNetTrunk):
    """The conditional UNet. Pure: `apply({"params": p}, sample, timesteps, context, added_cond)`;
    fields as `UNetTrunk`'s."""

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 added_cond: Optional[Mapping[str, jax.Array]] = None, *,
                 down_residuals: Optional[Sequence[jax.Array]] = None,
                 mid_residual: Optional[jax.Array] = None) -> jax.Array:
        """Predict noise (or v, per the checkpoint) for a batch of latents.

        Args:
          sample: [B, h, w, in_channels] latents (inpainting: latents ++ mask ++ masked-image latents).
          timesteps: [B] or [] int or float timesteps (a scalar or [1] is used for the whole batch).
          encoder_hidden_states: [B, L, cross_attention_dim] text context.
          added_cond: SDXL: {"text_embeds": [B, 1280] pooled text, "time_ids": [B, 6] (refiner [B, 5])};
            class-conditioned configs: {"class_labels": [B] ints or [B, D] vectors}. None otherwise.
          down_residuals: ControlNet residuals added to the down blocks' skip outputs, one per skip
            (conv_in's output first; shapes as `down`'s skips) -- diffusers' down_block_additional_residuals.
          mid_residual: added to the mid block's output -- diffusers' mid_block_additional_residual.

        Returns:
          [B, h, w, out_channels] float32.
        """
        c = self.config
        added_cond = dict(added_cond or {})
        b = sample.shape[0]
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise ValueError(f"sample must be [B, h, w, {c.in_channels}] (NHWC), got {sample.shape}")

        emb = self.embed(timesteps, added_cond, b)
        context = encoder_hidden_states.astype(self.dtype)
        x, skips = self.down(self.conv_in(sample.astype(self.dtype)), emb, context)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals has {len(down_residuals)} arrays; this UNet has {len(skips)} "
                                 f"down outputs")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
        x = self.mid(x, emb, context)
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)

        # --- up: block i mirrors down level n-1-i ---
        up_cls = self._block_classes()[2]
        for i in range(c.levels):
            level = c.levels - 1 - i
            n = c.layers_per_level[level] + 1
            res, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size: x2 normally, and exactly diffusers' `upsample_size`
            # when h or w is not a multiple of 2 ** (levels - 1).
            size = tuple(skips[-1].shape[1:3]) if i < c.levels - 1 else None
            x = up_cls(level=level, cross_attention=c.has_cross_attention_up[i], add_upsample=i < c.levels - 1,
                       name=f"up_blocks_{i}", **self._blocks())(x, res, emb, context, size)

        x = GroupNorm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **self._kw())(x)
        x = conv2d(c.out_channels, 3, "conv_out", **self._kw())(nn.silu(x))
        return x.astype(jnp.float32)


def example_inputs(config: UNetConfig, *, batch: int = 1, height: Optional[int] = None,
                   width: Optional[int] = None, seq_len: int = 77, text_embeds_dim: Optional[int] = None):
    """Zero inputs of the right shapes for `init` / `jax.eval_shape`: (sample, t, context, added_cond).

    SDXL-style configs get `text_embeds` [B, text_embeds_dim] and as many time ids as make up
    projection_class_embeddings_input_dim (6 for SDXL base, 5 for the refiner). text_embeds_dim=None
    means 1280 (OpenCLIP-bigG's pooled width) when that fits the config, else whatever leaves 6 ids.
    """
    c = config
    size = c.sample_size if isinstance(c.sample_size, tuple) else (c.sample_size,) * 2
    h = height or size[0] or 2 ** c.levels
    w = width or size[1] or h
    sample = jnp.zeros((batch, h, w, c.in_channels), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    context = jnp.zeros((batch, seq_len, c.cross_attention_dims[0]), jnp.float32)
    added = {}
    if c.takes_text_time:
        total, per_id = c.projection_class_embeddings_input_dim, c.addition_time_embed_dim
        if text_embeds_dim is None:
            fits = total > 1280 and (total - 1280) % per_id == 0
            text_embeds_dim = 1280 if fits else total - 6 * per_id
        n_ids, rest = divmod(total - text_embeds_dim, per_id)
        if rest or n_ids < 1 or text_embeds_dim < 1:
            raise ValueError(f"text_embeds_dim={text_embeds_dim} does not fit projection_class_embeddings_input_dim="
                             f"{total} with {per_id} features per time id")
        added["text_embeds"] = jnp.zeros((batch, text_embeds_dim), jnp.float32)
        added["time_ids"] = jnp.zeros((batch, n_ids), jnp.float32)
    if c.time_cond_proj_dim is not None:
        added["timestep_cond"] = jnp.zeros((batch, c.time_cond_proj_dim), jnp.float32)
    if c.class_embed_type is not None or c.num_class_embeds is not None:
        if c.class_embed_type is None:
            added["class_labels"] = jnp.zeros((batch,), jnp.int32)
        elif c.class_embed_type == "timestep":
            added["class_labels"] = jnp.zeros((batch,), jnp.float32)
        elif c.class_embed_type == "identity":
            added["class_labels"] = jnp.zeros((batch, c.time_embed_dim), jnp.float32)
        else:
            added["class_labels"] = jnp.zeros((batch, c.projection_class_embeddings_input_dim), jnp.float32)
    return sample, t, context, (added or None)


def param_shapes(config: UNetConfig, param_dtype=jnp.float32) -> dict:
    """The params tree as jax.ShapeDtypeStruct (no compute, no memory): the converter's target."""
    model = UNet2DConditionModel(config, param_dtype=param_dtype)
    sample, t, context, added = example_inputs(config, height=2 ** config.levels, seq_len=1)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample, t, context, added)
    return shapes["params"]
