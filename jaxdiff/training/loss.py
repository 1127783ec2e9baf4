"""The denoising objective: forward noising, targets, SNR weighting, and the per-batch loss.

Formulas follow diffusers' training scripts (`examples/text_to_image/train_text_to_image.py`,
`DDPMScheduler.add_noise / get_velocity`, `training_utils.compute_snr`):

    z_t      = sqrt(ab_t) z_0 + sqrt(1 - ab_t) n'          n' = n + input_perturbation * m
    target   = n (epsilon)  |  sqrt(ab_t) n - sqrt(1 - ab_t) z_0 (v_prediction)
    snr_t    = (sqrt(ab_t) / sqrt(1 - ab_t)) ** 2
    weight_t = min(snr_t, gamma) / snr_t (epsilon)  |  min(snr_t, gamma) / (snr_t + 1) (v)
    loss     = mean_b( weight_b * mean_{h,w,c} (pred - target) ** 2 )

with offset noise n = n_0 + noise_offset * o, o ~ N(0, 1) of shape [B, 1, 1, C] (Guttenberg 2023).
Input perturbation (Ning et al. 2023) noises z_t with n' but keeps the clean n in the target.

Randomness never depends on the layout: sample i's t and noise come from `fold_in(key, i)` where i is
its row in the global batch, so a step gives the same numbers on 1 or 64 devices and with or without
gradient accumulation (each micro-batch passes its own global row indices).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import prediction, schedules
from jaxdiff.errors import ConfigError

TIMESTEP_BIAS_STRATEGIES = ("none", "later", "earlier", "range")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """What the UNet is trained to predict and how the per-sample losses are weighted.

    prediction_type: "epsilon" or "v_prediction"; None takes the model's scheduler config.
    snr_gamma: min-SNR-gamma weighting (Hang et al. 2023; 5.0 recommended); None = plain MSE.
    noise_offset: scale of the per-channel offset noise (0.05-0.1 typical); 0 = off.
    input_perturbation: scale of the extra noise on z_t only (0.1 recommended); 0 = off.
    t_min, t_max: timesteps are drawn from [t_min, t_max) (None: num_train_timesteps), uniformly unless
      a timestep bias is set.
    timestep_bias_strategy: diffusers' SDXL-script timestep bias: "none"; "later" / "earlier" (the last /
      first `timestep_bias_portion` of the timesteps); "range" ([timestep_bias_begin, timestep_bias_end)).
      Those timesteps are drawn `timestep_bias_multiplier` times as often. "later" stresses the noisy
      steps, where composition is decided.
    """
    prediction_type: str | None = None
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    t_min: int = 0
    t_max: int | None = None
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000

    def __post_init__(self):
        if self.prediction_type not in (None, *prediction.TRAINABLE):
            raise ConfigError(f"prediction_type={self.prediction_type!r}: expected one of {prediction.TRAINABLE}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"snr_gamma must be > 0, got {self.snr_gamma}")
        if self.timestep_bias_strategy not in TIMESTEP_BIAS_STRATEGIES:
            raise ConfigError(f"timestep_bias_strategy={self.timestep_bias_strategy!r}: expected one of "
                              f"{TIMESTEP_BIAS_STRATEGIES}")
        if self.timestep_bias_multiplier <= 0:
            raise ConfigError(f"timestep_bias_multiplier must be > 0, got {self.timestep_bias_multiplier}")
        if not 0.0 <= self.timestep_bias_portion <= 1.0:
            raise ConfigError(f"timestep_bias_portion must be in [0, 1], got {self.timestep_bias_portion}")


def timestep_weights(cfg: LossConfig, num_train_timesteps: int) -> np.ndarray | None:
    """float64 [T] probabilities of each training timestep, or None for uniform on [t_min, t_max).

    diffusers' `generate_timestep_weights` (examples/text_to_image/train_text_to_image_sdxl.py), with
    timesteps outside [t_min, t_max) given weight 0.
    """
    n = num_train_timesteps
    t_max = cfg.t_max if cfg.t_max is not None else n
    if cfg.timestep_bias_strategy == "none" or cfg.timestep_bias_multiplier == 1.0:
        return None
    weights = np.ones(n, np.float64)
    k = int(cfg.timestep_bias_portion * n)
    if cfg.timestep_bias_strategy == "later":
        biased = slice(n - k, n)   # diffusers' slice(-k, None), which for k = 0 would be everything
    elif cfg.timestep_bias_strategy == "earlier":
        biased = slice(0, k)
    else:
        if not 0 <= cfg.timestep_bias_begin < cfg.timestep_bias_end <= n:
            raise ConfigError(f"timestep bias range [{cfg.timestep_bias_begin}, {cfg.timestep_bias_end}) "
                              f"must lie inside [0, {n})")
        biased = slice(cfg.timestep_bias_begin, cfg.timestep_bias_end)
    weights[biased] *= cfg.timestep_bias_multiplier
    weights[:cfg.t_min] = 0.0
    weights[t_max:] = 0.0
    if weights.sum() <= 0:
        raise ConfigError(f"no timestep left to train on: t_min={cfg.t_min}, t_max={t_max}")
    return weights / weights.sum()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseTables:
    """float32 [T] tables indexed by the integer timestep; passed to jitted code as arguments."""
    sqrt_alphas_cumprod: jax.Array        # sqrt(ab_t)
    sqrt_one_minus_alphas_cumprod: jax.Array  # sqrt(1 - ab_t); 0 at t=0 never (ab_0 < 1)

    @classmethod
    def from_scheduler(cls, cfg: schedules.SchedulerConfig) -> "NoiseTables":
        """Built in float64 on the host (zero-terminal-SNR rescale included), then cast to float32."""
        ab = schedules.alphas_cumprod(cfg)
        return cls(jnp.asarray(np.sqrt(ab), jnp.float32), jnp.asarray(np.sqrt(1.0 - ab), jnp.float32))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sqrt_alphas_cumprod.shape[0])


def _per_row(table: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] [B] -> [B, 1, ..., 1] with `ndim` axes in all (explicit: rank promotion is off)."""
    return table[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def add_noise(tables: NoiseTables, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """q(z_t | z_0): x0, noise [B, h, w, C], t [B] int -> z_t [B, h, w, C]."""
    a = _per_row(tables.sqrt_alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    s = _per_row(tables.sqrt_one_minus_alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    return a * x0 + s * noise


def velocity(tables: NoiseTables, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v target (Salimans & Ho 2022): sqrt(ab) noise - sqrt(1 - ab) x0, [B, h, w, C]."""
    return target(tables, "v_prediction", x0, noise, t)


def target(tables: NoiseTables, prediction_type: str, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What a model of `prediction_type` should output at q(z_t | x0) with `noise` (jaxdiff.prediction)."""
    a = _per_row(tables.sqrt_alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    s = _per_row(tables.sqrt_one_minus_alphas_cumprod, t, x0.ndim).astype(x0.dtype)
    return prediction.target(prediction_type, x0, noise, a, s)


def snr(tables: NoiseTables, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ab / (1 - ab) at t [B] -> [B] float32 (0 at a zero-SNR terminal step)."""
    return (tables.sqrt_alphas_cumprod[t] / tables.sqrt_one_minus_alphas_cumprod[t]) ** 2


def min_snr_weights(snr_t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """min-SNR-gamma loss weights [B].

    epsilon: min(snr, gamma) / snr, which tends to 1 as snr -> 0 and is set to 1 at snr == 0 (the
    zero-terminal-SNR step, where diffusers' formula gives 0/0 = NaN). v: min(snr, gamma) / (snr + 1).
    """
    clipped = jnp.minimum(snr_t, jnp.float32(gamma))
    if prediction_type == "epsilon":
        safe = jnp.where(snr_t > 0, snr_t, jnp.float32(1))
        return jnp.where(snr_t > 0, clipped / safe, jnp.float32(1))
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ConfigError(f"unknown prediction_type {prediction_type!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Draw:
    """One step's randomness for a batch; every field is a function of (key, global row index)."""
    t: jax.Array            # [B] int32 timesteps
    noise: jax.Array        # [B, h, w, C] standard normal (offset noise already added)
    perturbation: jax.Array  # [B, h, w, C] standard normal (used only when input_perturbation > 0)
    latent_noise: jax.Array  # [B, h, w, C] standard normal for sampling z_0 from cached VAE moments


def draw(key: jax.Array, rows: jax.Array, latent_shape: tuple[int, ...], cfg: LossConfig,
         num_train_timesteps: int) -> Draw:
    """Per-sample t and noise. rows: [B] int32 global row indices; latent_shape: (h, w, C)."""
    t_max = cfg.t_max if cfg.t_max is not None else num_train_timesteps
    weights = timestep_weights(cfg, num_train_timesteps)
    log_p = None if weights is None else jnp.asarray(np.log(np.maximum(weights, 1e-300)), jnp.float32)

    n = int(np.prod(latent_shape))
    channels = latent_shape[-1]

    def one(i):
        # Two PRNG calls per row (one normal draw sliced four ways): threefry is slow to compile on
        # CPU, and each call site adds to the train step's compile time.
        kt, kn = jax.random.split(jax.random.fold_in(key, i))
        if log_p is None:
            t = jax.random.randint(kt, (), cfg.t_min, t_max, dtype=jnp.int32)
        else:   # a categorical draw; zero-weight timesteps get log p = -690, never drawn in float32
            t = jax.random.categorical(kt, log_p).astype(jnp.int32)
        z = jax.random.normal(kn, (3 * n + channels,), jnp.float32)
        noise = z[:n].reshape(latent_shape)
        if cfg.noise_offset:
            offset = z[3 * n:].reshape(1, 1, channels)
            noise = noise + jnp.float32(cfg.noise_offset) * offset
        return Draw(t, noise, z[n:2 * n].reshape(latent_shape), z[2 * n:3 * n].reshape(latent_shape))

    return jax.vmap(one)(rows)


def per_sample_loss(pred: jax.Array, x0: jax.Array, d: Draw, tables: NoiseTables, cfg: LossConfig,
                    prediction_type: str) -> jax.Array:
    """Weighted MSE per sample [B] (float32) of a prediction made at `noisy_input(...)`."""
    want = target(tables, prediction_type, x0, d.noise, d.t)
    err = (pred.astype(jnp.float32) - want.astype(jnp.float32)) ** 2
    loss = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    if cfg.snr_gamma is not None:
        loss = loss * min_snr_weights(snr(tables, d.t), cfg.snr_gamma, prediction_type)
    return loss


def noisy_input(x0: jax.Array, d: Draw, tables: NoiseTables, cfg: LossConfig) -> jax.Array:
    """z_t for the UNet; with input perturbation the noise it sees is n + p * m but the target is n."""
    noise = d.noise
    if cfg.input_perturbation:
        noise = noise + jnp.float32(cfg.input_perturbation) * d.perturbation
    return add_noise(tables, x0, noise, d.t)


def latents_from_moments(moments: jax.Array, eps: jax.Array, scaling_factor: float,
                         shift_factor: float = 0.0) -> jax.Array:
    """Sample z_0 from cached VAE moments: [B, h, w, 2C] (mean ++ logvar) -> [B, h, w, C] scaled.

    A fresh sample every step (as maxdiffusion's cached tfrecords do), logvar clipped to [-30, 20] as
    diffusers' DiagonalGaussianDistribution does.
    """
    c = moments.shape[-1] // 2
    mean, logvar = moments[..., :c], jnp.clip(moments[..., c:], -30.0, 20.0)
    z = mean + jnp.exp(0.5 * logvar) * eps
    return (z - jnp.float32(shift_factor)) * jnp.float32(scaling_factor)


def diffusion_loss(predict: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, d: Draw,
                   tables: NoiseTables, cfg: LossConfig, prediction_type: str) -> jax.Array:
    """Per-sample losses [B] for `predict(z_t [B,h,w,C], t [B]) -> [B,h,w,C]` (context bound inside)."""
    pred = predict(noisy_input(x0, d, tables, cfg), d.t)
    return per_sample_loss(pred, x0, d, tables, cfg, prediction_type)
