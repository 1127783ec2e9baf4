"""Timestep-space (VP) samplers: DDPM, DDIM, PLMS, UniPC (bh1, bh2), DEIS, LCM and TCD.

Every one of them is LINEAR in the model outputs and the current sample once the schedule is fixed, so all
seven share one branch-free scan body; only the host-side coefficient tables differ. Evaluation k does

    out    = model(x, t[k])                                  # raw eps / v / x0 output, x unscaled (VP)
    m      = m_x[k] x + m_out[k] out                         # the solver's model output (x0, eps or raw)
    ring   = [m, ring[0], ..., ring[R-2]]                    # ring[j] = m of evaluation k - j
    xc     = c_prev[k] xc + c_x[k] x + sum_j c_ring[k, j] ring[j]      # corrector / restart (UniPC, PLMS)
    x      = p_xc[k] xc + sum_j p_ring[k, j] ring[j] + p_noise[k] noise[k]

with carry (x, xc, ring). Warm-up, lower-order final steps, UniPC's corrector that skips step 0, PLMS's
restart from the saved sample and the steps that draw no noise are all zeros and ones in the tables, so the
body has no branch (samplers.md pitfall 3). Tables are built in numpy float64 from the diffusers formulas
(diffusers 0.42.1 `scheduling_{ddpm,ddim,pndm,unipc_multistep,deis_multistep,lcm,tcd}.py`) and passed to the
scan as float32 arguments, so every schedule shares one compiled loop per (R, K, shape).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

from jaxdiff import prediction
from jaxdiff.errors import SamplerError
from jaxdiff.samplers.core import Tables, register
from jaxdiff.schedules import SchedulerConfig, alphas_cumprod, resolve_schedule, sigma_table, spaced_timesteps

_NO_CLIP = float(np.finfo(np.float32).max)


# ------------------------------------------------------------------------------------------------ tables
@dataclasses.dataclass
class LinearTables:
    """Host tables of the linear multistep body, float64; K evaluations, ring of R past outputs."""

    t: np.ndarray  # [K] timestep the model sees
    m_x: np.ndarray  # [K]
    m_out: np.ndarray  # [K]
    c_prev: np.ndarray  # [K]
    c_x: np.ndarray  # [K]
    c_ring: np.ndarray  # [K, R]
    p_xc: np.ndarray  # [K]
    p_ring: np.ndarray  # [K, R]
    p_noise: np.ndarray  # [K] 0 where the step draws no noise
    # clip_sample (DDIM / DDPM / LCM / TCD): x += p_x0 * clip(x0_x x + x0_out out, -clip_r, clip_r)
    x0_x: np.ndarray  # [K]
    x0_out: np.ndarray  # [K]
    p_x0: np.ndarray  # [K] 0 unless the sampler clips its x0 prediction
    clip_r: np.ndarray  # [K] clip_sample_range (float32 max: no clipping)

    @classmethod
    def zeros(cls, num_evals: int, ring: int) -> "LinearTables":
        z = lambda *s: np.zeros(s, np.float64)  # noqa: E731
        return cls(z(num_evals), z(num_evals), z(num_evals), z(num_evals), np.ones(num_evals),
                   z(num_evals, ring), z(num_evals), z(num_evals, ring), z(num_evals), z(num_evals),
                   z(num_evals), z(num_evals), np.full(num_evals, _NO_CLIP))

    def clip_x0(self, k: int, x0: tuple[float, float], coef: float, clip_range: float | None) -> None:
        """Evaluation k adds `coef * x0` (x0 = x0[0] x + x0[1] out): through the clip when clip_range is a
        number (diffusers' clip_sample), else folded into the linear coefficients."""
        if clip_range is None:
            self.p_xc[k] += coef * x0[0]
            self.p_ring[k, 0] += coef * x0[1]
        else:
            self.x0_x[k], self.x0_out[k], self.p_x0[k], self.clip_r[k] = x0[0], x0[1], coef, clip_range

    def check_finite(self, name: str) -> "LinearTables":
        for f in dataclasses.fields(self):
            if not np.all(np.isfinite(getattr(self, f.name))):
                raise SamplerError(f"{name}: non-finite {f.name} coefficients for this schedule (zero-SNR with a "
                                   "prediction type or final sigma this sampler cannot handle?)")
        return self

    def as_dict(self) -> dict[str, np.ndarray]:
        """float32 tables for the scan; each [K] or [K, R]."""
        return {f.name: np.asarray(getattr(self, f.name), np.float32) for f in dataclasses.fields(self)}


def _to_x0(alpha: float, sigma: float, prediction_type: str) -> tuple[float, float]:
    """(a, b) with x0 = a x + b out, at x = alpha x0 + sigma eps."""
    if prediction_type == "epsilon":
        if alpha == 0.0:  # diffusers divides by zero here and returns inf / NaN
            raise SamplerError("zero-SNR schedule (rescale_betas_zero_snr) with prediction_type='epsilon': x0 is "
                               "undefined at the last timestep (alphas_cumprod = 0); zero-SNR models predict "
                               "v_prediction -- set it in scheduler_config.json")
    return prediction.x0_coefficients(prediction_type, alpha, sigma)


def _to_eps(alpha: float, sigma: float, prediction_type: str) -> tuple[float, float]:
    """(a, b) with eps = a x + b out."""
    return prediction.eps_coefficients(prediction_type, alpha, sigma)


def _check_prediction(prediction_type: str, allowed=prediction.PREDICTION_TYPES) -> None:
    if prediction_type not in allowed:
        raise SamplerError(f"prediction_type {prediction_type!r} is not supported here; use one of {allowed}")


# ---------------------------------------------------------------------------------- one-step samplers
def ddim_tables(ab: np.ndarray, timesteps: np.ndarray, steps: int, *, prediction_type: str, eta: float = 0.0,
                final_alpha_cumprod: float, clip_range: float | None = None) -> LinearTables:
    """DDIM (Song et al. 2020, eq. 12 and 16) with diffusers' `prev_t = t - T // steps` (whatever the spacing).

    Args:
      ab: [T] float64 alphas_cumprod (zero-SNR: ab[-1] = 0 exactly, as DDIMScheduler keeps it).
      timesteps: [K] int the model sees (K = steps, or fewer for img2img).
      steps: num_inference_steps (sets the stride).
      final_alpha_cumprod: 1.0 with set_alpha_to_one, else ab[0].
      clip_range: clip the x0 prediction to [-r, r] (clip_sample); eps stays the unclipped one, as diffusers.
    """
    _check_prediction(prediction_type)
    tab = LinearTables.zeros(len(timesteps), 1)
    stride = len(ab) // steps
    for k, t in enumerate(timesteps):
        t = int(t)
        prev = t - stride
        a_t, a_p = ab[t], (ab[prev] if prev >= 0 else final_alpha_cumprod)
        var = (1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p)
        std = eta * math.sqrt(max(var, 0.0))  # var = 0 exactly at t = 0 -> final_alpha_cumprod = ab[0]
        x0 = _to_x0(math.sqrt(a_t), math.sqrt(1.0 - a_t), prediction_type)
        ep = _to_eps(math.sqrt(a_t), math.sqrt(1.0 - a_t), prediction_type)
        direction = math.sqrt(max(1.0 - a_p - std * std, 0.0))
        tab.t[k], tab.m_out[k] = t, 1.0
        tab.p_xc[k] = direction * ep[0]
        tab.p_ring[k, 0] = direction * ep[1]
        tab.clip_x0(k, x0, math.sqrt(a_p), clip_range)
        tab.p_noise[k] = std
    return tab.check_finite("ddim")


def ddpm_tables(ab: np.ndarray, timesteps: np.ndarray, *, prediction_type: str,
                variance_type: str = "fixed_small", clip_range: float | None = None) -> LinearTables:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7); prev_t is the next entry, 1.0 past the end.

    No noise at t = 0, as diffusers draws only for t > 0.
    """
    _check_prediction(prediction_type)
    if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise SamplerError(f"DDPM variance_type {variance_type!r} is not supported (fixed_small, fixed_small_log, "
                           "fixed_large)")
    tab = LinearTables.zeros(len(timesteps), 1)
    for k, t in enumerate(timesteps):
        t = int(t)
        a_t = ab[t]
        a_p = ab[int(timesteps[k + 1])] if k + 1 < len(timesteps) else 1.0
        cur_alpha = a_t / a_p
        cur_beta = 1.0 - cur_alpha
        x0 = _to_x0(math.sqrt(a_t), math.sqrt(1.0 - a_t), prediction_type)
        c_x0 = math.sqrt(a_p) * cur_beta / (1.0 - a_t)
        c_xt = math.sqrt(cur_alpha) * (1.0 - a_p) / (1.0 - a_t)
        var = max((1.0 - a_p) / (1.0 - a_t) * cur_beta, 1e-20)
        std = math.sqrt(cur_beta) if variance_type == "fixed_large" else math.sqrt(var)
        tab.t[k], tab.m_out[k] = t, 1.0
        tab.p_xc[k] = c_xt
        tab.clip_x0(k, x0, c_x0, clip_range)
        tab.p_noise[k] = std if t > 0 else 0.0
    return tab.check_finite("ddpm")


def lcm_tables(ab: np.ndarray, timesteps: np.ndarray, *, prediction_type: str,
               timestep_scaling: float = 10.0, clip_range: float | None = None) -> LinearTables:
    """LCM multistep consistency sampling (Luo et al. 2023): boundary-condition x0, re-noised except at the end."""
    _check_prediction(prediction_type)
    n = len(timesteps)
    tab = LinearTables.zeros(n, 1)
    for k, t in enumerate(timesteps):
        t = int(t)
        a_t = ab[t]
        a_p = ab[int(timesteps[k + 1])] if k + 1 < n else a_t
        st = t * timestep_scaling
        c_skip, c_out = 0.25 / (st * st + 0.25), st / math.sqrt(st * st + 0.25)  # sigma_data = 0.5
        x0 = _to_x0(math.sqrt(a_t), math.sqrt(1.0 - a_t), prediction_type)
        # denoised = c_out x0 + c_skip x; last step returns denoised, others sqrt(a_p) denoised + noise.
        keep, noise = (1.0, 0.0) if k == n - 1 else (math.sqrt(a_p), math.sqrt(1.0 - a_p))
        tab.t[k], tab.m_out[k] = t, 1.0
        tab.p_xc[k] = keep * c_skip
        tab.clip_x0(k, x0, keep * c_out, clip_range)
        tab.p_noise[k] = noise
    return tab.check_finite("lcm")


def tcd_tables(ab: np.ndarray, timesteps: np.ndarray, *, prediction_type: str, eta: float = 0.3,
               final_alpha_cumprod: float, clip_range: float | None = None) -> LinearTables:
    """TCD (Zheng et al. 2024) with gamma = eta: jump to s = floor((1 - eta) t_prev), re-noise to t_prev."""
    _check_prediction(prediction_type)
    if not 0.0 <= eta <= 1.0:
        raise SamplerError(f"TCD eta (gamma) must be in [0, 1], got {eta}")
    n = len(timesteps)
    tab = LinearTables.zeros(n, 1)
    for k, t in enumerate(timesteps):
        t = int(t)
        prev = int(timesteps[k + 1]) if k + 1 < n else 0
        # diffusers computes floor((1 - eta) * prev) in float32; match it exactly at integer boundaries.
        s = int(np.floor(np.float32(1.0 - eta) * np.float32(prev)))
        a_t, a_s = ab[t], ab[s]
        a_p = ab[prev] if prev >= 0 else final_alpha_cumprod
        x0 = _to_x0(math.sqrt(a_t), math.sqrt(1.0 - a_t), prediction_type)
        ep = _to_eps(math.sqrt(a_t), math.sqrt(1.0 - a_t), prediction_type)
        # pred_noised_sample = sqrt(a_s) x0 + sqrt(1 - a_s) eps
        stochastic = eta > 0 and k != n - 1
        keep = math.sqrt(a_p / a_s) if stochastic else 1.0
        tab.t[k], tab.m_out[k] = t, 1.0
        tab.p_xc[k], tab.p_ring[k, 0] = keep * math.sqrt(1.0 - a_s) * ep[0], keep * math.sqrt(1.0 - a_s) * ep[1]
        tab.clip_x0(k, x0, keep * math.sqrt(a_s), clip_range)
        tab.p_noise[k] = math.sqrt(1.0 - a_p / a_s) if stochastic else 0.0
    return tab.check_finite("tcd")


# ------------------------------------------------------------------------------------------- multistep
_ADAMS_BASHFORTH = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms_timesteps(base: np.ndarray) -> np.ndarray:
    """PNDM skip_prk_steps evaluation timesteps from the ascending base grid: [981, 961, 961, 941, ...]."""
    base = np.asarray(base, np.int64)
    return np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()


def plms_tables(ab: np.ndarray, timesteps: np.ndarray, steps: int, *, prediction_type: str,
                final_alpha_cumprod: float) -> LinearTables:
    """PLMS = PNDM with skip_prk_steps (Liu et al. 2022, eq. 9 transfer + Adams-Bashforth up to order 4).

    Evaluation 0 steps with eps_0 and saves x; evaluation 1 restarts from the saved x with (eps_1 + eps_0) / 2
    (a Heun-like second look at the same interval; eps_1 never enters the history); evaluations >= 2 use AB2, AB3,
    AB4 over the history eps_0, eps_2, eps_3, ... Ring of 5 raw outputs; v is turned into eps after combining,
    against the sample the step starts from, as PNDMScheduler does.
    """
    _check_prediction(prediction_type, ("epsilon", "v_prediction"))
    n = len(timesteps)
    tab = LinearTables.zeros(n, 5)
    stride = len(ab) // steps
    for k, t_model in enumerate(timesteps):
        t_model = int(t_model)
        if k == 1:  # restart: the interval of evaluation 0 again, from the saved sample
            t, prev = t_model + stride, t_model
            tab.c_prev[k], tab.c_x[k] = 1.0, 0.0
            weights = {0: 0.5, 1: 0.5}  # ring offsets j -> weight: (eps_1 + eps_0) / 2
        else:
            t, prev = t_model, t_model - stride
            history = [i for i in range(k, -1, -1) if i != 1][:4]  # newest first: e_k, e_{k-1}, ..., e_0
            coeffs = _ADAMS_BASHFORTH[len(history)]
            weights = {k - i: c for i, c in zip(history, coeffs)}
        a_t = ab[t]
        a_p = ab[prev] if prev >= 0 else final_alpha_cumprod
        sample_coeff = math.sqrt(a_p / a_t)
        q = (a_p - a_t) / (a_t * math.sqrt(1.0 - a_p) + math.sqrt(a_t * (1.0 - a_t) * a_p))
        # prev = sample_coeff * sample - q * eps, eps = combo (epsilon) or sqrt(a_t) combo + sqrt(1-a_t) sample (v)
        out_scale, sample_eps = (1.0, 0.0) if prediction_type == "epsilon" else (math.sqrt(a_t), math.sqrt(1 - a_t))
        tab.t[k], tab.m_out[k] = t_model, 1.0
        tab.p_xc[k] = sample_coeff - q * sample_eps
        for j, w in weights.items():
            tab.p_ring[k, j] = -q * out_scale * w
    return tab.check_finite("plms")


def _vp(sigma: float) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) of a VE sigma, as diffusers' _sigma_to_alpha_sigma_t; lambda = inf at 0."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    lam = math.inf if sigma == 0.0 else -math.log(sigma)
    return alpha, sigma * alpha, lam


def _unipc_coeffs(lams: list[float], order: int, bh: str, predictor: bool):
    """UniPC's (h, hphi_1, B(h), rks, rhos) for one update from lams = [lambda_target, lambda_s0, lambda_s1, ...].

    Mirrors multistep_uni_{p,c}_bh_update with predict_x0=True: hh = -h, rks_i = (lambda_si - lambda_s0) / h.
    """
    h = lams[0] - lams[1]
    if h == 0.0:  # a repeated sigma (karras/exponential with final sigma_min): the update is the identity
        return None
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if bh == "bh1" else math.expm1(hh)
    rks = [(lams[1 + i] - lams[1]) / h for i in range(1, order)] + [1.0]
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r, b = np.array(rows, np.float64), np.array(b, np.float64)
    if predictor:
        if order == 1:
            rhos = np.zeros(0)
        elif order == 2:
            rhos = np.array([0.5])
        else:
            rhos = np.linalg.solve(big_r[:-1, :-1], b[:-1])
    else:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(big_r, b)
    return h_phi_1, b_h, rks, rhos


def unipc_tables(sigmas: np.ndarray, timesteps: np.ndarray, *, prediction_type: str, solver_order: int = 2,
                 solver_type: str = "bh2", lower_order_final: bool = True, disable_corrector: tuple[int, ...] = (),
                 start: int = 0) -> LinearTables:
    """UniPC (Zhao et al. 2023) multistep predictor-corrector, data prediction (predict_x0=True), B(h) bh1/bh2.

    Evaluation k first corrects the sample the model just saw (UniC, with m_k; not at the first evaluation or
    where k-1 is in disable_corrector), then predicts the next one (UniP). Orders warm up 1, 2, ... and drop
    to 1 on the last step with lower_order_final.

    Args:
      sigmas: [N+1] VE sigma table of the whole schedule (last entry 0 or sigma_min).
      timesteps: [N] model timesteps of the whole schedule.
      start: first step index (img2img); history starts empty there, as diffusers' set_begin_index does.
    """
    _check_prediction(prediction_type)
    if solver_type not in ("bh1", "bh2"):
        raise SamplerError(f"UniPC solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
    n = len(timesteps)
    vp = [_vp(float(s)) for s in sigmas]
    tab = LinearTables.zeros(n - start, solver_order + 1)
    orders = {}
    for step in range(start, n):
        k = step - start
        alpha, sig, _ = vp[step]
        tab.t[k] = timesteps[step]
        tab.m_x[k], tab.m_out[k] = _to_x0(alpha, sig, prediction_type)
        if k > 0 and (step - 1) not in disable_corrector:  # UniC on the sample this evaluation saw
            o = orders[step - 1]
            lams = [vp[step][2]] + [vp[step - 1 - i][2] for i in range(o)]
            coeffs = _unipc_coeffs(lams, o, solver_type, predictor=False)
            tab.c_prev[k], tab.c_x[k] = vp[step][1] / vp[step - 1][1], 0.0
            h_phi_1, b_h, rks, rhos = coeffs if coeffs else (0.0, 0.0, [], [0.0])
            ring = tab.c_ring[k]
            ring[1] += -alpha * h_phi_1  # m0 = m_{k-1} at ring offset 1
            for i in range(1, len(rks)):  # D1_i = (m_{k-1-i} - m0) / rk_i
                ring[1 + i] += -alpha * b_h * rhos[i - 1] / rks[i - 1]
                ring[1] -= -alpha * b_h * rhos[i - 1] / rks[i - 1]
            ring[0] += -alpha * b_h * rhos[-1]  # D1_t = m_k - m0
            ring[1] -= -alpha * b_h * rhos[-1]
        o = min(solver_order, n - step if lower_order_final else solver_order, k + 1)
        orders[step] = o
        a_next, s_next, lam_next = vp[step + 1]
        lams = [lam_next] + [vp[step - i][2] for i in range(o)]
        coeffs = _unipc_coeffs(lams, o, solver_type, predictor=True)
        h_phi_1, b_h, rks, rhos = coeffs if coeffs else (0.0, 0.0, [], [])
        ring = tab.p_ring[k]
        tab.p_xc[k] = s_next / sig
        ring[0] += -a_next * h_phi_1
        for i in range(1, len(rks)):  # D1_i = (m_{k-i} - m_k) / rk_i
            ring[i] += -a_next * b_h * rhos[i - 1] / rks[i - 1]
            ring[0] -= -a_next * b_h * rhos[i - 1] / rks[i - 1]
    return tab.check_finite("uni_pc")


def deis_tables(sigmas: np.ndarray, timesteps: np.ndarray, *, prediction_type: str, solver_order: int = 2,
                lower_order_final: bool = True, start: int = 0) -> LinearTables:
    """DEIS (Zhang & Chen 2022) log-rho multistep on eps, orders warming up to solver_order (<= 3).

    Lower order on the last two steps only when the run has < 15 steps, as DEISMultistepScheduler does.
    """
    _check_prediction(prediction_type)
    if solver_order not in (1, 2, 3):
        raise SamplerError(f"DEIS solver_order must be 1, 2 or 3, got {solver_order}")
    n = len(timesteps)
    vp = [_vp(float(s)) for s in sigmas]
    tab = LinearTables.zeros(n - start, solver_order)
    short = lower_order_final and n < 15
    for step in range(start, n):
        k = step - start
        alpha, sig, _ = vp[step]
        tab.t[k] = timesteps[step]
        # convert_model_output: x0 first, then eps = (x - alpha x0) / sigma_t
        ax, ao = _to_x0(alpha, sig, prediction_type)
        tab.m_x[k], tab.m_out[k] = (1.0 - alpha * ax) / sig, -alpha * ao / sig
        done = min(k, solver_order)  # lower_order_nums
        if solver_order == 1 or done < 1 or (short and step == n - 1):
            order = 1
        elif solver_order == 2 or done < 2 or (short and step == n - 2):
            order = 2
        else:
            order = 3
        a_t, _, lam_t = vp[step + 1]
        rho = [float(sigmas[step + 1])] + [float(sigmas[step - i]) for i in range(order)]  # rho = sigma_t / alpha_t
        if order == 1:
            tab.p_xc[k] = a_t / alpha
            tab.p_ring[k, 0] = -vp[step + 1][1] * math.expm1(lam_t - vp[step][2])
            continue
        tab.p_xc[k] = a_t / alpha
        logs = [math.log(r) for r in rho]
        if order == 2:
            def ind(t, b, c):
                return math.exp(t) * (-c + t - 1.0) / (b - c)
            lt, l0, l1 = logs
            coef = [ind(lt, l0, l1) - ind(l0, l0, l1), ind(lt, l1, l0) - ind(l0, l1, l0)]
        else:
            def ind(t, b, c, d):
                num = math.exp(t) * (c * (d - t + 1.0) - d * t + d + t * t - 2.0 * t + 2.0)
                return num / ((b - c) * (b - d))
            lt, l0, l1, l2 = logs
            coef = [ind(lt, l0, l1, l2) - ind(l0, l0, l1, l2), ind(lt, l1, l2, l0) - ind(l0, l1, l2, l0),
                    ind(lt, l2, l0, l1) - ind(l0, l2, l0, l1)]
        for j, c in enumerate(coef):
            tab.p_ring[k, j] = a_t * c
    return tab.check_finite("deis")


# --------------------------------------------------------------------------------------- scan body
def _make_init(ring: int):
    def init(x):
        return (jnp.zeros_like(x), jnp.zeros((ring,) + x.shape, x.dtype))  # xc [B,h,w,C], ring [R,B,h,w,C]
    return init


def _linear_body(x, out, hist, tab, noise):
    """One evaluation of the linear multistep form in the module docstring; branch-free."""
    xc, ring = hist
    m = tab["m_x"] * x + tab["m_out"] * out
    ring = jnp.concatenate([m[None], ring[:-1]], axis=0)  # ring[j] = m of evaluation k - j
    c_ring, p_ring = tab["c_ring"], tab["p_ring"]  # [R] each
    xc = tab["c_prev"] * xc + tab["c_x"] * x
    x_new = tab["p_noise"] * noise
    for j in range(ring.shape[0]):  # R <= 5: unrolled, exact float32 sums in a fixed order
        xc = xc + c_ring[j] * ring[j]
    x_new = x_new + tab["p_xc"] * xc
    for j in range(ring.shape[0]):
        x_new = x_new + p_ring[j] * ring[j]
    x0 = jnp.clip(tab["x0_x"] * x + tab["x0_out"] * out, -tab["clip_r"], tab["clip_r"])
    x_new = x_new + tab["p_x0"] * x0  # clip_sample; p_x0 = 0 for every unclipped sampler
    return x_new, (xc, ring)


# ------------------------------------------------------------------------------------------ builders
def _default_only(name: str, schedule: str | None, cfg: SchedulerConfig) -> None:
    if resolve_schedule(cfg, schedule) != "default":
        raise SamplerError(f"sampler {name!r} runs on the checkpoint's timestep spacing only (schedule None, "
                           f"'automatic' or 'default'), not schedule={schedule!r}; for {schedule!r} use euler, "
                           f"dpmpp_2m, uni_pc_bh2 or another sampler that takes sigma schedules")


def _clip_range(cfg: SchedulerConfig) -> float | None:
    """diffusers' clip_sample / clip_sample_range (DDIM's and DDPM's class default is clip_sample=True)."""
    if not cfg.default("clip_sample", False):
        return None
    return float(cfg.default("clip_sample_range", 1.0))


