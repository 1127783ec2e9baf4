"""The generation program: text encoding, sampling and decoding compiled as ONE `jax.jit`, sharded.

`Pipeline.__call__` builds a typed request on the host (jaxdiff.request), then a `Runner` places the
request's rows on a ("data", "fsdp") mesh (batch rows split over every device, params replicated),
runs the compiled program and brings the images back. Executables are cached by (Spec, shapes, mesh),
never by params: params, sampler tables, guidance scales and seeds are arguments, so a new seed, prompt,
guidance scale, schedule of the same length or a new set of weights (`Pipeline.with_params`, LoRA,
EMA) reuses the executable. Placed params are cached by the identity of each component's tree.
`enable_compilation_cache(path)` also keeps executables across processes.

Randomness is defined in jaxdiff.rng; conditioning and the model-function wrappers in
jaxdiff.conditioning.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import prompts, rng, sharding, vae_tiling
from jaxdiff.conditioning import Cond, ControlCond, bind, cfg, concat, control, pair, unet_fn
from jaxdiff.errors import NonFiniteImageError
from jaxdiff.family import ModelFamily
from jaxdiff.samplers import initial_latents, sample_steps, sampler_state
from jaxdiff.samplers.core import Plan

MODES = ("txt2img", "img2img", "inpaint", "inpaint_blend")  # inpaint: 9-channel UNet; blend: 4-channel
# The program's params: component name -> tree, plus this entry when textual-inversion terms are loaded:
# encoder name -> float32 [R, D] rows for token ids >= the vocabulary (jaxdiff.prompts.TextualInversions).
TEXTUAL_INVERSION = "textual_inversion"
_PLACED_KEEP = 2  # placed param sets a Runner keeps (the current one and, e.g., the one before a swap)


def enable_compilation_cache(path) -> None:
    """Keep compiled programs in `path` across processes (JAX's persistent compilation cache).

    Every executable is written, however fast it compiled or small it is: the thresholds JAX uses by
    default (1 s, size overrides) would skip the small programs and make a warm start still compile.
    Call before the first generation.
    """
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_enable_compilation_cache", True)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything that selects a different program (static under jit; hashable)."""
    mode: str                    # one of MODES
    cfg: bool                    # classifier-free guidance (guidance_scale > 1): UNet on 2B rows
    rescale: bool                # guidance_rescale > 0
    zero_negative: bool          # SDXL: all-zero negative context / pooled instead of encoding ""
    clip_skip: int | None
    given_latents: bool          # latents= injected instead of derived start noise
    from_image: bool             # x_T = add_noise(image latents) rather than noise * init_noise_sigma
    return_float: bool           # also return the [0, 1] float images
    latent_size: tuple[int, int]  # (h, w) of the latents
    control: int = 0             # ControlNets applied (the pipeline's, in order); 0 = none
    guess_mode: bool = False     # ControlNet guess mode (diffusers' guess_mode, or global_pool_conditions)
    vae_float32: bool = False    # decode with the VAE in float32 (the redo of a non-finite image)
    vae_tiles: bool = False      # tiled VAE encode / decode (Pipeline.enable_vae_tiling; jaxdiff.vae_tiling)
    image_latents: bool = False  # inputs.image holds scaled latents [B, h, w, C] (SDXL refiner hand-off)
    latent_output: bool = False  # output_type="latent": no decode, latents only


@flax.struct.dataclass
class Inputs:
    """A request's per-image arrays, all [B, ...] (batch-sharded); None where the request has none.

    Attributes:
      index: int32 [B] sample index of each row (its noise streams; see jaxdiff.rng).
      ids: encoder name -> int32 [B, 77k] prompt token ids, k chunks of 77 (jaxdiff.prompts).
      weights: encoder name -> float32 [B, 77k] per-token weights (A1111 emphasis; 1 = none).
      neg_ids, neg_weights: likewise for the negative prompt (None without guidance or with zero
        negatives).
      time_ids, neg_time_ids: float32 [B, n] SDXL micro-conditioning.
      latents: float32 [B, h, w, C] given unit starting noise.
      image: float32 [B, H, W, 3] init image in [-1, 1].
      mask: float32 [B, H, W, 1] inpainting mask in {0, 1} (1 = repaint).
      control_image: one float32 [B, H, W, Cc] image in [0, 1] per ControlNet (tuple), or None.
      control_scale: float32 [B, N] controlnet_conditioning_scale per row and ControlNet, or None.
      timestep_cond: float32 [B, D] LCM-distilled UNets' guidance-scale embedding (no CFG then).
    """
    index: np.ndarray
    ids: dict
    weights: dict
    neg_ids: Optional[dict] = None
    neg_weights: Optional[dict] = None
    time_ids: Optional[np.ndarray] = None
    neg_time_ids: Optional[np.ndarray] = None
    latents: Optional[np.ndarray] = None
    image: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None
    control_image: Optional[tuple] = None
    control_scale: Optional[np.ndarray] = None
    timestep_cond: Optional[np.ndarray] = None


@flax.struct.dataclass
class Prepared:
    """Everything before the first model evaluation, per request (a pytree).

    Attributes:
      cond: the UNet conditioning ([2B] rows with guidance).
      index: int32 [B] sample indices.
      x_T: float32 [B, h, w, C] starting latents.
      blend: (image latents, latent mask, noise) for 4-channel inpainting, else None.
    """
    cond: Cond
    index: jax.Array
    x_T: jax.Array
    blend: Any = None


@dataclasses.dataclass(frozen=True)
class Models:
    """The pipeline's modules and static facts (closed over by the jitted program; no arrays)."""
    encoders: prompts.EncoderSpec
    unet: Any
    vae: Any
    family: ModelFamily
    scaling_factor: float
    vae_upcast: bool = False     # encode / decode in float32 (force_upcast on a reduced-precision VAE)
    controlnets: tuple = ()      # ControlNetModel modules (params under params[CONTROLNET], same order)


CONTROLNET = "controlnet"  # program params entry: a tuple of ControlNet param trees


def models_of(pipe) -> Models:
    vae_dtype = jnp.dtype(getattr(pipe.vae.module, "dtype", jnp.float32))
    # diffusers' upcast_vae: a VAE whose config says force_upcast runs in float32 under a float16
    # pipeline (SDXL's VAE overflows float16); jaxdiff does the same for bfloat16.
    upcast = bool(getattr(pipe.vae.config, "force_upcast", False)) and vae_dtype != jnp.float32
    return Models(encoders=prompts.encoder_spec(pipe), unet=pipe.unet.module, vae=pipe.vae.module,
                  family=pipe.family, scaling_factor=float(pipe.vae.config.scaling_factor),
                  controlnets=tuple(c.module for c in (getattr(pipe, "controlnet", None) or ())),
                  vae_upcast=upcast)


def vae_at(m: Models, vae_params, float32: bool):
    """(module, params) of the VAE, both lifted to float32 when `float32` (diffusers' `vae.to(float32)`:
    the stored params cast up, float32 compute)."""
    if not float32 or jnp.dtype(m.vae.dtype) == jnp.float32:
        return m.vae, vae_params
    up = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, vae_params)
    return m.vae.clone(dtype=jnp.float32), up


