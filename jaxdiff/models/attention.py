"""Multi-head scaled dot-product attention: one entry point, several kernels behind it.

`attention(q, k, v, heads=...)` is what every model calls. Tensors are [B, L, heads * head_dim] — the
layout `to_q` / `to_k` / `to_v` produce — so callers never reshape. The kernel is picked by the
`implementation` string, which models carry as a static config field:

  "xla"   the reference: two einsums and a softmax. Materialises the [B, heads, Lq, Lk] scores, so
          it is memory-hungry at long sequences (64x64 latents = 4096 tokens). Every other kernel is
          tested against this one.

Planned, not written yet (asking for them raises): "cudnn" (fused flash attention on NVIDIA GPUs via
`jax.nn.dot_product_attention(implementation="cudnn")`), "splash" (TPU Pallas kernel) and "chunked"
(query/key blocks with an online softmax, for CPU and very long sequences). Add a kernel as a function
with the same signature as `_xla_attention` and register it in `_KERNELS`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool) -> jax.Array:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]. Plain XLA reference."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    # Scale q (Lq*D multiplies) rather than the scores (Lq*Lk); diffusers' SDPA path scales inside.
    q = q * jnp.asarray(scale, q.dtype)
    # Softmax in float32 for low-precision inputs: bf16 exp/sum over thousands of keys loses the
    # small weights. upcast=True (SD2's upcast_attention) also computes the scores in float32.
    low_precision = jnp.finfo(dtype).bits < 32
    if upcast:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    elif low_precision:
        # bf16 operands, float32 accumulation and scores: same speed on tensor cores, no rounding of
        # the scores to 8 mantissa bits before the exp.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    else:
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)             # [B, H, Lq, Lk]
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(dtype)


_KERNELS = {"xla": _xla_attention}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int, upcast: bool = False,
              implementation: str = "xla") -> jax.Array:
    """Multi-head attention softmax(q k^T / sqrt(head_dim)) v, no mask, no dropout.

    Args:
      q: [B, Lq, heads * head_dim] queries (already projected).
      k: [B, Lk, heads * head_dim] keys.
      v: [B, Lk, heads * head_dim] values.
      heads: number of heads; the last axis is split as (heads, head_dim), head-major, the same split
        diffusers' `attn.head_to_batch_dim` / SDPA reshape makes.
      upcast: compute scores and softmax in float32 (diffusers' `upcast_attention`, SD2). Inputs in
        bfloat16/float16 always get a float32 softmax.
      implementation: kernel name, one of IMPLEMENTATIONS.

    Returns:
      [B, Lq, heads * head_dim] in q's dtype, heads concatenated head-major (ready for `to_out_0`).
    """
    if implementation not in _KERNELS:
        raise ValueError(f"attention implementation {implementation!r} is not available "
                         f"(available: {', '.join(IMPLEMENTATIONS)})")
    b, lq, width = q.shape
    if width % heads:
        raise ValueError(f"attention: width {width} does not split into {heads} heads")
    d = width // heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads)
    if k.shape[-1] != width or v.shape[-1] != width:
        raise ValueError(f"attention: q/k/v widths differ: {q.shape}, {k.shape}, {v.shape}")
    out = _KERNELS[implementation](split(q), split(k), split(v), upcast=upcast)   # [B, Lq, H, D]
    return out.reshape(b, lq, heads * d)
