"""The generation program: text encoding, sampling and decoding compiled as ONE `jax.jit`, sharded.

`Pipeline.__call__` (jaxdiff/pipeline.py) validates a request on the host, then calls `run`, which
places the inputs on a ("data", "fsdp") mesh (batch rows split over every device, params replicated),
runs the compiled program and brings the images back. The program is compiled once per
(image shape, padded batch size, sampler kind, number of model evaluations, mode flags in `Spec`);
params, sampler tables, guidance scales and seeds are arguments, so a new seed, prompt, guidance scale
or schedule of the same length reuses the executable. `enable_compilation_cache(path)` also keeps
executables across processes.

Randomness (the one place it is defined). With root = jax.random.PRNGKey(seed) and i the sample index
of an image within the request (0 .. B-1 by default, or the caller's `indices`):

    start noise x_T (unit):        normal(fold_in(fold_in(root, START_NOISE), i),      [h, w, C])
    sampler step noise, eval k:    normal(fold_in(fold_in(fold_in(root, STEP_NOISE), i), k), [h, w, C])
    VAE posterior of init image:   normal(fold_in(fold_in(root, IMAGE_POSTERIOR), i),  [h, w, C])
    VAE posterior of masked image: normal(fold_in(fold_in(root, MASKED_POSTERIOR), i), [h, w, C])

(`sharding.per_sample_noise` and `samplers.step_noise` implement the fold_in rows). So image i depends only
on (seed, i, settings), never on batch size, padding, device count or host count. The 4-channel inpaint
blend re-noises the known region with the start noise, as diffusers does. `request_noise` returns these
arrays on the host (tests feed them to diffusers).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import prompts, sharding
from jaxdiff.samplers import initial_latents, sample_steps, sampler_state
from jaxdiff.samplers.core import Plan

START_NOISE, STEP_NOISE, IMAGE_POSTERIOR, MASKED_POSTERIOR = 0, 1, 2, 3
MODES = ("txt2img", "img2img", "inpaint", "inpaint_blend")  # inpaint: 9-channel UNet; blend: 4-channel


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


@functools.partial(jax.jit, static_argnames=("shape",))
def _noise(key, indices, shape):
    return {name: sharding.per_sample_noise(jax.random.fold_in(key, tag), indices, shape)
            for name, tag in (("start", START_NOISE), ("image_posterior", IMAGE_POSTERIOR),
                              ("masked_posterior", MASKED_POSTERIOR))}


def request_noise(seed: int, indices, latent_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The per-image noises a request draws (see the module docstring), on the host.

    Args:
      seed: the request's seed.
      indices: [B] sample indices.
      latent_shape: (h, w, C) of one latent.

    Returns:
      {"start", "image_posterior", "masked_posterior"} -> float32 [B, h, w, C].
    """
    out = _noise(request_key(seed), jnp.asarray(np.asarray(indices, np.int32)), tuple(latent_shape))
    return {k: np.asarray(v) for k, v in out.items()}


def request_key(seed: int) -> jax.Array:
    """The root PRNG key of a request."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        from jaxdiff.errors import JaxdiffError
        raise JaxdiffError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return jax.random.PRNGKey(int(seed))


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


@dataclasses.dataclass(frozen=True)
class Models:
    """The pipeline's modules and static facts (closed over by the jitted program; no arrays)."""
    encoders: prompts.EncoderSpec
    unet: Any
    vae: Any
    scaling_factor: float
    vae_factor: int
    latent_channels: int


def models_of(pipe) -> Models:
    return Models(encoders=prompts.encoder_spec(pipe), unet=pipe.unet.module, vae=pipe.vae.module,
                  scaling_factor=float(pipe.vae.config.scaling_factor),
                  vae_factor=pipe.vae.config.downsample_factor, latent_channels=pipe.vae.config.latent_channels)


def _posterior_sample(m: Models, vae_params, images, key, tag, indices):
    """Scaled latents of a sample from q(z | images): (mean + std * noise) * scaling_factor. [B, h, w, C]"""
    post = m.vae.apply({"params": vae_params}, images, method="encode")
    mean, logvar = post.mean.astype(jnp.float32), post.logvar.astype(jnp.float32)
    noise = sharding.per_sample_noise(jax.random.fold_in(key, tag), indices, mean.shape[1:])
    return (mean + jnp.exp(0.5 * logvar) * noise) * m.scaling_factor


def _pair(neg: jax.Array, pos: jax.Array) -> jax.Array:
    """[B, ...] x 2 -> [2B, ...] interleaved (u0, c0, u1, c1, ...): each device keeps its own rows' pairs,
    so CFG never moves rows between devices."""
    return jnp.stack([neg, pos], axis=1).reshape((2 * pos.shape[0],) + pos.shape[1:])