def _tileable(m: Models) -> bool:
    """AutoencoderKL tiles (diffusers' rules need config.sample_size); TAESD is small enough not to."""
    return getattr(m.vae.config, "sample_size", None) is not None


def vae_encode(m: Models, vae_params, images, *, tiles: bool, float32: bool):
    """images [B, H, W, 3] in [-1, 1] -> the posterior (jaxdiff.models.vae.DiagonalGaussian), tiled as
    diffusers' enable_tiling() when `tiles` and the image is larger than one tile."""
    vae, vae_params = vae_at(m, vae_params, float32)
    tiled = tiles and _tileable(m) and vae_tiling.needs_tiles(images.shape[1:3], vae_tiling.encode_tiling(m.vae.config))
    if not tiled:
        return vae.apply({"params": vae_params}, images, method="encode")
    from jaxdiff.models.vae import posterior
    moments_fn = lambda x: vae.apply({"params": vae_params}, x, method="encode_moments")
    moments = vae_tiling.encode_moments_tiled(moments_fn, images, m.vae.config)
    return posterior(moments, m.vae.config.latent_channels)


def vae_decode(m: Models, vae_params, z, *, tiles: bool, float32: bool) -> jax.Array:
    """Unscaled latents [B, h, w, C] -> float32 images [B, H, W, 3] in about [-1, 1], tiled as diffusers'
    enable_tiling() when `tiles` and the latents are larger than one tile."""
    vae, vae_params = vae_at(m, vae_params, float32)
    decode_fn = lambda zt: vae.apply({"params": vae_params}, zt, method="decode").astype(jnp.float32)
    if tiles and _tileable(m) and vae_tiling.needs_tiles(z.shape[1:3], vae_tiling.decode_tiling(m.vae.config)):
        return vae_tiling.decode_tiled(decode_fn, z, m.vae.config)
    return decode_fn(z)


