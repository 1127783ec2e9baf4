"""jaxdiff vs diffusers PyTorch, side by side in one process, on the same config, weights and inputs.

    python benchmarks/compare_torch.py --model sd15 --what unet --batch 2 --size 512 --repeats 3 \
        --json benchmarks/results/cpu-2core-sd15.json

Same flags as `jaxdiff bench` (jaxdiff/bench/, which measures the JAX side here too). For a preset the
PyTorch models are built first by diffusers / transformers from the preset's config with their own random
init; their state dicts are converted to jaxdiff params with convert/diffusers_layout.py, so both sides
run the very same weights. For a model folder both sides read its files. PyTorch runs in the same dtype
with SDPA attention (diffusers' default AttnProcessor2_0, transformers' attn_implementation="sdpa"),
under `torch.inference_mode()`, timed like the JAX side: warm-up calls, then min-of-N with device sync.
`--torch-device auto` (the default) runs PyTorch on the GPU when torch sees one (`cuda`), else on the CPU;
`--torch-compile` times `torch.compile(unet)` (default mode) instead of eager, its first call (the compile)
recorded apart as `torch.first_call_s`. On a GPU both frameworks share its memory: JAX is told to take at
most XLA_PYTHON_CLIENT_MEM_FRACTION (set to .45 here unless already set) instead of its default 75%.
The two sides alternate call by call (one JAX call, one PyTorch call, ...), so a slow spell of a shared
machine falls on both about alike; the 1-minute load average is recorded with every case.

Ratios (> 1: jaxdiff is faster): `speedup` = torch steady_s / jaxdiff steady_s (min over the timed calls);
`speedup_median` the same with medians; `speedup_pairs` each timed PyTorch call over the JAX call just
before it, and `speedup_pairs_median` their median, the ratio least moved by a noisy machine.

This file imports torch and diffusers; jaxdiff/ and convert/ never do.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jaxdiff import bench  # noqa: E402
from jaxdiff.models import presets  # noqa: E402

TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def torch_device(choice: str) -> str:
    """'cpu' or 'cuda' for --torch-device auto|cpu|cuda; cuda asked for but absent is a usage error."""
    import torch
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--torch-device cuda: torch sees no CUDA device (use auto or cpu)")
    return choice


def torch_models(model: str, dtype: str, device: str = "cpu") -> dict:
    """diffusers / transformers modules for a preset (random init, made on `device`: initialising SDXL's
    2.6 B parameters on a GPU takes a second, on the CPU most of a minute) or a model folder, eval mode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFCLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from convert.export import upstream_config
    tdtype = getattr(torch, TORCH_DTYPES[dtype])
    if model in presets.PRESETS:
        nets = {}
        for name, cfg in presets.preset_configs(model).items():
            fields = dataclasses.asdict(cfg)
            with torch.device(device):
                if name == "unet":
                    nets[name] = UNet2DConditionModel(**fields)
                elif name == "vae":
                    nets[name] = AutoencoderKL(**{k: v for k, v in upstream_config("AutoencoderKL", fields).items()
                                                  if not k.startswith("_")})
                else:
                    hf = HFCLIPTextConfig(**{k: v for k, v in fields.items() if k != "with_projection"},
                                          attn_implementation="sdpa")
                    nets[name] = (CLIPTextModelWithProjection if cfg.with_projection else CLIPTextModel)(hf)
    else:
        root = Path(model)
        nets = {"unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet"),
                "vae": AutoencoderKL.from_pretrained(root, subfolder="vae")}
        for name in ("text_encoder", "text_encoder_2"):
            if (root / name).is_dir():
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                nets[name] = cls.from_pretrained(root, subfolder=name, attn_implementation="sdpa")
    return {k: v.to(device, tdtype).eval() for k, v in nets.items()}


def convert_params(nets: dict, configs: dict) -> dict:
    """torch state dicts -> jaxdiff param trees, strictly (every tensor used, every param filled)."""
    from convert.diffusers_layout import convert_state_dict
    from jaxdiff import components
    kinds = {"unet": components.UNET, "vae": components.VAE_KIND,
             "text_encoder": components.CLIP, "text_encoder_2": components.CLIP}
    params = {}
    for name, net in nets.items():
        kind = kinds[name]
        tensors = kind.canonical_keys({k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()})
        params[name] = convert_state_dict(tensors, kind.param_shapes(configs[name]), source=f"torch {name}",
                                          ignore=kind.ignore)
    return params