def _final_alpha(cfg: SchedulerConfig, ab: np.ndarray) -> float:
    return 1.0 if cfg.set_alpha_to_one else float(ab[0])


def _spaced_int(cfg: SchedulerConfig, steps: int) -> np.ndarray:
    """DDIM / DDPM / PNDM integer timesteps, descending (linspace rounded, unlike Euler's fractional t)."""
    if steps > cfg.num_train_timesteps:
        raise SamplerError(f"steps={steps} exceeds num_train_timesteps={cfg.num_train_timesteps}")
    return np.round(spaced_timesteps(cfg, steps, family="k")).astype(np.int64)


def _vp_tables(tab: LinearTables, ring: int, start_a: np.ndarray, start_b: np.ndarray,
               init_noise_sigma: float = 1.0) -> Tables:
    """Pad the ring columns to the registered ring size and add the driver's columns.

    start_a, start_b: [K] add_noise coefficients (sqrt(ab), sqrt(1 - ab)) at each evaluation's level; the
    known inpaint region after evaluation k sits at evaluation k+1's level, the clean image after the last.
    """
    cols = tab.as_dict()
    k, r = cols["c_ring"].shape
    for name in ("c_ring", "p_ring"):
        cols[name] = np.concatenate([cols[name], np.zeros((k, ring - r), np.float32)], axis=1)
    cols["c_in"] = np.ones(k)
    cols["inpaint_a"] = np.concatenate([start_a[1:], [1.0]])
    cols["inpaint_b"] = np.concatenate([start_b[1:], [0.0]])
    return Tables(tables=cols, init_noise_sigma=init_noise_sigma, img2img=(float(start_a[0]), float(start_b[0])))


