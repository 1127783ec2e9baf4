"""Text conditioning: prompts -> token ids on the host, ids -> UNet context inside the compiled program.

Host side, `tokenize_request` turns a request's prompts into fixed-shape int32 id arrays, one row per
generated image (prompt p's images are rows p*N .. p*N+N-1, as diffusers' `num_images_per_prompt`).
Device side, `encode` is a pure function of (params, ids) traced into the generation program, so text
encoding is compiled together with sampling and decoding.

What the UNet receives follows diffusers' pipelines exactly:

* SD1 / SD2 (one encoder): context = `last_hidden_state` [B, 77, D] (final LayerNorm applied). With
  `clip_skip = k >= 1`: `final_layer_norm(hidden_states[-(k + 1)])` (diffusers' clip_skip; k = 1 is A1111's
  "clip skip 2"). jaxdiff applies clip skip to the negative prompt too (A1111 and ComfyUI do; diffusers'
  SD pipelines encode the negative prompt without it, which only matters with guidance).
* SDXL (two encoders): context = concat(enc1.hidden_states[-2], enc2.hidden_states[-2]) [B, 77, D1 + D2],
  `clip_skip = k` takes hidden_states[-(k + 2)] instead (no final LayerNorm, as diffusers), and the pooled
  conditioning is encoder 2's projected `text_embeds` [B, P]. The refiner has only encoder 2.
  An absent negative prompt gives all-zero negative context and pooled embedding when the model asks
  for it (diffusers' `force_zeros_for_empty_prompt`, on for SDXL base).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError
from jaxdiff.models.clip import LayerNorm

ENCODERS = ("text_encoder", "text_encoder_2")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What `encode` needs to know about a pipeline's text encoders (static, hashable).

    Attributes:
      names: the encoders present, in concatenation order (a subset of ENCODERS).
      modules: their Flax modules.
      layer_norm_eps: each encoder's final LayerNorm epsilon (SD1/SD2 clip skip re-applies it).
      sdxl: SDXL rules (penultimate layers, pooled text_embeds from the last encoder).
    """
    names: tuple[str, ...]
    modules: tuple[Any, ...]
    layer_norm_eps: tuple[float, ...]
    sdxl: bool


def encoder_spec(pipe, dtype=None) -> EncoderSpec:
    """The EncoderSpec of a Pipeline: SDXL-style when the UNet takes pooled text + time ids.
    `dtype`: re-make the modules at this compute dtype (training's mixed precision); None keeps them."""
    names = tuple(n for n in ENCODERS if getattr(pipe, n) is not None)
    comps = [getattr(pipe, n) for n in names]
    modules = tuple(c.module if dtype is None else c.module.clone(dtype=dtype) for c in comps)
    return EncoderSpec(names=names, modules=modules,
                       layer_norm_eps=tuple(float(c.config.layer_norm_eps) for c in comps),
                       sdxl=pipe.family.text_time)


def as_prompt_list(prompt: str | Sequence[str], what: str = "prompt") -> list[str]:
    """A string or a list of strings -> a non-empty list of strings."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise JaxdiffError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def tokenize_request(pipe, prompt, negative_prompt, num_images_per_prompt: int) -> tuple[dict, dict | None, int]:
    """Token ids for every generated image.

    Args:
      prompt: a string or a list of P strings.
      negative_prompt: None, a string (used for every prompt) or a list of P strings.
      num_images_per_prompt: N images per prompt.

    Returns:
      (ids, negative_ids, P): ids maps each present encoder name to int32 [P * N, 77];
      negative_ids likewise, or None when `negative_prompt` is None (the caller decides between "" and
      zeros). Row r belongs to prompt r // N.
    """
    prompts = as_prompt_list(prompt)
    n_prompts = len(prompts)
    negatives = None
    if negative_prompt is not None:
        negatives = as_prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * n_prompts
        if len(negatives) != n_prompts:
            raise JaxdiffError(f"negative_prompt has {len(negatives)} entries but prompt has {n_prompts}; "
                               f"pass one negative prompt or one per prompt")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise JaxdiffError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")

    def ids_for(texts):
        out = {}
        for name in ENCODERS:
            if getattr(pipe, name) is None:
                continue
            tok = pipe.tokenizer if name == "text_encoder" else pipe.tokenizer_2
            out[name] = np.repeat(tok(texts), num_images_per_prompt, axis=0)  # [P * N, 77]
        return out

    return ids_for(prompts), (ids_for(negatives) if negatives is not None else None), n_prompts


def empty_ids(pipe, rows: int) -> dict[str, np.ndarray]:
    """Ids of the empty prompt "" for `rows` images (the default negative prompt)."""
    return tokenize_request(pipe, [""] * rows, None, 1)[0]


def encode(spec: EncoderSpec, params: Mapping[str, Any], ids: Mapping[str, jax.Array],
           clip_skip: int | None) -> tuple[jax.Array, jax.Array | None]:
    """Pure: ids -> (context [B, 77, D] float32, pooled [B, P] float32 or None). Traced inside jit.

    Args:
      spec: from `encoder_spec`.
      params: encoder name -> its params.
      ids: encoder name -> int32 [B, 77].
      clip_skip: None, or the number of final layers to skip (see the module docstring).
    """
    contexts, pooled = [], None
    for name, module, eps in zip(spec.names, spec.modules, spec.layer_norm_eps):
        out = module.apply({"params": params[name]}, ids[name])
        if spec.sdxl:
            h = out.hidden_states[-(clip_skip + 2)] if clip_skip else out.hidden_states[-2]
            pooled = out.text_embeds  # the last encoder's projected pooled output (diffusers keeps that one)
        elif clip_skip:
            ln = params[name]["text_model"]["final_layer_norm"]
            h = LayerNorm(epsilon=eps, dtype=jnp.float32).apply({"params": ln}, out.hidden_states[-(clip_skip + 1)])
        else:
            h = out.last_hidden_state
        contexts.append(h.astype(jnp.float32))
    context = contexts[0] if len(contexts) == 1 else jnp.concatenate(contexts, axis=-1)
    if spec.sdxl:
        if pooled is None:
            raise JaxdiffError("an SDXL-style UNet needs a projected text encoder (text_encoder_2)")
        pooled = pooled.astype(jnp.float32)
    return context, pooled


def check_clip_skip(pipe, clip_skip: int | None) -> int | None:
    """Validate clip_skip against the shallowest encoder; 0 and None both mean "no skip"."""
    if clip_skip is None or clip_skip == 0:
        return None
    layers = min(getattr(pipe, n).config.num_hidden_layers for n in ENCODERS if getattr(pipe, n) is not None)
    extra = 1 if pipe.family.text_time else 0
    if not isinstance(clip_skip, int) or not 0 < clip_skip + extra < layers:
        raise JaxdiffError(f"clip_skip={clip_skip!r} must be an integer in [0, {layers - 1 - extra}] "
                           f"for this model's {layers}-layer text encoder")
    return clip_skip
