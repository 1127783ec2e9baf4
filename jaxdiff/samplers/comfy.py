"""ComfyUI's k-diffusion samplers beyond A1111's classic set: DPM++ 3M SDE, Heun++, iPNDM (+ variable step),
gradient estimation, RES multistep (+ ancestral) and ER-SDE, from comfy/k_diffusion/sampling.py.

Each is a host table builder over EulerDiscrete's sigma tables (kdiffusion._table) and one of the sigma-space
scan bodies: kdiffusion's VE body (Heun++), its LMS body (iPNDM, gradient estimation: x' = x + sum_j c_j
d_{i-j}) or the three-step exponential-integrator body below (x' = ax x + b0 D + b1 D_1 + b2 D_2 + cn noise).
tests/test_samplers_new.py checks each against a float64 transcription of ComfyUI's function.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.core import Tables, register, to_x0
from jaxdiff.samplers.kdiffusion import (_CHURN_OPTS, _NOISE_OPTS, _Rows, _ancestral, _churn, _lms_body, _lms_init,
                                         _t_of, _table, _ve_body, _ve_init, _ve_tables)
from jaxdiff.schedules import train_sigmas

_E = "EulerDiscreteScheduler"  # no diffusers class: Euler's defaults fill a scheduler file's missing keys


def _build_heunpp2(cfg, steps, schedule, start, options):
    """Heun++ (ComfyUI's sample_heunpp2, from Carzit/sd-webui-samplers-scheduler; churn as sample_heun): three
    evaluations per step x -> x_2 = x + d dt -> x_3 = x_2 + d_2 dt_2, then x + (w1 d + w2 d_2 + w3 d_3) dt with
    w_k = sigma_{i+k-1} / (3 sigma_0); Heun with w = sigma / (2 sigma_0) on the step before the last, Euler on
    the last. d_2 is not kept: the third evaluation recovers it as (x_3 - x_s - dt d_s) / dt_2, so the VE
    body's saved (x_s, d_s) suffice."""
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    rows = _Rows(cfg.prediction_type)
    log_sigmas = np.log(train_sigmas(cfg))
    s0, s_end, n = s[start], s[-1], len(s)
    for i in range(start, len(ts)):
        hat, pre = _churn(options, s[i], n - start)
        extra = {"pre_noise": pre} if "s_churn" in options else {}
        t_hat, dt = _t_of(hat, ts[i], s[i], log_sigmas), s[i + 1] - hat
        if s[i + 1] == s_end:  # Euler
            rows.add(t_hat, hat, s[i + 1], ax=1.0, cd=dt, **extra)
            continue
        rows.add(t_hat, hat, s[i + 1], ax=1.0, cd=dt, save=1.0, **extra)  # x_2 = x + d dt
        if s[i + 2] == s_end:  # Heun
            w2 = s[i + 1] / (2 * s0)
            rows.add(ts[i + 1], s[i + 1], s[i + 1], **{"as": 1.0}, cds=dt * (1 - w2), cd=dt * w2)
            continue
        dt_2 = s[i + 2] - s[i + 1]
        rows.add(ts[i + 1], s[i + 1], s[i + 1], ax=1.0, cd=dt_2)  # x_3 = x_2 + d_2 dt_2
        w2, w3 = s[i + 1] / (3 * s0), s[i + 2] / (3 * s0)
        w1, k = 1 - w2 - w3, dt * w2 / dt_2  # d_2 = (x_3 - x_s - dt d_s) / dt_2
        rows.add(ts[i + 2], s[i + 2], s[i + 1], ax=k, **{"as": 1.0 - k}, cds=dt * w1 - k * dt, cd=dt * w3)
    return _ve_tables(rows, tab, start)


_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ipndm_v_coefficients(s, i: int, order: int) -> tuple[float, ...]:
    """ComfyUI's sample_ipndm_v (from zju-pi/diff-sampler): variable-step Adams-Bashforth weights on d_i, d_{i-1},
    ... over the sigma grid s (the run's own, i counted from its first step)."""
    h = s[i + 1] - s[i]
    if order == 1:
        return (1.0,)
    h1 = s[i] - s[i - 1]
    if order == 2:
        return ((2 + h / h1) / 2, -(h / h1) / 2)
    h2 = s[i - 1] - s[i - 2]
    temp1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return ((2 + h / h1) / 2 + temp1, -(h / h1) / 2 - (1 + h1 / h2) * temp1, temp1 * h1 / h2)
    h3 = s[i - 2] - s[i - 3]
    temp2 = (((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
             * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3)))
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return ((2 + h / h1) / 2 + temp1 + temp2,
            -(h / h1) / 2 - (1 + h1 / h2) * temp1 - (1 + h1 / h2 + q) * temp2,
            temp1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * temp2,
            -temp2 * q * h1 / h2)


def _build_ipndm(cfg, steps, schedule, start, options, variable=False):
    """iPNDM (Zhang & Chen 2022; ComfyUI's sample_ipndm / sample_ipndm_v, max_order 4): Adams-Bashforth on the
    derivatives d = (x - D) / sigma in sigma, fixed weights (ipndm) or variable-step ones (ipndm_v); the
    step to sigma 0 returns D. Runs in the LMS body (x' = x + sum_j c_j d_{i-j})."""
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    run = s[start:]  # the run's own grid: history starts at the img2img start, as ComfyUI's sliced sigmas
    rows = _Rows(cfg.prediction_type)
    coef = []
    for i in range(len(run) - 1):
        dt = run[i + 1] - run[i]
        order = min(4, i + 1)
        if run[i + 1] == 0.0:
            w = (1.0,)  # x = D = x - sigma d
        else:
            w = _ipndm_v_coefficients(run, i, order) if variable else _AB[order]
        coef.append([dt * c for c in w] + [0.0] * (4 - len(w)))
        rows.add(ts[start + i], run[i], run[i + 1])
    tables = rows.tables()
    tables["lms"] = np.array(coef)
    return Tables(tables, tab.init_noise_sigma, (1.0, float(s[start])))


def _build_ipndm_v(cfg, steps, schedule, start, options):
    return _build_ipndm(cfg, steps, schedule, start, options, variable=True)


def _ms_init(x):
    return (jnp.zeros_like(x), jnp.zeros_like(x))  # the previous two x0 predictions, newest first


def _ms_body(x, out, hist, tab, noise):
    """Sigma-space three-step exponential integrator: x' = ax x + b0 D + b1 D_1 + b2 D_2 + cn noise."""
    d1, d2 = hist
    den = to_x0(x, out, tab)
    x_new = tab["ax"] * x + tab["b0"] * den + tab["b1"] * d1 + tab["b2"] * d2 + tab["cn"] * noise
    return x_new, (den, d1)


def _build_dpmpp_3m_sde(cfg, steps, schedule, start, options):
    """DPM-Solver++(3M) SDE as k-diffusion / ComfyUI's sample_dpmpp_3m_sde (VE, eta and s_noise), over
    EulerDiscrete's tables. Its Brownian-tree noise covers disjoint [sigma_{i+1}, sigma_i] per step: one
    independent normal per step here."""
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    eta, s_noise = float(options.get("eta", 1.0)), float(options.get("s_noise", 1.0))
    rows = _Rows(cfg.prediction_type)
    h_1 = h_2 = None
    for i in range(start, len(ts)):
        if s[i + 1] == 0.0:
            rows.add(ts[i], s[i], s[i + 1], ax=0.0, b0=1.0, b1=0.0, b2=0.0, cn=0.0)
            continue
        h = math.log(s[i]) - math.log(s[i + 1])  # lambda = -log sigma
        h_eta = h * (eta + 1.0)
        c = np.array([-math.expm1(-h_eta), 0.0, 0.0])  # on (D, D_1, D_2); alpha_t = 1 in VE
        phi_2 = math.expm1(-h_eta) / h_eta + 1.0
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = np.array([1.0, -1.0, 0.0]) / r0, np.array([0.0, 1.0, -1.0]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            c = c + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif h_1 is not None:
            c = c + phi_2 * np.array([1.0, -1.0, 0.0]) / (h_1 / h)
        cn = s[i + 1] * math.sqrt(-math.expm1(-2.0 * h * eta)) * s_noise if eta > 0 else 0.0
        rows.add(ts[i], s[i], s[i + 1], ax=s[i + 1] / s[i] * math.exp(-h * eta), b0=c[0], b1=c[1], b2=c[2], cn=cn)
        h_1, h_2 = h, h_1
    return _ve_tables(rows, tab, start)


def _build_gradient_estimation(cfg, steps, schedule, start, options):
    """ComfyUI's sample_gradient_estimation (Permenter & Yuan, ge_gamma = 2): Euler plus (gamma - 1)(d - d_prev)
    dt from the second step on; the step to sigma 0 returns D. In the LMS body (x' = x + c0 d + c1 d_prev)."""
    gamma = float(options.get("ge_gamma", 2.0))
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    rows = _Rows(cfg.prediction_type)
    coef = []
    for i in range(start, len(ts)):
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0.0:
            c = [-s[i], 0.0]  # x = D = x - sigma d
        elif i > start:
            c = [dt * gamma, -dt * (gamma - 1.0)]
        else:
            c = [dt, 0.0]
        coef.append(c + [0.0, 0.0])
        rows.add(ts[i], s[i], s[i + 1])
    tables = rows.tables()
    tables["lms"] = np.array(coef)
    return Tables(tables, tab.init_noise_sigma, (1.0, float(s[start])))


def _build_res_multistep(cfg, steps, schedule, start, options, eta_default=0.0):
    """ComfyUI's res_multistep (Zhang et al. 2023, arXiv 2308.02157, second-order multistep in log sigma) and its
    ancestral form (eta > 0: step to sigma_down, add sigma_up noise); Euler on the first step and to sigma 0."""
    eta, s_noise = float(options.get("eta", eta_default)), float(options.get("s_noise", 1.0))
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    rows = _Rows(cfg.prediction_type)
    old_down = None
    for i in range(start, len(ts)):
        down, up = _ancestral(s[i], s[i + 1], eta)
        if down == 0.0 or old_down is None:  # Euler: x + (x - D) / sigma (down - sigma)
            ax, b0, b1 = down / s[i], 1.0 - down / s[i], 0.0
        else:
            h = math.log(s[i]) - math.log(down)
            c2 = (-math.log(s[i - 1]) + math.log(old_down)) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            ax, b0, b1 = math.exp(-h), h * (phi1 - phi2 / c2), h * (phi2 / c2)
        rows.add(ts[i], s[i], s[i + 1], ax=ax, b0=b0, b1=b1, b2=0.0, cn=up * s_noise if s[i + 1] > 0 else 0.0)
        old_down = down
    return _ve_tables(rows, tab, start)


def _build_res_multistep_ancestral(cfg, steps, schedule, start, options):
    return _build_res_multistep(cfg, steps, schedule, start, options, eta_default=1.0)


def _build_er_sde(cfg, steps, schedule, start, options):
    """ComfyUI's sample_er_sde (Cui et al. 2023, VP ER-SDE-Solver-3, max_stage 3, the default noise scaler
    x (e^{x^0.3} + 10)), for an eps/v model: lambda_er = sigma (VE), alpha = 1. Stages 2 and 3 use the x0
    history through divided differences; the integrals are its 200-point Riemann sums in float32."""
    s_noise, max_stage = float(options.get("s_noise", 1.0)), 3
    tab = _table(cfg, steps, schedule, "euler")
    s, ts = tab.sigmas, tab.timesteps
    lam = s[start:]  # er_lambda of the run's own grid
    points = np.arange(0, 200.0, dtype=np.float32)
    scaler = lambda v: v * (np.exp(v ** 0.3) + 10.0)  # noqa: E731
    rows = _Rows(cfg.prediction_type)
    old_dd = None  # previous denoised_d as coefficients on (D_1, D_2) after the shift
    for k in range(len(lam) - 1):
        i = start + k
        if lam[k + 1] == 0.0:
            rows.add(ts[i], s[i], s[i + 1], ax=0.0, b0=1.0, b1=0.0, b2=0.0, cn=0.0)
            continue
        ls, lt = lam[k], lam[k + 1]
        r = scaler(lt) / scaler(ls)
        c = np.array([1.0 - r, 0.0, 0.0])  # on (D, D_1, D_2)
        stage = min(max_stage, k + 1)
        new_dd = None
        if stage >= 2:
            dt = lt - ls
            step = np.float32(-dt / 200.0)
            pos = np.float32(lt) + points * step
            scaled = scaler(pos.astype(np.float32)).astype(np.float32)
            s_int = float(np.sum(1.0 / scaled, dtype=np.float32) * step)
            new_dd = np.array([1.0, -1.0, 0.0]) / (ls - lam[k - 1])
            c = c + (dt + s_int * scaler(lt)) * new_dd
            if stage >= 3:
                s_u = float(np.sum((pos - np.float32(ls)) / scaled, dtype=np.float32) * step)
                du = (new_dd - old_dd) / ((ls - lam[k - 2]) / 2.0)
                c = c + (dt ** 2 / 2.0 + s_u * scaler(lt)) * du
        cn = s_noise * math.sqrt(max(lt ** 2 - ls ** 2 * r ** 2, 0.0))
        rows.add(ts[i], s[i], s[i + 1], ax=r, b0=c[0], b1=c[1], b2=c[2], cn=cn)
        # the next step sees this step's D as D_1: shift its denoised_d coefficients by one slot
        old_dd = None if new_dd is None else np.array([0.0, new_dd[0], new_dd[1]])
    return _ve_tables(rows, tab, start)


# -------------------------------------------------------------------------------------- registration
register("dpmpp_3m_sde", build=_build_dpmpp_3m_sde, body=_ms_body, init=_ms_init, stochastic=True,
         options=_NOISE_OPTS, diffusers_class=_E, default_schedule="exponential",
         aliases=("DPM++ 3M SDE", "k_dpmpp_3m_sde"))
register("heunpp2", build=_build_heunpp2, body=_ve_body, init=_ve_init, order=2, options=_CHURN_OPTS,
         diffusers_class=_E, aliases=("Heun++",))
register("gradient_estimation", build=_build_gradient_estimation, body=_lms_body, init=_lms_init,
         options=("ge_gamma",), diffusers_class=_E)
register("res_multistep", build=_build_res_multistep, body=_ms_body, init=_ms_init, diffusers_class=_E)
register("res_multistep_ancestral", build=_build_res_multistep_ancestral, body=_ms_body, init=_ms_init,
         stochastic=True, options=_NOISE_OPTS, diffusers_class=_E)
register("er_sde", build=_build_er_sde, body=_ms_body, init=_ms_init, stochastic=True, options=("s_noise",),
         diffusers_class=_E)
register("ipndm", build=_build_ipndm, body=_lms_body, init=_lms_init, diffusers_class=_E)
register("ipndm_v", build=_build_ipndm_v, body=_lms_body, init=_lms_init, diffusers_class=_E)
