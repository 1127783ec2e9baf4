"""`jaxdiff` command line: thin wrappers over library functions.

    jaxdiff generate "a red panda" --model sd15/ --steps 25 --sampler "DPM++ 2M" --schedule karras
    jaxdiff convert diffusers-folder/ native-folder/
    jaxdiff convert v1-5-pruned-emaonly.safetensors sd15/ --to diffusers   (or --to single-file out.safetensors)

Each subcommand lives in a `register(subparsers)` function that adds its parser and sets `run`
(a function of the parsed args). `build_parser` calls the local ones and then `register` of every
module in `COMMAND_MODULES`, so training / bench add a subcommand with one line there. Registration
must stay light: nothing imports jax before the arguments are checked, so `--help` and flag errors
are instant.

A user error (bad flag or value, missing file, a JaxdiffError from the library) prints one line to
stderr and exits 2; Ctrl-C exits 130 and SIGTERM 143, after removing any half-written output.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
from pathlib import Path

# Modules with a `register(subparsers)` function, each adding one subcommand (e.g. "jaxdiff.training.cli").
COMMAND_MODULES: tuple[str, ...] = ("jaxdiff.bench", "jaxdiff.training.cli")

# The bundled demo model `generate` uses without --model (jaxdiff/demo/README.md is its card).
DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "demo_model"
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A bad command line found after parsing (a missing file, an impossible combination)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default prints usage over several lines
        print(f"jaxdiff: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


# -- value checks used as argparse `type=`: they run before anything heavy is imported -------------------

def _int_at_least(low: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    check.__name__ = "integer"
    return check


def _multiple_of_8(text: str) -> int:
    value = _int_at_least(8)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}; "
                                         f"try {max(8, value // 8 * 8)}")
    return value


def _float_in(low: float, high: float, *, open_low: bool = False):
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if open_low else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if open_low else '['}{low:g}, {high:g}], "
                                             f"got {text}")
        return value
    check.__name__ = "number"
    return check


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2 ** 32:  # jax.random.PRNGKey takes a uint32 seed
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def _default_cache_dir() -> str:
    return os.environ.get("JAXDIFF_CACHE") or str(Path.home() / ".cache" / "jaxdiff" / "xla")


# -- generate --------------------------------------------------------------------------------------------

def register_generate(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image, img2img and inpainting; writes PNGs",
                       description="Generate images. Each PNG carries its parameters in A1111's "
                                   "'parameters' text chunk.")
    p.add_argument("prompt", nargs="*", help="one or more prompts")
    p.add_argument("--prompts-file", metavar="FILE", help="more prompts, one per line (blank lines skipped)")
    p.add_argument("--model", metavar="PATH",
                   help="diffusers folder or jaxdiff folder (default: the bundled demo model)")
    p.add_argument("--out", metavar="DIR", default="out", help="output folder (default: ./out)")
    p.add_argument("--negative", metavar="TEXT",
                   help="negative prompt (default: none; SDXL then uses zeros, as diffusers does)")
    p.add_argument("--prompt-2", metavar="TEXT", help="SDXL: the second text encoder's prompt (default: the prompt)")
    p.add_argument("--negative-2", metavar="TEXT",
                   help="SDXL: the second text encoder's negative prompt (default: --negative)")
    p.add_argument("--prompt-weighting", choices=("a1111", "none"), default="a1111",
                   help="a1111 (default): (word:1.2), [word], BREAK, prompts past 75 tokens in chunks; "
                        "none: the text as is, truncated at 75 tokens (diffusers)")
    p.add_argument("--embedding", metavar="FILE", action="append", default=[],
                   help="a textual-inversion file, used in prompts by its file stem (repeatable)")
    p.add_argument("--embeddings-dir", metavar="DIR",
                   help="every textual-inversion file in DIR, each used by its file stem (A1111)")
    p.add_argument("--lora", metavar="FILE[:WEIGHT]", action="append", default=[],
                   help="a LoRA / LyCORIS file at WEIGHT (default 1), repeatable")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="where <lora:NAME:WEIGHT> prompt tags find NAME.safetensors (A1111's Lora folder)")
    p.add_argument("--height", metavar="H", type=_multiple_of_8,
                   help="pixels, a multiple of 8 (default: the init image's size, else the model's)")
    p.add_argument("--width", metavar="W", type=_multiple_of_8, help="pixels, a multiple of 8")
    p.add_argument("--steps", metavar="N", type=_int_at_least(1), default=25, help="sampler steps (default 25)")
    p.add_argument("--sampler", metavar="NAME", default="dpmpp_2m",
                   help="any name or alias: dpmpp_2m, 'DPM++ 2M Karras', 'Euler a', EulerDiscreteScheduler, ...")
    p.add_argument("--schedule", metavar="NAME",
                   help="karras, normal, exponential, sgm_uniform, ays, ...; default: the sampler's own "
                        "(A1111's Automatic: see --list-samplers)")
    p.add_argument("--list-samplers", action="store_true",
                   help="print every sampler with its aliases, options and default schedule, then exit")
    p.add_argument("--guidance", metavar="G", type=_float_in(0.0, 100.0), default=7.5,
                   help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--guidance-rescale", metavar="R", type=_float_in(0.0, 1.0), default=0.0,
                   help="CFG rescale in [0, 1] for zero-terminal-SNR models (default 0)")
    p.add_argument("--clip-skip", metavar="N", type=_int_at_least(1), default=1,
                   help="A1111's 'Clip skip': condition on the N-th last CLIP layer; 1 (default) is the "
                        "last layer, 2 the penultimate (diffusers' clip_skip=1)")
    p.add_argument("--seed", metavar="S", type=_seed, default=0,
                   help="image i of the run (prompts in order, --images-per-prompt each) uses (S, i) (default 0)")
    p.add_argument("--batch", metavar="N", type=_int_at_least(1), default=1,
                   help="images per compiled call (default 1)")
    p.add_argument("--images-per-prompt", metavar="N", type=_int_at_least(1),
                   help="images for each prompt (default: --batch)")
    p.add_argument("--init-image", metavar="FILE", help="img2img / inpainting source image")
    p.add_argument("--strength", metavar="X", type=_float_in(0.0, 1.0, open_low=True),
                   help="how much of the init image is re-noised, in (0, 1] (default 0.75; 1.0 with --mask)")
    p.add_argument("--mask", metavar="FILE", help="inpainting mask (white = repaint); needs --init-image")
    p.add_argument("--controlnet", metavar="PATH", action="append", default=[],
                   help="a ControlNet (diffusers folder or ControlNet 1.x .safetensors / .pth); repeat for several, "
                        "each with its own --control-image")
    p.add_argument("--control-image", metavar="FILE", action="append", default=[],
                   help="the control image of each --controlnet, in order (resized to the output size)")
    p.add_argument("--control-scale", metavar="W", type=float, action="append", default=[],
                   help="controlnet_conditioning_scale: once for all ControlNets or once each (default 1.0)")
    p.add_argument("--control-start", metavar="S", type=_float_in(0.0, 1.0), action="append", default=[],
                   help="fraction of the steps before which a ControlNet is off: once or once each (default 0)")
    p.add_argument("--control-end", metavar="E", type=_float_in(0.0, 1.0), action="append", default=[],
                   help="fraction of the steps after which a ControlNet is off: once or once each (default 1)")
    p.add_argument("--control-preprocess", choices=("none", "canny"), action="append", default=[],
                   help="run on each control image first: canny (OpenCV's Canny 100 / 200); once or once each")
    p.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode (diffusers' guess_mode)")
    p.add_argument("--mask-blur", metavar="PX", type=_float_in(0.0, 64.0), default=4.0,
                   help="Gaussian blur of the mask in pixels (A1111's Mask blur; default 4)")
    p.add_argument("--no-paste-back", action="store_true",
                   help="keep the decoded pixels outside the mask instead of pasting the original back (A1111 pastes)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and param dtype")
    p.add_argument("--vae", metavar="PATH",  # issue 18
                   help="a separate VAE: an LDM VAE file (.safetensors/.ckpt) or a diffusers AutoencoderKL folder")
    p.add_argument("--refiner", metavar="PATH",
                   help="SDXL ensemble of experts: this refiner finishes each image from --refiner-switch")
    p.add_argument("--refiner-switch", metavar="X", type=_float_in(0.0, 1.0, open_low=True), default=0.8,
                   help="fraction of the noise schedule the base runs before the refiner (default 0.8)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode / encode in overlapping tiles (diffusers' enable_tiling): large images fit")
    p.add_argument("--compile-cache", metavar="DIR", default=_default_cache_dir(),
                   help="JAX persistent compilation cache (default $JAXDIFF_CACHE or ~/.cache/jaxdiff/xla)")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=None,
                   help="do not use the compilation cache")
    p.add_argument("--gather", choices=("host0", "local"), default="host0",
                   help="multi-host: host 0 writes every image (default), or each host writes its own")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_generate)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"{path}: prompts file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read the prompts file ({e})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError("no prompt: give one or more prompts, or --prompts-file FILE")
    return prompts


def _model_source(text: str) -> Path:
    """A model path that exists, or an "org/name" Hub id (`jaxdiff.load` looks it up in the local cache)."""
    model = Path(text)
    if not model.exists() and not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", str(text)):
        raise UsageError(f"{model}: model not found (a folder, a single file, or an org/name Hub id in the "
                         f"local Hugging Face cache)")
    return model


def _check_inputs(args) -> Path:
    """Every file the run needs exists (checked before loading anything); returns the model path."""
    if args.model is None:
        if not DEMO_MODEL.exists():
            raise UsageError("no bundled demo model in this install; pass --model PATH (a diffusers folder "
                             "or a folder written by `jaxdiff convert`)")
        model = DEMO_MODEL
    else:
        model = _model_source(args.model)
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    for flag, value in (("--init-image", args.init_image), ("--mask", args.mask)):
        if value is not None and not Path(value).is_file():
            raise UsageError(f"{value}: {flag} file not found")
    if args.vae is not None and not Path(args.vae).exists():
        raise UsageError(f"{args.vae}: --vae file or folder not found")
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image")
    if (args.height is None) != (args.width is None):
        raise UsageError("give both --height and --width, or neither")
    n = len(args.controlnet)
    if len(args.control_image) != n:
        raise UsageError(f"{n} --controlnet and {len(args.control_image)} --control-image: give one image per "
                         f"ControlNet")
    for flag, values in (("--control-scale", args.control_scale), ("--control-start", args.control_start),
                         ("--control-end", args.control_end), ("--control-preprocess", args.control_preprocess)):
        if values and (n == 0 or len(values) not in (1, n)):
            raise UsageError(f"{flag} given {len(values)} times for {n} --controlnet: give it once or once each")
    if args.guess_mode and n == 0:
        raise UsageError("--guess-mode needs --controlnet")
    for flag, values in (("--controlnet", args.controlnet), ("--control-image", args.control_image)):
        for value in values:
            if not Path(value).exists():
                raise UsageError(f"{value}: {flag} file not found")
    return model


def _generate(args) -> None:
    if args.list_samplers:
        from jaxdiff.samplers import sampler_table
        print(sampler_table())
        return
    texts = _prompts(args)
    model_path = _check_inputs(args)
    per_prompt = args.images_per_prompt or args.batch
    # Heavy imports only now that the command line is known to be good.
    from jaxdiff import images
    from jaxdiff.samplers import resolve
    # "automatic" and no --schedule resolve to None: the sampler's own default (the library's rule);
    # a name like "DPM++ 2M Exponential" implies its own.
    sampler, schedule = resolve(args.sampler, args.schedule)
    size = (args.height, args.width) if args.height is not None else None
    init = mask = None
    if args.init_image is not None:
        size = size or _round8(images.image_size(args.init_image))
        init = images.read_image(args.init_image, size)  # resized to the requested size (A1111 "Just resize")
        if args.mask is not None:
            mask = images.read_mask(args.mask, size)
    # The library's default: 0.75 for img2img, 1.0 (all noise) for inpainting.
    strength = args.strength
    if strength is None and init is not None:
        strength = 1.0 if mask is not None else 0.75  # the library's defaults, named so the PNG can say them

    from jaxdiff import generation, sharding
    sharding.initialize_distributed()  # no-op on one host; must precede every other JAX call
    if args.compile_cache is not None:
        generation.enable_compilation_cache(args.compile_cache)
    pipe = _load(model_path, args.dtype, **_vae_kwargs(args))
    _check_clip_skip(pipe, args.clip_skip)
    _load_embeddings(pipe, args)
    texts_for_model, lora_hashes = _load_loras(pipe, args, texts)
    refiner = None
    if args.refiner is not None:
        if init is not None:
            raise UsageError("--refiner runs after text-to-image; it does not take --init-image")
        refiner = _load(Path(args.refiner), args.dtype)
    for p in (pipe, refiner):
        if p is not None and args.vae_tiling:
            p.enable_vae_tiling()
    handoff = {} if refiner is None else {"denoising_end": args.refiner_switch, "output_type": "latent"}
    control_kwargs, control_fields = {}, {}
    if args.controlnet:
        if size is None:
            size = _round8(images.image_size(args.control_image[0]))
        pipe, control_kwargs, control_fields = _controlnets(pipe, args, size)

    # One request over every prompt: image i (prompt i // per_prompt) uses sample index i, so the files
    # equal `pipe(texts, num_images_per_prompt=per_prompt, seed=...)` whatever --batch is.
    total = len(texts) * per_prompt
    bar = _ProgressBar(total, args.batch or total, quiet=args.quiet)
    batches = pipe.generate_batches(
        texts_for_model, num_images_per_prompt=per_prompt, batch_size=args.batch, negative_prompt=args.negative,
        prompt_2=args.prompt_2, negative_prompt_2=args.negative_2, prompt_weighting=args.prompt_weighting,
        height=None if init is not None or size is None else size[0],
        width=None if init is not None or size is None else size[1], steps=args.steps, sampler=sampler,
        schedule=schedule, guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
        clip_skip=args.clip_skip - 1, seed=args.seed, image=init, strength=strength, mask=mask,
        gather="all" if refiner is not None else args.gather, progress=None if args.quiet else bar.on_step,
        **handoff, **control_kwargs, **({} if mask is None else {"mask_blur": args.mask_blur, "paste_back": not args.no_paste_back}))
    if refiner is not None:
        batches = _refined(refiner, batches, texts_for_model, per_prompt, args, sampler=sampler, schedule=schedule)
    blur = int(args.mask_blur) if float(args.mask_blur).is_integer() else args.mask_blur
    extra = {"Denoising strength": strength, "Clip skip": args.clip_skip if args.clip_skip > 1 else None,
             "Mask blur": blur if mask is not None else None,
             "CFG rescale": args.guidance_rescale or None, "TI hashes": _ti_hashes(pipe, args),
             "Lora hashes": lora_hashes or None,
             "Prompt weighting": None if args.prompt_weighting == "a1111" else args.prompt_weighting,
             **control_fields}
    written = []
    try:
        while (out := _interruptible(next, batches, None)) is not None:
            bar.batch_done(len(out.indices))
            for row, index in zip(out.images if out.images is not None else (), out.indices):
                text = images.parameters_text(
                    texts[index // per_prompt], args.negative or "", steps=args.steps, sampler=sampler,
                    schedule=schedule, guidance_scale=args.guidance, seed=args.seed, width=row.shape[1],
                    height=row.shape[0], model=model_path.name,
                    extra={**extra, "Seed index": int(index) if total > 1 else None})
                with _deferred_signals():  # a file is finished before Ctrl-C / SIGTERM acts
                    written.append(images.write_png(args.out, row, text, seed=args.seed))
    finally:
        bar.close()
    if written:
        print(f"wrote {len(written)} image(s) to {args.out}")


def _refined(refiner, batches, texts: list[str], per_prompt: int, args, *, sampler, schedule):
    """Each base batch's latents finished by the refiner from --refiner-switch (diffusers' hand-off)."""
    for out in batches:
        rows = [texts[int(i) // per_prompt] for i in out.indices]
        yield refiner(rows, None if args.negative is None else [args.negative] * len(rows), image=out.latents,
                      denoising_start=args.refiner_switch, steps=args.steps, sampler=sampler, schedule=schedule,
                      guidance_scale=args.guidance, seed=args.seed, indices=[int(i) for i in out.indices],
                      gather=args.gather)


def _load_loras(pipe, args, texts: list[str]) -> tuple[list[str], str]:
    """--lora files and <lora:NAME:W> prompt tags (found in --lora-dir) loaded into `pipe`. Returns the
    prompts without their tags (the PNGs keep them, as A1111) and A1111's "Lora hashes" value."""
    from jaxdiff.adapters import tags as lora_tags
    stripped, found = zip(*(lora_tags.extract_tags(t) for t in texts))
    if any(f != found[0] for f in found):
        raise UsageError("the prompts name different <lora:...> tags; one run applies one set of LoRAs to "
                         "every image: run them separately")
    wanted = []
    for spec in args.lora:
        path, weight = spec, 1.0
        head, _, tail = spec.rpartition(":")
        if head and not Path(spec).exists():
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        wanted.append((Path(path), Path(path).stem, weight))
    if found[0] and args.lora_dir is None:
        raise UsageError("the prompt has <lora:...> tags: pass --lora-dir DIR (the folder holding them)")
    for tag in found[0]:
        wanted.append((lora_tags.find_lora(args.lora_dir, tag.name), tag.name, tag.weight))
    names = []
    for path, name, weight in wanted:
        if not path.is_file():
            raise UsageError(f"--lora {path}: no such file")
        names.append(pipe.load_lora_weights(path, adapter_name=f"{name}_{len(names)}", scale=weight))
    hashes = ", ".join(f"{name}: {lora_tags.short_hash(path)}" for path, name, _ in wanted)
    return list(stripped), hashes


