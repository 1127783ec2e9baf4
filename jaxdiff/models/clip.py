"""CLIP text transformer: CLIP-L (SD1), OpenCLIP-H (SD2), OpenCLIP-bigG with projection (SDXL).

    input_ids [B, L] int32 (L <= 77) --> CLIPTextOutput
        last_hidden_state [B, L, D]   final-LayerNormed output of the last layer (SD1's context)
        hidden_states     tuple of num_hidden_layers + 1 arrays [B, L, D], transformers' order: the
                          embeddings first, then each layer's output without the final LayerNorm, so
                          hidden_states[-2] is the penultimate layer (SD2 / SDXL context, "clip skip")
        pooled            [B, D] final-normed state at the end-of-text token
        text_embeds       [B, projection_dim] = pooled @ text_projection (SDXL's pooled conditioning),
                          or None when the config has no projection

Module tree (transformers' CLIPTextModelWithProjection state dict, `.i` -> `_i`):

    text_model/embeddings/{token_embedding, position_embedding}/embedding
    text_model/encoder/layers_i/{layer_norm1, self_attn/{q,k,v,out}_proj, layer_norm2, mlp/{fc1, fc2}}
    text_model/final_layer_norm
    text_projection/kernel                      (no bias; only when config.with_projection)

transformers >= 5 saves a plain CLIPTextModel without the `text_model.` prefix; `canonical_torch_keys`
puts it back so both generations of files map onto this tree. Usage:

    model = CLIPTextModel(CLIPTextConfig.clip_l())
    out = model.apply({"params": params}, ids)
"""
from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import attention
from jaxdiff.models.configs import CLIPTextConfig
# float32 statistics with torch's two-pass variance: bf16 statistics of CLIP's residual stream are far off.
from jaxdiff.models.layers import LayerNorm

Dtype = jnp.dtype

# Source tensors that are buffers, not params: transformers < 4.31 saved `position_ids` (arange(77)).
IGNORED_TORCH_KEYS = ("*.position_ids",)


@flax.struct.dataclass
class CLIPTextOutput:
    """What the text encoder returns; a pytree, so it passes through jit."""
    last_hidden_state: jax.Array            # [B, L, D] after final_layer_norm
    hidden_states: tuple[jax.Array, ...]    # (layers + 1) x [B, L, D]: embeddings first, no final norm
    pooled: jax.Array                       # [B, D] last_hidden_state at the end-of-text position
    text_embeds: Optional[jax.Array]        # [B, projection_dim], or None without text_projection


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":  # OpenAI CLIP's sigmoid approximation of GELU
        return x * jax.nn.sigmoid(x * jnp.asarray(1.702, x.dtype))
    if name == "gelu":        # exact (erf) GELU, as torch.nn.functional.gelu
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unsupported hidden_act {name!r}")


def _layer_norm(config: CLIPTextConfig, name: str, dtype: Dtype, param_dtype: Dtype) -> LayerNorm:
    return LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


class CLIPAttention(nn.Module):
    """Causal self-attention with biased q/k/v/out projections. [B, L, D] -> [B, L, D]."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = self.config.hidden_size
        dense = lambda name: nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)
        # CLIP's 77 tokens: "auto" runs the plain XLA kernel on CPU/TPU, cuDNN's on GPU in bf16.
        out = attention(q, k, v, heads=self.config.num_attention_heads, causal=True)
        return dense("out_proj")(out)


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2. [B, L, D] -> [B, L, D]."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.config.intermediate_size, name="fc1", **kw)(x)
        x = _activation(self.config.hidden_act, x)
        return nn.Dense(self.config.hidden_size, name="fc2", **kw)(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x)). [B, L, D] -> [B, L, D]."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + CLIPAttention(self.config, name="self_attn", **kw)(
            _layer_norm(self.config, "layer_norm1", **kw)(x))
        return x + CLIPMLP(self.config, name="mlp", **kw)(_layer_norm(self.config, "layer_norm2", **kw)(x))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding. ids [B, L] -> [B, L, D]."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding",
                             **kw)(jnp.arange(input_ids.shape[1], dtype=jnp.int32))   # [L, D]
        return tokens + positions[None]


class CLIPEncoder(nn.Module):
    """The stack of encoder layers. [B, L, D] -> every layer's output, num_hidden_layers x [B, L, D]."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        outputs = []
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"layers_{i}")(x)
            outputs.append(x)
        return tuple(outputs)


