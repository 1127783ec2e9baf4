"""Shared test harness for sampler parity: an analytic denoiser, shared noise, diffusers and k-diffusion references.

Import it from a test as ``from tests.sampler_reference import ...`` (pytest's pythonpath is the repo root).
Everything here is test-only: torch and diffusers are imported, jaxdiff is not.

How to use it (the recipe of shared/reference/samplers.md section 4)::

    den = GaussianDenoiser.for_config(SD_CONFIG, lam=0.1, prediction_type="epsilon")
    noise0, noises = make_noise((1, 8, 8, 4), num_evals=K, seed=0)     # NHWC float32; K >= NFE
    ref = run_diffusers(DDIMScheduler, 20, noise0, noises, denoiser=den, config={"timestep_spacing": "trailing"},
                        step_kwargs={"eta": 1.0})
    ref.timesteps, ref.sigmas, ref.nfe, ref.init_noise_sigma, ref.x     # x: final latents, NHWC float32
    # JAX side: the same denoiser and the same noise tables
    x = jaxdiff.samplers.sample(den.jax, jnp.asarray(noise0) * plan.init_noise_sigma, plan, key, noises=noises[:K])

The pieces:

* ``GaussianDenoiser``: the exact posterior predictor for data x0 ~ N(mu, s^2) (elementwise), plus a
  nonlinearity ``lam * sqrt(1 - ab) * tanh(x_t)`` on eps so that a wrong timestep or sigma shows up:

      eps(x_t, t) = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab) + lam sqrt(1-ab) tanh(x_t)

  with ab = alphas_cumprod at t. At a fractional t, ab is interpolated LINEARLY IN LOG-SIGMA between the two
  neighbouring integer timesteps (sigma = sqrt((1-ab)/ab)); this is the exact inverse of k-diffusion's
  ``sigma_to_t``, so a sampler that maps sigma -> fractional t gets the denoiser of exactly that sigma. At an
  integer t, ab is the table entry itself. The x0 and v predictions are derived from the same eps:
  x0 = (x_t - sqrt(1-ab) eps)/sqrt(ab), v = sqrt(ab) eps - sqrt(1-ab) x0 (the Gaussian part in closed form, so
  lam=0 stays finite at ab=0; lam != 0 with x0/v prediction and a zero-SNR table is singular and refused).
  One formula (``_predict``) runs under numpy, torch and jax.numpy: ``den.numpy(x, t)``, ``den.torch(x, t)``,
  ``den.jax(x, t)`` (the last is jit-traceable; t a float32 scalar). Elementwise, so layout (NHWC/NCHW) does
  not matter. With lam=0 the exact ODE solution maps N(0, 1) onto N(mu, s^2): an accuracy oracle.

* ``make_noise(shape, num_evals, seed)``: pre-drawn ``noise0`` [B, h, w, C] and ``noises`` [K, B, h, w, C]
  (NHWC float32). THE NOISE CONVENTION: the noise a sampler consumes right after model evaluation k (0-based,
  counting every model call, i.e. the scan index) is ``noises[k]``. A step that draws nothing leaves its
  ``noises[k]`` unused (DDPM at t=0, LCM/TCD on the last step, DPM++ 2S a on the first half of a step).

* ``run_diffusers(cls, steps, noise0, noises, ...)``: the diffusers loop of the recipe (``from_config`` on
  SD_CONFIG + overrides, ``set_timesteps``, ``x = noise0 * init_noise_sigma`` or img2img ``add_noise`` with
  ``strength``, then per timestep ``step(den(scale_model_input(x, t), t), t, x)``). Noise is injected per
  step() call k as ``noises[k]``: through ``variance_noise=`` where ``step`` takes it (DDIM, DPMSolverMultistep)
  and by patching the scheduler module's ``randn_tensor`` (DDPM, Euler (s_churn), Euler a, KDPM2 a,
  DPMSolverSinglestep SDE, LCM, TCD). ``inject_noise`` is the context manager that does the patching; a draw
  with no noise given, or two draws in one step() call, raise. Returns a ``DiffusersRun``.

* ``ref_dpmpp_2s_ancestral`` / ``ref_dpmpp_sde``: k-diffusion's formulas (sampling.py 4601bf0) in numpy
  float64 over a sigma table ending in 0, with a k-diffusion model ``kdiffusion_model(den)`` (x, sigma) -> x0
  (DiscreteEpsDDPMDenoiser / CompVisVDenoiser: c_in = 1/sqrt(sigma^2+1), t = sigma_to_t(sigma) fractional).
  No diffusers class exists for 2S a; DPMSolverSDEScheduler needs torchsde (not installed), so these are the
  references. Evaluation indices: step i that is not the last evaluates at k = 2i (sigma_i) and k = 2i+1 (the
  midpoint); the final step (to sigma 0) is one Euler evaluation, so NFE = 2N - 1 when only the last sigma is 0.
    - 2S a adds its ancestral noise after the second evaluation of step i: ``noises[2i+1]``.
    - DPM++ SDE's two noises come from ONE Brownian path (k-diffusion's BrownianTreeNoiseSampler, time =
      sigma). The sub-step noise covers [s_mid, s_i] and the full-step noise [s_next, s_i]; these overlap.
      With independent standard normals z1 = noises[2i], z2 = noises[2i+1] and d1 = s_i - s_mid,
      d2 = s_mid - s_next, the increments are A = sqrt(d1) z1 over [s_mid, s_i] and B = sqrt(d2) z2 over
      [s_next, s_mid], so
          sub-step noise  n1 = z1
          full-step noise n2 = (sqrt(d1) z1 + sqrt(d2) z2) / sqrt(d1 + d2)
      (``bridge_noises``), which has exactly the tree's joint law: unit variances, corr sqrt(d1/(d1+d2)).
      Different steps cover disjoint intervals, hence independent noises, as in the tree.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import sys
from typing import Any, Callable

import numpy as np
import torch

# Stock SD1.5 / SD2 / SDXL scheduler config (diffusers' SCHEDULER_DEFAULT_CONFIG, samplers.md "Stock configs").
SD_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

MU, STD = 0.3, 0.5  # the Gaussian data distribution N(MU, STD^2) the analytic denoiser is exact for


# ----------------------------------------------------------------------------------------------- schedule
def alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """float64 [T] alphas_cumprod for a diffusers scheduler config (independent of jaxdiff.schedules)."""
    cfg = dict(SD_CONFIG, **config)
    n, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    kind = cfg["beta_schedule"]
    if kind == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    else:
        raise ValueError(f"unknown beta_schedule {kind!r}")
    if cfg.get("rescale_betas_zero_snr", False):
        # diffusers' rescale_zero_terminal_snr (Lin et al. 2023, Algorithm 1).
        sa = np.sqrt(np.cumprod(1.0 - betas))
        s0, sT = sa[0], sa[-1]
        sa = (sa - sT) * s0 / (s0 - sT)
        ab = sa**2
        alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
        betas = 1.0 - alphas
    return np.cumprod(1.0 - betas)


# ---------------------------------------------------------------------------------------------- denoiser
def _predict(x, ab, mu: float, s: float, lam: float, prediction_type: str, sqrt, tanh):
    """The analytic model output at noise level ab; x is any array type, ab a 0-d array of x's dtype."""
    sa, sb = sqrt(ab), sqrt(1.0 - ab)
    r = (x - sa * mu) / (ab * (s * s) + (1.0 - ab))  # [B, ...]
    eps = sb * r
    if lam:
        bump = (lam * sb) * tanh(x)  # the nonlinearity, on eps
        eps = eps + bump
    if prediction_type == "epsilon":
        return eps
    x0 = mu + (sa * (s * s)) * r  # closed-form Gaussian posterior mean: finite at ab = 0
    if lam:
        x0 = x0 - sb * bump / sa  # keeps x_t = sqrt(ab) x0 + sqrt(1-ab) eps exact
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return sa * eps - sb * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


