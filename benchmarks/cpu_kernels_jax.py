"""Micro-benchmark: SD1.5-shaped 3x3 convs (batch 2, NHWC), one attention (2 x 8 heads x 4096 tokens x 40)
and one matmul on XLA CPU under the current XLA_FLAGS; min of 5 timed calls in seconds, one JSON line.
benchmarks/cpu_kernels_torch.py times the same shapes in PyTorch (2 threads, SDPA). Results:
benchmarks/results/cpu-2core-kernels.json.

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/cpu_kernels_jax.py
"""
import os, time, json, sys
import numpy as np, jax, jax.numpy as jnp

def bench(f, *a, reps=5):
    f(*a).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(*a).block_until_ready(); ts.append(time.perf_counter() - t)
    return min(ts)

rng = np.random.default_rng(0)
res = {"flags": os.environ.get("XLA_FLAGS", "")}
for c, hw in ((320, 64), (640, 32), (1280, 16)):
    x = jnp.asarray(rng.standard_normal((2, hw, hw, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, c, c)) * 0.02, jnp.float32)
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    res[f"conv{c}@{hw}"] = bench(conv, x, w)
q = jnp.asarray(rng.standard_normal((2, 4096, 8, 40)), jnp.float32)
att = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="xla"))
res["attn4096_xla"] = bench(att, q)
m = jnp.asarray(rng.standard_normal((8192, 320)), jnp.float32)
w = jnp.asarray(rng.standard_normal((320, 1280)), jnp.float32)
res["matmul8192x320x1280"] = bench(jax.jit(jnp.dot), m, w)
print(json.dumps(res))
