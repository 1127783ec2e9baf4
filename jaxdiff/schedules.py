"""Noise schedules, host side (numpy float64): training betas, timestep spacings and sigma schedules.

Everything here runs once per request on the host and feeds float32 tables to the sampling scan
(jaxdiff/samplers/). The functions reproduce diffusers' `set_timesteps` for each scheduler family
(EulerDiscrete, Heun, KDPM2, LMS, DPMSolverMultistep; B's timestep-space samplers use `spaced_timesteps`
and `alphas_cumprod`), plus ComfyUI / A1111 schedules that diffusers lacks (normal, simple, sgm_uniform,
ddim_uniform, Align Your Steps).

Vocabulary: `t` is the integer (or fractional) training timestep in [0, T), `sigma(t) =
sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])` is the VE noise level of the same point.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from jaxdiff.errors import SamplerError
from jaxdiff import prediction
from jaxdiff.config_parsing import freeze, parse_config

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
# Sigma schedules a sampler may be asked for. "default" is what the checkpoint's scheduler config asks for, as
# its diffusers class runs it (use_*_sigmas, else its timestep spacing); None in make_plan is the sampler's own
# default (samplers/core.py).
# "beta" is diffusers' / A1111's (Beta quantiles between sigma_min and sigma_max); ComfyUI's scheduler of the
# same name samples training timesteps instead and is "beta_comfy".
SCHEDULES = ("default", "karras", "exponential", "beta", "beta_comfy", "normal", "simple", "sgm_uniform",
             "ddim_uniform", "kl_optimal", "linear_quadratic", "polyexponential", "laplace", "vp", "ays", "ays_sd1",
             "ays_sdxl", "ays_comfy", "ays_comfy_sd1", "ays_comfy_sdxl")

# Align Your Steps 10-step tables (Sabour et al. 2024). The first ten entries are diffusers'
# scheduling_utils.AysSchedules["StableDiffusion{,XL}Sigmas"]; diffusers replaces the last entry (0.029,
# the training sigma_min) with 0. ComfyUI keeps 0.029 for the log-linear interpolation to other step
# counts and zeroes the last sigma afterwards, which is what `ays_sigmas` does.
# These published 3-decimal tables (also A1111's sd_schedulers.py) are the default ("ays", "ays_sd1",
# "ays_sdxl"); ComfyUI's nodes_align_your_steps.py NOISE_LEVELS carry 10 digits ("ays_comfy*"). They differ by
# up to 2e-3 relative (SD1's 0.0291671582 vs 0.029).
AYS_SIGMAS = {
    "SD1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "SDXL": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "COMFY_SD1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
                  0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "COMFY_SDXL": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                   0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}

# scheduler_config.json keys that choose a sampler's behaviour rather than the training schedule: kept in
# SchedulerConfig.defaults so schedule=None / options can reproduce the checkpoint's own scheduler.
_SAMPLER_KEYS = frozenset({
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "solver_order", "algorithm_type",
    "solver_type", "lower_order_final", "euler_at_final", "final_sigmas_type", "skip_prk_steps",
    "variance_type", "predict_x0", "disable_corrector", "original_inference_steps", "timestep_scaling",
    "clip_sample", "clip_sample_range",  # implemented by DDIM / DDPM / LCM / TCD, refused where not
    "thresholding", "use_lu_lambdas",  # refused by the samplers whose diffusers class takes them (samplers/core.py)
})
# Keys whose value only matters when another (refused) option is on.
_INERT_KEYS = frozenset({
    "dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type",
    "noise_sampler_seed",  # DPMSolverSDE's torchsde seed: jaxdiff draws from the request key instead
})
# Keys that change numerics, accepted only at the value jaxdiff implements.
_ONLY_VALUES = {
    "trained_betas": (None,),
    "interpolation_type": ("linear",), "timestep_type": ("discrete",), "sigma_min": (None,),
    "sigma_max": (None,), "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,),
    "lambda_min_clipped": (-math.inf,), "shift_terminal": (None,),
    "solver_p": (None,),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """The training noise schedule plus the model-facing knobs of a diffusers scheduler_config.json.

    Defaults are the stock SD1/SD2/SDXL values (diffusers' SCHEDULER_DEFAULT_CONFIG), not the defaults of
    any one diffusers class.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # one of BETA_SCHEDULES
    prediction_type: str = "epsilon"  # what the UNet predicts: one of prediction.PREDICTION_TYPES
    timestep_spacing: str = "leading"  # one of SPACINGS
    steps_offset: int = 1  # added to `leading` timesteps only
    set_alpha_to_one: bool = False  # DDIM/PNDM final alpha: 1 or alphas_cumprod[0]
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023: alphas_cumprod[-1] = 0
    class_name: str | None = None  # the diffusers scheduler class the checkpoint ships, if known
    defaults: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) sampler-choice keys from the file
    # The file's own sorted (key, value) pairs, for `for_class`; None: every field above is given (no file:
    # diffusers' single-file loaders use the stock SD dict, SCHEDULER_DEFAULT_CONFIG, which these defaults are).
    source: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self):
        for name, value, allowed in (("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
                                     ("prediction_type", self.prediction_type, prediction.PREDICTION_TYPES),
                                     ("timestep_spacing", self.timestep_spacing, SPACINGS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported (supported: {', '.join(allowed)})")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "scheduler_config.json") -> "SchedulerConfig":
        """Parse any diffusers scheduler class's config dict (see the module constants for the key sets)."""

        raw = dict(raw)
        items = tuple(sorted((k, freeze(v)) for k, v in raw.items() if not k.startswith("_"))) or None
        defaults = tuple(sorted((k, freeze(raw.pop(k))) for k in list(raw) if k in _SAMPLER_KEYS))
        class_name = raw.get("_class_name")
        cfg = parse_config(cls, raw, source=source, ignored=_INERT_KEYS, only_values=_ONLY_VALUES)
        return dataclasses.replace(cfg, class_name=class_name, defaults=defaults, source=items)

    def for_class(self, class_defaults: Mapping[str, Any] | None) -> "SchedulerConfig":
        """This config as diffusers' `SchedulerClass.from_config(file)` sees it: the file's keys that the class
        takes, the class's own default for every key the file lacks, the file's other keys dropped.

        Args:
          class_defaults: the class's __init__ defaults (jaxdiff.samplers.class_defaults), or None for a
            sampler without a diffusers class (the config is returned as is).
        Returns self when the config did not come from a file (`source` None: all fields are given).
        """
        if self.source is None or class_defaults is None:
            return self
        raw = {**class_defaults, **{k: v for k, v in self.source if k in class_defaults}}
        raw = {k: v for k, v in raw.items() if v is not None or k not in _SAMPLER_KEYS}
        cfg = SchedulerConfig.from_dict(raw)
        return dataclasses.replace(cfg, class_name=self.class_name, source=None)

    def given(self, key: str) -> bool:
        """Whether the file sets `key` (always True for a config built without a file)."""
        return self.source is None or key in dict(self.source)

    def default(self, key: str, fallback: Any = None) -> Any:
        """A sampler-choice key from the checkpoint's scheduler config, or `fallback`."""
        return dict(self.defaults).get(key, fallback)


# ------------------------------------------------------------------------------------- training schedule
def betas(cfg: SchedulerConfig) -> np.ndarray:
    """float64 [T] betas, zero-SNR rescaled when the config asks for it."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        b = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float64)
    elif cfg.beta_schedule == "scaled_linear":
        b = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2: the GLIDE cosine schedule, betas capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = np.array([min(1.0 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=np.float64)
    return rescale_zero_terminal_snr(b) if cfg.rescale_betas_zero_snr else b


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(alphas_cumprod) so the last one is exactly 0."""
    sa = np.sqrt(np.cumprod(1.0 - b))
    s0, s_last = sa[0], sa[-1]
    sa = (sa - s_last) * (s0 / (s0 - s_last))
    ab = sa ** 2
    return 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """float64 [T] alphas_cumprod; the last entry is exactly 0 under zero-SNR."""
    return np.cumprod(1.0 - betas(cfg))


def train_sigmas(cfg: SchedulerConfig) -> np.ndarray:
    """float64 [T] sigma(t). Under zero-SNR alphas_cumprod[-1] is clamped to 2^-24 first, as diffusers'
    sigma-space schedulers do (Euler, DPMSolverMultistep), so sigma_max stays finite (4096)."""
    ab = alphas_cumprod(cfg)
    if cfg.rescale_betas_zero_snr:
        ab = ab.copy()
        ab[-1] = 2.0 ** -24
    return np.sqrt((1.0 - ab) / ab)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps of `sigma`: linear interpolation in log sigma (diffusers' / k-diffusion's)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma[None] - log_sigmas.reshape((-1,) + (1,) * sigma.ndim)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def t_to_sigma(t: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """sigma at fractional t, interpolated in log sigma (ComfyUI's ModelSamplingDiscrete.sigma)."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0, len(log_sigmas) - 1)
    lo = np.floor(t).astype(np.int64)
    hi = np.ceil(t).astype(np.int64)
    w = t - lo
    return np.exp((1.0 - w) * log_sigmas[lo] + w * log_sigmas[hi])


# ---------------------------------------------------------------------------------------- spacings
def spaced_timesteps(cfg: SchedulerConfig, steps: int, *, family: str = "k") -> np.ndarray:
    """float64 [N] descending timesteps for `cfg.timestep_spacing`, as diffusers' set_timesteps makes them.

    Args:
      family: "k" for DDIM/DDPM/Euler/Heun/KDPM2/LMS (leading stride T//N; linspace fractional),
        "dpm" for DPMSolverMultistep/UniPC/DEIS (leading stride T//(N+1); linspace rounded).
    """
    n_train = cfg.num_train_timesteps
    spacing = cfg.timestep_spacing
    if family == "k":
        if spacing == "linspace":
            # float32 like diffusers (np.linspace(..., dtype=np.float32)), so fractional t match bit for bit.
            return np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
        if spacing == "leading":
            return (np.arange(0, steps) * (n_train // steps)).round()[::-1] + float(cfg.steps_offset)
        return np.arange(n_train, 0, -n_train / steps).round() - 1.0
    if family == "dpm":
        if spacing == "linspace":
            return np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            ratio = n_train // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1] + float(cfg.steps_offset)
        return np.arange(n_train, 0, -n_train / steps).round() - 1.0
    raise ValueError(f"unknown spacing family {family!r}")


# ---------------------------------------------------------------------------------- sigma schedules
def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """[n] Karras et al. (2022) eq. 5 noise levels, sigma_max first (no trailing zero)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """[n] log-linear from sigma_max to sigma_min (diffusers' use_exponential_sigmas)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """[n] diffusers' use_beta_sigmas (Lee et al. 2024): Beta(0.6, 0.6) quantiles between the extremes.

    ComfyUI's `beta` scheduler differs (quantiles over training timesteps, deduplicated): see
    `comfy_sigmas(..., "beta_comfy")`.
    """
    import scipy.stats  # only this schedule needs scipy

    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return sigma_min + ppf * (sigma_max - sigma_min)


def ays_sigmas(model: str, steps: int) -> np.ndarray:
    """[steps + 1] Align Your Steps sigmas for "SD1" or "SDXL", log-linearly interpolated, last one 0.

    ComfyUI's AlignYourStepsScheduler: interpolate log sigma over a uniform grid in [0, 1]; at 10 steps
    this is the table itself (= diffusers' AysSchedules).
    """
    table = np.asarray(AYS_SIGMAS[model], dtype=np.float64)
    if steps + 1 != len(table):
        xs = np.linspace(0, 1, len(table))
        table = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, np.log(table[::-1])))[::-1].copy()
    table[-1] = 0.0
    return table


def comfy_sigmas(cfg: SchedulerConfig, steps: int, schedule: str) -> np.ndarray:
    """ComfyUI's normal / simple / sgm_uniform / ddim_uniform / beta / kl_optimal / linear_quadratic schedules
    (comfy/samplers.py) and A1111's polyexponential, ending in 0.

    ddim_uniform can return more than steps + 1 sigmas (stride T//steps from t=1) and beta_comfy fewer
    (it drops repeated timesteps): the scan length comes from the table, not from `steps`.
    """
    sig = train_sigmas(cfg)
    log_sigmas = np.log(sig)
    n_train = len(sig)
    if schedule in ("normal", "sgm_uniform"):
        start, end = float(n_train - 1), 0.0
        if schedule == "sgm_uniform":
            ts = np.linspace(start, end, steps + 1)[:-1]
        else:
            ts = np.linspace(start, end, steps)
        return np.concatenate([t_to_sigma(ts, log_sigmas), [0.0]])
    if schedule == "simple":
        stride = n_train / steps
        return np.array([sig[-(1 + int(x * stride))] for x in range(steps)] + [0.0])
    if schedule == "beta_comfy":
        # ComfyUI beta_scheduler: Beta(0.6, 0.6) quantiles of 1 - linspace(0, 1, steps, endpoint=False) as
        # rounded training timesteps, a timestep equal to the previous one dropped (from ~200 steps on).
        import scipy.stats  # only the beta schedules need scipy

        ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (n_train - 1))
        keep = np.concatenate([[True], ts[1:] != ts[:-1]])
        return np.concatenate([sig[ts[keep].astype(np.int64)], [0.0]])
    if schedule == "ddim_uniform":
        stride = max(n_train // steps, 1)
        return np.concatenate([sig[1::stride][::-1], [0.0]])
    sigma_min, sigma_max = float(sig[0]), float(sig[-1])  # ComfyUI's model_sampling.sigma_min / sigma_max
    if schedule == "kl_optimal":
        # ComfyUI kl_optimal_scheduler (A1111 PR 15608; Teng et al. 2024): tan of a linear ramp in atan(sigma)
        if steps == 1:
            return np.array([sigma_max, 0.0])
        w = np.arange(steps) / (steps - 1)
        return np.concatenate([np.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)), [0.0]])
    if schedule == "linear_quadratic":
        # ComfyUI linear_quadratic_schedule (from Mochi): 1 - (linear then quadratic ramp), times sigma_max
        if steps == 1:
            return np.array([sigma_max, 0.0])
        threshold, linear = 0.025, steps // 2
        lin = [i * threshold / linear for i in range(linear)]
        diff = linear - threshold * steps
        quad_steps = steps - linear
        q_coef = diff / (linear * quad_steps ** 2)
        l_coef = threshold / linear - 2 * diff / quad_steps ** 2
        const = q_coef * linear ** 2
        quad = [q_coef * i * i + l_coef * i + const for i in range(linear, steps)]
        return (1.0 - np.array(lin + quad + [1.0])) * sigma_max
    if schedule == "polyexponential":
        # A1111's "Polyexponential" (k-diffusion get_sigmas_polyexponential, rho = 1) over the model's extremes
        ramp = np.linspace(1, 0, steps) ** 1.0
        sig_poly = np.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
        return np.concatenate([sig_poly, [0.0]])
    if schedule == "laplace":
        # ComfyUI's LaplaceScheduler node: k-diffusion get_sigmas_laplace(n=steps, mu=0, beta=0.5) (Tiankai et al.
        # 2024), clamped to [sigma_min, sigma_max], with NO trailing 0: `steps` sigmas, steps - 1 sampler steps,
        # the last one to sigma_min
        if steps < 2:
            raise SamplerError("schedule 'laplace' needs steps >= 2: like ComfyUI's LaplaceScheduler it returns "
                               "`steps` sigmas, i.e. steps - 1 sampler steps ending at sigma_min")
        x = np.linspace(0, 1, steps)
        lmb = -0.5 * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x) + 1e-5)
        return np.clip(np.exp(lmb), sigma_min, sigma_max)
    if schedule == "vp":
        # ComfyUI's VPScheduler node: k-diffusion get_sigmas_vp (continuous VP, beta_d 19.9, beta_min 0.1, eps_s
        # 1e-3) + 0. Its sigma_max (~152) lies above SD's: the model sees t clamped to the last timestep there.
        t = np.linspace(1, 1e-3, steps)
        return np.concatenate([np.sqrt(np.expm1(19.9 * t ** 2 / 2 + 0.1 * t)), [0.0]])
    raise ValueError(schedule)


@dataclasses.dataclass(frozen=True)
class SigmaTable:
    """One run's schedule before the per-sampler interleaving.

    timesteps: float64 [N] what the UNet sees at each step (integer, rounded or fractional as diffusers).
    sigmas: float64 [N + 1] solver noise levels, the last one the final sigma (usually 0).
    init_noise_sigma: txt2img x_T = noise * init_noise_sigma.
    """

    timesteps: np.ndarray
    sigmas: np.ndarray
    init_noise_sigma: float


def resolve_schedule(cfg: SchedulerConfig, schedule: str | None) -> str:
    """None / "default" -> the checkpoint's own choice (use_karras_sigmas & co. in its config, else its
    spacing: what the diffusers class does with this config), else validate."""
    if schedule is None or schedule == "default":
        for key, name in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
                          ("use_beta_sigmas", "beta")):
            if cfg.default(key, False):
                return name
        return "default"
    if schedule not in SCHEDULES:
        raise SamplerError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    return schedule


def sigma_table(cfg: SchedulerConfig, steps: int, schedule: str, *, family: str,
                final_sigma: str = "zero") -> SigmaTable:
    """The sigma-space schedule a diffusers scheduler family builds in set_timesteps.

    Args:
      schedule: a resolved name (see `resolve_schedule`).
      family: "euler" (EulerDiscrete / EulerAncestral / Heun / LMS: fractional t for karras & co.),
        "kdpm2" (KDPM2 / KDPM2 a: karras t rounded), "dpm" (DPMSolverMultistep: its own spacing, VP space,
        init_noise_sigma 1, every non-default t rounded).
      final_sigma: "zero" or "sigma_min" (diffusers' final_sigmas_type).
    """
    if steps < 1:
        raise SamplerError(f"steps must be >= 1, got {steps}")
    sig = train_sigmas(cfg)
    log_sigmas = np.log(sig)
    round_t = family == "dpm" or (family == "kdpm2" and schedule == "karras")
    if schedule == "default":
        ts = spaced_timesteps(cfg, steps, family="dpm" if family == "dpm" else "k")
        sigmas = np.interp(ts, np.arange(len(sig)), sig)
        round_t = False  # already integers (or diffusers' float32 linspace)
    elif schedule in ("karras", "exponential", "beta"):
        if family == "dpm":
            lo, hi = sig[0], sig[-1]
        else:  # the extremes of the *spaced* table (diffusers feeds in_sigmas = interpolated sigmas)
            spaced = np.interp(spaced_timesteps(cfg, steps, family="k"), np.arange(len(sig)), sig)
            lo, hi = spaced[-1], spaced[0]
        fn = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[schedule]
        sigmas = fn(float(lo), float(hi), steps)
        ts = sigma_to_t(sigmas, log_sigmas)
    else:
        if schedule.startswith("ays"):
            table = "SDXL" if schedule.endswith("sdxl") else "SD1"
            full = ays_sigmas(("COMFY_" if "comfy" in schedule else "") + table, steps)
        else:
            full = comfy_sigmas(cfg, steps, schedule)
        sigmas = full[:-1]
        ts = sigma_to_t(sigmas, log_sigmas)
        if schedule == "laplace":
            final_sigma = float(full[-1])  # ends at sigma_min, not 0 (see comfy_sigmas)
    if round_t and family != "dpm":
        ts = ts.round()
    elif family == "dpm" and schedule in ("exponential", "beta"):
        # DPMSolverMultistep does not round these; its int64 cast truncates. Its first t is sigma_to_t(sigma_max)
        # of float32 torch tables: 998.99999975 there, exactly 999 here (torch's float32 cumprod is not
        # reproducible in numpy), so diffusers' first timestep is 998 where jaxdiff's is 999.
        ts = np.trunc(ts)
    elif family == "dpm" and schedule != "default":
        # DPMSolverMultistep rounds karras t (except for squaredcos_cap_v2, where its int64 cast truncates).
        ts = np.trunc(ts) if cfg.beta_schedule == "squaredcos_cap_v2" else ts.round()
    if isinstance(final_sigma, float):
        last = final_sigma
    else:
        last = sig[0] if final_sigma == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]])
    if family == "dpm":
        init = 1.0  # VP space: x_T is the unit noise itself
    elif cfg.timestep_spacing in ("linspace", "trailing"):
        init = float(sigmas.max())
    else:  # diffusers keys this on the spacing alone, even when karras & co. replaced the spaced table
        init = float(math.sqrt(sigmas.max() ** 2 + 1))
    return SigmaTable(timesteps=ts, sigmas=sigmas, init_noise_sigma=init)