@dataclasses.dataclass(frozen=True)
class GaussianDenoiser:
    """Exact predictor for x0 ~ N(mu, s^2) plus a tanh nonlinearity; numpy / torch / jnp front ends.

    Attributes:
      table: float64 [T] alphas_cumprod the "model" was trained with.
      mu, s: the data distribution.
      lam: strength of the nonlinearity (0: exact Gaussian oracle).
      prediction_type: "epsilon" | "v_prediction" | "sample".
    """

    table: np.ndarray
    mu: float = MU
    s: float = STD
    lam: float = 0.1
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.lam and self.prediction_type != "epsilon" and float(self.table.min()) <= 0.0:
            raise ValueError("lam != 0 with x0/v prediction is singular on a zero-SNR table (ab = 0); use lam=0")

    @classmethod
    def for_config(cls, config: dict[str, Any], **kw) -> "GaussianDenoiser":
        """Denoiser on the alphas_cumprod of SD_CONFIG updated with ``config``."""
        kw.setdefault("prediction_type", dict(SD_CONFIG, **config)["prediction_type"])
        return cls(alphas_cumprod(config), **kw)

    @property
    def log_sigmas(self) -> np.ndarray:
        """float64 [T] log sigma(t); ab clamped to 2^-24 (as diffusers' Euler does) so it stays finite."""
        ab = np.maximum(self.table, 2.0**-24)
        return 0.5 * np.log((1.0 - ab) / ab)

    def ab_at(self, t: float) -> float:
        """float64 ab at a (possibly fractional) timestep: table entry at integer t, log-sigma lerp between."""
        t = float(t)
        lo = min(max(int(math.floor(t)), 0), len(self.table) - 1)
        w = t - lo
        if w == 0.0:
            return float(self.table[lo])
        hi = min(lo + 1, len(self.table) - 1)
        ls = (1.0 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]
        return float(1.0 / (1.0 + math.exp(2.0 * ls)))

    def numpy(self, x: np.ndarray, t) -> np.ndarray:
        """Model output for a numpy x (float32 or float64), computed in x's dtype."""
        ab = np.asarray(self.ab_at(t), dtype=x.dtype)
        return _predict(x, ab, self.mu, self.s, self.lam, self.prediction_type, np.sqrt, np.tanh)

    def torch(self, x: torch.Tensor, t) -> torch.Tensor:
        """Model output for a torch x (t: int/float/0-d tensor), in x's dtype."""
        t = float(t.item()) if isinstance(t, torch.Tensor) else float(t)
        ab = torch.tensor(self.ab_at(t), dtype=x.dtype)
        return _predict(x, ab, self.mu, self.s, self.lam, self.prediction_type, torch.sqrt, torch.tanh)

    def jax(self, x, t):
        """Model output for a jax x [B, h, w, C] float32; t a float32 scalar (jit-traceable)."""
        return jax_model(x, t, self.jax_params())

    def jax_params(self) -> dict[str, Any]:
        """The denoiser as a dict of jnp arrays, for ``jax_model``: pass it as a jit ARGUMENT so one compiled
        sampler serves every (table, lam, prediction type) of a sweep."""
        import jax.numpy as jnp

        onehot = np.array([self.prediction_type == p for p in ("epsilon", "v_prediction", "sample")], np.float32)
        f32 = lambda v: jnp.asarray(v, dtype=jnp.float32)  # noqa: E731
        return {"table": f32(self.table), "log_sigmas": f32(self.log_sigmas), "mu": f32(self.mu),
                "s": f32(self.s), "lam": f32(self.lam), "onehot": f32(onehot)}


