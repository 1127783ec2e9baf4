"""Parity of the timestep-space samplers (jaxdiff/samplers/timesteps.py) with diffusers, plus NFE counts,
scan == Python loop and jit == eager.

Reference: the diffusers scheduler class run by tests/sampler_reference.py on the analytic Gaussian denoiser
(lam = 0.1, so the model is nonlinear and t-dependent) with shared noise. Tolerance: max|jax - diffusers| <=
1e-5 on a 1x8x8x4 latent (values ~1), timesteps exactly equal.

What is swept, and why (the sampler test budget is shared; compile cost dominates and is one executable per
(sampler, K)): the full step sweep {1, 2, 3, 4, 10, 14, 15, 20, 50} x {epsilon, v} on the stock SD config for
the priority samplers (DDIM with eta 0 and 1, UniPC bh2, UniPC bh1); the three spacings on {1, 4, 15, 20}
(these reuse the same executables); karras and zero-SNR (trailing + v, lam = 0 because the analytic v model is
singular at alphas_cumprod = 0 with lam != 0) where the class supports them; DDPM, PLMS, DEIS, LCM, TCD on a
subset of step counts; img2img (strength 0.6) for DDIM, PLMS, DDPM and UniPC.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, LCMScheduler, PNDMScheduler,
                       TCDScheduler, UniPCMultistepScheduler)

from jaxdiff.errors import SamplerError
from jaxdiff.samplers import initial_latents, make_plan, sample
from jaxdiff.samplers.core import Plan
from jaxdiff.schedules import SchedulerConfig, sigma_table
from tests.sampler_reference import SD_CONFIG, GaussianDenoiser, jax_model, make_noise, run_diffusers

SHAPE = (1, 8, 8, 4)
ALL_STEPS = (1, 2, 3, 4, 10, 14, 15, 20, 50)
SPACING_STEPS = (1, 4, 15, 20)
TOL = 1e-5
NOISE0, NOISES = make_noise(SHAPE, 60, seed=0)
IMAGE = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32) * 0.5

_RUNNERS: dict[str, callable] = {}


def _runner(kind: str):
    """One jitted `sample` per sampler kind; tables and the denoiser are arguments, so a sweep recompiles
    only when K (the scan length) changes."""
    if kind not in _RUNNERS:
        def run(tables, init, img2img, x_T, noises, params):
            plan = Plan(tables=tables, init_noise_sigma=init, img2img=img2img, kind=kind,
                        prediction_type="epsilon")  # the body reads only the tables; the type is in them
            return sample(lambda x, t: jax_model(x, t, params), x_T, plan, noises=noises)
        _RUNNERS[kind] = jax.jit(run)
    return _RUNNERS[kind]


# An evaluation that leaves (x, xc, ring) unchanged when it comes FIRST (the ring is still all zeros then).
_IDENTITY_ROW = {"m_x": 0.0, "m_out": 0.0, "c_prev": 0.0, "c_x": 1.0, "c_ring": 0.0, "p_xc": 1.0, "p_ring": 0.0,
                 "p_noise": 0.0, "c_in": 1.0, "inpaint_a": 1.0, "inpaint_b": 0.0, "x0_x": 0.0, "x0_out": 0.0,
                 "p_x0": 0.0, "clip_r": 1.0}


def _pad_front(tables, pad):
    """Prepend `pad` identity evaluations, so every K up to a bucket size shares one executable (a test-speed
    device: CPU compiles of this scan cost ~2 s each; the unpadded driver is covered by the loop test)."""
    out = {}
    for name, col in tables.items():
        col = np.asarray(col)
        fill = col[:1] if name == "t" else np.full((1,) + col.shape[1:], _IDENTITY_ROW[name], col.dtype)
        out[name] = jnp.asarray(np.concatenate([np.repeat(fill, pad, axis=0), col]))
    return out


def _run_jax(plan, x_T, den):
    bucket = 8 if plan.nfe <= 8 else 64
    pad = bucket - plan.nfe
    noises = np.concatenate([np.zeros((pad,) + SHAPE, np.float32), NOISES[: plan.nfe]])
    return np.asarray(_runner(plan.kind)(_pad_front(plan.tables, pad), plan.init_noise_sigma, plan.img2img,
                                         jnp.asarray(x_T), jnp.asarray(noises), den.jax_params()))


def _compare(name, cls, steps, pred="epsilon", cfg=None, *, lam=0.1, options=None, step_kwargs=None,
             output="prev_sample", strength=1.0, schedule=None):
    """Run jaxdiff and diffusers on the same denoiser and noise; return max |diff| (asserting tables first)."""
    cfg = dict(cfg or {})
    config = SchedulerConfig.from_dict(dict(SD_CONFIG, prediction_type=pred, **cfg))
    plan = make_plan(name, steps, config, strength=strength, schedule=schedule, **(options or {}))
    image = IMAGE if strength < 1.0 else None
    ref = run_diffusers(cls, steps, NOISE0, NOISES, lam=lam, prediction_type=pred, config=cfg,
                        step_kwargs=step_kwargs, output=output, image=image, strength=strength)
    where = f"{name} steps={steps} {pred} {cfg} {options or ''} strength={strength}"
    np.testing.assert_array_equal(np.asarray(plan.tables["t"]), ref.timesteps.astype(np.float32), err_msg=where)
    assert plan.nfe == ref.nfe, where
    x_T = initial_latents(plan, jnp.asarray(NOISE0), None if image is None else jnp.asarray(image))
    np.testing.assert_allclose(np.asarray(x_T), ref.x_T, rtol=0, atol=2e-6, err_msg=where)
    den = GaussianDenoiser.for_config(dict(cfg, prediction_type=pred), lam=lam)
    x = _run_jax(plan, x_T, den)
    err = float(np.max(np.abs(x - ref.x)))
    assert np.all(np.isfinite(ref.x)), where
    assert err <= TOL, f"{where}: max|jax - diffusers| = {err:.2e}"
    return err


def _sweep(name, cls, *, steps=ALL_STEPS, preds=("epsilon", "v_prediction"), cfg=None, **kw):
    errs = [_compare(name, cls, n, p, cfg, **kw) for n in steps for p in preds]
    return max(errs)


# --------------------------------------------------------------------------------------------- DDIM
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_parity(eta):
    kw = dict(options={"eta": eta}, step_kwargs={"eta": eta})
    _sweep("ddim", DDIMScheduler, **kw)
    for spacing in ("linspace", "trailing"):
        _sweep("ddim", DDIMScheduler, steps=SPACING_STEPS, cfg={"timestep_spacing": spacing}, **kw)
    if eta == 0.0:
        # Zero-SNR with eta = 1 is left out: on the first step (alphas_cumprod = 0) diffusers' float32
        # sqrt(1 - a_prev - std^2) of an exact 0 returns ~1e-5 of rounding noise, which is all the difference.
        _sweep("ddim", DDIMScheduler, steps=(1, 4, 20), preds=("v_prediction",), lam=0.0,
               cfg={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, **kw)
    _compare("ddim", DDIMScheduler, 20, cfg={"set_alpha_to_one": True}, **kw)
    _compare("ddim", DDIMScheduler, 20, "sample", **kw)


# -------------------------------------------------------------------------------------------- UniPC
def test_uni_pc_bh2_parity():
    _sweep("uni_pc_bh2", UniPCMultistepScheduler)
    for spacing in ("linspace", "trailing"):
        _sweep("uni_pc_bh2", UniPCMultistepScheduler, steps=SPACING_STEPS, cfg={"timestep_spacing": spacing})
    _sweep("uni_pc_bh2", UniPCMultistepScheduler, steps=(4, 10, 20), cfg={"use_karras_sigmas": True})
    _sweep("uni_pc_bh2", UniPCMultistepScheduler, steps=(4, 20), preds=("v_prediction",), lam=0.0,
           cfg={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
    _sweep("uni_pc_bh2", UniPCMultistepScheduler, steps=(10, 20), preds=("epsilon",),
           cfg={"solver_order": 3}, options={"solver_order": 3})
    _compare("uni_pc_bh2", UniPCMultistepScheduler, 10, cfg={"disable_corrector": [0, 3]},
             options={"disable_corrector": (0, 3)})


def test_uni_pc_bh1_parity():
    """bh1 against diffusers with final_sigmas_type="sigma_min": with the default final sigma 0, diffusers'
    bh1 computes B(h) = -inf times a zero residual on the last step and returns NaN; jaxdiff's tables drop
    that zero term (the last step is first order: x = x0 prediction), checked for finiteness below."""
    cfg = {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}
    _sweep("uni_pc", UniPCMultistepScheduler, cfg=cfg, options={"final_sigmas_type": "sigma_min"})
    for spacing in ("linspace", "trailing"):
        _sweep("uni_pc", UniPCMultistepScheduler, steps=SPACING_STEPS, cfg=dict(cfg, timestep_spacing=spacing),
               options={"final_sigmas_type": "sigma_min"})
    plan = make_plan("uni_pc", 10)
    x = _run_jax(plan, NOISE0, GaussianDenoiser.for_config({}, lam=0.1))
    ref = run_diffusers(UniPCMultistepScheduler, 10, NOISE0, lam=0.1, config={"solver_type": "bh2"})
    assert np.all(np.isfinite(x))
    assert np.max(np.abs(x - ref.x)) < 0.1  # bh1 and bh2 differ, but solve the same ODE


# ------------------------------------------------------------------------------ the other samplers
def test_ddpm_parity():
    _sweep("ddpm", DDPMScheduler, steps=(1, 2, 3, 4, 10, 20))
    _sweep("ddpm", DDPMScheduler, steps=(4, 20), cfg={"timestep_spacing": "trailing"})
    _sweep("ddpm", DDPMScheduler, steps=(4, 20), cfg={"variance_type": "fixed_large"})
    _sweep("ddpm", DDPMScheduler, steps=(4,), preds=("v_prediction",), lam=0.0,
           cfg={"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})


def test_plms_parity():
    _sweep("plms", PNDMScheduler, steps=(1, 2, 3, 4, 10, 15, 20, 50))
    for spacing in ("linspace", "trailing"):
        _sweep("plms", PNDMScheduler, steps=(1, 4, 20), cfg={"timestep_spacing": spacing})


def test_deis_parity():
    """Order 2 (the default). diffusers evaluates DEIS's integrals in float32 with cancellation; at order 3
    that alone moves its result by up to 6e-5, so order 3 is checked at 1e-4 against our float64 tables."""
    _sweep("deis", DEISMultistepScheduler, steps=(1, 2, 3, 4, 10, 14, 15, 20))
    _sweep("deis", DEISMultistepScheduler, steps=(4, 20), preds=("epsilon",), cfg={"use_karras_sigmas": True})
    _sweep("deis", DEISMultistepScheduler, steps=(4, 20), preds=("epsilon",), cfg={"timestep_spacing": "trailing"})
    global TOL
    TOL, saved = 1e-4, TOL
    try:
        _sweep("deis", DEISMultistepScheduler, steps=(20,), preds=("epsilon",), cfg={"solver_order": 3},
               options={"solver_order": 3})
    finally:
        TOL = saved


def test_lcm_parity():
    _sweep("lcm", LCMScheduler, steps=(1, 2, 4, 8), output="denoised")


@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_tcd_parity(eta):
    _sweep("tcd", TCDScheduler, steps=(1, 2, 4, 8), options={"eta": eta}, step_kwargs={"eta": eta})


def test_img2img_parity():
    """strength < 1 starts part-way exactly as diffusers' img2img pipelines (get_timesteps + add_noise)."""
    for name, cls, kw in (("ddim", DDIMScheduler, {"options": {"eta": 1.0}, "step_kwargs": {"eta": 1.0}}),
                          ("ddpm", DDPMScheduler, {}), ("plms", PNDMScheduler, {}),
                          ("uni_pc_bh2", UniPCMultistepScheduler, {})):
        _compare(name, cls, 20, strength=0.6, **kw)


