"""Sigma-space (k-diffusion family) samplers: Euler, Euler a, Heun, DPM2, DPM2 a, LMS, DPM++ 2M, DPM++ 2M SDE
(midpoint or heun), DPM++ 2S a, DPM++ SDE; churn (s_churn & co.) for Euler / Heun / DPM2. ComfyUI's further
k-diffusion samplers live in comfy.py and reuse the bodies and table helpers here.

Tables follow diffusers' classes (EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete, KDPM2Discrete,
KDPM2AncestralDiscrete, LMSDiscrete, DPMSolverMultistep with dpmsolver++ / sde-dpmsolver++) so results match
them; DPM++ 2S a and DPM++ SDE follow k-diffusion's sampling.py (no diffusers class without torchsde) over
EulerDiscrete's tables.

Three scan bodies cover all eleven:
* `_ve_body`: every single- and two-evaluation VE sampler is, at each model evaluation, a linear map
    x' = ax x + as xs + cd d + cds ds + bD D + cn noise + cns ns
  of the current sample x, the sample / derivative / noise saved at the step's first evaluation (xs, ds, ns),
  the x0 prediction D and the derivative d = (x - D) / sigma. The host folds Euler, ancestral steps, the
  Heun / DPM2 / 2S / SDE phases, the final Euler step and the Brownian-bridge noise into the coefficients.
* `_lms_body`: LMS's four-derivative history with host-integrated coefficients.
* `_dpm_body`: DPM-Solver++(2M) (and its SDE variant) in VP space: x' = ax x + b0 D + b1 D_prev + cn noise.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxdiff.errors import SamplerError
from jaxdiff.samplers.core import Tables, register, to_x0, x0_coefficients
from jaxdiff.schedules import SchedulerConfig, resolve_schedule, sigma_table, sigma_to_t, train_sigmas

_VE_COLS = ("ax", "as", "cd", "cds", "bD", "cn", "cns", "save")


# ------------------------------------------------------------------------------------------ the bodies
def _ve_init(x):
    return (jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros_like(x))  # xs, ds, ns: [B, h, w, C] each


def _ve_body(x, out, hist, tab, noise):
    """One evaluation of a single/two-stage sigma-space sampler (Karras et al. 2022 Alg. 1-2, k-diffusion)."""
    xs, ds, ns = hist
    den = to_x0(x, out, tab)
    d = (x - den) * tab["inv_sigma"]
    x_new = (tab["ax"] * x + tab["as"] * xs + tab["cd"] * d + tab["cds"] * ds + tab["bD"] * den
             + tab["cn"] * noise + tab["cns"] * ns)
    keep = 1.0 - tab["save"]  # save = 1 at a step's first evaluation: remember x, d and its noise
    hist = (keep * xs + tab["save"] * x, keep * ds + tab["save"] * d, keep * ns + tab["save"] * noise)
    return x_new, hist


def _lms_init(x):
    return jnp.zeros((3,) + x.shape, x.dtype)  # [3, B, h, w, C] the previous derivatives, newest first


def _lms_body(x, out, hist, tab, noise):
    """Linear multistep in sigma (k-diffusion sample_lms / diffusers LMSDiscrete): x' = x + sum_j c_j d_{i-j}."""
    d = (x - to_x0(x, out, tab)) * tab["inv_sigma"]
    c = tab["lms"]  # [4]
    x_new = x + c[0] * d + c[1] * hist[0] + c[2] * hist[1] + c[3] * hist[2]
    return x_new, jnp.concatenate([d[None], hist[:2]], axis=0)


def _dpm_init(x):
    return jnp.zeros_like(x)  # the previous step's x0 prediction [B, h, w, C]


def _dpm_body(x, out, hist, tab, noise):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) and its SDE variant, diffusers' VP-space formulas."""
    den = to_x0(x, out, tab)
    x_new = tab["ax"] * x + tab["b0"] * den + tab["b1"] * hist + tab["cn"] * noise
    return x_new, den