def _ti_hashes(pipe, args) -> str | None:
    """A1111's "TI hashes" of the embeddings the flags loaded (None without any)."""
    if not args.embedding and args.embeddings_dir is None:
        return None
    return pipe.embeddings.hashes() or None


def _load_embeddings(pipe, args) -> None:
    """--embeddings-dir, then each --embedding (a later file replaces a term of the same name)."""
    from convert import embeddings as files
    if args.embeddings_dir is not None:
        found, skipped = files.read_embeddings_dir(args.embeddings_dir)
        for path, why in skipped:
            print(f"jaxdiff: skipped {path}: {why}", file=sys.stderr)
        for embedding in found:
            pipe.embeddings = pipe.embeddings.add(embedding)
    for path in args.embedding:
        pipe.load_textual_inversion(path)


def _check_clip_skip(pipe, n: int) -> None:
    """--clip-skip counts as A1111 does (1 = no skip), the library as diffusers (0 = no skip): say which."""
    from jaxdiff.errors import JaxdiffError
    from jaxdiff.prompts import check_clip_skip
    try:
        check_clip_skip(pipe, n - 1)
    except JaxdiffError as e:
        raise UsageError(f"--clip-skip {n} is too deep for this model: {e} (library clip_skip = --clip-skip - 1)"
                         ) from None