# ---------------------------------------------------------------------------------- tables & structure
@pytest.mark.parametrize("name,steps,nfe", [("ddim", 20, 20), ("ddpm", 20, 20), ("plms", 20, 21), ("plms", 1, 1),
                                            ("uni_pc", 20, 20), ("uni_pc_bh2", 20, 20), ("deis", 20, 20),
                                            ("lcm", 4, 4), ("tcd", 4, 4)])
def test_nfe(name, steps, nfe):
    assert make_plan(name, steps).nfe == nfe


def test_uni_pc_sigmas_match_diffusers():
    """The sigma table the UniPC tables are built from equals the scheduler's, karras included: rtol 2e-6 where
    sigma >= 0.5. Below that diffusers' own sigmas carry float32 cancellation (1 - alphas_cumprod near t = 0 has
    ~6e-8 / (1 - ab) relative error; 1.3e-5 at karras' sigma_min 0.029), so those get rtol 5e-5."""
    for cfg in ({}, {"use_karras_sigmas": True}, {"timestep_spacing": "trailing"}):
        ref = run_diffusers(UniPCMultistepScheduler, 20, NOISE0, config=cfg)
        tab = sigma_table(SchedulerConfig.from_dict(dict(SD_CONFIG, **cfg)), 20,
                          "karras" if cfg.get("use_karras_sigmas") else "default", family="dpm")
        big = ref.sigmas >= 0.5
        rtol = 2e-5 if cfg.get("use_karras_sigmas") else 2e-6  # karras inherits sigma_min's float32 error
        np.testing.assert_allclose(tab.sigmas[big], ref.sigmas[big], rtol=rtol)
        np.testing.assert_allclose(tab.sigmas[~big], ref.sigmas[~big], rtol=5e-5)


