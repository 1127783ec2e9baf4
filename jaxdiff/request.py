"""Host side of a generation: `pipe(...)`'s keyword arguments -> a validated, typed `Request`.

Everything a user can get wrong is checked here, once, with a one-line JaxdiffError; what comes out is
the program's static `Spec`, its per-image `Inputs` (numpy, batch-first), the sampler plan, the
request seed and the guidance scalars. jaxdiff.generation runs it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from jaxdiff import pixels
from jaxdiff import prompts, rng
from jaxdiff.errors import JaxdiffError
from jaxdiff.generation import Inputs, Spec
from jaxdiff.samplers.core import Plan


@dataclasses.dataclass(frozen=True)
class Request:
    """One validated request (see `build`)."""
    spec: Spec
    inputs: Inputs
    plan: Plan
    seed: np.ndarray             # uint32 []: the program makes the root key from it (jaxdiff.rng)
    guidance: np.ndarray         # float32 [2]: guidance_scale, guidance_rescale

    @property
    def rows(self) -> int:
        return int(self.inputs.index.shape[0])


def build(pipe, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
          prompt_2: str | Sequence[str] | None = None, negative_prompt_2: str | Sequence[str] | None = None,
          prompt_weighting: str = "a1111", height: int | None = None, width: int | None = None, steps: int = 25,
          sampler: str = "dpmpp_2m", schedule: str | None = None, guidance_scale: float = 7.5,
          guidance_rescale: float = 0.0, clip_skip: int | None = None, seed: int = 0,
          num_images_per_prompt: int = 1, latents=None, image=None, strength: float | None = None,
          mask=None, indices: Sequence[int] | None = None,
          original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
          target_size: tuple[int, int] | None = None,
          negative_original_size: tuple[int, int] | None = None,
          negative_crops_coords_top_left: tuple[int, int] | None = None,
          negative_target_size: tuple[int, int] | None = None,
          aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
          sampler_options: Mapping[str, Any] | None = None, return_float: bool = False,
          control_image=None, controlnet_conditioning_scale: float | Sequence[float] = 1.0,
          control_guidance_start: float | Sequence[float] = 0.0,
          control_guidance_end: float | Sequence[float] = 1.0, guess_mode: bool = False,
          denoising_start: float | None = None, denoising_end: float | None = None,
          output_type: str = "np", mask_blur: float = 0.0) -> Request:
    """Checks a request against `pipe` and turns it into program inputs (arguments: `Pipeline.__call__`).

    Text goes through jaxdiff.prompts: A1111 weighting and chunks of 75 tokens by default
    (`prompt_weighting="none"`: diffusers' literal text, truncated at 75 tokens), the pipeline's
    textual-inversion terms, SDXL's `prompt_2` / `negative_prompt_2` (diffusers semantics).
    `denoising_end` / `output_type="latent"` / `image=<latents>` with `denoising_start`: the SDXL ensemble
    of experts (jaxdiff.handoff)."""
    from jaxdiff import handoff
    handoff.check(denoising_start, denoising_end, output_type)
    family = pipe.family
    tokenizers = prompts.pipeline_tokenizers(pipe, pipe.embeddings)
    text = prompts.tokenize_prompts(tokenizers, prompt, negative_prompt, num_images_per_prompt,
                                    prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                                    prompt_weighting=prompt_weighting, embeddings=pipe.embeddings)
    rows = text.n_prompts * num_images_per_prompt
    clip_skip = prompts.check_clip_skip(pipe, clip_skip)
    f, c = family.vae_factor, family.latent_channels

    image_rows = mask_rows = image_latents = None
    if image is not None and handoff.is_latents(image, family.latent_channels):
        image_latents = handoff.latent_rows(image, rows, num_images_per_prompt, family.latent_channels)
        if mask is not None:
            raise JaxdiffError("image= holds latents (NHWC, latent channels); a mask needs pixels")
        size = (image_latents.shape[1] * f, image_latents.shape[2] * f)
        if (height, width) not in ((None, None), size):
            raise JaxdiffError(f"image= latents are for {size[0]}x{size[1]} pixels but height, width = "
                               f"{height}, {width}; leave height and width unset")
        height, width = size
        image_rows = np.zeros((1, 1, 1, 3), np.float32)  # a placeholder: the request has an init image
    if image is not None and image_latents is None:
        image_rows = pixels.per_row(pixels.rgb(pixels.as_images(image, "image")), rows,
                                      num_images_per_prompt, "image")
        size = image_rows.shape[1:3]
        if (height, width) not in ((None, None), tuple(size)):
            raise JaxdiffError(f"image is {size[0]}x{size[1]} but height, width = {height}, {width}; "
                               f"resize the image or leave height and width unset")
        height, width = size
    elif mask is not None:
        raise JaxdiffError("mask needs an init image (image=)")
    nets = tuple(getattr(pipe, "controlnet", None) or ())
    controls = _control_list(nets, control_image)
    if controls and height is None and width is None:  # diffusers: the control image's own size
        first = pixels.control_images(controls[0], None, None, f, nets[0].config.conditioning_channels)
        height, width = first.shape[1:3]
    height, width = height or family.default_size[0], width or family.default_size[1]
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v <= 0 or v % 8 or v % f:
            raise JaxdiffError(f"{name}={v!r} must be a positive multiple of 8 (and of the VAE factor {f})")
    h, w = height // f, width // f

    if mask is not None:
        from jaxdiff.inpaint_masks import blur
        mask_rows = blur(pixels.per_row(pixels.as_mask(mask), rows, num_images_per_prompt, "mask"), mask_blur)
        if mask_rows.shape[1:3] != (height, width):
            raise JaxdiffError(f"mask is {mask_rows.shape[1]}x{mask_rows.shape[2]} but the image is "
                               f"{height}x{width}")
    mode = _mode(family, image_rows is not None, mask_rows is not None)
    if strength is None:
        strength = 0.75 if mode == "img2img" and denoising_start is None else 1.0
    elif mode == "txt2img":
        raise JaxdiffError("strength applies only with an init image (image=)")

    from jaxdiff.samplers import make_plan
    from jaxdiff.schedules import SchedulerConfig
    sched = SchedulerConfig.from_dict(pipe.scheduler_config or {}, "scheduler_config.json")
    plan = make_plan(sampler, steps, sched, schedule=schedule, strength=strength,
                     model_family=family.sampler_family, **dict(sampler_options or {}))
    if denoising_start is not None or denoising_end is not None:
        if denoising_start is not None and mode == "txt2img":
            raise JaxdiffError("denoising_start needs image= (the base's latents or an init image)")
        plan = handoff.cut_plan(plan, steps, sched, denoising_start, denoising_end,
                                lambda strength_: make_plan(sampler, steps, sched, schedule=schedule,
                                                            strength=strength_, model_family=family.sampler_family,
                                                            **dict(sampler_options or {})))

    # LCM-distilled UNets take the guidance scale as an embedding and run one pass per step
    # (diffusers' LatentConsistencyModelPipeline: no classifier-free guidance).
    lcm_dim = family.guidance_embedding_dim
    guided = float(guidance_scale) > 1.0 and lcm_dim is None
    if not 0.0 <= float(guidance_rescale) <= 1.0:
        raise JaxdiffError(f"guidance_rescale={guidance_rescale!r} must be in [0, 1]")
    # diffusers' force_zeros_for_empty_prompt: zeros when no negative prompt at all was given.
    zero_negative = family.text_time and negative_prompt is None and negative_prompt_2 is None and bool(
        pipe.options.get("force_zeros_for_empty_prompt", family.zero_negative_default))
    neg_ids, neg_weights = text.negative_ids, text.negative_weights
    if guided and neg_ids is None and not zero_negative:
        neg_ids, neg_weights = prompts.empty_text_inputs(tokenizers, rows, text.chunks)
    with_negative = guided and not zero_negative

    idx = np.arange(rows) if indices is None else np.asarray(indices)
    if idx.shape != (rows,) or not np.issubdtype(idx.dtype, np.integer) or (idx < 0).any():
        raise JaxdiffError(f"indices must be {rows} non-negative integers (one per image), got {indices!r}")
    time_ids = neg_time_ids = None
    if family.text_time:
        pos, neg = time_id_rows(family, height, width, original_size, crops_coords_top_left, target_size,
                                negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                aesthetic_score, negative_aesthetic_score)
        time_ids = np.tile(pos[None], (rows, 1))
        neg_time_ids = np.tile(neg[None], (rows, 1)) if guided else None
    if latents is not None:
        latents = np.asarray(latents, np.float32)
        if latents.shape != (rows, h, w, c):
            raise JaxdiffError(f"latents must be [B, h, w, C] = {(rows, h, w, c)} (NHWC), got {latents.shape}")
    control_rows = control_scale = None
    if nets:
        control_rows = tuple(
            pixels.per_row(pixels.control_images(img, height, width, f, net.config.conditioning_channels), rows,
                           num_images_per_prompt, "control_image") for net, img in zip(nets, controls))
        scales = _per_net(controlnet_conditioning_scale, len(nets), "controlnet_conditioning_scale")
        control_scale = np.tile(np.asarray(scales, np.float32)[None], (rows, 1))
        plan = plan.replace(tables={**plan.tables, "control_keep": control_keep(
            plan.nfe, _per_net(control_guidance_start, len(nets), "control_guidance_start"),
            _per_net(control_guidance_end, len(nets), "control_guidance_end"))})
    elif guess_mode:
        raise JaxdiffError("guess_mode applies only to a pipeline with a ControlNet")
    inputs = Inputs(index=idx.astype(np.int32), ids=text.ids, weights=text.weights,
                    neg_ids=neg_ids if with_negative else None, neg_weights=neg_weights if with_negative else None,
                    time_ids=time_ids, neg_time_ids=neg_time_ids, latents=latents,
                    # [-1, 1], as diffusers' VaeImageProcessor.normalize
                    image=(image_latents if image_latents is not None
                           else None if image_rows is None else 2.0 * image_rows - 1.0), mask=mask_rows,
                    control_image=control_rows, control_scale=control_scale,
                    timestep_cond=None if lcm_dim is None else np.tile(
                        guidance_scale_embedding(float(guidance_scale) - 1.0, lcm_dim)[None], (rows, 1)))
    spec = Spec(mode=mode, cfg=guided, rescale=guided and float(guidance_rescale) > 0.0,
                zero_negative=zero_negative, clip_skip=clip_skip, given_latents=latents is not None,
                from_image=mode == "img2img" or (mode != "txt2img" and strength < 1.0),
                return_float=return_float, latent_size=(h, w),
                vae_tiles=bool(getattr(pipe, "vae_tiling", False)), image_latents=image_latents is not None,
                latent_output=output_type == "latent", control=len(nets),
                # diffusers: guess_mode = guess_mode or the (first) ControlNet's global_pool_conditions
                guess_mode=bool(nets) and (bool(guess_mode) or bool(nets[0].config.global_pool_conditions)))
    return Request(spec=spec, inputs=inputs, plan=plan, seed=rng.check_seed(seed),
                   guidance=np.array([guidance_scale, guidance_rescale], np.float32))


def _control_list(nets: tuple, control_image) -> list:
    """control_image -> one entry per ControlNet (diffusers: a single ControlNet takes an image or a
    batch; several take a list with one entry each)."""
    if not nets:
        if control_image is not None:
            raise JaxdiffError("control_image needs a ControlNet: jaxdiff.load(base, controlnet=PATH) or "
                               "pipe.with_controlnet(jaxdiff.load_controlnet(PATH))")
        return []
    if control_image is None:
        raise JaxdiffError(f"this pipeline has {len(nets)} ControlNet(s): pass control_image=")
    if len(nets) == 1:
        return [control_image]
    if not isinstance(control_image, (list, tuple)) or len(control_image) != len(nets):
        raise JaxdiffError(f"control_image: this pipeline has {len(nets)} ControlNets; pass a list with one "
                           f"image (or batch) per ControlNet")
    return list(control_image)


def _per_net(value, n: int, name: str) -> list[float]:
    """A float for all ControlNets or a list with one per ControlNet."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise JaxdiffError(f"{name}: {len(values)} values for {n} ControlNets")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise JaxdiffError(f"{name}={value!r} must be a number or one number per ControlNet") from None


def control_keep(nfe: int, starts: Sequence[float], ends: Sequence[float]) -> np.ndarray:
    """diffusers' controlnet_keep as a table: float32 [K, N], evaluation i keeps ControlNet j unless
    i / K < start_j or (i + 1) / K > end_j (pipeline_controlnet.py, "Create tensor stating which
    controlnets to keep"; K = len(timesteps), the model evaluations)."""
    for s, e in zip(starts, ends):
        if not 0.0 <= s < e <= 1.0:
            raise JaxdiffError(f"control_guidance_start={s} / control_guidance_end={e}: need 0 <= start < end <= 1")
    return np.array([[1.0 - float(i / nfe < s or (i + 1) / nfe > e) for s, e in zip(starts, ends)]
                     for i in range(nfe)], np.float32)


def guidance_scale_embedding(w: float, dim: int) -> np.ndarray:
    """float32 [dim]: diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding of one w
    (the pipeline passes guidance_scale - 1): sin / cos of 1000 w * exp(-log(1e4) k / (dim/2 - 1)),
    zero-padded to an odd dim. Computed in float64 (diffusers uses float32, whose rounding of the
    ~1e4-sized sine arguments alone is ~5e-4), then cast."""
    half = dim // 2
    arg = w * 1000.0 * np.exp(np.arange(half) * -(np.log(10000.0) / (half - 1)))
    return np.pad(np.concatenate([np.sin(arg), np.cos(arg)]), (0, dim % 2)).astype(np.float32)


def _mode(family, has_image: bool, has_mask: bool) -> str:
    """txt2img, img2img, inpaint (dedicated inpainting UNet) or inpaint_blend (plain UNet)."""
    if not has_image:
        if family.concat_channels:
            raise JaxdiffError(f"this is an inpainting model ({family.unet_in_channels}-channel UNet): "
                               f"pass image= and mask=")
        return "txt2img"
    if not has_mask:
        return "img2img"
    if family.inpaint:
        return "inpaint"
    if family.concat_channels == 0:
        return "inpaint_blend"
    c = family.latent_channels
    raise JaxdiffError(f"inpainting needs a UNet with {c} or {2 * c + 1} input channels, this one has "
                       f"{family.unet_in_channels}")


def time_id_rows(family, height, width, original_size, crops, target_size, neg_original, neg_crops,
                 neg_target, aesthetic, neg_aesthetic) -> tuple[np.ndarray, np.ndarray]:
    """SDXL micro-conditioning (diffusers' _get_add_time_ids): float32 [n] positive and negative."""
    original = tuple(original_size or (height, width))
    target = tuple(target_size or (height, width))
    crops = tuple(crops)
    neg_original = tuple(neg_original or original)
    neg_crops = tuple(neg_crops or crops)
    neg_target = tuple(neg_target or target)
    if family.is_refiner:
        pos, neg = original + crops + (aesthetic,), neg_original + neg_crops + (neg_aesthetic,)
    else:
        pos, neg = original + crops + target, neg_original + neg_crops + neg_target
    return np.asarray(pos, np.float32), np.asarray(neg, np.float32)