def _ab_levels(ab: np.ndarray, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = ab[np.asarray(timesteps, np.int64)]
    return np.sqrt(a), np.sqrt(1.0 - a)


def _build_ddim(cfg, steps, schedule, start, options):
    _default_only("ddim", schedule, cfg)
    ab = alphas_cumprod(cfg)
    ts = _spaced_int(cfg, steps)[start:]
    tab = ddim_tables(ab, ts, steps, prediction_type=cfg.prediction_type, eta=float(options.get("eta", 0.0)),
                      final_alpha_cumprod=_final_alpha(cfg, ab), clip_range=_clip_range(cfg))
    return _vp_tables(tab, 1, *_ab_levels(ab, ts))


def _build_ddpm(cfg, steps, schedule, start, options):
    _default_only("ddpm", schedule, cfg)
    ab = alphas_cumprod(cfg)
    ts = _spaced_int(cfg, steps)
    variance_type = options.get("variance_type", cfg.default("variance_type", "fixed_small"))
    tab = ddpm_tables(ab, ts, prediction_type=cfg.prediction_type, variance_type=variance_type,
                      clip_range=_clip_range(cfg))
    return _vp_tables(_slice(tab, start), 1, *_ab_levels(ab, ts[start:]))


def _build_plms(cfg, steps, schedule, start, options):
    _default_only("plms", schedule, cfg)
    if not cfg.default("skip_prk_steps", True):
        raise SamplerError("PNDM with skip_prk_steps=False (Runge-Kutta warm-up) is not implemented; "
                           "jaxdiff's plms is PNDMScheduler(skip_prk_steps=True)")
    ab = alphas_cumprod(cfg)
    ts = plms_timesteps(_spaced_int(cfg, steps)[::-1])[start:]
    tab = plms_tables(ab, ts, steps, prediction_type=cfg.prediction_type,
                      final_alpha_cumprod=_final_alpha(cfg, ab))
    return _vp_tables(tab, 5, *_ab_levels(ab, ts))


def _dpm_family(cfg, steps, schedule, final_sigma):
    if steps > cfg.num_train_timesteps:
        raise SamplerError(f"steps={steps} exceeds num_train_timesteps={cfg.num_train_timesteps}")
    table = sigma_table(cfg, steps, resolve_schedule(cfg, schedule), family="dpm", final_sigma=final_sigma)
    sig = table.sigmas
    alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)
    return table, alpha, sig * alpha