def test_scan_equals_python_loop_and_jit_equals_eager():
    """The scan driver against a hand-written Python loop over the same host tables and body formula."""
    den = GaussianDenoiser.for_config({}, lam=0.1)
    for name, options in (("uni_pc_bh2", {}), ("plms", {}), ("ddim", {"eta": 1.0})):
        plan = make_plan(name, 6, **options)
        tab = {k: np.asarray(v, np.float64) for k, v in plan.tables.items()}
        x, ring_len = NOISE0.astype(np.float64), tab["c_ring"].shape[1]
        xc, ring = np.zeros_like(x), np.zeros((ring_len,) + x.shape)
        for k in range(plan.nfe):
            out = den.numpy(x, tab["t"][k])
            ring = np.concatenate([(tab["m_x"][k] * x + tab["m_out"][k] * out)[None], ring[:-1]])
            xc = tab["c_prev"][k] * xc + tab["c_x"][k] * x + np.tensordot(tab["c_ring"][k], ring, axes=1)
            x0 = np.clip(tab["x0_x"][k] * x + tab["x0_out"][k] * out, -tab["clip_r"][k], tab["clip_r"][k])
            x = (tab["p_xc"][k] * xc + np.tensordot(tab["p_ring"][k], ring, axes=1) + tab["p_noise"][k] * NOISES[k]
                 + tab["p_x0"][k] * x0)
        jitted = _run_jax(plan, NOISE0, den)
        eager = np.asarray(sample(den.jax, jnp.asarray(NOISE0), plan, noises=jnp.asarray(NOISES[: plan.nfe])))
        np.testing.assert_allclose(jitted, x, rtol=0, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(eager, jitted, rtol=0, atol=1e-6, err_msg=name)


def test_drawn_noise_is_per_sample_and_deterministic():
    """Without noises=, DDIM eta=1 draws from the key per sample index: row 1 of a batch of 2 equals the same
    sample run alone with sample_index=[1]."""
    den = GaussianDenoiser.for_config({}, lam=0.1)
    plan = make_plan("ddim", 4, eta=1.0)
    key = jax.random.PRNGKey(3)
    x2 = jnp.asarray(np.concatenate([NOISE0, NOISE0]))
    both = np.asarray(sample(den.jax, x2, plan, key))
    one = np.asarray(sample(den.jax, jnp.asarray(NOISE0), plan, key, sample_index=jnp.array([1], jnp.int32)))
    np.testing.assert_allclose(both[1:], one, atol=1e-6)
    assert np.max(np.abs(both[0] - both[1])) > 1e-3  # different rows got different noise


def test_bad_input():
    with pytest.raises(SamplerError, match="schedule"):
        make_plan("ddim", 10, schedule="karras")
    with pytest.raises(SamplerError, match="original_inference_steps"):
        make_plan("lcm", 60)
    with pytest.raises(SamplerError, match="eta"):
        make_plan("tcd", 4, eta=1.5)
    with pytest.raises(SamplerError, match="zero_snr"):
        make_plan("deis", 10, SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    with pytest.raises(SamplerError, match="prediction_type"):
        make_plan("plms", 10, SchedulerConfig(prediction_type="sample"))
    with pytest.raises(SamplerError, match="skip_prk_steps"):
        make_plan("plms", 10, SchedulerConfig.from_dict(dict(SD_CONFIG, skip_prk_steps=False)))
    with pytest.raises(SamplerError, match="steps"):
        make_plan("uni_pc", 0)