def jax_model(x, t, params: dict[str, Any]):
    """jnp form of ``_predict`` with every constant traced (see GaussianDenoiser.jax_params).

    The three prediction types are all computed and one is selected by params["onehot"]; the lam term of
    x0 is dropped where sqrt(ab) = 0 (only reachable with lam = 0, see GaussianDenoiser).
    """
    import jax.numpy as jnp

    table, log_sigmas = params["table"], params["log_sigmas"]
    t = jnp.asarray(t, dtype=jnp.float32)
    n = table.shape[0]
    lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, n - 1)
    hi = jnp.minimum(lo + 1, n - 1)
    w = t - lo.astype(jnp.float32)
    ls = (1.0 - w) * log_sigmas[lo] + w * log_sigmas[hi]
    ab = jnp.where(w == 0.0, table[lo], 1.0 / (1.0 + jnp.exp(2.0 * ls))).astype(x.dtype)
    mu, s, lam = params["mu"], params["s"], params["lam"]
    sa, sb = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
    r = (x - sa * mu) / (ab * (s * s) + (1.0 - ab))
    bump = (lam * sb) * jnp.tanh(x)
    eps = sb * r + bump
    x0 = mu + (sa * (s * s)) * r
    x0 = x0 - jnp.where(sa > 0, sb * bump / jnp.where(sa > 0, sa, 1.0), 0.0)
    v = sa * eps - sb * x0
    oh = params["onehot"]
    return oh[0] * eps + oh[1] * v + oh[2] * x0


