"""Pipeline: the networks, tokenizers and scheduler config of one Stable Diffusion model, and generation.

    pipe = jaxdiff.load("path/to/sd15")          # see jaxdiff.loading
    out = pipe("a red panda", steps=25, seed=0)  # out.images uint8 [B, H, W, 3], out.latents NHWC
    pipe.text_encoder(ids).last_hidden_state     # components are pure jitted callables
    pipe.unet(x, t, context)
    pipe.vae.decode(z)
    pipe.save("out/")                            # native format, read back by jaxdiff.load

`__call__` checks a request and turns it into per-image host arrays (token ids, time ids, init image,
mask, sample indices); jaxdiff.generation compiles text encoding + sampling + decoding into one
sharded program and holds the seed rules. jaxdiff.prompts holds the text-conditioning rules.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxdiff import checkpoint, generation, prompts
from jaxdiff.components import Component
from jaxdiff.errors import CheckpointError, JaxdiffError

REQUIRED = ("unet", "vae")  # plus at least one text encoder (the SDXL refiner has only text_encoder_2)
GATHER = ("all", "host0", "local")


@dataclasses.dataclass
class GenerationOutput:
    """What `pipe(...)` returns. Rows are the images this process holds (all of them unless
    gather="local", none on processes other than 0 with gather="host0").

    Attributes:
      images: uint8 [n, H, W, 3].
      latents: float32 [n, h, w, C] final (scaled) latents, NHWC.
      indices: int [n] each row's sample index in the request (its noise stream; see jaxdiff.generation).
      pixels: float32 [n, H, W, 3] in [0, 1], the images before rounding (only with return_float=True).
    """
    images: np.ndarray | None
    latents: np.ndarray | None
    indices: np.ndarray
    pixels: np.ndarray | None = None


class Pipeline:
    """Holds `text_encoder`, `text_encoder_2` (SDXL), `unet`, `vae`, `tokenizer`, `tokenizer_2` and
    `scheduler_config` (the checkpoint's own scheduler_config.json, a dict, or None)."""

    def __init__(self, *, unet: Component, vae: Component, text_encoder: Component | None = None,
                 tokenizer=None, text_encoder_2: Component | None = None, tokenizer_2=None,
                 scheduler_config: Mapping[str, Any] | None = None, pipeline_class: str | None = None,
                 options: Mapping[str, Any] | None = None):
        """`options`: model_index.json pipeline flags jaxdiff honours: "force_zeros_for_empty_prompt"
        (default: True for SDXL base, False for refiners, as the released checkpoints set it)."""
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.pipeline_class = pipeline_class
        self.options = dict(options or {})
        self._runners: dict[Any, generation.Runner] = {}
        self._mesh = None

    @classmethod
    def from_parts(cls, networks: Mapping[str, Component], tokenizers: Mapping[str, Any],
                   scheduler_config, *, source: str, pipeline_class: str | None = None,
                   options: Mapping[str, Any] | None = None) -> "Pipeline":
        """Assembles a pipeline from loaded parts, checking that they fit together."""
        missing = [n for n in REQUIRED if n not in networks]
        if not any(n in networks for n in prompts.ENCODERS):
            missing.append("text_encoder (or text_encoder_2)")
        if missing:
            raise CheckpointError(f"{source}: no {', '.join(missing)} in this model folder")
        if "text_encoder" in networks and "tokenizer" not in tokenizers:
            from jaxdiff.tokenizer import Tokenizer  # bundled CLIP vocabulary, SD1 padding
            tokenizers = {**tokenizers, "tokenizer": Tokenizer.bundled()}
        if "text_encoder_2" in networks and "tokenizer_2" not in tokenizers:
            from jaxdiff.tokenizer import Tokenizer
            tokenizers = {**tokenizers, "tokenizer_2": Tokenizer.bundled(pad_token="!")}
        context = sum(networks[n].config.hidden_size for n in ("text_encoder", "text_encoder_2")
                      if n in networks)
        if networks["unet"].config.cross_attention_dim != context:
            raise CheckpointError(f"{source}: the unet expects context width "
                                  f"{networks['unet'].config.cross_attention_dim} but the text encoders give "
                                  f"{context}; the components do not belong together")
        return cls(**networks, **tokenizers, scheduler_config=scheduler_config,
                   pipeline_class=pipeline_class, options=options)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def components(self) -> dict[str, Component]:
        """The networks present, by their diffusers names."""
        return {name: c for name in ("text_encoder", "text_encoder_2", "unet", "vae")
                if (c := getattr(self, name)) is not None}

    def save(self, dst) -> None:
        """Writes the native format (jaxdiff.checkpoint) atomically; `jaxdiff.load(dst)` reads it back."""
        parts = {name: (type(c).__name__, c.config, c.params) for name, c in self.components().items()}
        with tempfile.TemporaryDirectory() as tmp:
            tok_dirs = {}
            for name in ("tokenizer", "tokenizer_2"):
                tok = getattr(self, name)
                if tok is not None:
                    tok.save(Path(tmp) / name)
                    tok_dirs[name] = Path(tmp) / name
            extra_json = {}
            if self.scheduler_config is not None:
                extra_json["scheduler/scheduler_config.json"] = self.scheduler_config
            checkpoint.write_folder(dst, parts, extra_dirs=tok_dirs, extra_json=extra_json,
                                    pipeline={"class": self.pipeline_class, "options": self.options})

    # ------------------------------------------------------------------------------------ generation
    @property
    def mesh(self):
        """The default mesh: every device of every process, batch split over all of them."""
        if self._mesh is None:
            from jaxdiff import sharding
            self._mesh = sharding.make_mesh()
        return self._mesh

    def runner(self, mesh=None) -> generation.Runner:
        """The compiled-program holder for `mesh` (params placed once per mesh)."""
        mesh = mesh if mesh is not None else self.mesh
        if mesh not in self._runners:
            self._runners[mesh] = generation.Runner(self, mesh)
        return self._runners[mesh]

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 height: int | None = None, width: int | None = None, steps: int = 25,
                 sampler: str = "dpmpp_2m", schedule: str | None = "karras", guidance_scale: float = 7.5,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, seed: int = 0,
                 num_images_per_prompt: int = 1, latents=None, image=None, strength: float | None = None,
                 mask=None, indices: Sequence[int] | None = None,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None,
                 negative_original_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] | None = None,
                 negative_target_size: tuple[int, int] | None = None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                 sampler_options: Mapping[str, Any] | None = None, gather: str = "all", mesh=None,
                 return_float: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> GenerationOutput:
        """Generate images: txt2img, img2img (`image`), inpainting (`image` + `mask`).

        Args:
          prompt: a string or a list of P strings; B = P * num_images_per_prompt images, prompt p's
            images are rows p*N .. p*N+N-1.
          negative_prompt: None, one string, or P strings. None means "" (SDXL base: zero embeddings,
            diffusers' force_zeros_for_empty_prompt).
          height, width: image size, multiples of 8 (default: the init image's size, else the UNet's
            sample_size times the VAE factor).
          steps, sampler, schedule, sampler_options: see jaxdiff.samplers.make_plan; schedule=None is the
            checkpoint scheduler's own.
          guidance_scale: classifier-free guidance; <= 1 runs the UNet on the prompt alone.
          guidance_rescale: Lin et al. 2023's CFG rescale in [0, 1] (for zero-terminal-SNR models).
          clip_skip: final text-encoder layers to skip (diffusers' clip_skip; 1 = A1111's "clip skip 2").
          seed: request seed; image i's noise depends only on (seed, i) (jaxdiff.generation).
          latents: unit-variance starting noise [B, h, w, C] NHWC (replaces the seeded start noise).
          image: init image(s): uint8 or float in [0, 1], [H, W, 3] or [1 | P | B, H, W, 3].
          strength: img2img / inpaint strength in (0, 1]; default 0.75 for img2img, 1.0 for inpainting.
          mask: inpainting mask, white (>= 0.5) = repaint: [H, W], [H, W, 1|3] or with a leading
            1 | P | B axis, uint8 or float in [0, 1]. 9-channel UNets get mask + masked-image latents;
            4-channel UNets blend the known region back after every step.
          indices: sample index of each of the B images (default 0..B-1): image i of a batch equals the
            same request made with indices=[i].
          original_size, crops_coords_top_left, target_size, negative_*: SDXL size conditioning
            (defaults: (height, width), (0, 0), (height, width); negatives default to the positives).
          aesthetic_score, negative_aesthetic_score: SDXL refiner conditioning.
          gather: "all" (every process gets every image), "host0" (process 0 only), "local" (each
            process its own rows; see GenerationOutput.indices).
          mesh: a jaxdiff.sharding mesh (default: all devices).
          return_float: also return the float images in [0, 1] (GenerationOutput.pixels).
          progress: called on the host as (model evaluations done, total) after each evaluation. The
            request then runs as three programs (prepare, one evaluation called K times, decode) instead
            of one: other compiles, the same numbers per evaluation, one host sync per step.

        Raises:
          JaxdiffError (SamplerError for sampler problems) with a one-line message.
        """
        if gather not in GATHER:
            raise JaxdiffError(f"gather={gather!r}; expected one of {', '.join(GATHER)}")
        ids, neg_ids, n_prompts = prompts.tokenize_request(self, prompt, negative_prompt, num_images_per_prompt)
        rows = n_prompts * num_images_per_prompt
        clip_skip = prompts.check_clip_skip(self, clip_skip)
        f = self.vae_scale_factor
        c = self.vae.config.latent_channels

        image_rows = mask_rows = None
        if image is not None:
            image_rows = _per_row(_rgb(_as_images(image, "image")), rows, num_images_per_prompt, "image")
            size = image_rows.shape[1:3]
            if (height, width) not in ((None, None), tuple(size)):
                raise JaxdiffError(f"image is {size[0]}x{size[1]} but height, width = {height}, {width}; "
                                   f"resize the image or leave height and width unset")
            height, width = size
        elif mask is not None:
            raise JaxdiffError("mask needs an init image (image=)")
        default = (self.unet.config.sample_size or 64) * f
        height, width = height or default, width or default
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % 8 or v % f:
                raise JaxdiffError(f"{name}={v!r} must be a positive multiple of 8 (and of the VAE factor {f})")
        h, w = height // f, width // f

        if mask is not None:
            mask_rows = _per_row(_as_mask(mask), rows, num_images_per_prompt, "mask")
            if mask_rows.shape[1:3] != (height, width):
                raise JaxdiffError(f"mask is {mask_rows.shape[1]}x{mask_rows.shape[2]} but the image is "
                                   f"{height}x{width}")
        mode = "txt2img"
        if image_rows is not None:
            mode = "img2img"
            if mask_rows is not None:
                unet_in = self.unet.config.in_channels
                if unet_in == 2 * c + 1:
                    mode = "inpaint"
                elif unet_in == c:
                    mode = "inpaint_blend"
                else:
                    raise JaxdiffError(f"inpainting needs a UNet with {c} or {2 * c + 1} input channels, "
                                       f"this one has {unet_in}")
        elif self.unet.config.in_channels != c:
            raise JaxdiffError(f"this is an inpainting model ({self.unet.config.in_channels}-channel UNet): "
                               f"pass image= and mask=")
        if strength is None:
            strength = 0.75 if mode == "img2img" else 1.0
        elif mode == "txt2img":
            raise JaxdiffError("strength applies only with an init image (image=)")

        from jaxdiff.samplers import make_plan
        from jaxdiff.schedules import SchedulerConfig
        sched = SchedulerConfig.from_dict(self.scheduler_config or {}, "scheduler_config.json")
        plan = make_plan(sampler, steps, sched, schedule=schedule, strength=strength, **dict(sampler_options or {}))

        cfg = float(guidance_scale) > 1.0
        if not 0.0 <= float(guidance_rescale) <= 1.0:
            raise JaxdiffError(f"guidance_rescale={guidance_rescale!r} must be in [0, 1]")
        sdxl = self.unet.config.addition_embed_type == "text_time"
        zero_negative = sdxl and negative_prompt is None and bool(
            self.options.get("force_zeros_for_empty_prompt", not self._is_refiner()))
        if cfg and neg_ids is None and not zero_negative:
            neg_ids = prompts.empty_ids(self, rows)

        idx = np.arange(rows) if indices is None else np.asarray(indices)
        if idx.shape != (rows,) or not np.issubdtype(idx.dtype, np.integer) or (idx < 0).any():
            raise JaxdiffError(f"indices must be {rows} non-negative integers (one per image), got {indices!r}")
        inputs: dict[str, Any] = {"index": idx.astype(np.int32), "ids": ids}
        if cfg and not zero_negative:
            inputs["neg_ids"] = neg_ids
        if sdxl:
            pos, neg = self._time_ids(height, width, original_size, crops_coords_top_left, target_size,
                                      negative_original_size, negative_crops_coords_top_left,
                                      negative_target_size, aesthetic_score, negative_aesthetic_score)
            inputs["time_ids"] = np.tile(pos[None], (rows, 1))
            if cfg:
                inputs["neg_time_ids"] = np.tile(neg[None], (rows, 1))
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (rows, h, w, c):
                raise JaxdiffError(f"latents must be [B, h, w, C] = {(rows, h, w, c)} (NHWC), got {latents.shape}")
            inputs["latents"] = latents
        if image_rows is not None:
            inputs["image"] = 2.0 * image_rows - 1.0  # [-1, 1], as diffusers' VaeImageProcessor.normalize
        if mask_rows is not None:
            inputs["mask"] = mask_rows

        spec = generation.Spec(mode=mode, cfg=cfg, rescale=cfg and float(guidance_rescale) > 0.0,
                               zero_negative=zero_negative, clip_skip=clip_skip, given_latents=latents is not None,
                               from_image=mode == "img2img" or (mode != "txt2img" and strength < 1.0),
                               return_float=return_float, latent_size=(h, w))
        runner = self.runner(mesh)
        on_step = None if progress is None else lambda k: progress(k + 1, plan.nfe)
        out, n = runner(spec, inputs, plan, generation.request_key(seed),
                        np.array([guidance_scale, guidance_rescale], np.float32), on_step=on_step)
        return _collect(out, n, inputs["index"], gather)  # blocks until the program is done

    def generate_batches(self, prompt: str | Sequence[str], *, num_images_per_prompt: int = 1,
                         batch_size: int | None = None, negative_prompt: str | Sequence[str] | None = None,
                         **kwargs) -> Iterator[GenerationOutput]:
        """Like `pipe(...)`, in batches of `batch_size` images: yields one GenerationOutput per batch,
        as soon as it is done (progress, writing files as they come). Image i of the whole request keeps
        sample index i, so the images equal those of one big call. `kwargs` are `__call__`'s; `image`
        and `mask` must be single images (or None) here.

        Args:
          batch_size: images per compiled call (default: all at once). The last batch may be smaller
            (it compiles once more unless it has the same padded size).
        """
        texts = prompts.as_prompt_list(prompt)
        negs = None if negative_prompt is None else prompts.as_prompt_list(negative_prompt, "negative_prompt")
        if negs is not None and len(negs) not in (1, len(texts)):
            raise JaxdiffError(f"negative_prompt has {len(negs)} entries but prompt has {len(texts)}")
        rows = [p for p in texts for _ in range(num_images_per_prompt)]
        neg_rows = None if negs is None else [negs[0] if len(negs) == 1 else negs[r // num_images_per_prompt]
                                             for r in range(len(rows))]
        batch_size = batch_size or len(rows)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise JaxdiffError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            yield self(rows[start:stop], None if neg_rows is None else neg_rows[start:stop],
                       indices=list(range(start, stop)), **kwargs)

    def _is_refiner(self) -> bool:
        """SDXL refiner: 5 time ids (sizes + aesthetic score) instead of 6."""
        return self._n_time_ids() == 5

    def _n_time_ids(self) -> int:
        cfg = self.unet.config
        pooled = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else 0
        return (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim

    def _time_ids(self, height, width, original_size, crops, target_size, neg_original, neg_crops, neg_target,
                  aesthetic, neg_aesthetic) -> tuple[np.ndarray, np.ndarray]:
        """SDXL micro-conditioning (diffusers' _get_add_time_ids): float32 [n] positive and negative."""
        original = tuple(original_size or (height, width))
        target = tuple(target_size or (height, width))
        crops = tuple(crops)
        neg_original = tuple(neg_original or original)
        neg_crops = tuple(neg_crops or crops)
        neg_target = tuple(neg_target or target)
        n = self._n_time_ids()
        if n == 5:
            pos, neg = original + crops + (aesthetic,), neg_original + neg_crops + (neg_aesthetic,)
        elif n == 6:
            pos, neg = original + crops + target, neg_original + neg_crops + neg_target
        else:
            raise JaxdiffError(f"this UNet expects {n} SDXL time ids; jaxdiff knows 6 (base) and 5 (refiner)")
        return np.asarray(pos, np.float32), np.asarray(neg, np.float32)


def _collect(out: dict, n: int, index: np.ndarray, gather: str) -> GenerationOutput:
    """Global program outputs -> host arrays per the gather mode (trimmed to the n real rows)."""
    from jaxdiff import sharding
    if gather == "local":
        got = {k: sharding.local_rows(v, n) for k, v in out.items()}
        rows = got["images"][1]
        return GenerationOutput(images=got["images"][0], latents=got["latents"][0], indices=index[rows],
                                pixels=got["pixels"][0] if "pixels" in got else None)
    host = sharding.gather(out, host0_only=gather == "host0")
    if host is None:
        return GenerationOutput(images=None, latents=None, indices=np.zeros(0, np.int64))
    host = sharding.trim(host, n)
    return GenerationOutput(images=host["images"], latents=host["latents"], indices=index[:n].astype(np.int64),
                            pixels=host.get("pixels"))


def _as_images(image, what: str) -> np.ndarray:
    """uint8 / float [0, 1] image(s) (arrays, PIL images or a list of them) -> float32 [N, H, W, C]."""
    if isinstance(image, (list, tuple)):
        arrays = [np.asarray(i) for i in image]
        if len({a.shape for a in arrays}) != 1:
            raise JaxdiffError(f"{what}: all images must have the same size, got {[a.shape for a in arrays]}")
        image = np.stack(arrays)
    x = np.asarray(image)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0  # as diffusers' pil_to_numpy
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise JaxdiffError(f"{what}: float images must be in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    else:
        raise JaxdiffError(f"{what}: expected uint8 or float pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise JaxdiffError(f"{what}: expected [H, W, 3] or [N, H, W, 3] pixels, got shape {np.shape(image)}")
    return x


def _rgb(x: np.ndarray) -> np.ndarray:
    """[N, H, W, 1 | 3 | 4] -> [N, H, W, 3]: grey repeated, alpha dropped."""
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]


def _as_mask(mask) -> np.ndarray:
    """A mask in any common layout -> float32 [N, H, W, 1] in {0, 1} (>= 0.5 means repaint)."""
    x = np.asarray(mask[0] if isinstance(mask, (list, tuple)) and len(mask) == 1 else mask)
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] not in (1, 3, 4)):
        x = x[..., None]  # [H, W] or [N, H, W]
    x = _as_images(x, "mask")
    if x.shape[-1] >= 3:  # RGB(A): luma as PIL's convert("L"), which diffusers' mask processor uses
        x = (x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    return (x >= 0.5).astype(np.float32)


def _per_row(x: np.ndarray, rows: int, per_prompt: int, what: str) -> np.ndarray:
    """[1 | P | B, ...] -> [B, ...]: one for all, one per prompt (repeated N times), or one per image."""
    n = x.shape[0]
    if n == 1:
        return np.repeat(x, rows, axis=0)
    if n == rows:
        return x
    if n * per_prompt == rows:
        return np.repeat(x, per_prompt, axis=0)
    raise JaxdiffError(f"{what}: got {n} of them for {rows} images; pass 1, one per prompt or one per image")
