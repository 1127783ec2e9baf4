"""The JSON record of a run (device, versions, FLOPs, MFU, memory) and its text table."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxdiff.bench.flops import peak_tflops, pipeline_flops, rate_flops, reference_flops
from jaxdiff.bench.measure import bench_component, bench_pipeline, use_compilation_cache
from jaxdiff.bench.programs import Case
from jaxdiff.models.presets import build_pipeline


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


def fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


TABLE_HEAD = ("what", "model", "batch", "size", "dtype", "dev", "compile s (cached)", "steady s", "it/s",
              "img/s", "img/s/dev", "TFLOP/s", "MFU", "peak mem", "load")


def table_row(r: dict) -> tuple[str, ...]:
    mem = r["peak_memory"]["bytes"]
    return (r["what"] + (f" {r['sampler']}x{r['steps']}" if r["what"] == "pipeline" else ""), r["model"],
            str(r["batch"]), f"{r['height']}x{r['width']}", r["dtype"], str(r["devices"]),
            f"{r['compile_s']:.1f} ({fmt(r['compile_cached_s'], '.1f')})", f"{r['steady_s']:.3f}", fmt(r["it_per_s"]),
            fmt(r["images_per_s"]), fmt(r["images_per_s_per_device"]), fmt(r["tflops"]),
            fmt(r["mfu"], ".1%"), "-" if mem is None else f"{mem / 2 ** 30:.2f} GiB",
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