# ------------------------------------------------------------------------------------------------- noise
def make_noise(shape: tuple[int, ...], num_evals: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noise0 [*shape], noises [num_evals, *shape]) standard normal, float32, NHWC."""
    rng = np.random.default_rng(seed)
    noise0 = rng.standard_normal(shape, dtype=np.float32)
    noises = rng.standard_normal((num_evals, *shape), dtype=np.float32)
    return noise0, noises


def to_torch(a: np.ndarray) -> torch.Tensor:
    """NHWC numpy [..., B, h, w, C] -> NCHW torch [..., B, C, h, w] (a copy)."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3)))


def from_torch(t: torch.Tensor) -> np.ndarray:
    """NCHW torch -> NHWC numpy float32."""
    return np.moveaxis(t.detach().to(torch.float32).numpy(), -3, -1).copy()


class _NoiseQueue:
    """Serves noises[k] to the k-th step() call; records which calls drew."""

    def __init__(self, noises: torch.Tensor | None):
        self.noises = noises  # [K, B, C, h, w] or None
        self.k = 0
        self.drawn: list[int] = []

    def current(self, shape, dtype) -> torch.Tensor:
        if self.noises is None:
            raise AssertionError(f"the scheduler drew noise at step() call {self.k} but no noises were injected")
        if self.drawn and self.drawn[-1] == self.k:
            raise AssertionError(f"the scheduler drew noise twice in step() call {self.k}")
        if self.k >= len(self.noises):
            raise AssertionError(f"step() call {self.k} needs noise but only {len(self.noises)} were given")
        noise = self.noises[self.k]
        if tuple(noise.shape) != tuple(shape):
            raise AssertionError(f"noise shape {tuple(noise.shape)} != requested {tuple(shape)}")
        self.drawn.append(self.k)
        return noise.to(dtype)

    def randn_tensor(self, shape, generator=None, device=None, dtype=None, layout=None):
        """Drop-in for diffusers.utils.torch_utils.randn_tensor."""
        return self.current(shape, dtype or torch.float32)


@contextlib.contextmanager
def inject_noise(scheduler, noises: torch.Tensor | None):
    """Patch the module-level ``randn_tensor`` of ``scheduler``'s module to serve ``noises[queue.k]``.

    Yields the queue; the caller sets ``queue.k`` to the step() call index before each call.
    """
    module = sys.modules[type(scheduler).__module__]
    queue = _NoiseQueue(noises)
    original = getattr(module, "randn_tensor", None)
    if original is not None:
        module.randn_tensor = queue.randn_tensor
    try:
        yield queue
    finally:
        if original is not None:
            module.randn_tensor = original