def torch_call(nets: dict, case: bench.Case, inputs: dict, pipe_torch=None):
    """A zero-argument function running the case once in PyTorch (NCHW), and its device sync."""
    import torch
    first = next(nets["unet"].parameters())
    dev_dtype = first.dtype
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(first.device)
    nchw = lambda a: t(a).permute(0, 3, 1, 2).contiguous().to(dev_dtype)
    if case.what == "unet":
        x, ts, ctx = nchw(inputs["x"]), t(inputs["t"]), t(inputs["context"]).to(dev_dtype)
        added = None if inputs["added"] is None else {k: t(v).to(dev_dtype) for k, v in inputs["added"].items()}
        return lambda: nets["unet"](x, ts, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    if case.what == "vae_decode":
        z = nchw(inputs["z"])
        return lambda: nets["vae"].decode(z).sample
    if case.what == "vae_encode":
        images = nchw(inputs["images"])
        return lambda: nets["vae"].encode(images).latent_dist.mean
    if case.what == "text_encode":
        ids = t(inputs["ids"]).long()
        encs = [nets[n] for n in ("text_encoder", "text_encoder_2") if n in nets]
        return lambda: [e(ids, output_hidden_states=True) for e in encs]
    if case.what == "pipeline":
        prompts = [f"a photograph of an astronaut riding a horse, {i}" for i in range(case.batch)]
        return lambda: pipe_torch(prompts, height=case.height, width=case.width, num_inference_steps=case.steps,
                                  guidance_scale=case.guidance_scale, output_type="np",
                                  generator=torch.Generator().manual_seed(0)).images
    raise ValueError(case.what)


def torch_pipeline(nets: dict, model: str, sampler: str):
    """A diffusers pipeline over the same modules (Euler; other samplers: see the note in the README)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    if sampler not in ("euler", "Euler"):
        raise SystemExit(f"compare_torch.py: the PyTorch pipeline runs 'euler' only, got --sampler {sampler}")
    from jaxdiff.tokenizer import BUNDLED_DIR as vocab
    tok = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading", use_karras_sigmas=True)
    if "text_encoder_2" in nets:
        tok2 = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token="!",
                             model_max_length=77)
        return StableDiffusionXLPipeline(vae=nets["vae"], text_encoder=nets["text_encoder"],
                                         text_encoder_2=nets["text_encoder_2"], tokenizer=tok, tokenizer_2=tok2,
                                         unet=nets["unet"], scheduler=sched)
    return StableDiffusionPipeline(vae=nets["vae"], text_encoder=nets["text_encoder"], tokenizer=tok,
                                   unet=nets["unet"], scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def synced(fn):
    """`fn` under inference mode, returning only once the device is done (bench's companion contract)."""
    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def call():
        with torch.inference_mode():
            fn()
        sync()
    return call


def compare(args, log=lambda msg: None) -> dict:
    """Runs every case on both sides; returns the report (jaxdiff's, each result with .torch and .ratio)."""
    import torch
    device = torch_device(getattr(args, "torch_device", "auto"))
    if device == "cuda":
        # Read when JAX first opens the GPU (after this): leave PyTorch room beside it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".45")
    import diffusers
    import transformers
    cases = bench.check_args(args)
    bench.check_attention(args.attention)
    log(f"building {args.model} in PyTorch ({args.dtype}, {device})")
    nets = torch_models(args.model, args.dtype, device)
    params = convert_params(nets, presets.preset_configs(args.model)) if args.model in presets.PRESETS else None
    pipe = presets.build_pipeline(args.model, dtype=args.dtype, attention=args.attention, params=params)
    del params
    cases = bench.resolve_cases(cases, pipe)
    pipe_torch = torch_pipeline(nets, args.model, args.sampler) if any(c.what == "pipeline" for c in cases) else None
    if getattr(args, "torch_compile", False):
        # Default mode (no CUDA graphs: they would need static inputs per case); the UNet is where the time is.
        nets["unet"] = torch.compile(nets["unet"])
        if pipe_torch is not None:
            pipe_torch.unet = nets["unet"]
    torch_side = lambda case: synced(torch_call(
        nets, case, bench.component_inputs(pipe, case, args.seed) if case.what != "pipeline" else None, pipe_torch))
    report = None
    for case in cases:
        first_call_s, compile_calls_s = None, []
        if getattr(args, "torch_compile", False):
            # The first call compiles (per input shape); the next few can still be slow (measured on
            # the CPU: 25, 19, 6.8, then 0.12 s), so calls repeat until two agree within 20%, apart from
            # bench's warm-up.
            call = torch_side(case)
            for _ in range(6):
                start = time.perf_counter()
                call()
                compile_calls_s.append(time.perf_counter() - start)
                if len(compile_calls_s) >= 2 and compile_calls_s[-2] <= 1.2 * compile_calls_s[-1]:
                    break
            first_call_s = compile_calls_s[0]
            log(f"  torch.compile calls before timing: {', '.join(f'{t:.2f}' for t in compile_calls_s)} s")
        # Both sides alternate call by call (warm-up and timed calls): see bench.time_calls.
        one = bench.run(args.model, [case], dtype=args.dtype, attention=args.attention, devices=args.devices,
                        fsdp=args.fsdp, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
                        compile_cache=args.compile_cache, cached_compile=args.cached_compile, pipe=pipe,
                        log=log, companion=torch_side)
        record = one["results"][0]
        times = record.pop("companion_times_s")
        steady = min(times)
        calls = case.steps if case.what == "pipeline" else 1
        record["torch"] = {"steady_s": steady, "steady_median_s": float(np.median(times)), "times_s": times,
                           "it_per_s": calls / steady, "images_per_s": case.batch / steady,
                           "attention": "sdpa", "threads": torch.get_num_threads(), "device": device,
                           "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                           "compiled": bool(getattr(args, "torch_compile", False)), "first_call_s": first_call_s,
                           "compile_calls_s": compile_calls_s}
        # Per pair: call i of each side ran back to back, so their ratio sees one machine state.
        paired = [t / j for t, j in zip(times, record["times_s"])]
        record["ratio"] = {"speedup": steady / record["steady_s"],
                           "speedup_median": record["torch"]["steady_median_s"] / record["steady_median_s"],
                           "speedup_pairs": paired, "speedup_pairs_median": float(np.median(paired))}
        log(f"  torch {steady:.3f} s, jaxdiff {record['steady_s']:.3f} s: speedup {record['ratio']['speedup']:.2f}x "
            f"(median of pairs {record['ratio']['speedup_pairs_median']:.2f}x)")
        if report is None:
            report = {k: v for k, v in one.items() if k != "results"}
            report["versions"].update(torch=torch.__version__, diffusers=diffusers.__version__,
                                      transformers=transformers.__version__)
            report["results"] = []
        report["results"].append(record)
    return report


HEAD = ("what", "model", "batch", "size", "dtype", "jaxdiff s", "torch s", "speedup", "pairs median",
        "jax compile s (cached)", "load")


def row(r: dict) -> tuple[str, ...]:
    return (r["what"], r["model"], str(r["batch"]), f"{r['height']}x{r['width']}", r["dtype"],
            f"{r['steady_s']:.3f}", f"{r['torch']['steady_s']:.3f}", f"{r['ratio']['speedup']:.2f}x",
            f"{r['ratio']['speedup_pairs_median']:.2f}x", f"{r['compile_s']:.1f} ({bench.fmt(r['compile_cached_s'], '.1f')})",
            f"{r['load_avg_1min']['before']:.1f}")


def main(argv=None) -> int:
    from jaxdiff.cli import UsageError, _Parser
    parser = _Parser(prog="compare_torch.py", description=__doc__.split("\n\n")[0])
    bench.add_arguments(parser)
    parser.add_argument("--torch-device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where PyTorch runs (default auto: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--torch-compile", action="store_true",
                        help="time torch.compile(unet) instead of eager (first call recorded apart)")
    args = parser.parse_args(argv)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report = compare(args, log)
    except (UsageError, ValueError) as e:
        print(f"compare_torch.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(bench.format_table(report["results"], head=HEAD, row=row))
    if args.json:
        bench.write_json(report, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