def _each(values: list, n: int, default) -> list:
    """A repeatable flag given 0 times (default), once (for all) or n times."""
    return [default] * n if not values else (values * n if len(values) == 1 else list(values))


def _controlnets(pipe, args, size: tuple[int, int]):
    """--controlnet / --control-* -> (the pipeline with its ControlNets, pipe(...) keyword arguments, the
    PNG's "ControlNet i" fields in A1111's sd-webui-controlnet style)."""
    from jaxdiff import images
    from jaxdiff.preprocess import canny
    n = len(args.controlnet)
    nets = [_load_controlnet(Path(path), args.dtype) for path in args.controlnet]
    pipe = pipe.with_controlnet(nets)
    scales = _each(args.control_scale, n, 1.0)
    starts, ends = _each(args.control_start, n, 0.0), _each(args.control_end, n, 1.0)
    modules = _each(args.control_preprocess, n, "none")
    for start, end in zip(starts, ends):
        if start >= end:
            raise UsageError(f"--control-start {start} must be below --control-end {end}")
    control = []
    for path, module in zip(args.control_image, modules):
        image = images.read_image(path, size)
        control.append(canny(image, 100, 200) if module == "canny" else image)
    kwargs = dict(control_image=control[0] if n == 1 else control, controlnet_conditioning_scale=scales,
                  control_guidance_start=starts, control_guidance_end=ends, guess_mode=args.guess_mode)
    fields = {}
    for i in range(n):
        body = {"Module": modules[i], "Model": Path(args.controlnet[i]).stem,
                "Weight": scales[i], "Guidance Start": starts[i], "Guidance End": ends[i]}
        if modules[i] == "canny":
            body.update({"Threshold A": 100.0, "Threshold B": 200.0})
        if args.guess_mode:
            body["Guess Mode"] = True
        fields[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in body.items())
    return pipe, kwargs, fields


