"""`jaxdiff bench`: compile time, steady-state speed, FLOP/s, MFU and memory of each stage.

    jaxdiff bench --model sd15 --what unet,vae_decode --batch 1,2 --size 512 --dtype bfloat16 --json out.json
    python benchmarks/compare_torch.py --model sd15 --what unet      # the same numbers for diffusers, and ratios

What is measured (`WHATS`), each as one jitted program over a ("data", "fsdp") mesh, batch rows split
over every device, params replicated (or split over "fsdp"):

  unet         one UNet call on B latent rows (a CFG step of B/2 images is a call on B rows)
  vae_decode   latents [B, h, w, 4] -> images [B, H, W, 3]
  vae_encode   images -> posterior moments
  text_encode  token ids [B, 77] through every text encoder of the model
  pipeline     `pipe(prompts, steps=, sampler=, guidance_scale=)`: the whole compiled request, host
               tokenizing and the copy back included, as a user sees it

Method (nanoGPT's bench.py, plus what XLA makes separable): each program is lowered and compiled
explicitly (`compile_s`, cold: a fresh persistent-cache folder unless --compile-cache names one); then
`jax.clear_caches()` and the same compile again, now served by the persistent cache
(`compile_cached_s`); then `warmup` untimed calls and `repeats` timed ones, each ended by
`block_until_ready` (--no-cached-compile skips the second compile, which for the pipeline costs one
more full run). `steady_s` is the fastest timed call (min-of-N: on a shared machine the minimum is
the least disturbed run); the median and every time are kept too, with the load average around them.

FLOPs: the published count from shared/reference/numbers.md for the stock presets, scaled by pixel
count for other sizes (an approximation: attention grows faster than linearly), and XLA's cost analysis
of the compiled program (summed over devices). TFLOP/s and MFU use the published count where there is
one (`flops_per_call.rate_from`): XLA counts a loop body once (the CPU attention and feed-forward run in
loops) and a custom call (cuDNN, splash attention) as nothing, so XLA's count is the cross-check, and
the rate for model folders. The pipeline's XLA FLOPs are built from its parts: NFE x UNet(rows) + VAE
decode + text encode, each from XLA.
MFU = achieved FLOP/s per device / the device's dense bf16 peak (`PEAK_TFLOPS`), whatever the dtype,
the convention nanoGPT and most papers use; null where the peak is unknown (CPUs).

Peak memory: `device.memory_stats()["peak_bytes_in_use"]` where the backend keeps it (GPU, TPU), else
the compiled program's `memory_analysis()` (arguments + outputs + temporaries - aliased).

Nothing heavy is imported at module import: `register` must keep `jaxdiff --help` instant.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxdiff.models.presets import PRESETS, build_pipeline

WHATS = ("unet", "vae_decode", "vae_encode", "text_encode", "pipeline")
DTYPES = ("float32", "bfloat16", "float16")

# Dense bf16 TFLOP/s per device (shared/reference/numbers.md), matched against `device.device_kind` by
# substring, first match wins (so "H100" before "A100" does not matter, but "v5p" must precede "v5").
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v4", 275.0),
)

# Published FLOPs per sample per call (numbers.md: torch.utils.flop_counter on the diffusers modules)
# and the pixel count (latent for the UNet, image for the VAE) they were counted at.
REFERENCE_FLOPS = {
    ("sd15", "unet"): (0.677e12, 64 * 64),
    ("sd21", "unet"): (2.149e12, 96 * 96),
    ("sdxl", "unet"): (6.761e12, 128 * 128),
    ("sd15", "vae_decode"): (2.480e12, 512 * 512),
    ("sd21", "vae_decode"): (2.480e12, 512 * 512),
    ("sdxl", "vae_decode"): (10.470e12, 1024 * 1024),
    ("sd15", "text_encode"): (0.013e12, None),   # per prompt, size-independent
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    """One measurement's settings."""
    what: str                      # one of WHATS
    batch: int                     # rows per call (pipeline: images per call)
    height: int                    # image pixels (latents are height / the VAE factor)
    width: int
    steps: int = 20                # pipeline only
    sampler: str = "euler"         # pipeline only
    guidance_scale: float = 7.5    # pipeline only (> 1: CFG, 2 UNet rows per image)


