"""Attention kernels vs the XLA reference, and the "auto" dispatch rule.

The reference ("xla") is itself checked against torch SDPA in tests/test_layers.py. Here every other
kernel must agree with it: float32 within 1e-5 of the output's scale, bf16 within a bf16 tolerance.
cuDNN and the real splash kernel need a GPU / TPU and skip elsewhere; the splash wrapper's padding,
masking and layout also run on CPU through the Pallas interpreter.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdiff.models import attention as attn_mod
from jaxdiff.models.attention import attention, choose_implementation, chunked_attention

BACKEND = jax.default_backend()


def _qkv(b, lq, lk, heads, dim, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, heads * dim)), dtype) for n in (lq, lk, lk))
    return q, k, v


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# (lq, lk, heads, dim, q_chunk, k_chunk, causal, upcast): lengths deliberately not multiples of the
# chunks; 77 keys is the CLIP context of cross-attention; k_chunk < lk runs the online-softmax loop.
CHUNKED_CASES = [
    (100, 100, 2, 8, 32, None, True, False),       # causal, one key block, padded last query block
    (100, 77, 4, 5, 16, None, False, True),        # cross-attention, upcast
    (100, 77, 4, 5, 32, 20, False, False),         # online softmax, padded last key block
    (45, 45, 2, 8, 16, 10, True, False),           # causal, online, blocks straddle the diagonal
    (300, 77, 2, 8, None, None, False, False),     # sizes as "auto" picks them
]


@pytest.mark.parametrize("lq,lk,heads,dim,q_chunk,k_chunk,causal,upcast", CHUNKED_CASES)
def test_chunked_matches_reference(lq, lk, heads, dim, q_chunk, k_chunk, causal, upcast):
    q, k, v = _qkv(2, lq, lk, heads, dim)
    want = attention(q, k, v, heads=heads, upcast=upcast, causal=causal, implementation="xla")
    got = jax.jit(lambda q, k, v: chunked_attention(q, k, v, heads=heads, upcast=upcast, causal=causal,
                                                    q_chunk=q_chunk, k_chunk=k_chunk))(q, k, v)
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert _rel_err(got, want) < 1e-5


def test_chunked_never_builds_the_full_score_matrix():
    """No array in the compiled program holds Lq x Lk scores: the biggest float buffer is one block."""
    lq = lk = 512
    q, k, v = _qkv(1, lq, lk, 2, 8)
    fn = jax.jit(lambda q, k, v: chunked_attention(q, k, v, heads=2, q_chunk=64, k_chunk=128))
    hlo = fn.lower(q, k, v).as_text()
    assert f"{lq}x{lk}" not in hlo.replace(",", "x")          # no [.., 512, 512] tensor
    assert "64x128" in hlo.replace(",", "x")                  # the [B, H, 64, 128] score block
    ref = jax.jit(lambda q, k, v: attention(q, k, v, heads=2, implementation="xla")).lower(q, k, v).as_text()
    assert f"{lq}x{lk}" in ref.replace(",", "x")              # ...which the reference does build


def test_chunked_bf16_close_to_float32():
    q, k, v = _qkv(1, 70, 70, 2, 16, seed=3)
    ref = attention(q, k, v, heads=2, implementation="xla")
    low = [q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)]
    for kw in (dict(q_chunk=32), dict(q_chunk=32, k_chunk=24)):
        got = jax.jit(lambda q, k, v: chunked_attention(q, k, v, heads=2, **kw))(*low)
        assert got.dtype == jnp.bfloat16
        # bf16 inputs carry ~3 significant digits, the float32 softmax keeps the output at that level.
        assert _rel_err(got, ref) < 2e-2
        # and it agrees with the bf16 reference more tightly than either with float32
        assert _rel_err(got, attention(*low, heads=2, implementation="xla")) < 1e-2


def test_auto_runs_the_chosen_kernel_and_matches():
    q, k, v = _qkv(1, 1024, 1024, 1, 8)   # 1024^2 scores: "chunked" on CPU
    want = attention(q, k, v, heads=1, implementation="xla")
    got = jax.jit(lambda q, k, v: attention(q, k, v, heads=1))(q, k, v)
    assert _rel_err(got, want) < 1e-5


def test_choose_implementation():
    f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
    # GPU: cuDNN for half precision and head widths its flash kernel takes, else XLA.
    assert choose_implementation("gpu", bf16, 4096, 4096, 40) == "cudnn"
    assert choose_implementation("gpu", f16, 4096, 77, 64) == "cudnn"
    assert choose_implementation("gpu", f32, 4096, 4096, 40) == "xla"
    assert choose_implementation("gpu", bf16, 64, 77, 160) == "xla"                  # > 128 pre-Hopper
    assert choose_implementation("gpu", bf16, 64, 77, 160, cudnn_max_head_dim=256) == "cudnn"
    assert choose_implementation("gpu", bf16, 4096, 4096, 64) == "cudnn"
    assert choose_implementation("gpu", bf16, 4096, 4096, 20) == "xla"               # not a multiple of 8
    # TPU: splash for long sequences when installed, XLA for short ones.
    assert choose_implementation("tpu", bf16, 4096, 4096, 64) == "splash"
    assert choose_implementation("tpu", f32, 4096, 4096, 40) == "splash"
    assert choose_implementation("tpu", bf16, 4096, 77, 40) == "xla"                 # 77 keys: padding waste
    assert choose_implementation("tpu", bf16, 77, 77, 64) == "xla"
    assert choose_implementation("tpu", bf16, 4096, 4096, 64, splash_available=False) == "xla"
    # CPU: blocks once the score matrix is large, plain einsums for small ones.
    assert choose_implementation("cpu", f32, 4096, 4096, 40) == "chunked"
    assert choose_implementation("cpu", f32, 1024, 1024, 80) == "chunked"
    assert choose_implementation("cpu", f32, 4096, 77, 40) == "chunked"     # measured on par with xla
    assert choose_implementation("cpu", f32, 256, 256, 160) == "xla"        # chunked 2x slower here
    assert choose_implementation("cpu", f32, 77, 77, 64) == "xla"


def test_refuses_unknown_kernel_and_bad_shapes():
    q, k, v = _qkv(1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match="not available"):
        attention(q, k, v, heads=2, implementation="flash3")
    with pytest.raises(ValueError, match="split"):
        attention(q, k, v, heads=3)
    with pytest.raises(ValueError, match="do not match"):
        attention(q, k[:, :, :4], v, heads=2)


def test_splash_wrapper_in_interpreter():
    """Padding (150 -> 256 rows, head 40 -> 128 lanes), padded-key segment ids and the causal mask,
    through the Pallas interpreter: the wrapper's logic, not the TPU compile."""
    q, k, v = _qkv(1, 150, 150, 2, 40, seed=5)
    split = lambda t: t.reshape(1, 150, 2, 40)
    got = jax.jit(lambda q, k, v: attn_mod._splash_attention(split(q), split(k), split(v), upcast=False,
                                                             causal=True, interpret=True))(q, k, v)
    want = attention(q, k, v, heads=2, causal=True, implementation="xla")
    assert _rel_err(got.reshape(want.shape), want) < 1e-5


@pytest.mark.skipif(BACKEND != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("lq,lk,causal", [(4096, 4096, False), (1024, 77, False), (77, 77, True)])
def test_cudnn_matches_reference(lq, lk, causal):
    q, k, v = _qkv(2, lq, lk, 8, 64, dtype=jnp.bfloat16)
    want = attention(q, k, v, heads=8, causal=causal, implementation="xla")
    got = jax.jit(lambda q, k, v: attention(q, k, v, heads=8, causal=causal, implementation="cudnn"))(q, k, v)
    assert _rel_err(got, want) < 2e-2


@pytest.mark.skipif(BACKEND != "tpu", reason="splash attention needs a TPU")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("lq,lk,causal", [(4096, 4096, False), (1000, 77, False), (300, 300, True)])
def test_splash_matches_reference(lq, lk, causal, dtype, tol):
    q, k, v = _qkv(2, lq, lk, 8, 40, dtype=dtype)
    want = attention(q, k, v, heads=8, causal=causal, implementation="xla")
    got = jax.jit(lambda q, k, v: attention(q, k, v, heads=8, causal=causal, implementation="splash"))(q, k, v)
    assert _rel_err(got, want) < tol