def _load_controlnet(path: Path, dtype: str):
    from jaxdiff.loading import load_controlnet
    return load_controlnet(path, dtype)


def _round8(size: tuple[int, int]) -> tuple[int, int]:
    h, w = size
    if h < 8 or w < 8:
        raise UsageError(f"the init image is {w}x{h}; it must be at least 8x8")
    return h // 8 * 8, w // 8 * 8


def _load(path: Path, dtype: str, vae=None):
    from jaxdiff.loading import load
    return load(path, dtype=dtype, vae=vae)


def _vae_kwargs(args) -> dict:
    """`vae=` only when --vae is given (so `_load(path, dtype)` stays the two-argument call)."""
    return {"vae": args.vae} if args.vae is not None else {}


# -- interrupts ------------------------------------------------------------------------------------------

_WORKER: threading.Thread | None = None  # a computation still running when main() returns


def _interruptible(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a daemon thread, so Ctrl-C / SIGTERM act at once.

    Python runs signal handlers only in the main thread between bytecodes; a main thread blocked inside
    XLA for a whole sampling loop would ignore Ctrl-C until the batch ends. Here the main thread waits
    on an Event (interruptible) while the worker computes; on interrupt `main` exits without waiting.
    """
    global _WORKER
    result: dict = {}
    done = threading.Event()

    def work():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the main thread
            result["error"] = e
        finally:
            done.set()

    _WORKER = threading.Thread(target=work, name="jaxdiff-generate", daemon=True)
    _WORKER.start()
    while not done.wait(0.2):
        pass
    _WORKER = None
    if "error" in result:
        raise result["error"]
    return result["value"]


@contextlib.contextmanager
def _deferred_signals():
    """Holds SIGINT / SIGTERM until the block ends, then acts on them (short blocks only: file writes)."""
    pending = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])


class _ProgressBar:
    """One bar over every model evaluation of every batch, with the images finished as a postfix.

    The library reports (evaluations done, per batch) from the running program; the number of batches
    is known up front, the evaluations per batch only once the first batch reports."""

    def __init__(self, images: int, batch: int, *, quiet: bool):
        from tqdm import tqdm
        self._bar = tqdm(total=None, unit="step", disable=quiet, file=sys.stderr, dynamic_ncols=True)
        self._batches = -(-images // batch)
        self._batch = 0
        self._images = [0, images]

    def on_step(self, done: int, per_batch: int) -> None:
        self._bar.total = self._batches * per_batch
        self._bar.n = self._batch * per_batch + done
        self._bar.set_postfix_str(f"{self._images[0]}/{self._images[1]} images", refresh=True)

    def batch_done(self, n_images: int) -> None:
        self._batch += 1
        self._images[0] += n_images
        self._bar.set_postfix_str(f"{self._images[0]}/{self._images[1]} images", refresh=True)

    def close(self) -> None:
        self._bar.close()


# -- convert ---------------------------------------------------------------------------------------------

def register_convert(sub) -> None:
    p = sub.add_parser("convert", help="read a model (diffusers / jaxdiff folder, single file) and write it "
                                       "in jaxdiff's native format, as a diffusers folder or as one file")
    p.add_argument("src", help="diffusers folder, jaxdiff folder, or single-file .safetensors/.ckpt")
    p.add_argument("dst", help="output folder, or a .safetensors file for --to single-file (written atomically)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="param dtype to store")
    p.add_argument("--to", choices=("native", "diffusers", "single-file"), default="native",
                   help="output format (default: native); single-file is the original CompVis / SGM layout")
    p.add_argument("--vae", metavar="PATH", help="replace the VAE (a VAE file or a diffusers AutoencoderKL folder)")
    p.set_defaults(run=_convert)


def _convert(args) -> None:
    _model_source(args.src)
    if args.vae is not None and not Path(args.vae).exists():
        raise UsageError(f"{args.vae}: --vae file or folder not found")
    if args.to == "single-file" and not str(args.dst).endswith(".safetensors"):
        raise UsageError(f"{args.dst}: --to single-file writes a .safetensors file; name it *.safetensors")
    pipe = _load(Path(args.src), args.dtype, **_vae_kwargs(args))
    if args.to == "native":
        pipe.save(args.dst)
    elif args.to == "diffusers":
        from jaxdiff.export import export_pipeline
        export_pipeline(pipe, args.dst, overwrite=True)
    else:
        from jaxdiff.single_file import export_single_file
        export_single_file(pipe, args.dst)
    print(f"wrote {args.dst}")


# -- entry point -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxdiff", description="Stable Diffusion in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    register_generate(sub)
    register_convert(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so `finally` blocks remove temp files as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from jaxdiff.errors import JaxdiffError, NonFiniteImageError
        args.run(args)
    except NonFiniteImageError as e:  # the request was fine, the model is not: a failure, not a usage error
        print(f"jaxdiff: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except (UsageError, JaxdiffError) as e:
        print(f"jaxdiff: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _stop("interrupted", 130)
    except _Terminated:
        return _stop("terminated", 128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may be called in-process (tests, notebooks)
    return 0


def _stop(what: str, code: int) -> int:
    print(f"jaxdiff: {what}", file=sys.stderr)
    if _WORKER is not None and _WORKER.is_alive():
        # XLA is still running the interrupted batch; interpreter shutdown would wait for it. Temp files
        # are already gone (the `finally` blocks ran on the way here), so leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
