"""A short `jax.profiler` trace of UNet calls, summarised into JSON: where the time goes, by op.

    python benchmarks/profile_unet.py --preset sd15 --batch 16 --size 512 --dtype bfloat16 \\
        --json out/profile.json --trace-dir /tmp/trace --keep-trace out/trace.json.gz

The UNet (random weights, `presets.host_init`) is jitted, compiled, warmed up, then `--calls` calls run
inside `jax.profiler.trace(..., create_perfetto_trace=True)`. The Perfetto trace (Chrome trace JSON) is
read back with the standard library: on a GPU the device tracks (processes named `/device:GPU:*`) hold
one event per kernel; elsewhere the host's XLA op events are used. Per kernel name: total time, count,
share; and a coarse category (matmul, convolution, attention, norm/elementwise fusion, copy/transpose,
other) from the name, a heuristic said as such in the JSON. XLA's own cost analysis (FLOPs, bytes) of
the compiled program is kept beside it. `--keep-trace` copies the trace if it is smaller than
`--max-trace-mb`, so a folder with a size limit gets it or nothing.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# First match wins: kernel name (lower case) -> category. Names are cuBLAS/CUTLASS/cuDNN/XLA kernel names.
CATEGORIES = (
    ("attention", r"fmha|flash|attn|sdpa|softmax"),
    ("convolution", r"conv|implicit_gemm|dgrad|wgrad|fprop"),
    ("matmul", r"gemm|xmma|cutlass|matmul|dot|cublas|sm\d+_"),
    ("copy/transpose", r"transpose|copy|memcpy|memset|dynamic.update.slice|concatenate|pad"),
    ("reduction/norm", r"reduce|norm"),
    ("fusion (elementwise)", r"fusion|loop|input"),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def summarise_trace(path: Path, top: int = 30) -> dict:
    """Per-kernel totals from a Perfetto / Chrome trace (.json or .json.gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if re.search(r"(?i)/device:(gpu|tpu)|\bgpu:\d", n)}
    if not any(e.get("ph") == "X" and e.get("pid") in device_pids for e in events):
        device_pids = set()
    # Host fallback: XLA:CPU op events (thunks) live in the host process.
    source = "device tracks" if device_pids else "host tracks"
    spans = collections.defaultdict(list)              # (pid, tid) -> [(start, dur, name)]
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e["pid"] not in device_pids:
            continue
        if not device_pids and (e.get("name", "").startswith("$") or "ThunkExecutor" in e.get("name", "")):
            continue                                      # host: Python frames and executor waits
        spans[(e["pid"], e.get("tid"))].append((float(e["ts"]), float(e["dur"]), e.get("name", "?")))
    # Self time: an event's duration less its nested children's (host op events nest: executor > loop >
    # fusion); device kernels do not nest, so there it is their duration.
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for track in spans.values():
        track.sort(key=lambda s: (s[0], -s[1]))
        stack = []                                        # [end, name, self time]
        def close(until):
            while stack and stack[-1][0] <= until:
                end, name, own = stack.pop()
                by_name[name][0] += own
                by_name[name][1] += 1
        for start, dur, name in track:
            close(start)
            if stack:
                stack[-1][2] -= min(dur, stack[-1][0] - start)
            stack.append([start + dur, name, dur])
        close(float("inf"))
    total = sum(v[0] for v in by_name.values()) or 1.0
    cats = collections.defaultdict(float)
    for name, (dur, _) in by_name.items():
        cats[category(name)] += dur
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"source": source, "processes": sorted(set(names.values())),
            "total_kernel_time_us": total,
            "by_category_share": {k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "category_rule": "first matching regex on the kernel name (a heuristic): "
                             + "; ".join(f"{c}: {p}" for c, p in CATEGORIES),
            "top_ops": [{"name": n, "total_us": d, "count": c, "share": d / total, "category": category(n)}
                        for n, (d, c) in ranked[:top]],
            "distinct_ops": len(by_name)}


def build_call(preset: str, batch: int, size: int, dtype: str, attention: str):
    """(jitted UNet call, args): random weights in `dtype`, inputs as one CFG-batch of the pipeline."""
    import jax
    import jax.numpy as jnp

    from jaxdiff import components
    from jaxdiff.models import presets
    cfg = presets.preset_configs(preset)["unet"]
    vcfg = presets.preset_configs(preset)["vae"]
    dt = jnp.dtype(dtype)
    unet = components.UNET.build(cfg, dt)
    if attention != "auto":
        unet = unet.clone(attention_implementation=attention)
    params = jax.tree.map(lambda a: jnp.asarray(a, dt),
                          presets.host_init(components.UNET.param_shapes(cfg), seed=0))
    rng = np.random.default_rng(0)
    h = size // vcfg.downsample_factor
    x = jnp.asarray(rng.standard_normal((batch, h, h, vcfg.latent_channels)), dt)
    t = jnp.full((batch,), 500, jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((batch, 77, cfg.cross_attention_dim)), dt)
    added = None
    if cfg.takes_text_time:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": jnp.asarray(rng.standard_normal((batch, pooled)), dt),
                 "time_ids": jnp.tile(jnp.asarray([[size, size, 0, 0, size, size]], dt), (batch, 1))}
    fn = jax.jit(lambda p, x, t, c, a: unet.apply({"params": p}, x, t, c, a))
    return fn, (params, x, t, ctx, added)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="profile_unet.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="sd15", choices=("tiny", "sd15", "sd21", "sdxl"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--attention", default="auto")
    p.add_argument("--calls", type=int, default=3, help="calls inside the trace")
    p.add_argument("--trace-dir", default="/tmp/jaxdiff_profile")
    p.add_argument("--json", required=True)
    p.add_argument("--keep-trace", default=None, help="copy the Perfetto trace here when small enough")
    p.add_argument("--max-trace-mb", type=float, default=15.0)
    args = p.parse_args(argv)

    import jax

    from jaxdiff import bench
    fn, call_args = build_call(args.preset, args.batch, args.size, args.dtype, args.attention)
    t0 = time.perf_counter()
    compiled = fn.lower(*call_args).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(compiled(*call_args))                     # warm-up
    times = []
    trace_dir = Path(args.trace_dir)
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(args.calls):
            t = time.perf_counter()
            jax.block_until_ready(compiled(*call_args))
            times.append(time.perf_counter() - t)
    traces = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    report = {**bench.environment(), "preset": args.preset, "batch": args.batch, "size": args.size,
              "dtype": args.dtype, "attention": args.attention, "compile_s": compile_s,
              "call_times_s": times, "xla_cost": {k: float(v) for k, v in (cost or {}).items()
                                                   if k in ("flops", "bytes accessed", "transcendentals")}}
    if traces:
        report["trace"] = summarise_trace(traces[-1])
        report["trace"]["per_call_us"] = report["trace"]["total_kernel_time_us"] / args.calls
        size_mb = traces[-1].stat().st_size / 2 ** 20
        report["trace_file_mb"] = size_mb
        if args.keep_trace and size_mb <= args.max_trace_mb:
            Path(args.keep_trace).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(traces[-1], args.keep_trace)
            report["trace_kept_as"] = args.keep_trace
    else:
        report["trace"] = None
    bench.write_json(report, args.json)
    top = (report["trace"] or {}).get("top_ops", [])[:5]
    print(f"{args.preset} unet b{args.batch} {args.size}px: call {min(times) * 1e3:.1f} ms; top ops: "
          + ", ".join(f"{o['name'][:40]} {o['share']:.0%}" for o in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
