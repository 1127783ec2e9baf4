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
from jaxdiff.bench.cli import add_arguments, check_args, check_attention, register, resolve_cases  # noqa: F401
from jaxdiff.bench.flops import PEAK_TFLOPS, REFERENCE_FLOPS, peak_tflops, rate_flops, reference_flops  # noqa: F401
from jaxdiff.bench.measure import (bench_component, bench_pipeline, time_calls,  # noqa: F401
                                   use_compilation_cache)
from jaxdiff.bench.programs import DTYPES, WHATS, Case, component_inputs  # noqa: F401
from jaxdiff.bench.report import environment, finish, fmt, format_table, run, write_json  # noqa: F401
from jaxdiff.models.presets import PRESETS, build_pipeline  # noqa: F401