# ------------------------------------------------------------------------------------------- models

def peak_tflops(device) -> float | None:
    """Dense bf16 peak of one device, or None when unknown (CPUs, unlisted accelerators)."""
    if device.platform == "cpu":
        return None
    kind = str(device.device_kind)
    return next((peak for name, peak in PEAK_TFLOPS if name.lower() in kind.lower()), None)


# ------------------------------------------------------------------------------------------ programs

def component_inputs(pipe, case: Case, seed: int = 0) -> dict[str, Any]:
    """Host (numpy, float32 / int32, NHWC) inputs of a component benchmark; compare_torch.py feeds the
    same arrays to PyTorch."""
    from jaxdiff.models.unet import example_inputs
    rng = np.random.default_rng(seed)
    f = pipe.vae.config.downsample_factor
    h, w, b = case.height // f, case.width // f, case.batch
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    if case.what == "unet":
        x, _, ctx, added = example_inputs(pipe.unet.config, batch=b, height=h, width=w)
        return {"x": normal(*x.shape), "t": np.full((b,), 500.0, np.float32), "context": normal(*ctx.shape),
                "added": None if added is None else {k: normal(*v.shape) for k, v in added.items()}}
    if case.what == "vae_decode":
        return {"z": normal(b, h, w, pipe.vae.config.latent_channels)}
    if case.what == "vae_encode":
        return {"images": np.clip(normal(b, case.height, case.width, pipe.vae.config.in_channels), -1, 1)}
    if case.what == "text_encode":
        cfg = (pipe.text_encoder or pipe.text_encoder_2).config
        return {"ids": rng.integers(0, cfg.vocab_size, (b, cfg.max_position_embeddings)).astype(np.int32)}
    raise ValueError(f"not a component benchmark: {case.what!r}")


def _component_program(pipe, case: Case, mesh, seed: int):
    """(fn, params, inputs, n_rows) of one component benchmark, inputs placed batch-sharded on `mesh`."""
    from jaxdiff import sharding
    inputs = component_inputs(pipe, case, seed)
    if case.what == "unet":
        module, params = pipe.unet.module, pipe.unet.params
        fn = lambda p, i: module.apply({"params": p}, i["x"], i["t"], i["context"], i["added"])
    elif case.what in ("vae_decode", "vae_encode"):
        module, params = pipe.vae.module, pipe.vae.params
        method = case.what.split("_")[1]
        key = "z" if method == "decode" else "images"
        fn = lambda p, i: module.apply({"params": p}, i[key], method=method)
    else:  # text_encode: every encoder of the model on the same ids
        encs = {n: c for n in ("text_encoder", "text_encoder_2") if (c := getattr(pipe, n)) is not None}
        params = {n: c.params for n, c in encs.items()}
        modules = {n: c.module for n, c in encs.items()}
        fn = lambda p, i: {n: m.apply({"params": p[n]}, i["ids"]) for n, m in modules.items()}
    placed = sharding.to_global(inputs, sharding.batch_sharding(mesh, 1))
    return fn, params, placed, case.batch


def _place_params(params, mesh):
    from jaxdiff import sharding
    if mesh.shape[sharding.FSDP_AXIS] > 1:
        return sharding.shard_params(params, sharding.fsdp_param_shardings(params, mesh))
    return sharding.shard_params(params, sharding.replicated(mesh))


def _flops(compiled_or_lowered, n_devices: int) -> float | None:
    """XLA's FLOP count of a program, summed over devices (SPMD programs report one device's share)."""
    try:
        cost = compiled_or_lowered.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) * n_devices if flops and flops > 0 else None


def _memory(compiled, devices) -> dict:
    """Peak bytes: live device counters if the backend keeps them, else XLA's static estimate."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    if all(p is not None for p in peaks):
        return {"bytes": int(max(peaks)), "source": "device.memory_stats peak_bytes_in_use (max over devices)"}
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
        return {"bytes": int(total), "source": "compiled.memory_analysis (arguments + outputs + temp - alias), "
                                                "per device"}
    except Exception:
        return {"bytes": None, "source": "unavailable"}


class _CacheEvents:
    """Counts JAX's persistent compilation cache hits (one listener per process, reset per compile)."""
    listener = None
    hits = 0

    @classmethod
    def install(cls):
        if cls.listener is None:
            try:
                from jax._src import monitoring  # no public hook for cache events in jax 0.10
            except ImportError:  # then the *_hit fields stay False; the timings are still measured
                return
            def listener(name, **kw):
                cls.hits += name == "/jax/compilation_cache/cache_hits"
            cls.listener = listener
            monitoring.register_event_listener(listener)


