"""Multi-head scaled dot-product attention: one entry point, several kernels behind it.

`attention(q, k, v, heads=...)` is what every model calls. Tensors are [B, L, heads * head_dim] — the
layout `to_q` / `to_k` / `to_v` produce — so callers never reshape. The kernel is picked by the
`implementation` string, which models carry as a static config field:

  "xla"      the reference: two einsums and a softmax. Materialises the [B, heads, Lq, Lk] scores, so
             it is memory-hungry at long sequences (64x64 latents = 4096 tokens: 2 GB at batch 2 x 8
             heads) and slow on CPU, where XLA runs each op over the whole score tensor in turn.
  "chunked"  query blocks (a `lax.map`) with the full softmax over the keys per block, or, when the
             keys are many, key blocks with an online (flash-style) softmax. Never builds more than
             one block of scores. On CPU it keeps the score block in cache: 2x faster than "xla" at
             4096 tokens (numbers at CPU_CHUNK_MIN_SCORES).
  "cudnn"    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention on
             NVIDIA GPUs. bf16/fp16 only, head_dim a multiple of 8 and <= 128 (<= 256 on Hopper);
             under differentiation even lengths only, so it pads odd ones (CLIP's 77) with a mask.
  "splash"   the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu`). Sequences are
             padded to its 128-row blocks (padded keys masked by segment ids), head_dim to 128 lanes.
  "auto"     `choose_implementation` of the above for the default backend, dtype and shapes.

Every kernel is tested against "xla" (tests/test_attention.py).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")

# CPU: "chunked" beats "xla" once the score matrix per (batch, head) is this large. Measured on the
# 2-core dev CPU, batch 2, 8 heads (min of 3, loaded machine): 4096^2 x 40: xla 6.5 s, chunked 3.2 s;
# 1024^2 x 80: 0.52 / 0.37 s; 512^2 x 40: 83 / 70 ms; 4096 x 77 keys: 117 / 109 ms; but 256^2 x 160:
# 18.5 / 33.6 ms, where the loop overhead outweighs what the blocks save.
CPU_CHUNK_MIN_SCORES = 512 * 512
# Elements of one block of scores: one head [q_chunk, Lk] 2^19 float32 = 2 MB, about a core's L2
# (measured best of 64 / 128 / 256 rows at 4096 keys); [B, H, q_chunk, k_chunk] 16 MB, in the L3.
_HEAD_BLOCK_ELEMENTS = 1 << 19
_BLOCK_ELEMENTS = 1 << 22
# Key blocks (online softmax) only past this many keys; below it one query block sees all keys.
_MAX_FULL_KEYS = 8192
_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# cuDNN's flash-attention limits as JAX checks them before it calls cuDNN (JAX 0.10-0.11,
# jax/_src/cudnn/fused_attention_stablehlo.py: `check_layout` and `check_is_flash_attention`):
# - q/k/v in bfloat16 or float16;
# - head_dim a multiple of 8 and <= 128 (<= 256 from Hopper, compute capability 9.0);
# - under differentiation (the forward-for-backward rule runs the check with is_training=True) with a
#   bias, both sequence lengths even. `jax.nn.dot_product_attention` always hands that rule a
#   placeholder bias (its `bias = _not_used`, a zeros(0) array that `bias is not None` counts), so every
#   differentiated cuDNN call needs even Lq and Lk. CLIP's 77 tokens are odd: issue 26's crash
#   ("Unsupported sequence length Q 4096, KV 77" in cross-attention under jax.grad).
# The cuDNN kernel below therefore pads odd lengths to CUDNN_TRAINING_PAD under differentiation and
# masks the padding through cuDNN's sequence lengths (PADDING mask); inference calls stay unpadded.
CUDNN_TRAINING_PAD = 64


def cudnn_flash_supported(dtype, q_len: int, k_len: int, head_dim: int, *, max_head_dim: int = 128,
                          training: bool = False) -> bool:
    """Whether JAX's cuDNN flash checks accept these shapes (a mirror of them; tests compare the two).

    training=True is the forward-for-backward rule under `jax.grad`, with JAX's placeholder bias.
    """
    if jnp.dtype(dtype) not in _LOW_PRECISION:
        return False
    if head_dim % 8 or head_dim > max_head_dim:
        return False
    return not (training and (q_len % 2 or k_len % 2))


def cudnn_training_lengths(q_len: int, k_len: int) -> tuple:
    """(Lq, Lk) the cuDNN kernel sends under differentiation: odd lengths rounded up to a multiple of
    CUDNN_TRAINING_PAD (77 -> 128: cuDNN works in 64/128-key tiles anyway), even ones as they are."""
    pad = lambda n: _round_up(n, CUDNN_TRAINING_PAD) if n % 2 else n
    return pad(q_len), pad(k_len)


def choose_implementation(backend: str, dtype, q_len: int, k_len: int, head_dim: int, *,
                          cudnn_max_head_dim: int = 128, splash_available: bool = True) -> str:
    """The kernel "auto" runs, as a pure function of what is known at trace time.

    "auto" never picks a kernel that the shape cannot run, forward or backward: whether a call will
    be differentiated is not known when a model is traced for its forward, so cuDNN is picked only
    when both its inference shapes and its training shapes (`cudnn_training_lengths`, which the kernel
    switches to by itself under `jax.grad`) pass `cudnn_flash_supported`.

    Args:
      backend: `jax.default_backend()`: "cpu", "gpu" (or "cuda" / "rocm"), "tpu".
      dtype: compute dtype of q/k/v.
      q_len, k_len: sequence lengths.
      head_dim: per-head width.
      cudnn_max_head_dim: the largest head_dim cuDNN's flash kernel takes on this GPU (128; 256 on
        Hopper and later, which `attention` detects).
      splash_available: whether the installed JAX has the Pallas TPU splash kernel.

    Returns:
      one of "xla", "chunked", "cudnn", "splash".
    """
    dtype = jnp.dtype(dtype)
    if backend in ("gpu", "cuda"):
        # cuDNN's fused kernel has no float32 path; float32 and odd head widths go to XLA (cuBLAS).
        check = functools.partial(cudnn_flash_supported, dtype, head_dim=head_dim,
                                  max_head_dim=cudnn_max_head_dim)
        ok = check(q_len, k_len, training=False) and check(*cudnn_training_lengths(q_len, k_len),
                                                           training=True)
        return "cudnn" if ok else "xla"
    if backend == "tpu":
        # Short sequences (CLIP's 77, cross-attention on small latents) are cheaper as two einsums than
        # padded to the kernel's 128-row blocks.
        return "splash" if splash_available and q_len >= 512 and k_len >= 128 else "xla"
    if backend == "cpu" and q_len * k_len >= CPU_CHUNK_MIN_SCORES:
        return "chunked"
    return "xla"


def _scale_queries(q: jax.Array) -> jax.Array:
    # Scale q (Lq*D multiplies) rather than the scores (Lq*Lk); diffusers' SDPA path scales inside.
    return q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)


def _scores(q: jax.Array, k: jax.Array, spec: str, upcast: bool) -> jax.Array:
    """q . k in float32 whatever the inputs: bf16 exp/sum over thousands of keys loses the small
    weights. upcast=True (SD2's upcast_attention) also takes the products from float32 operands."""
    if upcast:
        return jnp.einsum(spec, q.astype(jnp.float32), k.astype(jnp.float32))
    if q.dtype != jnp.float32:
        # bf16 operands, float32 accumulation: same speed on tensor cores, no 8-bit-mantissa scores.
        return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)
    return jnp.einsum(spec, q, k)