def _build_uni_pc(cfg, steps, schedule, start, options, solver_type=None):
    order = int(options.get("solver_order", cfg.default("solver_order", 2)))
    if order not in (1, 2, 3):
        raise SamplerError(f"uni_pc solver_order must be 1, 2 or 3, got {order}")
    if not cfg.default("predict_x0", True):
        raise SamplerError("UniPC with predict_x0=False is not implemented")
    final = options.get("final_sigmas_type", cfg.default("final_sigmas_type", "zero"))
    table, alpha, sig_vp = _dpm_family(cfg, steps, schedule, final)
    tab = unipc_tables(table.sigmas, table.timesteps, prediction_type=cfg.prediction_type, solver_order=order,
                       solver_type=solver_type or cfg.default("solver_type", "bh2"),
                       lower_order_final=bool(options.get("lower_order_final",
                                                          cfg.default("lower_order_final", True))),
                       disable_corrector=tuple(options.get("disable_corrector",
                                                           cfg.default("disable_corrector", ()))),
                       start=start)
    return _vp_tables(tab, 4, alpha[start:-1], sig_vp[start:-1])


def _build_deis(cfg, steps, schedule, start, options):
    if cfg.rescale_betas_zero_snr:
        raise SamplerError("DEIS does not support rescale_betas_zero_snr (diffusers' DEIS has no zero-SNR "
                           "handling; its first sigma is infinite); use ddim, uni_pc or euler")
    order = int(options.get("solver_order", cfg.default("solver_order", 2)))
    table, alpha, sig_vp = _dpm_family(cfg, steps, schedule, "sigma_min")
    sig = table.sigmas.copy()
    if resolve_schedule(cfg, schedule) != "default":
        sig[-1] = sig[-2]  # DEISMultistep repeats the last karras / exponential / beta sigma
    tab = deis_tables(sig, table.timesteps, prediction_type=cfg.prediction_type, solver_order=order,
                      lower_order_final=bool(options.get("lower_order_final",
                                                         cfg.default("lower_order_final", True))), start=start)
    alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)
    return _vp_tables(tab, 3, alpha[start:-1], (sig * alpha)[start:-1])