_CACHE_FLAGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")


def use_compilation_cache(path) -> Callable[[], None]:
    """Turns on the persistent cache at `path` for every program (no size / time thresholds), resetting
    JAX's cache object so a folder set after an earlier compile is honoured. Returns a function that puts
    the previous settings back (a benchmark's temporary folder must not outlive it as the cache)."""
    import jax
    from jaxdiff.generation import enable_compilation_cache
    previous = {flag: getattr(jax.config, flag) for flag in _CACHE_FLAGS}
    enable_compilation_cache(path)
    _reset_cache()
    _CacheEvents.install()

    def restore():
        for flag, value in previous.items():
            jax.config.update(flag, value)
        _reset_cache()
    return restore


def _reset_cache():
    try:
        from jax._src import compilation_cache  # the cache object is built once per process otherwise
        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass


def _timed_compile(make: Callable[[], Any]) -> tuple[Any, float, bool]:
    """(compiled, seconds, served by the persistent cache?) of `make()` = lower + compile."""
    before = _CacheEvents.hits
    t0 = time.perf_counter()
    compiled = make()
    return compiled, time.perf_counter() - t0, _CacheEvents.hits > before


def _time_calls(call: Callable[[], Any], warmup: int, repeats: int,
                companion: Callable[[], Any] | None = None) -> tuple[list[float], list[float] | None]:
    """(times of `call`, times of `companion` or None). With a companion (e.g. the PyTorch side of a
    comparison), each warm-up and timed call of `call` is followed by one of `companion`, so the two
    alternate call by call and a slow spell of a shared machine falls on both about alike.
    `companion` must return only when its work is done (sync its device itself)."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(call())
        if companion is not None:
            companion()
    times, other = [], ([] if companion is not None else None)
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
        if companion is not None:
            t0 = time.perf_counter()
            companion()
            other.append(time.perf_counter() - t0)
    return times, other


def bench_component(pipe, case: Case, mesh, *, warmup: int = 1, repeats: int = 3, seed: int = 0,
                    cached_compile: bool = True, companion: Callable[[], Any] | None = None) -> dict:
    """Compile and time one component program. Returns the raw measurement (see `finish`); with a
    `companion`, also its times, alternated call by call (see `_time_calls`)."""
    import jax
    n = mesh.size
    if case.batch % n:
        raise ValueError(f"batch {case.batch} does not split over {n} devices; use a multiple of {n} "
                         f"or fewer devices (--devices)")
    fn, params, inputs, rows = _component_program(pipe, case, mesh, seed)
    params = _place_params(params, mesh)
    jitted = lambda: jax.jit(fn)
    compiled, cold, cold_hit = _timed_compile(lambda: jitted().lower(params, inputs).compile())
    cached = cached_hit = None
    if cached_compile:
        jax.clear_caches()  # drop the in-memory executable: the next compile can only hit the disk cache
        compiled, cached, cached_hit = _timed_compile(lambda: jitted().lower(params, inputs).compile())
    times, other = _time_calls(lambda: compiled(params, inputs), warmup, repeats, companion)
    return {"compile_s": cold, "compile_cached_s": cached, "compile_cold_hit": cold_hit,
            "compile_cached_hit": cached_hit, "times_s": times, "companion_times_s": other, "flops_xla": _flops(compiled, n),
            "peak_memory": _memory(compiled, mesh.devices.flat), "calls": 1, "images": rows}


def bench_pipeline(pipe, case: Case, mesh, *, warmup: int = 1, repeats: int = 3, seed: int = 0,
                   cached_compile: bool = True, companion: Callable[[], Any] | None = None) -> dict:
    """Compile and time `pipe(prompts, ...)`: one program for encode + sample + decode. The compile is
    timed through the pipeline's public AOT seam (`pipe.lower(...).compile()`, the exact program a call
    runs); the timed calls are whole `pipe(...)` calls (request building and image collection included)."""
    import jax
    from jaxdiff.samplers import make_plan
    from jaxdiff.schedules import SchedulerConfig

    prompts = [f"a photograph of an astronaut riding a horse, {i}" for i in range(case.batch)]
    options = dict(height=case.height, width=case.width, steps=case.steps, sampler=case.sampler,
                   guidance_scale=case.guidance_scale, seed=seed)
    compile_program = lambda: pipe.lower(prompts, mesh=mesh, **options).compile()
    compiled, cold, cold_hit = _timed_compile(compile_program)
    cached = cached_hit = None
    if cached_compile:
        jax.clear_caches()
        compiled, cached, cached_hit = _timed_compile(compile_program)
    call = lambda: pipe(prompts, mesh=mesh, **options)
    t0 = time.perf_counter()
    call()  # the call's own compile is served by the persistent cache when it is on
    first = time.perf_counter() - t0
    times, other = _time_calls(call, warmup, repeats, companion)
    sched = SchedulerConfig.from_dict(pipe.scheduler_config or {}, "scheduler_config.json")
    nfe = make_plan(case.sampler, case.steps, sched).nfe
    return {"compile_s": cold, "compile_cached_s": cached, "compile_cold_hit": cold_hit,
            "compile_cached_hit": cached_hit, "first_call_s": first, "times_s": times,
            "companion_times_s": other, "flops_xla_program": _flops(compiled, mesh.size), "nfe": nfe,
            "peak_memory": _memory(compiled, mesh.devices.flat), "calls": case.steps, "images": case.batch}


def pipeline_flops(pipe, case: Case, nfe: int) -> float | None:
    """NFE x UNet(rows) + VAE decode + text encode, each from XLA's cost of the lowered (not compiled)
    component: tracing only, seconds even at full size."""
    import jax
    rows = case.batch * (2 if case.guidance_scale > 1.0 else 1)
    total = 0.0
    for what, n, b in (("unet", nfe, rows), ("vae_decode", 1, case.batch), ("text_encode", 1, rows)):
        part = dataclasses.replace(case, what=what, batch=b)
        fn, params, inputs, _ = _component_program(pipe, part, _one_device_mesh(), 0)
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, inputs))
        flops = _flops(jax.jit(fn).lower(*abstract), 1)
        if flops is None:
            return None
        total += n * flops
    return total


def _one_device_mesh():
    import jax
    from jaxdiff import sharding
    return sharding.make_mesh(jax.devices()[:1])


def reference_flops(model: str, case: Case, pipe) -> float | None:
    """numbers.md FLOPs per call for the stock presets, scaled by pixel count (see the module docstring)."""
    if case.what == "pipeline":
        unet, dec, text = (reference_flops(model, dataclasses.replace(case, what=w), pipe)
                           for w in ("unet", "vae_decode", "text_encode"))
        if None in (unet, dec):
            return None
        rows = 2 if case.guidance_scale > 1.0 else 1
        # NFE = steps for first-order samplers (euler, dpmpp_2m, ddim...); heun-like ones evaluate twice.
        return case.steps * rows * unet + dec + rows * (text or 0.0)
    ref = REFERENCE_FLOPS.get((model, case.what))
    if ref is None:
        return None
    flops, pixels = ref
    if pixels is not None:
        f = pipe.vae.config.downsample_factor if case.what == "unet" else 1
        flops *= (case.height // f) * (case.width // f) / pixels
    return flops * case.batch


# --------------------------------------------------------------------------------------------- report

def environment(mesh=None) -> dict:
    """Device and library versions, for the JSON report."""
    import flax
    import jax
    import jaxlib
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    d = devices[0]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": {"platform": d.platform, "kind": str(d.device_kind), "count": len(devices),
                   "all_devices": jax.device_count(), "peak_tflops_bf16": peak_tflops(d),
                   "host_cpus": os.cpu_count(), "machine": platform.machine()},
        "versions": {"jaxdiff_commit": commit, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                     "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version()},
        # What XLA started with, jaxdiff's defaults included (jaxdiff/xla_flags.py): they change CPU kernels.
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def rate_flops(reference: float | None, xla: float | None) -> tuple[float | None, str | None]:
    """(FLOPs per call that TFLOP/s and MFU are computed from, "reference" / "xla" / None).

    The published count where there is one, XLA's otherwise: XLA's undercounts whatever runs in a loop
    (counted once: the CPU attention and feed-forward blocks) or in a custom call (cuDNN / splash
    attention count zero), so it stays a cross-check."""
    if reference is not None:
        return reference, "reference"
    return (xla, "xla") if xla is not None else (None, None)


def finish(raw: dict, *, case: Case, model: str, dtype: str, attention: str, mesh, pipe,
           flops_xla: float | None, load: tuple[float, float]) -> dict:
    """Raw timings -> the reported record (every field always present; null where not measurable)."""
    steady = min(raw["times_s"])
    n = mesh.size
    ref = reference_flops(model, case, pipe)
    flops, source = rate_flops(ref, flops_xla)
    tflops = flops / steady / 1e12 if flops else None
    peak = peak_tflops(next(iter(mesh.devices.flat)))
    f = pipe.vae.config.downsample_factor
    record = {
        "what": case.what, "model": model, "batch": case.batch, "height": case.height, "width": case.width,
        "latent": [case.height // f, case.width // f], "dtype": dtype, "attention": attention,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": n,
        "sampler": case.sampler if case.what == "pipeline" else None,
        "steps": case.steps if case.what == "pipeline" else None,
        "guidance_scale": case.guidance_scale if case.what == "pipeline" else None,
        "compile_s": raw["compile_s"], "compile_cached_s": raw["compile_cached_s"],
        "compile_cold_hit": raw["compile_cold_hit"], "compile_cached_hit": raw["compile_cached_hit"],
        "steady_s": steady, "steady_median_s": statistics.median(raw["times_s"]), "times_s": raw["times_s"],
        # it/s: sampler steps per second for the pipeline (as A1111 / diffusers' progress bars), calls per
        # second otherwise; images/s: images (pipeline) or batch rows (components) per second.
        "it_per_s": raw["calls"] / steady, "images_per_s": raw["images"] / steady,
        "images_per_s_per_device": raw["images"] / steady / n,
        "flops_per_call": {"xla": flops_xla, "reference": ref, "rate_from": source}, "tflops": tflops,
        "mfu": tflops / n / peak if tflops is not None and peak else None,
        "peak_memory": raw["peak_memory"],
        "load_avg_1min": {"before": load[0], "after": load[1]},
    }
    for key in ("first_call_s", "nfe", "flops_xla_program", "companion_times_s"):
        if raw.get(key) is not None:
            record[key] = raw[key]
    return record


def run(model: str, cases: list[Case], *, dtype: str = "float32", attention: str = "auto",
        devices: int | None = None, fsdp: int = 1, warmup: int = 1, repeats: int = 3, seed: int = 0,
        compile_cache: str | None = None, cached_compile: bool = True, pipe=None, log=None,
        companion: Callable[[Case], Callable[[], Any]] | None = None) -> dict:
    """Measures every case; returns {"device", "versions", "created", "results": [record, ...]}.

    Args:
      model: a preset name (PRESETS) or a model folder (also the label of the records).
      pipe: a ready Pipeline (e.g. with weights shared with a PyTorch model); built from `model` if None.
      devices: use the first N devices (default all); fsdp: of those, how many split the params.
      compile_cache: persistent-cache folder; None = a fresh temporary one, so `compile_s` is cold.
      cached_compile: also time a compile served by that cache (`compile_cached_s`; null if False).
      companion: case -> a zero-argument call to alternate with jaxdiff's, call by call (compare_torch.py's
        PyTorch side); its times go in the record's `companion_times_s` (absent without a companion).
    """
    import jax
    from jaxdiff import sharding
    log = log or (lambda msg: None)
    mesh = sharding.make_mesh(jax.devices()[:devices] if devices else None, fsdp=fsdp)
    tmp = None
    if compile_cache is None:
        tmp = tempfile.TemporaryDirectory(prefix="jaxdiff-bench-cache-")
        compile_cache = tmp.name
    restore_cache = use_compilation_cache(compile_cache)
    if pipe is None:
        log(f"building {model} ({dtype}, attention={attention})")
        pipe = build_pipeline(model, dtype=dtype, attention=attention, seed=seed)
    report = {**environment(mesh), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "results": []}
    try:
        for case in cases:
            log(f"{case.what}: batch {case.batch}, {case.height}x{case.width}")
            before = os.getloadavg()[0]
            timing = dict(warmup=warmup, repeats=repeats, seed=seed, cached_compile=cached_compile,
                          companion=companion(case) if companion is not None else None)
            if case.what == "pipeline":
                raw = bench_pipeline(pipe, case, mesh, **timing)
                flops_xla = pipeline_flops(pipe, case, raw["nfe"])
            else:
                raw = bench_component(pipe, case, mesh, **timing)
                flops_xla = raw["flops_xla"]
            record = finish(raw, case=case, model=model, dtype=dtype, attention=attention, mesh=mesh, pipe=pipe,
                            flops_xla=flops_xla, load=(before, os.getloadavg()[0]))
            report["results"].append(record)
            log(format_table([record], header=False))
    finally:
        restore_cache()
        if tmp is not None:
            tmp.cleanup()
    return report


def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


TABLE_HEAD = ("what", "model", "batch", "size", "dtype", "dev", "compile s (cached)", "steady s", "it/s",
              "img/s", "img/s/dev", "TFLOP/s", "MFU", "peak mem", "load")


def table_row(r: dict) -> tuple[str, ...]:
    mem = r["peak_memory"]["bytes"]
    return (r["what"] + (f" {r['sampler']}x{r['steps']}" if r["what"] == "pipeline" else ""), r["model"],
            str(r["batch"]), f"{r['height']}x{r['width']}", r["dtype"], str(r["devices"]),
            f"{r['compile_s']:.1f} ({_fmt(r['compile_cached_s'], '.1f')})", f"{r['steady_s']:.3f}", _fmt(r["it_per_s"]),
            _fmt(r["images_per_s"]), _fmt(r["images_per_s_per_device"]), _fmt(r["tflops"]),
            _fmt(r["mfu"], ".1%"), "-" if mem is None else f"{mem / 2 ** 30:.2f} GiB",
            f"{r['load_avg_1min']['before']:.1f}")


def format_table(records: list[dict], header: bool = True, head=TABLE_HEAD, row=table_row) -> str:
    """Fixed-width text table (one line per record)."""
    rows = [row(r) for r in records]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    lines = [head] if header else []
    lines += rows
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_json(report: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ CLI

def add_arguments(p) -> None:
    """The flags `jaxdiff bench` and benchmarks/compare_torch.py share."""
    from jaxdiff.cli import _int_at_least, _float_in, _seed
    p.add_argument("--model", default="tiny", metavar="PRESET|PATH",
                   help=f"a preset with random weights ({', '.join(PRESETS)}) or a model folder (default tiny)")
    p.add_argument("--what", default="unet,vae_decode,text_encode,pipeline", type=_choices(WHATS),
                   help=f"comma list of {', '.join(WHATS)}, or 'all' (default: all but vae_encode)")
    p.add_argument("--batch", default=[1], type=_int_list, metavar="N[,N...]", help="rows per call (default 1)")
    p.add_argument("--size", default=None, type=_sizes, metavar="HxW[,...]",
                   help="image size(s) in pixels, e.g. 512 or 512x768 (default: the model's own)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute and param dtype")
    p.add_argument("--attention", default="auto", metavar="KERNEL",
                   help="attention kernel for the UNet and VAE (jaxdiff.models.attention: auto (default, the "
                        "library's choice per backend and shape), xla, chunked, cudnn, splash)")
    p.add_argument("--sampler", default="euler", metavar="NAME", help="pipeline sampler (default euler)")
    p.add_argument("--steps", default=20, type=_int_at_least(1), metavar="N", help="pipeline steps (default 20)")
    p.add_argument("--guidance", default=7.5, type=_float_in(0.0, 100.0), metavar="G",
                   help="pipeline guidance scale (default 7.5; > 1 doubles the UNet rows)")
    p.add_argument("--devices", default=None, type=_int_at_least(1), metavar="N", help="use the first N devices")
    p.add_argument("--fsdp", default=1, type=_int_at_least(1), metavar="K", help="devices splitting the params")
    p.add_argument("--warmup", default=1, type=_int_at_least(0), metavar="N", help="untimed calls (default 1)")
    p.add_argument("--repeats", default=3, type=_int_at_least(1), metavar="N", help="timed calls (default 3)")
    p.add_argument("--seed", default=0, type=_seed)
    p.add_argument("--compile-cache", metavar="DIR",
                   help="persistent compilation cache (default: a fresh temporary folder, so compile_s is cold)")
    p.add_argument("--no-cached-compile", dest="cached_compile", action="store_false",
                   help="skip the second, cache-served compile (for the pipeline it costs one more full run)")
    p.add_argument("--json", metavar="FILE", help="write the report here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def register(subparsers) -> None:
    """Adds `jaxdiff bench` (see the module docstring)."""
    p = subparsers.add_parser("bench", help="compile time, speed, TFLOP/s, MFU and memory of each stage",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(run=_bench_command)


def check_args(args) -> list[Case]:
    """Semantic checks that need no heavy import; returns the cases. Raises cli.UsageError."""
    from jaxdiff.cli import UsageError
    if args.model not in PRESETS and not Path(args.model).exists():
        raise UsageError(f"--model {args.model}: neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    if args.devices is not None and args.devices % args.fsdp:
        raise UsageError(f"--fsdp {args.fsdp} must divide --devices {args.devices}")
    sizes = args.size or [None]
    return [Case(what=w, batch=b, height=s[0] if s else 0, width=s[1] if s else 0, steps=args.steps,
                 sampler=args.sampler, guidance_scale=args.guidance)
            for w in args.what for s in sizes for b in args.batch]


def resolve_cases(cases: list[Case], pipe) -> list[Case]:
    """Fills the model's default size where none was given; checks sizes against the VAE factor."""
    from jaxdiff.cli import UsageError
    f = pipe.vae.config.downsample_factor
    size = pipe.unet.config.sample_size or 64
    default = (size if isinstance(size, tuple) else (size, size))
    out = []
    for c in cases:
        if not c.height:
            c = dataclasses.replace(c, height=default[0] * f, width=default[1] * f)
        if c.height % f or c.width % f or c.height % 8 or c.width % 8:
            raise UsageError(f"--size {c.height}x{c.width} must be a multiple of 8 and of the VAE factor {f}")
        out.append(c)
    return out