def _causal_mask(q_start, q_len: int, k_start, k_len: int) -> jax.Array:
    """[q_len, k_len] bool: key j visible to query i iff j <= i (top-left aligned, torch's is_causal)."""
    qi = q_start + lax.broadcasted_iota(jnp.int32, (q_len, k_len), 0)
    kj = k_start + lax.broadcasted_iota(jnp.int32, (q_len, k_len), 1)
    return kj <= qi


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool, causal: bool) -> jax.Array:
    """q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]. Plain XLA reference."""
    scores = _scores(_scale_queries(q), k, "bqhd,bkhd->bhqk", upcast)   # [B, H, Lq, Lk] float32
    if causal:
        # Every row keeps key 0, so no row is fully masked and the softmax never sees only -inf.
        mask = _causal_mask(0, q.shape[1], 0, k.shape[1])
        scores = jnp.where(mask[None, None], scores, jnp.asarray(-jnp.inf, jnp.float32))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """[B, L, H, D] -> [n, B, H, size, D], zero-padding L up to n * size."""
    b, length, h, d = x.shape
    n = -(-length // size)
    x = jnp.pad(x, ((0, 0), (0, n * size - length), (0, 0), (0, 0)))
    return x.reshape(b, n, size, h, d).transpose(1, 0, 3, 2, 4)


def _pick_chunks(b: int, h: int, lq: int, lk: int, q_chunk: Optional[int], k_chunk: Optional[int]):
    """Block sizes: keys whole up to _MAX_FULL_KEYS (one-head [cq, Lk] tiles of _HEAD_BLOCK_ELEMENTS),
    else key blocks of 2048 with [B, H, cq, ck] tiles of _BLOCK_ELEMENTS. q_chunk is a power of two."""
    if k_chunk is None:
        k_chunk = lk if lk <= _MAX_FULL_KEYS else 2048
    if q_chunk is None:
        rows = (_HEAD_BLOCK_ELEMENTS // lk) if k_chunk >= lk else _BLOCK_ELEMENTS // (b * h * k_chunk)
        q_chunk = max(16, min(1024, 1 << max(0, rows.bit_length() - 1)))
    return min(q_chunk, lq), min(k_chunk, lk)


def _chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool, causal: bool,
                       q_chunk: Optional[int] = None, k_chunk: Optional[int] = None) -> jax.Array:
    """Blockwise attention: at most one block of scores exists at a time, never [B, H, Lq, Lk].

    q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]. One key block (k_chunk >= Lk): a loop over
    heads and query blocks, each [q_chunk, Lk] block a plain softmax over all keys. Several key blocks:
    [B, H, q_chunk, k_chunk] blocks, online softmax (running max m, running sum l, rescaled
    accumulator), as flash attention. Queries and keys are zero-padded to whole blocks;
    padded keys are masked, padded query rows are dropped.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    q_chunk, k_chunk = _pick_chunks(b, h, lq, lk, q_chunk, k_chunk)
    nq = -(-lq // q_chunk)
    starts = jnp.arange(nq, dtype=jnp.int32) * q_chunk

    if k_chunk >= lk:
        # One head per tile: a [cq, Lk] block of scores (2 MB at 4096 keys) stays in a core's L2 cache
        # through max, exp, sum and the product with V. Measured on CPU at 4096 tokens, 8 x 40: 30% less
        # CPU time than [B, H, cq, Lk] tiles (the loop over heads costs less than the cache misses).
        heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)   # [BH, L, D]
        qh = heads_first(_scale_queries(q))
        qh = jnp.pad(qh, ((0, 0), (0, nq * q_chunk - lq), (0, 0))).reshape(b * h, nq, q_chunk, d)
        kh, vh = heads_first(k), heads_first(v)

        def head(args):
            q_blocks, k1, v1 = args                              # [nq, cq, D], [Lk, D], [Lk, D]

            def q_block(xs):
                qc, q0 = xs
                s = _scores(qc, k1, "qd,kd->qk", upcast)         # [cq, Lk] float32
                if causal:
                    s = jnp.where(_causal_mask(q0, q_chunk, 0, lk), s, jnp.float32(-jnp.inf))
                # Softmax with the normalisation deferred to the [cq, D] output: one pass fewer over
                # the block than jax.nn.softmax (measured 1.7x faster on CPU at 4096 keys).
                p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
                o = jnp.einsum("qk,kd->qd", p.astype(v1.dtype), v1, preferred_element_type=jnp.float32)
                return o / jnp.sum(p, axis=-1, keepdims=True)

            return lax.map(q_block, (q_blocks, starts))          # [nq, cq, D]

        out = lax.map(head, (qh, kh, vh))                         # [BH, nq, cq, D] float32
        out = out.reshape(b, h, nq * q_chunk, d)[:, :, :lq].transpose(0, 2, 1, 3)
        return out.astype(q.dtype)
    # Several key blocks: [B, H, cq, ck] tiles, online softmax over the key blocks.
    qb = _blocks(_scale_queries(q), q_chunk)                          # [nq, B, H, cq, D]
    kb, vb = _blocks(k, k_chunk), _blocks(v, k_chunk)                # [nk, B, H, ck, D]
    k_starts = jnp.arange(kb.shape[0], dtype=jnp.int32) * k_chunk
    # A finite "minus infinity": a block masked for a whole row then gives exp(0) = 1 garbage that
    # the next real block's rescale exp(min - m) = 0 wipes out; -inf would give NaN (inf - inf).
    neg = jnp.float32(jnp.finfo(jnp.float32).min)

    def q_block(args):
        qc, q0 = args

        def k_block(carry, xs):
            m, l, acc = carry                  # [B, H, cq, 1], [B, H, cq, 1], [B, H, cq, D] float32
            kc, vc, k0 = xs
            s = _scores(qc, kc, "bhqd,bhkd->bhqk", upcast)        # [B, H, cq, ck] float32
            mask = k0 + lax.broadcasted_iota(jnp.int32, (q_chunk, k_chunk), 1) < lk
            if causal:
                mask = mask & _causal_mask(q0, q_chunk, k0, k_chunk)
            s = jnp.where(mask[None, None], s, neg)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
            p = jnp.exp(s - m_new)
            alpha = jnp.exp(m - m_new)
            l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
            return (m_new, l, alpha * acc + pv), None

        init = (jnp.full((b, h, q_chunk, 1), neg), jnp.zeros((b, h, q_chunk, 1), jnp.float32),
                jnp.zeros((b, h, q_chunk, d), jnp.float32))
        (_, l, acc), _ = lax.scan(k_block, init, (kb, vb, k_starts))
        return acc / l

    out = lax.map(q_block, (qb, starts))                              # [nq, B, H, cq, D] float32
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * q_chunk, h, d)[:, :lq]
    return out.astype(q.dtype)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool, causal: bool,
                    implementation: str = "cudnn") -> jax.Array:
    """cuDNN fused attention; [B, L, H, D] is its BTNH layout. It accumulates q.k and takes the softmax
    in float32 internally, which is what `upcast` asks for.

    Inference runs the call as it is. Under differentiation the forward-for-backward rule of
    `_cudnn_differentiable` runs instead, on odd lengths padded (see CUDNN_TRAINING_PAD): a custom
    VJP is how JAX tells a kernel, at trace time, that it is being differentiated. Forward-mode
    (`jax.jvp`) is not supported through it. `implementation="xla"` runs the same calls through
    `jax.nn.dot_product_attention`'s XLA path (how the padding is tested on CPU).
    """
    del upcast
    return _cudnn_differentiable(q, k, v, causal, implementation)


def _cudnn_call(q, k, v, causal: bool, implementation: str, q_len=None, k_len=None):
    """One `jax.nn.dot_product_attention`; q_len / k_len: real lengths of zero-padded q / k, v."""
    lengths = {}
    if q_len is not None:
        b = q.shape[0]
        lengths = dict(query_seq_lengths=jnp.full((b,), q_len, jnp.int32),
                       key_value_seq_lengths=jnp.full((b,), k_len, jnp.int32))
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation,
                                        **lengths)


def _cudnn_padded(q, k, v, causal: bool, implementation: str):
    """The differentiated call: odd lengths zero-padded, padding masked by sequence lengths, padded
    query rows dropped. [B, Lq, H, D], [B, Lk, H, D] x2 -> [B, Lq, H, D]."""
    lq, lk = q.shape[1], k.shape[1]
    lq_p, lk_p = cudnn_training_lengths(lq, lk)
    if (lq_p, lk_p) == (lq, lk):
        return _cudnn_call(q, k, v, causal, implementation)
    rows = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    out = _cudnn_call(rows(q, lq_p), rows(k, lk_p), rows(v, lk_p), causal, implementation, lq, lk)
    return out[:, :lq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _cudnn_differentiable(q, k, v, causal: bool, implementation: str):
    return _cudnn_call(q, k, v, causal, implementation)


def _cudnn_differentiable_fwd(q, k, v, causal: bool, implementation: str):
    # The pullback (a pytree of residual arrays) is the residual.
    return jax.vjp(functools.partial(_cudnn_padded, causal=causal, implementation=implementation),
                   q, k, v)


def _cudnn_differentiable_bwd(causal: bool, implementation: str, pullback, g):
    del causal, implementation
    return pullback(g)


_cudnn_differentiable.defvjp(_cudnn_differentiable_fwd, _cudnn_differentiable_bwd)


def _ambient_batch_axes(batch: int):
    """(mesh, axis names) to split a batch of `batch` rows over: every axis of the ambient mesh
    (`jax.set_mesh`; jaxdiff's meshes split batches over all their axes, ("data", "fsdp")), or
    (None, ()) without a mesh or when the rows do not divide evenly (then the plain call runs)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batch % mesh.size:
        return None, ()
    return mesh, tuple(mesh.axis_names)


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool, causal: bool,
                      interpret: bool = False) -> jax.Array:
    """Pallas TPU splash attention, per device under the ambient mesh.

    A Pallas kernel is one device's program: XLA cannot partition it, so under a mesh the call is
    wrapped in `jax.shard_map` with the batch split over the mesh axes and the heads whole on each
    device; without a mesh it is the plain call. Models never see the mesh. `interpret=True` runs
    the kernel in the Pallas interpreter (any backend), which is how the padding, masking and
    sharding here are tested without a TPU.
    """
    mesh, axes = _ambient_batch_axes(q.shape[0])
    local = functools.partial(_splash_local, upcast=upcast, causal=causal, interpret=interpret)
    if mesh is None:
        return local(q, k, v)
    spec = jax.sharding.PartitionSpec(axes)
    # check_vma=False: pallas_call's outputs carry no varying-manual-axes type to check.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool, causal: bool,
                  interpret: bool) -> jax.Array:
    """The splash kernel on one device's rows: [B, Lq, H, D], [B, Lk, H, D] x2 -> [B, Lq, H, D]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    del upcast   # the kernel accumulates scores and softmax in float32
    b, lq, h, d = q.shape
    lk = k.shape[1]
    block = 512 if min(lq, lk) >= 2048 else 128
    lq_p, lk_p, d_p = _round_up(lq, block), _round_up(lk, block), _round_up(d, 128)

    def prep(x: jax.Array, length: int) -> jax.Array:
        # [B, L, H, D] -> [B, H, L_pad, D_pad]; zero head-dim padding adds 0 to every q.k and its
        # outputs are sliced off; padded keys are masked below, padded queries dropped.
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_p - d)))
        return x.transpose(0, 2, 1, 3)

    qp, kp, vp = prep(_scale_queries(q), lq_p), prep(k, lk_p), prep(v, lk_p)
    mask_cls = sa.CausalMask if causal else sa.FullMask
    mask = sa.MultiHeadMask([mask_cls((lq_p, lk_p)) for _ in range(h)])
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
    segments = None
    if lk_p != lk:
        # Padded keys get segment 1, every query segment 0: each query row keeps its real keys.
        segments = sa.SegmentIds(q=jnp.zeros((lq_p,), jnp.int32),
                                 kv=(jnp.arange(lk_p) >= lk).astype(jnp.int32))
    out = jax.vmap(lambda a, b_, c: kernel(a, b_, c, segment_ids=segments))(qp, kp, vp)  # [B, H, Lq_p, D_p]
    return out.transpose(0, 2, 1, 3)[:, :lq, :, :d].astype(q.dtype)


_KERNELS = {"xla": _xla_attention, "chunked": _chunked_attention, "cudnn": _cudnn_attention,
            "splash": _splash_attention}


@functools.lru_cache(maxsize=None)
def _splash_importable() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _cudnn_max_head_dim() -> int:
    """256 on Hopper (compute capability 9.0) and later, 128 before, as JAX's cuDNN check allows."""
    try:
        major = int(str(jax.devices()[0].compute_capability).split(".")[0])
    except (AttributeError, ValueError, RuntimeError):
        return 128
    return 256 if major >= 9 else 128


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int, upcast: bool = False,
              implementation: str = "auto", causal: bool = False) -> jax.Array:
    """Multi-head attention softmax(q k^T / sqrt(head_dim)) v, no dropout.

    Args:
      q: [B, Lq, heads * head_dim] queries (already projected).
      k: [B, Lk, heads * head_dim] keys.
      v: [B, Lk, heads * head_dim] values.
      heads: number of heads; the last axis is split as (heads, head_dim), head-major, the same split
        diffusers' `attn.head_to_batch_dim` / SDPA reshape makes.
      upcast: compute scores and softmax in float32 (diffusers' `upcast_attention`, SD2). Inputs in
        bfloat16/float16 always get a float32 softmax.
      implementation: kernel name, one of IMPLEMENTATIONS ("auto" picks per backend and shape).
      causal: query i sees keys j <= i only (CLIP's text transformer).

    Returns:
      [B, Lq, heads * head_dim] in q's dtype, heads concatenated head-major (ready for `to_out_0`).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not available "
                         f"(available: {', '.join(IMPLEMENTATIONS)})")
    b, lq, width = q.shape
    if width % heads:
        raise ValueError(f"attention: width {width} does not split into {heads} heads")
    if k.shape[-1] != width or v.shape[-1] != width or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"attention: q/k/v shapes do not match: {q.shape}, {k.shape}, {v.shape}")
    d = width // heads
    if implementation == "auto":
        backend = jax.default_backend()
        implementation = choose_implementation(
            backend, q.dtype, lq, k.shape[1], d,
            cudnn_max_head_dim=_cudnn_max_head_dim() if backend == "gpu" else 128,
            splash_available=backend == "tpu" and _splash_importable())
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d)
    out = _KERNELS[implementation](split(q), split(k), split(v), upcast=upcast, causal=causal)  # [B, Lq, H, D]
    return out.reshape(b, lq, heads * d)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, heads: int, upcast: bool = False,
                      causal: bool = False, q_chunk: Optional[int] = None,
                      k_chunk: Optional[int] = None) -> jax.Array:
    """The "chunked" kernel with explicit block sizes (tests and tuning); shapes as `attention`.

    k_chunk < Lk selects the online-softmax key loop; None picks sizes as "auto" would.
    """
    b, lq, width = q.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, width // heads)
    out = _chunked_attention(split(q), split(k), split(v), upcast=upcast, causal=causal,
                             q_chunk=q_chunk, k_chunk=k_chunk)
    return out.reshape(b, lq, width)