def _consistency_timesteps(cfg: SchedulerConfig, steps: int, original_steps: int) -> np.ndarray:
    """LCMScheduler / TCDScheduler set_timesteps: `steps` evenly spaced picks of the distillation grid."""
    if original_steps > cfg.num_train_timesteps:
        raise SamplerError(f"original_inference_steps={original_steps} exceeds num_train_timesteps")
    if steps > original_steps:
        raise SamplerError(f"steps={steps} exceeds original_inference_steps={original_steps}: the schedule is a "
                           "subset of the distillation grid")
    k = cfg.num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[idx]


def _build_lcm(cfg, steps, schedule, start, options):
    _default_only("lcm", schedule, cfg)
    ab = alphas_cumprod(cfg)
    ts = _consistency_timesteps(cfg, steps, int(cfg.default("original_inference_steps", 50)))
    tab = lcm_tables(ab, ts, prediction_type=cfg.prediction_type,
                     timestep_scaling=float(cfg.default("timestep_scaling", 10.0)), clip_range=_clip_range(cfg))
    return _vp_tables(_slice(tab, start), 1, *_ab_levels(ab, ts[start:]))


def _build_tcd(cfg, steps, schedule, start, options):
    _default_only("tcd", schedule, cfg)
    ab = alphas_cumprod(cfg)
    ts = _consistency_timesteps(cfg, steps, int(cfg.default("original_inference_steps", 50)))
    tab = tcd_tables(ab, ts, prediction_type=cfg.prediction_type, eta=float(options.get("eta", 0.3)),
                     final_alpha_cumprod=_final_alpha(cfg, ab), clip_range=_clip_range(cfg))
    return _vp_tables(_slice(tab, start), 1, *_ab_levels(ab, ts[start:]))