# --------------------------------------------------------------------------------------- diffusers loop
@dataclasses.dataclass
class DiffusersRun:
    """What one diffusers reference loop produced."""

    x: np.ndarray  # [B, h, w, C] float32 final latents (NHWC)
    timesteps: np.ndarray  # [NFE] the timesteps the model saw (after strength slicing), scheduler dtype
    sigmas: np.ndarray | None  # the scheduler's full sigma table (float64 copy), None where it has none
    nfe: int  # model evaluations
    init_noise_sigma: float
    drawn: tuple[int, ...]  # step() call indices that consumed injected noise
    x_T: np.ndarray  # [B, h, w, C] the starting latents (noise0 * init_noise_sigma, or add_noise for img2img)
    scheduler: Any  # the scheduler after the run, for inspection


def make_scheduler(cls, config: dict[str, Any] | None = None, prediction_type: str | None = None,
                   base: dict[str, Any] | None = None):
    """``cls.from_config(base + config)`` (base: SD_CONFIG unless given, {} for a file's keys alone); unknown keys
    for this class are dropped silently."""
    cfg = dict(SD_CONFIG if base is None else base, **(config or {}))
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    logger = logging.getLogger("diffusers.configuration_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)  # from_config warns about keys other classes use (skip_prk_steps, ...)
    try:
        return cls.from_config(cfg)
    finally:
        logger.setLevel(level)


def run_diffusers(
    cls,
    steps: int,
    noise0: np.ndarray,
    noises: np.ndarray | None = None,
    *,
    denoiser: GaussianDenoiser | None = None,
    lam: float = 0.1,
    prediction_type: str = "epsilon",
    config: dict[str, Any] | None = None,
    step_kwargs: dict[str, Any] | None = None,
    set_timesteps_kwargs: dict[str, Any] | None = None,
    image: np.ndarray | None = None,
    strength: float = 1.0,
    output: str = "prev_sample",
    base: dict[str, Any] | None = None,
) -> DiffusersRun:
    """Run a diffusers scheduler class end to end on the analytic denoiser with shared noise.

    Args:
      cls: a diffusers scheduler class (DDIMScheduler, UniPCMultistepScheduler, ...).
      steps: num_inference_steps.
      noise0: [B, h, w, C] starting noise (NHWC float32).
      noises: [K, B, h, w, C] step noise; step() call k gets noises[k]. None: the run must not draw.
      denoiser: the model; default ``GaussianDenoiser.for_config(config, lam=lam, prediction_type=...)``.
      config: overrides of SD_CONFIG (timestep_spacing, use_karras_sigmas, rescale_betas_zero_snr, ...).
      step_kwargs: extra step() arguments (eta for DDIM/TCD, s_churn, ...).
      image: img2img starting latents [B, h, w, C]; with strength < 1 the loop starts part-way exactly as the
        diffusers img2img pipelines do (get_timesteps + set_begin_index + add_noise(image, noise0, t_first)).
      output: "prev_sample", or "denoised" (the LCM pipeline returns step()'s ``denoised`` of the last step).
      base: the dict ``config`` updates (default SD_CONFIG; ``{}`` runs ``from_config(config)`` on a file's keys
        alone, so absent keys take the class defaults). The denoiser still reads SD_CONFIG + config.

    Returns:
      DiffusersRun.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError("strength must be in (0, 1]")
    sch = make_scheduler(cls, config, prediction_type) if base is None else make_scheduler(
        cls, config, prediction_type, base=base)
    den = denoiser or GaussianDenoiser.for_config(dict(config or {}, prediction_type=prediction_type), lam=lam)
    sch.set_timesteps(steps, **(set_timesteps_kwargs or {}))
    timesteps = sch.timesteps
    sigmas = getattr(sch, "sigmas", None)
    sigmas = None if sigmas is None else np.asarray(torch.as_tensor(sigmas).to(torch.float64).numpy()).copy()
    n0 = to_torch(noise0)
    if image is not None and strength < 1.0:
        init = min(int(steps * strength), steps)
        t_start = max(steps - init, 0)
        timesteps = sch.timesteps[t_start * sch.order :]
        if hasattr(sch, "set_begin_index"):
            sch.set_begin_index(t_start * sch.order)
        x = sch.add_noise(to_torch(image), n0, timesteps[:1])
    else:
        x = n0 * sch.init_noise_sigma
    x_T = from_torch(x)
    takes_variance_noise = "variance_noise" in inspect.signature(sch.step).parameters
    step_kwargs = dict(step_kwargs or {})
    noises_t = None if noises is None else to_torch(noises)
    nfe = 0
    with inject_noise(sch, noises_t) as queue:
        for k, t in enumerate(timesteps):
            queue.k = k
            out = den.torch(sch.scale_model_input(x, t), t)
            nfe += 1
            kw = dict(step_kwargs)
            if takes_variance_noise and noises_t is not None and k < len(noises_t):
                kw["variance_noise"] = noises_t[k]
            res = sch.step(out, t, x, **kw)
            x = res.prev_sample
            if output == "denoised":
                last = res.denoised
    final = last if output == "denoised" else x
    init_sigma = float(torch.as_tensor(sch.init_noise_sigma))
    drawn = tuple(queue.drawn)
    if takes_variance_noise and noises_t is not None:
        drawn = tuple(range(len(timesteps)))  # passed every call; whether it was used depends on eta / algorithm
    return DiffusersRun(
        x=from_torch(final),
        timesteps=np.asarray(timesteps.numpy()).copy(),
        sigmas=sigmas,
        nfe=nfe,
        init_noise_sigma=init_sigma,
        drawn=drawn,
        x_T=x_T,
        scheduler=sch,
    )


# ---------------------------------------------------------------------------- k-diffusion references
def sigma_to_t(den: GaussianDenoiser, sigma: float) -> float:
    """k-diffusion's DiscreteSchedule.sigma_to_t: fractional t, linear in log sigma (float64)."""
    log_sigmas = den.log_sigmas
    ls = math.log(sigma)
    low = int(np.clip(np.sum(ls - log_sigmas >= 0) - 1, 0, len(log_sigmas) - 2))
    w = (log_sigmas[low] - ls) / (log_sigmas[low] - log_sigmas[low + 1])
    w = min(max(w, 0.0), 1.0)
    return (1.0 - w) * low + w * (low + 1)


def kdiffusion_model(
    den: GaussianDenoiser, t_of_sigma: Callable[[float], float] | None = None
) -> Callable[[np.ndarray, float], np.ndarray]:
    """k-diffusion denoiser (x, sigma) -> x0 in float64 over ``den`` (VE space: x = x0 + sigma * eps).

    Wraps like DiscreteEpsDDPMDenoiser / CompVisVDenoiser: the model sees x / sqrt(sigma^2 + 1) at
    t = t_of_sigma(sigma) (default: k-diffusion's fractional sigma_to_t; pass ``lambda s: round(sigma_to_t(den,
    s))`` to mimic diffusers' rounded timesteps).
    """
    t_of_sigma = t_of_sigma or (lambda sig: sigma_to_t(den, sig))

    def model(x: np.ndarray, sigma: float) -> np.ndarray:
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        out = den.numpy(np.asarray(x, np.float64) * c_in, t_of_sigma(sigma))
        if den.prediction_type == "epsilon":
            return x - sigma * out
        if den.prediction_type == "v_prediction":
            return x / (sigma * sigma + 1.0) - sigma * c_in * out
        return out

    return model


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion get_ancestral_step: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
    return sigma_down, sigma_up


def bridge_noises(z1, z2, sigma: float, sigma_mid: float, sigma_next: float):
    """Sub-step and full-step Brownian noises of one DPM++ SDE step from two independent normals.

    (n1, n2) with n1 = z1 over [sigma_mid, sigma] and n2 over [sigma_next, sigma] from the same path:
    n2 = (sqrt(d1) z1 + sqrt(d2) z2) / sqrt(d1 + d2), d1 = sigma - sigma_mid, d2 = sigma_mid - sigma_next.
    """
    d1, d2 = sigma - sigma_mid, sigma_mid - sigma_next
    return z1, (math.sqrt(d1) * z1 + math.sqrt(d2) * z2) / math.sqrt(d1 + d2)


def _sigma_fn(t: float) -> float:
    return math.exp(-t)


def _t_fn(sigma: float) -> float:
    return -math.log(sigma)


def ref_dpmpp_2s_ancestral(model, x, sigmas, noises, *, eta: float = 1.0, s_noise: float = 1.0):
    """k-diffusion sample_dpmpp_2s_ancestral (DPM-Solver++(2S) + ancestral noise), numpy float64.

    Args:
      model: (x, sigma) -> x0, e.g. ``kdiffusion_model(den)``.
      x: [B, h, w, C] x_T (already scaled by sigmas[0]).
      sigmas: [N+1] float64, descending, ending in 0.
      noises: [K, B, h, w, C]; the noise after evaluation k is noises[k] (see the module docstring).

    Returns:
      (x_0 float64, nfe).
    """
    x = np.asarray(x, np.float64)
    k = 0
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, s)
        sigma_down, sigma_up = ancestral_step(s, s_next, eta)
        if sigma_down == 0:  # Euler step (the last one)
            x = x + (x - denoised) / s * (sigma_down - s)
        else:
            t, t_next = _t_fn(s), _t_fn(sigma_down)
            h = t_next - t
            s_mid = t + 0.5 * h
            x_2 = (_sigma_fn(s_mid) / _sigma_fn(t)) * x - math.expm1(-0.5 * h) * denoised
            k += 1
            denoised_2 = model(x_2, _sigma_fn(s_mid))
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - math.expm1(-h) * denoised_2
        if s_next > 0:
            x = x + noises[k] * (s_noise * sigma_up)
        k += 1
    return x, k


