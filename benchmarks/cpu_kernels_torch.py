"""The shapes of benchmarks/cpu_kernels_jax.py in PyTorch (2 threads, NCHW, SDPA); one JSON line."""
import time, json, torch, numpy as np
torch.set_num_threads(2)
def bench(f, reps=5):
    with torch.no_grad():
        f(); ts = []
        for _ in range(reps):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)
res = {}
for c, hw in ((320, 64), (640, 32), (1280, 16)):
    x = torch.randn(2, c, hw, hw); conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
    res[f"conv{c}@{hw}"] = bench(lambda: conv(x))
q = torch.randn(2, 8, 4096, 40)
res["attn4096_sdpa"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
m, w = torch.randn(8192, 320), torch.randn(320, 1280)
res["matmul8192x320x1280"] = bench(lambda: m @ w)
print(json.dumps(res))
