"""Timing: explicit compiles (cold and served by the persistent cache), warm calls ended by
`block_until_ready`, alternating with a companion (the PyTorch side) call by call."""
from __future__ import annotations

import time
from typing import Any, Callable

from jaxdiff.bench.flops import xla_flops
from jaxdiff.bench.programs import Case, component_program, place_params


def peak_memory(compiled, devices) -> dict:
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


def timed_compile(make: Callable[[], Any]) -> tuple[Any, float, bool]:
    """(compiled, seconds, served by the persistent cache?) of `make()` = lower + compile."""
    before = _CacheEvents.hits
    t0 = time.perf_counter()
    compiled = make()
    return compiled, time.perf_counter() - t0, _CacheEvents.hits > before


def time_calls(call: Callable[[], Any], warmup: int, repeats: int,
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
    `companion`, also its times, alternated call by call (see `time_calls`)."""
    import jax
    n = mesh.size
    if case.batch % n:
        raise ValueError(f"batch {case.batch} does not split over {n} devices; use a multiple of {n} "
                         f"or fewer devices (--devices)")
    fn, params, inputs, rows = component_program(pipe, case, mesh, seed)
    params = place_params(params, mesh)
    jitted = lambda: jax.jit(fn)
    compiled, cold, cold_hit = timed_compile(lambda: jitted().lower(params, inputs).compile())
    cached = cached_hit = None
    if cached_compile:
        jax.clear_caches()  # drop the in-memory executable: the next compile can only hit the disk cache
        compiled, cached, cached_hit = timed_compile(lambda: jitted().lower(params, inputs).compile())
    times, other = time_calls(lambda: compiled(params, inputs), warmup, repeats, companion)
    return {"compile_s": cold, "compile_cached_s": cached, "compile_cold_hit": cold_hit,
            "compile_cached_hit": cached_hit, "times_s": times, "companion_times_s": other, "flops_xla": xla_flops(compiled, n),
            "peak_memory": peak_memory(compiled, mesh.devices.flat), "calls": 1, "images": rows}


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
    compiled, cold, cold_hit = timed_compile(compile_program)
    cached = cached_hit = None
    if cached_compile:
        jax.clear_caches()
        compiled, cached, cached_hit = timed_compile(compile_program)
    call = lambda: pipe(prompts, mesh=mesh, **options)
    t0 = time.perf_counter()
    call()  # the call's own compile is served by the persistent cache when it is on
    first = time.perf_counter() - t0
    times, other = time_calls(call, warmup, repeats, companion)
    sched = SchedulerConfig.from_dict(pipe.scheduler_config or {}, "scheduler_config.json")
    nfe = make_plan(case.sampler, case.steps, sched).nfe
    return {"compile_s": cold, "compile_cached_s": cached, "compile_cold_hit": cold_hit,
            "compile_cached_hit": cached_hit, "first_call_s": first, "times_s": times,
            "companion_times_s": other, "flops_xla_program": xla_flops(compiled, mesh.size), "nfe": nfe,
            "peak_memory": peak_memory(compiled, mesh.devices.flat), "calls": case.steps, "images": case.batch}