# ------------------------------------------------------------------------------------ table helpers
class _Rows:
    """Accumulates per-evaluation rows of a VE table; missing coefficients are 0."""

    def __init__(self, prediction_type: str):
        self.pred = prediction_type
        self.rows: list[dict[str, float]] = []

    def add(self, t: float, sigma: float, level_next: float, **coef) -> None:
        row = dict.fromkeys(_VE_COLS, 0.0)
        row.update(coef)
        x0_x, x0_out = x0_coefficients(self.pred, np.array([sigma]), "ve")
        row.update(t=t, c_in=1.0 / math.sqrt(sigma * sigma + 1.0), inv_sigma=1.0 / sigma,
                   x0_x=float(x0_x[0]), x0_out=float(x0_out[0]), inpaint_a=1.0, inpaint_b=level_next)
        self.rows.append(row)

    def tables(self) -> dict[str, np.ndarray]:
        self.rows[-1]["inpaint_b"] = 0.0  # after the last evaluation the known region is the clean image
        keys = dict.fromkeys(k for r in self.rows for k in r)  # optional columns (pre_noise) are 0 elsewhere
        return {k: np.array([r.get(k, 0.0) for r in self.rows]) for k in keys}


def _ancestral(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion get_ancestral_step: (sigma_down, sigma_up)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return math.sqrt(max(sigma_to ** 2 - up ** 2, 0.0)), up


_CHURN_OPTS = ("s_churn", "s_tmin", "s_tmax", "s_noise")


def _churn(options, sigma: float, n_sigmas: int) -> tuple[float, float]:
    """Karras et al. (2022) Alg. 2 "churn" as k-diffusion's sample_euler / heun / dpm_2 apply it:
    (sigma_hat, pre-noise coefficient): before the step's first evaluation x += coef * noise, and the step
    starts from sigma_hat = sigma (1 + gamma)."""
    s_churn = float(options.get("s_churn", 0.0))
    s_tmin, s_tmax = float(options.get("s_tmin", 0.0)), float(options.get("s_tmax", math.inf))
    gamma = min(s_churn / (n_sigmas - 1), 2 ** 0.5 - 1) if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return sigma, 0.0
    hat = sigma * (gamma + 1)
    return hat, float(options.get("s_noise", 1.0)) * math.sqrt(hat * hat - sigma * sigma)


def _t_of(sigma: float, t_default: float, sigma_default: float, log_sigmas) -> float:
    """The model timestep at a churned sigma_hat (k-diffusion's fractional sigma_to_t), else the table's."""
    return t_default if sigma == sigma_default else float(sigma_to_t(np.array(sigma), log_sigmas))


def _table(cfg, steps, schedule, family, final=False):
    final_sigma = cfg.default("final_sigmas_type", "zero") if final else "zero"
    return sigma_table(cfg, steps, resolve_schedule(cfg, schedule), family=family, final_sigma=final_sigma)


def _ve_tables(rows: _Rows, tab, start: int) -> Tables:
    s0 = float(tab.sigmas[start])
    return Tables(rows.tables(), tab.init_noise_sigma, (1.0, s0))


# --------------------------------------------------------------------------------------- builders
def _build_euler(cfg: SchedulerConfig, steps, schedule, start, options, ancestral=False):
    tab = _table(cfg, steps, schedule, "euler", final=not ancestral)
    s, ts = tab.sigmas, tab.timesteps
    rows = _Rows(cfg.prediction_type)
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    log_sigmas = np.log(train_sigmas(cfg))
    for i in range(start, len(ts)):
        if ancestral:  # Euler a: step to sigma_down, add sigma_up noise (diffusers draws even when up = 0)
            down, up = _ancestral(s[i], s[i + 1], eta)
            rows.add(ts[i], s[i], s[i + 1], ax=1.0, cd=down - s[i], cn=up * s_noise)
        else:
            hat, pre = _churn(options, s[i], len(s) - start)
            extra = {"pre_noise": pre} if "s_churn" in options else {}
            rows.add(_t_of(hat, ts[i], s[i], log_sigmas), hat, s[i + 1], ax=1.0, cd=s[i + 1] - hat, **extra)
    return _ve_tables(rows, tab, start)


def _build_euler_ancestral(cfg, steps, schedule, start, options):
    return _build_euler(cfg, steps, schedule, start, options, ancestral=True)


def _build_heun(cfg, steps, schedule, start, options):
    """Heun (Karras et al. Alg. 2 without churn): 2 evaluations per step, the last step one Euler step."""
    if cfg.default("clip_sample", False):
        raise SamplerError("heun: clip_sample=True (from the scheduler config) is not implemented; set "
                           "clip_sample false in scheduler_config.json (latent models do not clip)")
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    rows = _Rows(cfg.prediction_type)
    log_sigmas = np.log(train_sigmas(cfg))
    for i in range(start, len(ts)):
        hat, pre = _churn(options, s[i], len(s) - start)
        extra = {"pre_noise": pre} if "s_churn" in options else {}
        dt = s[i + 1] - hat
        rows.add(_t_of(hat, ts[i], s[i], log_sigmas), hat, s[i + 1], ax=1.0, cd=dt, save=1.0, **extra)
        if i < len(ts) - 1:  # corrector at the next sigma: x = xs + (ds + d) / 2 * dt
            rows.add(ts[i + 1], s[i + 1], s[i + 1], **{"as": 1.0}, cd=0.5 * dt, cds=0.5 * dt)
    return _ve_tables(rows, tab, start)


def _build_dpm_2(cfg, steps, schedule, start, options, ancestral=False):
    """DPM2 (k-diffusion sample_dpm_2): midpoint in log sigma; DPM2 a steps to sigma_down and adds noise."""
    tab = _table(cfg, steps, schedule, "kdpm2")
    s, ts = tab.sigmas, tab.timesteps
    log_sigmas = np.log(train_sigmas(cfg))
    rows = _Rows(cfg.prediction_type)
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    for i in range(start, len(ts)):
        hat, pre = (s[i], 0.0) if ancestral else _churn(options, s[i], len(s) - start)
        extra = {"pre_noise": pre} if "s_churn" in options else {}
        t_hat = _t_of(hat, ts[i], s[i], log_sigmas)
        if i == len(ts) - 1:  # last step: one Euler step to sigma 0
            rows.add(t_hat, hat, s[i + 1], ax=1.0, cd=s[i + 1] - hat, **extra)
            continue
        down, up = _ancestral(s[i], s[i + 1], eta) if ancestral else (s[i + 1], 0.0)
        mid = math.exp(0.5 * (math.log(hat) + math.log(down)))
        rows.add(t_hat, hat, s[i + 1], ax=1.0, cd=mid - hat, save=1.0, **extra)
        t_mid = float(sigma_to_t(np.array(mid), log_sigmas))
        rows.add(t_mid, mid, s[i + 1], **{"as": 1.0}, cd=down - hat, cn=up * s_noise)
    return _ve_tables(rows, tab, start)


def _build_dpm_2_ancestral(cfg, steps, schedule, start, options):
    return _build_dpm_2(cfg, steps, schedule, start, options, ancestral=True)


def _build_dpmpp_2s_ancestral(cfg, steps, schedule, start, options):
    """DPM-Solver++(2S) with ancestral noise (k-diffusion sample_dpmpp_2s_ancestral), EulerDiscrete tables."""
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    log_sigmas = np.log(train_sigmas(cfg))
    rows = _Rows(cfg.prediction_type)
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    for i in range(start, len(ts)):
        down, up = _ancestral(s[i], s[i + 1], eta)
        if down == 0.0:  # Euler step to 0 (the last step)
            rows.add(ts[i], s[i], s[i + 1], ax=1.0, cd=down - s[i])
            continue
        h = math.log(s[i]) - math.log(down)  # t = -log sigma
        mid = math.exp(-(-math.log(s[i]) + 0.5 * h))
        rows.add(ts[i], s[i], s[i + 1], ax=mid / s[i], bD=-math.expm1(-0.5 * h), save=1.0)
        t_mid = float(sigma_to_t(np.array(mid), log_sigmas))
        rows.add(t_mid, mid, s[i + 1], **{"as": down / s[i]}, bD=-math.expm1(-h), cn=up * s_noise)
    return _ve_tables(rows, tab, start)


def _build_dpmpp_sde(cfg, steps, schedule, start, options):
    """DPM-Solver++ SDE, r = 1/2 (k-diffusion sample_dpmpp_sde), EulerDiscrete tables.

    k-diffusion draws both noises of a step from one Brownian tree (time = sigma): the sub-step noise covers
    [sigma_mid, sigma_i], the full-step one [sigma_next, sigma_i]. With independent normals z1 (drawn at the
    first evaluation) and z2 (at the second), n1 = z1 and n2 = (sqrt(d1) z1 + sqrt(d2) z2) / sqrt(d1 + d2),
    d1 = sigma_i - sigma_mid, d2 = sigma_mid - sigma_next: the same joint law as the tree.
    """
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    log_sigmas = np.log(train_sigmas(cfg))
    rows = _Rows(cfg.prediction_type)
    eta, s_noise = options.get("eta", 1.0), options.get("s_noise", 1.0)
    for i in range(start, len(ts)):
        if s[i + 1] == 0.0:
            rows.add(ts[i], s[i], s[i + 1], ax=1.0, cd=-s[i])
            continue
        t, t_next = -math.log(s[i]), -math.log(s[i + 1])
        mid = math.exp(-(t + 0.5 * (t_next - t)))
        sd, su = _ancestral(s[i], mid, eta)
        rows.add(ts[i], s[i], s[i + 1], ax=sd / s[i], bD=-math.expm1(t + math.log(sd)), cn=su * s_noise,
                 save=1.0)
        sd2, su2 = _ancestral(s[i], s[i + 1], eta)
        d1, d2 = s[i] - mid, mid - s[i + 1]
        t_mid = float(sigma_to_t(np.array(mid), log_sigmas))
        rows.add(t_mid, mid, s[i + 1], **{"as": sd2 / s[i]}, bD=-math.expm1(t + math.log(sd2)),
                 cn=su2 * s_noise * math.sqrt(d2 / (d1 + d2)), cns=su2 * s_noise * math.sqrt(d1 / (d1 + d2)))
    return _ve_tables(rows, tab, start)


def _lms_coefficient(s: np.ndarray, i: int, order: int, j: int) -> float:
    """Integral over [s_i, s_{i+1}] of the Lagrange basis polynomial of s_{i-j} on nodes s_i..s_{i-order+1}."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
    integral = poly.integ()
    return float(integral(s[i + 1]) - integral(s[i]))


def _build_lms(cfg, steps, schedule, start, options):
    """LMS (k-diffusion sample_lms, order 4). Like diffusers, the order is min(i + 1, 4) in absolute step
    index, and after an img2img start only the derivatives seen so far contribute."""
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    rows = _Rows(cfg.prediction_type)
    lms = []
    for i in range(start, len(ts)):
        order = min(i + 1, 4)
        used = min(i - start + 1, order)
        lms.append([_lms_coefficient(s, i, order, j) if j < used else 0.0 for j in range(4)])
        rows.add(ts[i], s[i], s[i + 1])
    tables = rows.tables()
    tables["lms"] = np.array(lms)
    return Tables(tables, tab.init_noise_sigma, (1.0, float(s[start])))


def _build_dpmpp_2m(cfg, steps, schedule, start, options, sde=False):
    """DPM-Solver++(2M) as diffusers' DPMSolverMultistep (solver_order 1 or 2, midpoint) builds it.

    solver_order comes from options, else the checkpoint's scheduler config; 3 (DPM-Solver++(3M)) is not
    implemented and is refused rather than silently run at order 2 (it moves the result by ~3e-2).
    """
    name = "dpmpp_2m_sde" if sde else "dpmpp_2m"
    solver_type = options.get("solver_type", cfg.default("solver_type", "midpoint"))
    if solver_type in ("bh1", "bh2", "logrho"):
        solver_type = "midpoint"  # DPMSolverMultistepScheduler.__init__ maps these to midpoint
    if solver_type not in ("midpoint", "heun"):
        raise SamplerError(f"{name}: solver_type={solver_type!r} is not implemented (midpoint or heun)")
    algorithm = cfg.default("algorithm_type", "dpmsolver++")
    if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):  # noise-prediction DPM-Solver: other formulas
        raise SamplerError(f"{name}: algorithm_type={algorithm!r} (from the scheduler config) is not implemented; "
                           f"only dpmsolver++ and sde-dpmsolver++ are")
    order = options.get("solver_order", cfg.default("solver_order", 2))
    if order not in (1, 2):
        raise SamplerError(f"{name}: solver_order={order!r} is not implemented (1 or 2; DPM-Solver++(3M) is "
                           f"not available); pass solver_order=2 to run the 2M solver on this checkpoint")
    tab = _table(cfg, steps, schedule, "dpm", final=True)
    s, ts = tab.sigmas, tab.timesteps
    n = len(ts)
    lower_final = cfg.default("lower_order_final", True)
    euler_final = cfg.default("euler_at_final", False)
    final_zero = cfg.default("final_sigmas_type", "zero") == "zero"
    s_noise = options.get("s_noise", 1.0)
    alpha = 1.0 / np.sqrt(s ** 2 + 1.0)
    sig = s * alpha  # VP sigma
    cols = {k: [] for k in ("t", "ax", "b0", "b1", "cn", "inpaint_a", "inpaint_b")}
    for i in range(start, n):
        first = order == 1 or i == start or (i == n - 1 and (euler_final or (lower_final and n < 15) or final_zero))
        lam = lambda k: math.log(alpha[k]) - math.log(sig[k])  # noqa: E731
        if sig[i + 1] == 0.0:  # to sigma 0: the limit h -> inf of both formulas is x' = D
            ax, b0, b1, cn = 0.0, 1.0, 0.0, 0.0
        elif lam(i + 1) - lam(i) <= 0.0:
            # a zero-length step: final_sigmas_type="sigma_min" after a schedule that already ends at sigma_min
            # (karras / exponential / beta / normal). diffusers' formulas give x' = x there (its 1/r0 = 1/inf
            # = 0 drops the history term, the SDE noise is sqrt(1 - e^0) = 0).
            ax, b0, b1, cn = 1.0, 0.0, 0.0, 0.0
        else:
            h = lam(i + 1) - lam(i)
            if sde:
                ax = sig[i + 1] / sig[i] * math.exp(-h)
                b0 = -alpha[i + 1] * math.expm1(-2.0 * h)
                cn = sig[i + 1] * math.sqrt(-math.expm1(-2.0 * h)) * s_noise
            else:
                ax, b0, cn = sig[i + 1] / sig[i], -alpha[i + 1] * math.expm1(-h), 0.0
            b1 = 0.0
            r0 = (lam(i) - lam(i - 1)) / h if not first else 0.0
            if r0 > 0.0:  # + c D1, D1 = (D0 - D_prev) / r0, r0 = h_prev / h (after a zero-length step: order 1)
                if solver_type == "midpoint":
                    c = 0.5 * b0
                elif sde:  # heun: diffusers' multistep_dpm_solver_second_order_update (k-diffusion's 2M SDE heun)
                    c = alpha[i + 1] * (-math.expm1(-2.0 * h) / (-2.0 * h) + 1.0)
                else:
                    c = alpha[i + 1] * (math.expm1(-h) / h + 1.0)
                b0, b1 = b0 + c / r0, -c / r0
        for k, v in zip(("t", "ax", "b0", "b1", "cn"), (ts[i], ax, b0, b1, cn)):
            cols[k].append(v)
        last = i == n - 1
        cols["inpaint_a"].append(1.0 if last else alpha[i + 1])
        cols["inpaint_b"].append(0.0 if last else sig[i + 1])
    tables = {k: np.array(v) for k, v in cols.items()}
    x0_x, x0_out = x0_coefficients(cfg.prediction_type, s[start:n], "vp")
    tables.update(c_in=np.ones(n - start), x0_x=x0_x, x0_out=x0_out)
    return Tables(tables, 1.0, (float(alpha[start]), float(sig[start])))


def _build_dpmpp_2m_sde(cfg, steps, schedule, start, options):
    return _build_dpmpp_2m(cfg, steps, schedule, start, options, sde=True)


def _build_dpmpp_2m_sde_heun(cfg, steps, schedule, start, options):
    """k-diffusion's sample_dpmpp_2m_sde(solver_type="heun") = diffusers' sde-dpmsolver++ with solver_type heun."""
    return _build_dpmpp_2m(cfg, steps, schedule, start, {**options, "solver_type": "heun"}, sde=True)


# -------------------------------------------------------------------------------------- registration
_NOISE_OPTS = ("eta", "s_noise")
_E = "EulerDiscreteScheduler"
register("euler", build=_build_euler, body=_ve_body, init=_ve_init, diffusers_class=_E, options=_CHURN_OPTS,
         aliases=("Euler", _E, "k_euler"), invokeai=("euler_k",))
register("euler_ancestral", build=_build_euler_ancestral, body=_ve_body, init=_ve_init, stochastic=True,
         options=_NOISE_OPTS, diffusers_class="EulerAncestralDiscreteScheduler",
         aliases=("Euler a", "EulerAncestralDiscreteScheduler", "k_euler_a", "k_euler_ancestral"),
         invokeai=("euler_a",))
register("heun", build=_build_heun, body=_ve_body, init=_ve_init, order=2, diffusers_class="HeunDiscreteScheduler",
         options=_CHURN_OPTS,
         aliases=("Heun", "HeunDiscreteScheduler", "k_heun"), invokeai=("heun_k",))
register("dpm_2", build=_build_dpm_2, body=_ve_body, init=_ve_init, order=2, diffusers_class="KDPM2DiscreteScheduler",
         options=_CHURN_OPTS,
         default_schedule="karras", aliases=("DPM2", "KDPM2DiscreteScheduler", "k_dpm_2"),
         invokeai=("kdpm_2", "kdpm_2_k"))
register("dpm_2_ancestral", build=_build_dpm_2_ancestral, body=_ve_body, init=_ve_init, stochastic=True,
         order=2, options=_NOISE_OPTS, diffusers_class="KDPM2AncestralDiscreteScheduler", default_schedule="karras",
         aliases=("DPM2 a", "KDPM2AncestralDiscreteScheduler", "k_dpm_2_a"), invokeai=("kdpm_2_a", "kdpm_2_a_k"))
register("lms", build=_build_lms, body=_lms_body, init=_lms_init, diffusers_class="LMSDiscreteScheduler",
         aliases=("LMS", "LMSDiscreteScheduler", "k_lms"), invokeai=("lms_k",))
register("dpmpp_2m", build=_build_dpmpp_2m, body=_dpm_body, init=_dpm_init, options=("solver_order", "solver_type"),
         diffusers_class="DPMSolverMultistepScheduler", default_schedule="karras",
         aliases=("DPM++ 2M", "DPMSolverMultistepScheduler", "k_dpmpp_2m"), invokeai=("dpmpp_2m_k",))
register("dpmpp_2m_sde", build=_build_dpmpp_2m_sde, body=_dpm_body, init=_dpm_init, stochastic=True,
         options=("s_noise", "solver_order", "solver_type"), diffusers_class="DPMSolverMultistepScheduler",
         default_schedule="exponential", aliases=("DPM++ 2M SDE", "k_dpmpp_2m_sde"), invokeai=("dpmpp_2m_sde_k",))
register("dpmpp_2m_sde_heun", build=_build_dpmpp_2m_sde_heun, body=_dpm_body, init=_dpm_init, stochastic=True,
         options=("s_noise",), diffusers_class="DPMSolverMultistepScheduler", default_schedule="exponential",
         aliases=("DPM++ 2M SDE Heun", "k_dpmpp_2m_sde_heun"))
# No diffusers class runs these two here (2S a has none; DPMSolverSDEScheduler needs torchsde): they are
# k-diffusion's formulas over EulerDiscrete's tables, so Euler's defaults fill a file's missing keys.
register("dpmpp_2s_ancestral", build=_build_dpmpp_2s_ancestral, body=_ve_body, init=_ve_init, stochastic=True,
         options=_NOISE_OPTS, diffusers_class=_E, default_schedule="karras",
         aliases=("DPM++ 2S a", "k_dpmpp_2s_a"))
register("dpmpp_sde", build=_build_dpmpp_sde, body=_ve_body, init=_ve_init, stochastic=True,
         options=_NOISE_OPTS, diffusers_class=_E, default_schedule="karras",
         aliases=("DPM++ SDE", "DPMSolverSDEScheduler", "k_dpmpp_sde"), invokeai=("dpmpp_sde_k",))
