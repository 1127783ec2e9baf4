"""Samplers added from k-diffusion / ComfyUI: dpmpp_3m_sde, dpmpp_2m_sde_heun, ipndm, ipndm_v, heunpp2,
gradient_estimation, res_multistep, res_multistep_ancestral, er_sde, and the churn options (s_churn, s_tmin,
s_tmax, s_noise) of euler / heun / dpm_2.

References: float64 numpy transcriptions of ComfyUI's comfy/k_diffusion/sampling.py (sample_dpmpp_3m_sde,
sample_ipndm, sample_ipndm_v, sample_heunpp2, sample_gradient_estimation, res_multistep, sample_er_sde,
sample_euler / sample_heun / sample_dpm_2 with churn), written here, run on the
k-diffusion wrapping of the analytic denoiser (tests/sampler_reference.py: model(x, sigma) -> x0 with fractional
t = sigma_to_t(sigma)) over jaxdiff's own sigma table, with shared noise (noise consumed at model evaluation k
is noises[k]). dpmpp_2m_sde_heun (and solver_type="heun" for dpmpp_2m) against diffusers' DPMSolverMultistep,
whose heun update is the same formula. Tolerance 1e-5 on a 1x8x8x4 latent, float32.
"""
from __future__ import annotations

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff.samplers as smp
from jaxdiff.schedules import SchedulerConfig, resolve_schedule, sigma_table
from tests.sampler_reference import (SD_CONFIG, GaussianDenoiser, ancestral_step, jax_model, kdiffusion_model,
                                     make_noise, run_diffusers)

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]
SHAPE = (1, 8, 8, 4)
CFG = SchedulerConfig.from_dict(SD_CONFIG)
DEN = GaussianDenoiser.for_config(SD_CONFIG, lam=0.1)
_RUN = jax.jit(lambda plan, x, noises, params: smp.sample(lambda a, t: jax_model(a, t, params), x, plan,
                                                          noises=noises))


def _jax(plan, x_T, noises):
    return np.asarray(_RUN(plan.replace(prediction_type="-"), jnp.asarray(x_T, jnp.float32),
                           jnp.asarray(noises[: plan.nfe]), DEN.jax_params()))


def _sigmas(schedule, steps):
    return sigma_table(CFG, steps, resolve_schedule(CFG, schedule), family="euler").sigmas


# ------------------------------------------------------------------------------- float64 references
def ref_ipndm(model, x, sigmas, variable):
    """ComfyUI sample_ipndm / sample_ipndm_v, max_order 4."""
    x = np.asarray(x, np.float64)
    buf = []
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t)
        d = (x - denoised) / t
        order = min(4, i + 1)
        if t_next == 0:
            x_next = denoised
        elif not variable:
            w = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}[order]
            div = {1: 1, 2: 2, 3: 12, 4: 24}[order]
            hist = [d] + buf[::-1]
            x_next = x + (t_next - t) * sum(c * h for c, h in zip(w, hist)) / div
        else:
            h_n = t_next - t
            if order == 1:
                x_next = x + h_n * d
            elif order == 2:
                h_n_1 = t - sigmas[i - 1]
                x_next = x + h_n * ((2 + h_n / h_n_1) / 2 * d - (h_n / h_n_1) / 2 * buf[-1])
            elif order == 3:
                h_n_1, h_n_2 = t - sigmas[i - 1], sigmas[i - 1] - sigmas[i - 2]
                temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
                c1 = (2 + (h_n / h_n_1)) / 2 + temp
                c2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
                c3 = temp * h_n_1 / h_n_2
                x_next = x + h_n * (c1 * d + c2 * buf[-1] + c3 * buf[-2])
            else:
                h_n_1, h_n_2 = t - sigmas[i - 1], sigmas[i - 1] - sigmas[i - 2]
                h_n_3 = sigmas[i - 2] - sigmas[i - 3]
                temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
                temp2 = (((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n
                          / (6 * (h_n + h_n_1 + h_n_2))) * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                         / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3)))
                q = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
                c1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
                c2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + q) * temp2
                c3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + q * (1 + h_n_2 / h_n_3)) * temp2
                c4 = -temp2 * q * h_n_1 / h_n_2
                x_next = x + h_n * (c1 * d + c2 * buf[-1] + c3 * buf[-2] + c4 * buf[-3])
        buf = (buf + [d])[-3:]
        x = x_next
    return x


