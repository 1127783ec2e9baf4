"""Per-sample random streams: the one place generation's randomness is defined.

With root = jax.random.PRNGKey(seed) and i the sample index of an image within the request (0 .. B-1
by default, or the caller's `indices`):

    start noise x_T (unit):        normal(fold_in(fold_in(root, START_NOISE), i),      [h, w, C])
    sampler step noise, eval k:    normal(fold_in(fold_in(fold_in(root, STEP_NOISE), i), k), [h, w, C])
    VAE posterior of init image:   normal(fold_in(fold_in(root, IMAGE_POSTERIOR), i),  [h, w, C])
    VAE posterior of masked image: normal(fold_in(fold_in(root, MASKED_POSTERIOR), i), [h, w, C])

(the step-noise row is `samplers.step_noise`). So image i depends only on (seed, i, settings), never
on batch size, padding, device count or host count. `request_noise` returns these arrays on the host
(tests feed them to diffusers).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import JaxdiffError

START_NOISE, STEP_NOISE, IMAGE_POSTERIOR, MASKED_POSTERIOR = 0, 1, 2, 3


def check_seed(seed: int) -> np.ndarray:
    """A request seed as the uint32 host scalar programs take (they make the root key inside, so a
    request needs no eager device work and no implicit transfer)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise JaxdiffError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return np.asarray(seed, np.uint32)


def root_key(seed) -> jax.Array:
    """The root PRNG key of a request: PRNGKey(seed), from a Python int or a traced uint32 alike."""
    return jax.random.PRNGKey(seed)


def request_key(seed: int) -> jax.Array:
    """The root PRNG key of a request, on the host side (tests, `request_noise`)."""
    return root_key(int(check_seed(seed)))


def stream(key: jax.Array, tag: int) -> jax.Array:
    """The key of one of the request's streams (START_NOISE, STEP_NOISE, ...)."""
    return jax.random.fold_in(key, tag)


def per_sample_noise(key: jax.Array, indices: jax.Array, shape: tuple[int, ...],
                     dtype=jnp.float32) -> jax.Array:
    """Standard normal noise [B, *shape] where row b = normal(fold_in(key, indices[b]), shape).

    A sample's noise depends only on (key, its index), never on batch size, padding, device or host
    count: this is what makes sharded generation equal single-device generation.

    Args:
        key: a PRNG key (`jax.random.key(seed)` or `jax.random.PRNGKey(seed)`).
        indices: [B] int32 sample indices within the request.
        shape: per-sample shape, e.g. (h, w, C) for latents.
    """
    def one(i):
        return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)

    return jax.vmap(one)(indices)


@functools.partial(jax.jit, static_argnames=("shape",))
def _noise(key, indices, shape):
    return {name: per_sample_noise(stream(key, tag), indices, shape)
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