def ref_dpmpp_sde(model, x, sigmas, noises, *, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5):
    """k-diffusion sample_dpmpp_sde (DPM-Solver++ stochastic, Brownian noise as a bridge), numpy float64.

    Step i (sigma_{i+1} > 0) evaluates at k = 2i and 2i+1; z1 = noises[2i], z2 = noises[2i+1] are composed by
    ``bridge_noises``. A step to sigma 0 is one Euler evaluation. Returns (x_0 float64, nfe).
    """
    x = np.asarray(x, np.float64)
    k = 0
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, s)
        if s_next == 0:
            x = x + (x - denoised) / s * (s_next - s)
            k += 1
            continue
        t, t_next = _t_fn(s), _t_fn(s_next)
        h = t_next - t
        t_mid = t + h * r
        fac = 1.0 / (2.0 * r)
        n1, n2 = bridge_noises(noises[k], noises[k + 1], s, _sigma_fn(t_mid), s_next)
        # Step 1: to the midpoint, ancestrally.
        sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(t_mid), eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - math.expm1(t - s_) * denoised
        x_2 = x_2 + n1 * (s_noise * su)
        denoised_2 = model(x_2, _sigma_fn(t_mid))
        # Step 2: the full step with the combined x0 estimate.
        sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1.0 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - math.expm1(t - t_next_) * denoised_d
        x = x + n2 * (s_noise * su)
        k += 2
    return x, k


def max_rel_diff(a, b) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
