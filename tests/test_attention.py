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


@pytest.mark.skipif(BACKEND != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("lq,lk,causal", [(4096, 77, False), (77, 77, True), (1024, 1024, False)])
def test_cudnn_gradient_matches_reference(lq, lk, causal):
    """Issue 26's crash: jax.grad through cuDNN with 77 keys (cross-attention) / 77 causal tokens."""
    q, k, v = _qkv(2, lq, lk, 8, 64, dtype=jnp.bfloat16)
    loss = lambda impl: lambda q, k, v: jnp.sum(
        attention(q, k, v, heads=8, causal=causal, implementation=impl).astype(jnp.float32) ** 2)
    got = jax.jit(jax.grad(loss("cudnn"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, want):
        assert _rel_err(g, r) < 5e-2


@pytest.mark.skipif(BACKEND != "tpu", reason="splash attention needs a TPU")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("lq,lk,causal", [(4096, 4096, False), (1000, 77, False), (300, 300, True)])
def test_splash_matches_reference(lq, lk, causal, dtype, tol):
    q, k, v = _qkv(2, lq, lk, 8, 40, dtype=dtype)
    want = attention(q, k, v, heads=8, causal=causal, implementation="xla")
    got = jax.jit(lambda q, k, v: attention(q, k, v, heads=8, causal=causal, implementation="splash"))(q, k, v)
    assert _rel_err(got, want) < tol


# ------------------------------------------------------------------ cuDNN dispatch (issue 26), on CPU
def _sd_attention_shapes():
    """(q_len, k_len, head_dim, causal) of every attention in SD1 / SD2 / SDXL at 512, 768, 1024 px:
    UNet self- and cross-attention (77 text tokens) and the CLIP text encoders' causal self-attention."""
    shapes = {(77, 77, 64, True)}                        # CLIP ViT-L, OpenCLIP ViT-H / bigG: 64-wide heads
    for px in (512, 768, 1024):
        side = px // 8                                   # latent side
        levels = {"sd1": [(0, 40), (1, 80), (2, 160)],   # 8 heads over 320 / 640 / 1280 channels
                  "sd2": [(0, 64), (1, 64), (2, 64)],    # 64-wide heads
                  "sdxl": [(1, 64), (2, 64)]}            # no attention at full resolution
        for family in levels.values():
            for level, head_dim in family:
                tokens = (side >> level) ** 2
                shapes |= {(tokens, tokens, head_dim, False), (tokens, 77, head_dim, False)}
    return sorted(shapes)


SD_SHAPES = _sd_attention_shapes()


def _jax_cudnn_check(monkeypatch, q_len, k_len, head_dim, *, training, hopper, dtype=jnp.bfloat16):
    """True iff JAX's own cuDNN checks accept the shapes, as `jax.nn.dot_product_attention` calls them
    (a placeholder bias under differentiation; see attention.py), on a pre-Hopper or Hopper GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fa
    monkeypatch.setattr(fa, "check_compute_capability", lambda cap: hopper and float(cap) <= 9.0)
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda cap: False)
    s = lambda n: jax.ShapeDtypeStruct((2, n, 8, head_dim), dtype)
    q, k = s(q_len), s(k_len)
    try:
        fa.check_layout(q, k, k, None, None, None, None, None, None, None, fa.AttentionLayout.BTNH)
        fa.check_is_flash_attention(q, k, k, fa.AttentionLayout.BTNH.value, 90100, has_bias=training,
                                    is_training=training)
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("hopper", [False, True])
def test_cudnn_mirror_matches_jax_checks(monkeypatch, hopper):
    """`cudnn_flash_supported` says what JAX's checks say, on every SD shape and on odd / float cases."""
    max_head_dim = 256 if hopper else 128
    cases = [(q, k, d, jnp.bfloat16) for q, k, d, _ in SD_SHAPES]
    cases += [(77, 77, 64, jnp.float16), (4096, 77, 64, jnp.float32), (4096, 4096, 20, jnp.bfloat16),
              (4096, 4096, 264, jnp.bfloat16), (4096, 78, 40, jnp.bfloat16), (99, 64, 64, jnp.bfloat16)]
    for q_len, k_len, head_dim, dtype in cases:
        for training in (False, True):
            want = _jax_cudnn_check(monkeypatch, q_len, k_len, head_dim, training=training, hopper=hopper,
                                    dtype=dtype)
            got = attn_mod.cudnn_flash_supported(dtype, q_len, k_len, head_dim, max_head_dim=max_head_dim,
                                                 training=training)
            assert got == want, (q_len, k_len, head_dim, dtype, training)


@pytest.mark.parametrize("hopper", [False, True])
def test_auto_never_picks_cudnn_for_shapes_it_cannot_run(monkeypatch, hopper):
    """Issue 26: for every SD shape "auto" on a GPU picks cuDNN only where JAX's checks accept what the
    kernel sends, for inference (as is) and training (padded); and it does pick cuDNN for every head
    width the GPU's flash kernel takes, including 77-key cross-attention that training used to crash."""
    max_head_dim = 256 if hopper else 128
    for q_len, k_len, head_dim, _ in SD_SHAPES:
        chosen = choose_implementation("gpu", jnp.bfloat16, q_len, k_len, head_dim,
                                       cudnn_max_head_dim=max_head_dim)
        assert chosen == ("cudnn" if head_dim <= max_head_dim else "xla"), (q_len, k_len, head_dim)
        if chosen == "cudnn":
            assert _jax_cudnn_check(monkeypatch, q_len, k_len, head_dim, training=False, hopper=hopper)
            lq, lk = attn_mod.cudnn_training_lengths(q_len, k_len)
            assert _jax_cudnn_check(monkeypatch, lq, lk, head_dim, training=True, hopper=hopper)
            # ... while the unpadded cross-attention is what JAX refuses under jax.grad
            if k_len == 77:
                assert not _jax_cudnn_check(monkeypatch, q_len, k_len, head_dim, training=True, hopper=hopper)


@pytest.mark.parametrize("lq,lk,causal", [(96, 77, False), (77, 77, True), (64, 64, False)])
def test_cudnn_padded_path_matches_reference(lq, lk, causal):
    """The cuDNN kernel's calls (inference as is, training padded to 128 with a sequence-length mask)
    run through `jax.nn.dot_product_attention`'s XLA path on CPU: values and gradients equal "xla"'s."""
    heads, dim = 2, 8
    q, k, v = _qkv(2, lq, lk, heads, dim, seed=7)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, lq, heads * dim)), jnp.float32)

    def kernel(q, k, v):
        out = attn_mod._cudnn_attention(split(q), split(k), split(v), upcast=False, causal=causal,
                                        implementation="xla")
        return out.reshape(q.shape)

    reference = lambda q, k, v: attention(q, k, v, heads=heads, causal=causal, implementation="xla")
    assert _rel_err(jax.jit(kernel)(q, k, v), reference(q, k, v)) < 1e-5
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        assert np.all(np.isfinite(np.asarray(g))) and _rel_err(g, r) < 1e-5
    # Under jax.grad the kernel really calls with padded lengths; for inference it does not.
    padded = f"{attn_mod.cudnn_training_lengths(lq, lk)[1]},{heads},{dim}"
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(loss(kernel)))(q, k, v)).replace(" ", "")
    infer_jaxpr = str(jax.make_jaxpr(kernel)(q, k, v)).replace(" ", "")
    if lk % 2:
        assert padded in grad_jaxpr and padded not in infer_jaxpr


def test_splash_under_ambient_mesh_is_shard_mapped():
    """Issue 17: under `jax.set_mesh` of 8 devices the splash kernel runs per device (shard_map, batch
    split over ("data", "fsdp"), heads whole): same values as "xla", output split along the batch."""
    from jaxdiff import sharding

    mesh = sharding.make_mesh(fsdp=2)                              # 4 x 2 over the 8 virtual CPUs
    b, length, heads, dim = 8, 150, 2, 40
    q, k, v = _qkv(b, length, length, heads, dim, seed=11)
    want = attention(q, k, v, heads=heads, implementation="xla")
    split = lambda t: t.reshape(b, length, heads, dim)
    fn = jax.jit(lambda q, k, v: attn_mod._splash_attention(split(q), split(k), split(v), upcast=False,
                                                            causal=False, interpret=True))
    placed = jax.device_put((q, k, v), sharding.batch_sharding(mesh, 3))
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(fn)(*placed))
        got = fn(*placed)
    assert _rel_err(got.reshape(want.shape), want) < 1e-5
    assert got.sharding.spec[0] == sharding.BATCH_AXES and got.sharding.mesh.shape == mesh.shape
    # without a mesh: the plain call, no shard_map
    assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))