def ref_dpmpp_3m_sde(model, x, sigmas, noises, eta=1.0, s_noise=1.0):
    """ComfyUI sample_dpmpp_3m_sde for an eps/v model (lambda = -log sigma, alpha_t = 1)."""
    x = np.asarray(x, np.float64)
    d_1 = d_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = -math.log(sigmas[i + 1]) + math.log(sigmas[i])
            h_eta = h * (eta + 1)
            x = sigmas[i + 1] / sigmas[i] * math.exp(-h * eta) * x - math.expm1(-h_eta) * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * (denoised - d_1) / (h_1 / h)
            if eta > 0:
                x = x + noises[i] * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def ref_churn(kind, model, x, sigmas, noises, s_churn, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """ComfyUI sample_euler / sample_heun / sample_dpm_2 with churn. Step i's churn noise is the noise of its
    first model evaluation."""
    x = np.asarray(x, np.float64)
    k = 0
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        hat = s * (gamma + 1)
        if gamma > 0:
            x = x + noises[k] * s_noise * math.sqrt(hat ** 2 - s ** 2)
        d = (x - model(x, hat)) / hat
        k += 1
        if kind == "euler" or s_next == 0:
            x = x + d * (s_next - hat)
        elif kind == "heun":
            x_2 = x + d * (s_next - hat)
            d_2 = (x_2 - model(x_2, s_next)) / s_next
            k += 1
            x = x + (d + d_2) / 2 * (s_next - hat)
        else:  # dpm_2
            mid = math.exp(0.5 * (math.log(hat) + math.log(s_next)))
            x_2 = x + d * (mid - hat)
            d_2 = (x_2 - model(x_2, mid)) / mid
            k += 1
            x = x + d_2 * (s_next - hat)
    return x


def ref_heunpp2(model, x, sigmas, noises, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """ComfyUI sample_heunpp2; step i's churn noise is the noise of its first model evaluation."""
    x = np.asarray(x, np.float64)
    s_end, k = sigmas[-1], 0
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + noises[k] * s_noise * math.sqrt(hat ** 2 - sigmas[i] ** 2)
        d = (x - model(x, hat)) / hat
        k += 1
        dt = sigmas[i + 1] - hat
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            k += 1
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            dt_2 = sigmas[i + 2] - sigmas[i + 1]
            x_3 = x_2 + d_2 * dt_2
            d_3 = (x_3 - model(x_3, sigmas[i + 2])) / sigmas[i + 2]
            k += 2
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x, k


def ref_gradient_estimation(model, x, sigmas, ge_gamma=2.0):
    """ComfyUI sample_gradient_estimation (cfg_pp off)."""
    x = np.asarray(x, np.float64)
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def ref_res_multistep(model, x, sigmas, noises, eta=0.0, s_noise=1.0):
    """ComfyUI res_multistep (cfg_pp off); step i's noise is noises[i]."""
    x = np.asarray(x, np.float64)
    old_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0 or old_denoised is None:
            x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = (-math.log(v) for v in (sigmas[i], old_down, down, sigmas[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            x = math.exp(-h) * x + h * ((phi1 - phi2 / c2) * denoised + (phi2 / c2) * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noises[i] * s_noise * up
        old_denoised, old_down = denoised, down
    return x


def ref_er_sde(model, x, sigmas, noises, s_noise=1.0, max_stage=3):
    """ComfyUI sample_er_sde for an eps/v model (er_lambda = sigma, alpha = 1); step i's noise is noises[i]."""
    x = np.asarray(x, np.float64)
    scaler = lambda v: v * (np.exp(v ** 0.3) + 10.0)  # noqa: E731
    points = np.arange(0, 200.0)
    old_denoised = old_dd = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            ls, lt = sigmas[i], sigmas[i + 1]
            r = scaler(lt) / scaler(ls)
            x = r * x + (1 - r) * denoised
            if stage >= 2:
                dt = lt - ls
                step = -dt / 200.0
                pos = lt + points * step
                scaled = scaler(pos)
                dd = (denoised - old_denoised) / (ls - sigmas[i - 1])
                x = x + (dt + np.sum(1 / scaled) * step * scaler(lt)) * dd
                if stage >= 3:
                    du = (dd - old_dd) / ((ls - sigmas[i - 2]) / 2)
                    x = x + (dt ** 2 / 2 + np.sum((pos - ls) / scaled) * step * scaler(lt)) * du
                old_dd = dd
            x = x + noises[i] * s_noise * math.sqrt(max(lt ** 2 - ls ** 2 * r ** 2, 0.0))
        old_denoised = denoised
    return x


# -------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", ["gradient_estimation", "res_multistep", "res_multistep_ancestral", "er_sde"])
def test_comfy_multistep(name):
    for steps, schedule, opts in ((1, "default", {}), (3, "default", {}), (10, "karras", {}),
                                  (15, "exponential", {})):
        plan = smp.make_plan(name, steps, CFG, schedule=schedule, **opts)
        noise0, noises = make_noise(SHAPE, plan.nfe, seed=steps)
        x_T = noise0 * float(plan.init_noise_sigma)
        model, sig = kdiffusion_model(DEN), _sigmas(schedule, steps)
        want = {"gradient_estimation": lambda: ref_gradient_estimation(model, x_T, sig),
                "res_multistep": lambda: ref_res_multistep(model, x_T, sig, noises),
                "res_multistep_ancestral": lambda: ref_res_multistep(model, x_T, sig, noises, eta=1.0),
                "er_sde": lambda: ref_er_sde(model, x_T, sig, noises)}[name]()
        assert float(np.abs(_jax(plan, x_T, noises) - want).max()) <= 1e-5, (name, steps, schedule)

def test_heunpp2():
    for steps, schedule, opts in ((1, "default", {}), (2, "default", {}), (3, "default", {}),
                                  (10, "karras", {}), (8, "default", {"s_churn": 2.0})):
        plan = smp.make_plan("heunpp2", steps, CFG, schedule=schedule, **opts)
        noise0, noises = make_noise(SHAPE, plan.nfe, seed=steps)
        x_T = noise0 * float(plan.init_noise_sigma)
        want, nfe = ref_heunpp2(kdiffusion_model(DEN), x_T, _sigmas(schedule, steps), noises, **opts)
        assert nfe == plan.nfe == (1 if steps == 1 else 3 * steps - 3)
        assert float(np.abs(_jax(plan, x_T, noises) - want).max()) <= 1e-5, (steps, schedule, opts)

@pytest.mark.parametrize("name", ["ipndm", "ipndm_v"])
def test_ipndm(name):
    for steps, schedule in ((1, "default"), (3, "default"), (10, "karras"), (15, "exponential")):
        plan = smp.make_plan(name, steps, CFG, schedule=schedule)
        noise0, noises = make_noise(SHAPE, plan.nfe, seed=steps)
        x_T = noise0 * float(plan.init_noise_sigma)
        want = ref_ipndm(kdiffusion_model(DEN), x_T, _sigmas(schedule, steps), variable=name == "ipndm_v")
        assert float(np.abs(_jax(plan, x_T, noises) - want).max()) <= 1e-5, (name, steps, schedule)
    # ipndm and ipndm_v coincide on a uniform step (karras / exponential are not uniform in sigma)
    a, b = (smp.build_tables(n, 10, CFG, schedule="karras")[1].tables["lms"] for n in ("ipndm", "ipndm_v"))
    assert np.abs(a - b).max() > 1e-3


def test_dpmpp_3m_sde():
    for steps, schedule, opts in ((1, "default", {}), (3, "default", {}), (10, "exponential", {}),
                                  (15, "karras", {}), (10, "karras", {"eta": 0.5, "s_noise": 0.8}),
                                  (6, "karras", {"eta": 0.0})):
        plan = smp.make_plan("dpmpp_3m_sde", steps, CFG, schedule=schedule, **opts)
        noise0, noises = make_noise(SHAPE, plan.nfe, seed=steps)
        x_T = noise0 * float(plan.init_noise_sigma)
        want = ref_dpmpp_3m_sde(kdiffusion_model(DEN), x_T, _sigmas(schedule, steps), noises, **opts)
        assert float(np.abs(_jax(plan, x_T, noises) - want).max()) <= 1e-5, (steps, schedule, opts)
    assert smp.resolve("DPM++ 3M SDE Karras") == ("dpmpp_3m_sde", "karras")
    # no schedule: A1111's "Automatic" for DPM++ 3M SDE is exponential
    np.testing.assert_array_equal(smp.build_tables("dpmpp_3m_sde", 8, CFG)[1].tables["t"],
                                  smp.build_tables("dpmpp_3m_sde", 8, CFG, schedule="exponential")[1].tables["t"])


@pytest.mark.parametrize("kind", ["euler", "heun", "dpm_2"])
def test_churn(kind):
    for steps, opts in ((4, {"s_churn": 1.0}), (10, {"s_churn": 5.0, "s_tmin": 0.5, "s_tmax": 8.0,
                                                         "s_noise": 1.003})):
        plan = smp.make_plan(kind, steps, CFG, schedule="default", **opts)
        noise0, noises = make_noise(SHAPE, plan.nfe, seed=steps)
        x_T = noise0 * float(plan.init_noise_sigma)
        want = ref_churn(kind, kdiffusion_model(DEN), x_T, _sigmas("default", steps), noises, **opts)
        got = _jax(plan, x_T, noises)
        assert float(np.abs(got - want).max()) <= 1e-5, (kind, steps, opts)
        plain = smp.make_plan(kind, steps, CFG, schedule="default")
        assert float(np.abs(_jax(plain, x_T, noises) - got).max()) > 1e-3  # the churn acted
    # s_churn = 0 (the default) is the plain sampler; churn with a key draws its own noise
    zero = smp.make_plan(kind, 4, CFG, schedule="default", s_churn=0.0)
    assert float(np.abs(np.asarray(zero.tables["pre_noise"])).max()) == 0.0
    churned = smp.make_plan(kind, 4, CFG, schedule="default", s_churn=1.0)
    x = smp.sample(DEN.jax, jnp.ones(SHAPE), churned, jax.random.PRNGKey(0))
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("sde", [False, True])
def test_solver_type_heun_matches_diffusers(sde):
    """dpmpp_2m_sde_heun = diffusers' DPMSolverMultistep(algorithm_type="sde-dpmsolver++", solver_type="heun")
    (k-diffusion's 2M SDE heun update); solver_type="heun" in a config runs dpmpp_2m's heun update too."""
    extra = {"solver_type": "heun", **({"algorithm_type": "sde-dpmsolver++"} if sde else {})}
    for steps, karras in ((3, False), (15, False), (10, True)):
        over = dict(extra, **({"use_karras_sigmas": True} if karras else {}))
        cfg = SchedulerConfig.from_dict({**SD_CONFIG, **over})
        name = "dpmpp_2m_sde_heun" if sde else "dpmpp_2m"
        plan = smp.make_plan(name, steps, cfg, schedule=None if karras else "default")
        noise0, noises = make_noise(SHAPE, plan.nfe, seed=steps)
        ref = run_diffusers(diffusers.DPMSolverMultistepScheduler, steps, noise0, noises, denoiser=DEN, config=over)
        np.testing.assert_array_equal(np.asarray(plan.tables["t"]), ref.timesteps.astype(np.float32))
        assert float(np.abs(_jax(plan, noise0, noises) - ref.x).max()) <= 1e-5, (steps, karras)
    midpoint = smp.build_tables("dpmpp_2m_sde" if sde else "dpmpp_2m", 10, CFG, schedule="karras")[1].tables
    heun = smp.build_tables("dpmpp_2m", 10, CFG, schedule="karras", solver_type="heun")[1].tables if not sde else \
        smp.build_tables("dpmpp_2m_sde_heun", 10, CFG, schedule="karras")[1].tables
    assert np.abs(midpoint["b1"] - heun["b1"]).max() > 1e-3