def _slice(tab: LinearTables, start: int) -> LinearTables:
    """Rows [start:] of a table built on the whole schedule (one-step samplers: no history to restart)."""
    return LinearTables(**{f.name: getattr(tab, f.name)[start:] for f in dataclasses.fields(tab)})


# -------------------------------------------------------------------------------------- registration
register("ddpm", build=_build_ddpm, body=_linear_body, init=_make_init(1), stochastic=True,
         options=("variance_type",), aliases=("DDPM", "DDPMScheduler"), diffusers_class="DDPMScheduler")
register("ddim", build=_build_ddim, body=_linear_body, init=_make_init(1), stochastic=True, options=("eta",),
         aliases=("DDIM", "DDIMScheduler"), diffusers_class="DDIMScheduler")
register("plms", build=_build_plms, body=_linear_body, init=_make_init(5),
         aliases=("PLMS", "PNDMScheduler", "pndm"), diffusers_class="PNDMScheduler")
_UNIPC_OPTS = ("solver_order", "lower_order_final", "disable_corrector", "final_sigmas_type")
register("uni_pc", build=functools.partial(_build_uni_pc, solver_type="bh1"), body=_linear_body,
         init=_make_init(4), options=_UNIPC_OPTS, aliases=("UniPC", "UniPC bh1"),
         diffusers_class="UniPCMultistepScheduler")
register("uni_pc_bh2", build=functools.partial(_build_uni_pc, solver_type="bh2"), body=_linear_body,
         init=_make_init(4), options=_UNIPC_OPTS, aliases=("UniPC bh2", "UniPCMultistepScheduler"),
         diffusers_class="UniPCMultistepScheduler", invokeai=("unipc", "unipc_k"))
register("deis", build=_build_deis, body=_linear_body, init=_make_init(3),
         options=("solver_order", "lower_order_final"), aliases=("DEIS", "DEISMultistepScheduler"),
         diffusers_class="DEISMultistepScheduler", invokeai=("deis_k",))
register("lcm", build=_build_lcm, body=_linear_body, init=_make_init(1), stochastic=True,
         aliases=("LCM", "LCMScheduler"), diffusers_class="LCMScheduler")
register("tcd", build=_build_tcd, body=_linear_body, init=_make_init(1), stochastic=True, options=("eta",),
         aliases=("TCD", "TCDScheduler"), diffusers_class="TCDScheduler")
