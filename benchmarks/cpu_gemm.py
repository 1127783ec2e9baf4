"""The SD1.5 UNet's dense-layer matmuls, float32, in XLA:CPU, PyTorch and NumPy, interleaved call by call.

    python benchmarks/cpu_gemm.py --json benchmarks/results/cpu-2core-gemm.json

Why: at 512^2 batch 2 the UNet's Dense layers (attention projections, GEGLU feed-forward, proj_in/out)
are about 40% of its FLOPs. XLA:CPU runs a single dot through Eigen (jaxdiff turns YNNPACK's off, see
jaxdiff/xla_flags.py); PyTorch runs `torch.mm` through MKL; NumPy through OpenBLAS. This measures each
shape [M, K] x [K, N] as the UNet has it (M = batch 2 x tokens) on all three, one call of each in turn,
`--rounds` rounds of `--calls` calls; min time per library. `weighted` sums the shapes by how often the
UNet runs them (per call at batch 2), so it estimates the Dense layers' share of a UNet call.

This file imports torch; jaxdiff/ never does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (M, K, N, times per UNet call): per transformer block at C channels, L tokens, batch 2: to_q/k/v/out of
# attn1, to_q/out of attn2 and proj_in/out are [2L, C] x [C, C] (8 per block), GEGLU's proj C -> 8C, and
# net_2 4C -> C. 64x64: 5 blocks, C 320; 32x32: 5 blocks, C 640; 16x16: 6 blocks (mid too), C 1280.
LEVELS = ((4096, 320, 5), (1024, 640, 5), (256, 1280, 6))   # (tokens, C, transformer blocks)
SHAPES = [(2 * tokens, k, n, blocks * per_block) for tokens, c, blocks in LEVELS
          for k, n, per_block in ((c, c, 8), (c, 8 * c, 1), (4 * c, c, 1))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    import jaxdiff  # noqa: F401  (its XLA flags, as in every jaxdiff run)
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    rows, totals = [], {"jax": 0.0, "torch": 0.0, "numpy": 0.0}
    for m, k, n, count in SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        dot = jax.jit(jnp.dot)
        calls = {"jax": lambda: dot(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb),
                 "numpy": lambda: a @ b}
        best = {}
        for name, call in calls.items():
            call()  # warm-up (and the jit compile)
        for _ in range(args.rounds):
            for name, call in calls.items():
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    call()
                    best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
        flops = 2 * m * k * n
        row = {"m": m, "k": k, "n": n, "per_unet_call": count,
               **{f"{name}_s": t for name, t in best.items()},
               **{f"{name}_gflops": flops / t / 1e9 for name, t in best.items()},
               "torch_over_jax": best["jax"] / best["torch"]}
        rows.append(row)
        for name in totals:
            totals[name] += count * best[name]
        print(f"{m:5d} x {k:4d} x {n:5d} (x{count:2d}): " +
              ", ".join(f"{name} {row[f'{name}_gflops']:5.0f} GFLOP/s" for name in calls) +
              f"; PyTorch {row['torch_over_jax']:.2f}x JAX's speed", flush=True)
    print("weighted per UNet call: " + ", ".join(f"{name} {t:.2f} s" for name, t in totals.items()))
    if args.json:
        report = {"what": __doc__.split("\n\n")[0], "shapes": rows, "weighted_s": totals,
                  "versions": {"jax": jax.__version__, "torch": torch.__version__, "numpy": np.__version__},
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "torch_threads": torch.get_num_threads(),
                  "host_cpus": os.cpu_count(), "load_avg_1min_after": os.getloadavg()[0]}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