def check_attention(name: str) -> None:
    from jaxdiff.cli import UsageError
    from jaxdiff.models.attention import IMPLEMENTATIONS
    if name not in IMPLEMENTATIONS:
        raise UsageError(f"--attention {name}: not available here (available: {', '.join(IMPLEMENTATIONS)})")


def _bench_command(args) -> None:
    from jaxdiff.cli import UsageError
    cases = check_args(args)
    check_attention(args.attention)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    pipe = build_pipeline(args.model, dtype=args.dtype, attention=args.attention, seed=args.seed)
    try:
        report = run(args.model, resolve_cases(cases, pipe), dtype=args.dtype, attention=args.attention,
                     devices=args.devices, fsdp=args.fsdp, warmup=args.warmup, repeats=args.repeats,
                     seed=args.seed, compile_cache=args.compile_cache, cached_compile=args.cached_compile,
                     pipe=pipe, log=log)
    except ValueError as e:  # batch / mesh mismatches found once devices are known
        raise UsageError(str(e)) from None
    print(format_table(report["results"]))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


def _choices(allowed: tuple[str, ...]):
    import argparse

    def check(text: str) -> list[str]:
        items = list(allowed) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad) or 'empty list'}; choose from "
                                             f"{', '.join(allowed)} or 'all'")
        return items
    check.__name__ = "list"
    return check


def _int_list(text: str) -> list[int]:
    import argparse
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return values


def _sizes(text: str) -> list[tuple[int, int]]:
    import argparse
    out = []
    for item in text.split(","):
        parts = item.lower().split("x")
        try:
            h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(f"expected sizes like 512 or 512x768, got {text!r}") from None
        if len(parts) > 2 or h < 8 or w < 8:
            raise argparse.ArgumentTypeError(f"expected sizes like 512 or 512x768 (>= 8), got {text!r}")
        out.append((h, w))
    return out
