"""`jaxdiff bench` flags, registered beside the other subcommands' (jaxdiff/cli.py imports this lazily)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path


from jaxdiff.bench.programs import DTYPES, WHATS, Case
from jaxdiff.bench.report import format_table, run, write_json
from jaxdiff.models.presets import PRESETS, build_pipeline


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