def program(m: Models, spec: Spec, params: Mapping[str, Any], inputs: Mapping[str, jax.Array], plan: Plan,
            key: jax.Array, guidance: jax.Array) -> dict[str, jax.Array]:
    """The whole request for one batch; pure, traced once per (Spec, shapes, plan kind / length).

    Args:
      params: component name -> params.
      inputs: per-row arrays, all [B, ...] (batch-sharded):
        "index" int32 [B]; "ids" / "neg_ids": encoder name -> int32 [B, 77] (neg_ids absent when
        spec.zero_negative or not spec.cfg); "time_ids" / "neg_time_ids" float32 [B, n] (SDXL);
        "latents" [B, h, w, C] (spec.given_latents); "image" [B, H, W, 3] in [-1, 1] and "mask"
        [B, H, W, 1] in {0, 1} (img2img / inpaint modes).
      plan: sampler tables (replicated).
      key: the request's root key.
      guidance: float32 [2] (guidance_scale, guidance_rescale).

    Returns:
      {"images": uint8 [B, H, W, 3], "latents": float32 [B, h, w, C], "pixels": float32 [B, H, W, 3] in
      [0, 1] when spec.return_float}.
    """
    ctx, carry = _prepare_and_start(m, spec, params, inputs, plan, key)
    x0, _ = denoise(m, spec, params, ctx, carry, plan, key, guidance, None)
    return decode(m, spec, params, x0)


def prepare(m: Models, spec: Spec, params: Mapping[str, Any], inputs: Mapping[str, jax.Array], plan: Plan,
            key: jax.Array) -> dict[str, Any]:
    """Everything before the first model evaluation (arguments as `program`'s): the prompts' encodings,
    the starting latents and the image conditioning, as a dict of [B]- or [2B]-row arrays (None where
    the mode has none)."""
    idx = inputs["index"]
    b, (h, w) = idx.shape[0], spec.latent_size
    c = m.latent_channels
    if spec.cfg and not spec.zero_negative:
        # Negative and positive prompts through the encoders as one [2B] batch (one traced encoder).
        ids = {k: _pair(inputs["neg_ids"][k], v) for k, v in inputs["ids"].items()}
        context, pooled = prompts.encode(m.encoders, params, ids, spec.clip_skip)
    else:
        context, pooled = prompts.encode(m.encoders, params, inputs["ids"], spec.clip_skip)
        if spec.cfg:  # SDXL with no negative prompt: zero negative context and pooled embedding
            context = _pair(jnp.zeros_like(context), context)
            pooled = None if pooled is None else _pair(jnp.zeros_like(pooled), pooled)
    added = None
    if m.encoders.sdxl:
        time_ids = inputs["time_ids"]
        if spec.cfg:
            time_ids = _pair(inputs["neg_time_ids"], time_ids)
        added = {"text_embeds": pooled, "time_ids": time_ids}

    if spec.given_latents:
        noise = inputs["latents"].astype(jnp.float32)
    else:
        noise = sharding.per_sample_noise(jax.random.fold_in(key, START_NOISE), idx, (h, w, c))

    image_latents, extra, blend = None, None, None
    if spec.mode != "txt2img":
        image = inputs["image"]
        if spec.mode in ("img2img", "inpaint_blend") or spec.from_image:
            image_latents = _posterior_sample(m, params["vae"], image, key, IMAGE_POSTERIOR, idx)
    if spec.mode in ("inpaint", "inpaint_blend"):
        mask = inputs["mask"]
        f = m.vae_factor
        mask_latent = mask[:, ::f, ::f, :]  # torch interpolate(nearest) to (h, w) picks pixel (f*i, f*j)
        if spec.mode == "inpaint":
            masked = image * (mask < 0.5).astype(image.dtype)
            masked_latents = _posterior_sample(m, params["vae"], masked, key, MASKED_POSTERIOR, idx)
            extra = jnp.concatenate([mask_latent, masked_latents], axis=-1)  # [B, h, w, 1 + C]
            if spec.cfg:
                extra = _pair(extra, extra)
        else:
            blend = (image_latents, mask_latent, noise)

    x_T = initial_latents(plan, noise, image_latents if spec.from_image else None)

    return {"idx": idx, "context": context, "added": added, "extra": extra, "blend": blend, "x_T": x_T}