class CLIPTextTransformer(nn.Module):
    """transformers' `text_model`: embeddings, encoder layers, final LayerNorm, EOS pooling."""
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
        """ids [B, L] -> (last_hidden_state [B, L, D], hidden_states, pooled [B, D])."""
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPTextEmbeddings(cfg, name="embeddings", **kw)(input_ids)
        hidden_states = (x,) + CLIPEncoder(cfg, name="encoder", **kw)(x)
        last = _layer_norm(cfg, "final_layer_norm", **kw)(hidden_states[-1])
        return last, hidden_states, _pool(cfg, input_ids, last)


def _pool(config: CLIPTextConfig, input_ids: jax.Array, last: jax.Array) -> jax.Array:
    """last_hidden_state [B, L, D] at the end-of-text position of each row -> [B, D], as transformers 5."""
    if config.eos_token_id == 2:
        # Configs written before transformers PR #24773 (all SD releases) say eos_token_id=2; the rule
        # there is "the highest id", which is <|endoftext|> 49407 in the CLIP vocabulary.
        index = jnp.argmax(input_ids, axis=-1)
    else:
        # First occurrence: the pad token may equal the end token (SD1's tokenizer pads with it).
        index = jnp.argmax((input_ids == config.eos_token_id).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(last, index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel / CLIPTextModelWithProjection (config.with_projection).

    Attributes:
      config: the architecture.
      dtype: compute dtype (attention scores and softmax stay float32).
      param_dtype: storage dtype of the params.
    """
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> CLIPTextOutput:
        """input_ids: [B, L] integer token ids, L <= max_position_embeddings (77), padded as the
        tokenizer does. Returns CLIPTextOutput (see the module docstring)."""
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids must be [B, L<={cfg.max_position_embeddings}], "
                             f"got {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
        last, hidden_states, pooled = CLIPTextTransformer(
            cfg, dtype=self.dtype, param_dtype=self.param_dtype, name="text_model")(input_ids)
        text_embeds = None
        if cfg.with_projection:
            text_embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name="text_projection")(pooled)
        return CLIPTextOutput(last_hidden_state=last, hidden_states=hidden_states, pooled=pooled,
                              text_embeds=text_embeds)


def init_params(config: CLIPTextConfig, key: jax.Array, *, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32) -> dict:
    """Random params (the `params` collection, without the outer {"params": ...}) for `config`."""
    model = CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    return model.init(key, ids)["params"]


def param_shapes(config: CLIPTextConfig, *, param_dtype: Dtype = jnp.float32) -> dict:
    """The param tree as jax.ShapeDtypeStruct leaves, computed without allocating or running anything."""
    return jax.eval_shape(lambda k: init_params(config, k, param_dtype=param_dtype), jax.random.PRNGKey(0))


def canonical_torch_keys(tensors: Mapping[str, object]) -> dict[str, object]:
    """Puts a CLIP text encoder state dict under `text_model.`, where this module's params live.

    transformers < 5 (every released SD checkpoint) and CLIPTextModelWithProjection write
    `text_model.embeddings...`; transformers >= 5 writes a plain CLIPTextModel as `embeddings...`.
    Files already in the first form are returned unchanged. `text_projection.*` stays at the top.
    """
    if any(k.startswith("text_model.") for k in tensors):
        return dict(tensors)
    return {(k if k.startswith("text_projection.") else "text_model." + k): v for k, v in tensors.items()}