def _posterior_sample(m: Models, vae_params, images, key, tag, indices, tiles: bool = False):
    """Scaled latents of a sample from q(z | images): (mean + std * noise) * scaling_factor. [B, h, w, C]"""
    post = vae_encode(m, vae_params, images, tiles=tiles, float32=m.vae_upcast)
    mean, logvar = post.mean.astype(jnp.float32), post.logvar.astype(jnp.float32)
    noise = rng.per_sample_noise(rng.stream(key, tag), indices, mean.shape[1:])
    return (mean + jnp.exp(0.5 * logvar) * noise) * m.scaling_factor


def _text_cond(m: Models, spec: Spec, params, inputs: Inputs) -> tuple[jax.Array, dict | None]:
    """(context, added) with [2B] interleaved rows under guidance."""
    extra = params.get(TEXTUAL_INVERSION)
    if spec.cfg and not spec.zero_negative:
        # Negative and positive prompts through the encoders as one [2B] batch (one traced encoder).
        ids = {k: pair(inputs.neg_ids[k], v) for k, v in inputs.ids.items()}
        weights = {k: pair(inputs.neg_weights[k], v) for k, v in inputs.weights.items()}
        context, pooled = prompts.encode(m.encoders, params, ids, spec.clip_skip, weights, extra)
    else:
        context, pooled = prompts.encode(m.encoders, params, inputs.ids, spec.clip_skip, inputs.weights, extra)
        if spec.cfg:  # SDXL with no negative prompt: zero negative context and pooled embedding
            context = pair(jnp.zeros_like(context), context)
            pooled = None if pooled is None else pair(jnp.zeros_like(pooled), pooled)
    if not m.family.text_time:
        return context, None
    time_ids = pair(inputs.neg_time_ids, inputs.time_ids) if spec.cfg else inputs.time_ids
    return context, {"text_embeds": pooled, "time_ids": time_ids}