def denoise(m: Models, spec: Spec, params: Mapping[str, Any], ctx: Mapping[str, Any], carry, plan: Plan,
            key: jax.Array, guidance: jax.Array, ks: jax.Array | None):
    """Model evaluations `ks` (int32 [n]; None = all) of the sampler from `carry` (see samplers.sample_steps)."""
    b = ctx["idx"].shape[0]
    context, added, extra = ctx["context"], ctx["added"], ctx["extra"]

    def model_fn(x_in, t):
        x = _pair(x_in, x_in) if spec.cfg else x_in
        if extra is not None:
            x = jnp.concatenate([x, extra.astype(x.dtype)], axis=-1)
        out = m.unet.apply({"params": params["unet"]}, x, t, context, added).astype(jnp.float32)
        if not spec.cfg:
            return out
        out = out.reshape((b, 2) + out.shape[1:])
        uncond, text = out[:, 0], out[:, 1]
        guided = uncond + guidance[0] * (text - uncond)
        if spec.rescale:
            # Lin et al. 2023 sec. 3.4 (diffusers' rescale_noise_cfg): match the text branch's per-image std.
            ratio = jnp.std(text, axis=(1, 2, 3), keepdims=True, ddof=1) / jnp.std(
                guided, axis=(1, 2, 3), keepdims=True, ddof=1)
            guided = guidance[1] * (guided * ratio) + (1.0 - guidance[1]) * guided
        return guided

    return sample_steps(model_fn, carry, plan, ks, jax.random.fold_in(key, STEP_NOISE), inpaint=ctx["blend"],
                        sample_index=ctx["idx"])


def decode(m: Models, spec: Spec, params: Mapping[str, Any], x0: jax.Array) -> dict[str, jax.Array]:
    """Final latents [B, h, w, C] -> `program`'s outputs."""
    decoded = m.vae.apply({"params": params["vae"]}, x0 / m.scaling_factor, method="decode")
    pixels = jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    out = {"images": jnp.round(pixels * 255.0).astype(jnp.uint8), "latents": x0}
    if spec.return_float:
        out["pixels"] = pixels
    return out


def _prepare_and_start(m: Models, spec: Spec, params, inputs, plan: Plan, key) -> tuple[dict, tuple]:
    """`prepare`, and the sampler's carry before evaluation 0."""
    ctx = prepare(m, spec, params, inputs, plan, key)
    return ctx, sampler_state(plan, ctx["x_T"])


class Runner:
    """One pipeline's compiled program on one mesh, with its params placed (replicated) there."""

    def __init__(self, pipe, mesh):
        self.mesh = mesh
        self.models = models_of(pipe)
        self.params = sharding.shard_params({name: c.params for name, c in pipe.components().items()},
                                            sharding.replicated(mesh))
        self._jit = jax.jit(functools.partial(program, self.models), static_argnums=0,
                            out_shardings=sharding.batch_sharding(mesh, 1))
        # The same request as three programs, for callers that report progress: prepare, ONE model
        # evaluation (called K times, the evaluation index an argument), decode. The host sees each step
        # end without a host callback inside a program: JAX does not write programs holding callbacks to
        # its persistent compilation cache, so a progress bar that used one recompiled on every run.
        self._prepare = jax.jit(functools.partial(_prepare_and_start, self.models), static_argnums=0)
        self._denoise = jax.jit(functools.partial(denoise, self.models), static_argnums=0)
        self._decode = jax.jit(functools.partial(decode, self.models), static_argnums=0,
                               out_shardings=sharding.batch_sharding(mesh, 1))

    def __call__(self, spec: Spec, inputs: Mapping[str, Any], plan: Plan, key, guidance,
                 on_step: Callable[[int], None] | None = None) -> tuple[dict, int]:
        """Pads the batch to the device count, places everything, runs. Returns (global outputs, n_real).

        on_step: called on the host with k after model evaluation k is done. Given, the request runs as
        prepare / K single evaluations / decode (same numbers per evaluation, one host sync per step);
        without it, as one program.
        """
        padded, n = sharding.pad_batch(dict(inputs), self.mesh.size)
        placed = sharding.to_global(padded, sharding.batch_sharding(self.mesh, 1))
        rep = sharding.to_global((plan, np.asarray(key), np.asarray(guidance, np.float32)),
                                 sharding.replicated(self.mesh))
        if on_step is None:
            return self._jit(spec, self.params, placed, *rep), n
        plan_r, key_r, guidance_r = rep
        ctx, carry = self._prepare(spec, self.params, placed, plan_r, key_r)
        for k in range(plan.nfe):
            ks = sharding.to_global(np.array([k], np.int32), sharding.replicated(self.mesh))
            carry = jax.block_until_ready(self._denoise(spec, self.params, ctx, carry, plan_r, key_r,
                                                        guidance_r, ks))
            on_step(k)
        return self._decode(spec, self.params, carry[0]), n

    def cache_size(self) -> int:
        """Number of one-program executables compiled so far (one per Spec and shapes)."""
        return self._jit._cache_size()