def prepare(m: Models, spec: Spec, params: Mapping[str, Any], inputs: Inputs, plan: Plan,
            key: jax.Array) -> Prepared:
    """The prompts' encodings, the image conditioning and the starting latents (arguments as `program`'s)."""
    idx = inputs.index
    (h, w), c = spec.latent_size, m.family.latent_channels
    context, added = _text_cond(m, spec, params, inputs)
    if inputs.timestep_cond is not None:  # LCM-distilled UNet (request.py builds it; never with CFG)
        added = {**(added or {}), "timestep_cond": inputs.timestep_cond}

    if spec.given_latents:
        noise = inputs.latents.astype(jnp.float32)
    else:
        noise = rng.per_sample_noise(rng.stream(key, rng.START_NOISE), idx, (h, w, c))

    image_latents = concat_in = blend = None
    if spec.image_latents:
        image_latents = inputs.image.astype(jnp.float32)
    elif spec.mode != "txt2img" and (spec.mode in ("img2img", "inpaint_blend") or spec.from_image):
        image_latents = _posterior_sample(m, params["vae"], inputs.image, key, rng.IMAGE_POSTERIOR, idx,
                                          spec.vae_tiles)
    if spec.mode in ("inpaint", "inpaint_blend"):
        f = m.family.vae_factor
        mask_latent = inputs.mask[:, ::f, ::f, :]  # torch interpolate(nearest) to (h, w) picks pixel (f*i, f*j)
        if spec.mode == "inpaint":
            masked = inputs.image * (inputs.mask < 0.5).astype(inputs.image.dtype)
            masked_latents = _posterior_sample(m, params["vae"], masked, key, rng.MASKED_POSTERIOR, idx,
                                               spec.vae_tiles)
            concat_in = jnp.concatenate([mask_latent, masked_latents], axis=-1)  # [B, h, w, 1 + C]
            if spec.cfg:
                concat_in = pair(concat_in, concat_in)
        else:
            blend = (image_latents, mask_latent, noise)

    x_T = initial_latents(plan, noise, image_latents if spec.from_image else None)
    control_in = None
    if spec.control:
        control_in = ControlCond(images=tuple(inputs.control_image), scale=inputs.control_scale.astype(jnp.float32),
                                 keep=jnp.ones((spec.control,), jnp.float32))
    return Prepared(cond=Cond(context=context, added=added, concat=concat_in, control=control_in), index=idx,
                    x_T=x_T, blend=blend)


def model_fn(m: Models, spec: Spec, params: Mapping[str, Any], guidance: jax.Array):
    """The wrapped UNet (jaxdiff.conditioning): x, t, cond -> the prediction the sampler consumes."""
    fn = unet_fn(m.unet, params["unet"])
    if spec.control:
        fn = control(fn, m.controlnets[:spec.control], tuple(params[CONTROLNET])[:spec.control],
                     guess_mode=spec.guess_mode)
    fn = concat(fn)
    return cfg(fn, guidance, rescale=spec.rescale) if spec.cfg else fn


def denoise(m: Models, spec: Spec, params: Mapping[str, Any], prep: Prepared, carry, plan: Plan,
            key: jax.Array, guidance: jax.Array, ks: jax.Array | None):
    """Model evaluations `ks` (int32 [n]; None = all) of the sampler from `carry` (see samplers.sample_steps)."""
    fn = bind(model_fn(m, spec, params, guidance), prep.cond)
    return sample_steps(fn, carry, plan, ks, rng.stream(key, rng.STEP_NOISE), inpaint=prep.blend,
                        sample_index=prep.index)


def decode(m: Models, spec: Spec, params: Mapping[str, Any], x0: jax.Array) -> dict[str, jax.Array]:
    """Final latents [B, h, w, C] -> `program`'s outputs, plus "finite": bool [B], every row holding
    whether the WHOLE batch decoded to finite numbers (so each process can read its own rows)."""
    if spec.latent_output:
        return {"latents": x0, "finite": jnp.ones(x0.shape[:1], bool)}
    decoded = vae_decode(m, params["vae"], x0 / m.scaling_factor, tiles=spec.vae_tiles,
                         float32=m.vae_upcast or spec.vae_float32)
    finite = jnp.broadcast_to(jnp.all(jnp.isfinite(decoded)), decoded.shape[:1])
    pixels = jnp.clip(decoded / 2 + 0.5, 0.0, 1.0)
    out = {"images": jnp.round(pixels * 255.0).astype(jnp.uint8), "latents": x0, "finite": finite}
    if spec.return_float:
        out["pixels"] = pixels
    return out


def _prepare_and_start(m: Models, spec: Spec, params, inputs: Inputs, plan: Plan, seed) -> tuple[Prepared, tuple]:
    """`prepare`, and the sampler's carry before evaluation 0 (a jitted entry: takes the seed)."""
    prep = prepare(m, spec, params, inputs, plan, rng.root_key(seed))
    return prep, sampler_state(plan, prep.x_T)


def _denoise_steps(m: Models, spec: Spec, params, prep: Prepared, carry, plan: Plan, seed, guidance, ks):
    """`denoise` as a jitted entry: takes the seed."""
    return denoise(m, spec, params, prep, carry, plan, rng.root_key(seed), guidance, ks)


def program(m: Models, spec: Spec, params: Mapping[str, Any], inputs: Inputs, plan: Plan,
            seed: jax.Array, guidance: jax.Array) -> dict[str, jax.Array]:
    """The whole request for one batch; pure, traced once per (Spec, shapes, plan kind / length).

    Args:
      params: component name -> params.
      inputs: the request's rows (see `Inputs`).
      plan: sampler tables (replicated).
      seed: uint32 [], the request's seed (the root key is made inside: jaxdiff.rng).
      guidance: float32 [2] (guidance_scale, guidance_rescale).

    Returns:
      {"images": uint8 [B, H, W, 3], "latents": float32 [B, h, w, C], "pixels": float32 [B, H, W, 3] in
      [0, 1] when spec.return_float}.
    """
    prep, carry = _prepare_and_start(m, spec, params, inputs, plan, seed)
    x0, _ = denoise(m, spec, params, prep, carry, plan, rng.root_key(seed), guidance, None)
    return decode(m, spec, params, x0)


class Runner:
    """One pipeline structure's compiled programs on one mesh. Params are arguments: any params tree of
    the same structure and shapes runs on the same executables."""

    def __init__(self, models: Models, mesh):
        self.mesh = mesh
        self.models = models
        self._placed: dict[str, list[tuple[Any, Any]]] = {}  # component -> [(host tree, placed)], newest last
        self._program = jax.jit(functools.partial(program, models), static_argnums=0,
                                out_shardings=sharding.batch_sharding(mesh, 1))
        # The same request as three programs, for callers that report progress: prepare, ONE model
        # evaluation (called K times, the evaluation index an argument), decode. The host sees each step
        # end without a host callback inside a program: JAX does not write programs holding callbacks to
        # its persistent compilation cache, so a progress bar that used one recompiled on every run.
        self._prepare = jax.jit(functools.partial(_prepare_and_start, models), static_argnums=0)
        self._denoise = jax.jit(functools.partial(_denoise_steps, models), static_argnums=0)
        self._decode = jax.jit(functools.partial(decode, models), static_argnums=0,
                               out_shardings=sharding.batch_sharding(mesh, 1))

    def place(self, params: Mapping[str, Any]) -> dict:
        """Params replicated on the mesh. Each component's tree is placed once per identity (a LoRA
        swap re-places the UNet only); the last _PLACED_KEEP trees of each component stay placed."""
        out = {}
        for name, tree in params.items():
            kept = self._placed.setdefault(name, [])
            hit = next((placed for host, placed in kept if host is tree), None)
            if hit is None:
                hit = sharding.shard_params(tree, sharding.replicated(self.mesh))
                # The host tree is kept with its placement, so its identity cannot pass to another tree.
                self._placed[name] = (kept + [(tree, hit)])[-_PLACED_KEEP:]
            out[name] = hit
        return out

    def arguments(self, params, inputs: Inputs, plan: Plan, seed, guidance) -> tuple[tuple, int]:
        """(the one program's arguments after `spec`, placed on the mesh; the real row count)."""
        padded, n = sharding.pad_batch(inputs, self.mesh.size)
        placed = sharding.to_global(padded, sharding.batch_sharding(self.mesh, 1))
        rep = sharding.to_global((plan, np.asarray(seed, np.uint32), np.asarray(guidance, np.float32)),
                                 sharding.replicated(self.mesh))
        return (self.place(params), placed, *rep), n

    def lower(self, spec: Spec, params, inputs: Inputs, plan: Plan, seed, guidance) -> jax.stages.Lowered:
        """The one-program path lowered for these arguments (JAX AOT): `.compile()` it to time the
        compile, read XLA's cost and memory analysis, or call the executable directly."""
        args, _ = self.arguments(params, inputs, plan, seed, guidance)
        return self._program.lower(spec, *args)

    def __call__(self, spec: Spec, params, inputs: Inputs, plan: Plan, seed, guidance,
                 on_step: Callable[[int], None] | None = None) -> tuple[dict, int]:
        """Pads the batch to the device count, places everything, runs. Returns (global outputs, n_real).

        on_step: called on the host with k after model evaluation k is done. Given, the request runs as
        prepare / K single evaluations / decode (same numbers per evaluation, one host sync per step);
        without it, as one program.
        """
        (params_p, placed, plan_r, seed_r, guidance_r), n = self.arguments(params, inputs, plan, seed, guidance)
        if on_step is None:
            out = self._program(spec, params_p, placed, plan_r, seed_r, guidance_r)
            return self.finite(spec, params_p, out), n
        prep, carry = self._prepare(spec, params_p, placed, plan_r, seed_r)
        for k in range(plan.nfe):
            ks = sharding.to_global(np.array([k], np.int32), sharding.replicated(self.mesh))
            carry = jax.block_until_ready(self._denoise(spec, params_p, prep, carry, plan_r, seed_r,
                                                        guidance_r, ks))
            on_step(k)
        return self.finite(spec, params_p, self._decode(spec, params_p, carry[0])), n

    def finite(self, spec: Spec, params_p, out: dict) -> dict:
        """`out` without its "finite" flag; a non-finite image from a reduced-precision VAE is decoded again
        from the same latents with the VAE in float32 (with a warning). One small read of a flag that comes
        with the images the caller fetches next: no extra sync per step.

        Raises:
          NonFiniteImageError: still not finite in float32 (NaN / inf weights or latents).
        """
        if _all_finite(out):
            return {k: v for k, v in out.items() if k != "finite"}
        if self.models.vae_upcast or spec.vae_float32 or jnp.dtype(self.models.vae.dtype) == jnp.float32:
            raise NonFiniteImageError(_NON_FINITE)
        warnings.warn(f"the VAE decoded NaN / inf in {jnp.dtype(self.models.vae.dtype).name}; decoding again in "
                      f"float32 (set force_upcast in the VAE's config.json to do so from the start)",
                      RuntimeWarning, stacklevel=3)
        again = self._decode(dataclasses.replace(spec, vae_float32=True), params_p, out["latents"])
        if not _all_finite(again):
            raise NonFiniteImageError(_NON_FINITE)
        return {k: v for k, v in again.items() if k != "finite"}

    def cache_size(self) -> int:
        """Number of one-program executables compiled so far (one per Spec and shapes)."""
        return self._program._cache_size()


_NON_FINITE = ("the image is NaN / inf even with the VAE in float32: the weights or the final latents hold NaN / "
               "inf (a broken or float16-overflowing checkpoint?); try dtype float32 or another VAE file")


def _all_finite(out: dict) -> bool:
    """The batch-wide flag `decode` puts in every row, read from this process's first row."""
    flag = out["finite"]
    shard = flag.addressable_shards[0].data if hasattr(flag, "addressable_shards") else flag
    return bool(np.asarray(shard).reshape(-1)[0])


class Programs:
    """A pipeline structure's Runners by mesh. Pipelines made by `with_params` share one Programs, so
    new weights never compile anything."""

    def __init__(self, models: Models):
        self.models = models
        self._runners: dict[Any, Runner] = {}

    def runner(self, mesh) -> Runner:
        if mesh not in self._runners:
            self._runners[mesh] = Runner(self.models, mesh)
        return self._runners[mesh]
