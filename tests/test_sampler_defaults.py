"""Defaults as users meet them: a checkpoint's scheduler config with keys missing, no schedule given, and the
DPM-Solver final-sigma settings that used to crash.

* Every diffusers class default jaxdiff relies on equals the installed diffusers' `__init__` default.
* On SD1.5's own scheduler_config.json (PNDMScheduler, no `timestep_spacing`, `prediction_type` or
  `clip_sample`), each sampler matches diffusers' `SchedulerClass.from_config(that file)`: timesteps exactly,
  the final latents at 1e-5 on the analytic denoiser with shared noise (tests/sampler_reference.py). DDIM and
  DDPM then clip x0 (their class default), checked with a denoiser strong enough for the clip to act.
* No schedule: the timestep samplers run their own spacing, also when the file asks for karras sigmas (their
  diffusers classes have no such key); an explicit incompatible pair is one line that names what works.
* DPM++ 2M / 2M SDE with final_sigmas_type="sigma_min" under karras / exponential / beta match diffusers (the
  zero-length last step is the identity there) and run finite under every other schedule.
* Align Your Steps follows the model family; ComfyUI's 10-digit tables are selectable.
Runs eagerly (jax.disable_jit): a handful of short runs per sampler is cheaper than compiling each.
"""
from __future__ import annotations

import inspect

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff.samplers as smp
from jaxdiff.errors import SamplerError
from jaxdiff.samplers.class_defaults import DIFFUSERS_DEFAULTS
from jaxdiff.schedules import AYS_SIGMAS, SchedulerConfig
from tests.sampler_reference import GaussianDenoiser, make_noise, run_diffusers

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]
SHAPE = (1, 4, 4, 4)
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json as diffusers' docs print it, less clip_sample
# (older copies lack it): no timestep_spacing, no prediction_type.
SD15_FILE = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "trained_betas": None}
D = diffusers
CASES = [  # (sampler name, diffusers class, extra file keys, step kwargs / options, output)
    ("EulerDiscreteScheduler", D.EulerDiscreteScheduler, {}, {}, "prev_sample"),
    ("EulerAncestralDiscreteScheduler", D.EulerAncestralDiscreteScheduler, {}, {}, "prev_sample"),
    ("HeunDiscreteScheduler", D.HeunDiscreteScheduler, {}, {}, "prev_sample"),
    ("KDPM2DiscreteScheduler", D.KDPM2DiscreteScheduler, {}, {}, "prev_sample"),
    ("KDPM2AncestralDiscreteScheduler", D.KDPM2AncestralDiscreteScheduler, {}, {}, "prev_sample"),
    ("LMSDiscreteScheduler", D.LMSDiscreteScheduler, {}, {}, "prev_sample"),
    ("DPMSolverMultistepScheduler", D.DPMSolverMultistepScheduler, {}, {}, "prev_sample"),
    ("DPMSolverMultistepScheduler", D.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, {},
     "prev_sample"),
    ("DDPMScheduler", D.DDPMScheduler, {}, {}, "prev_sample"),
    ("DDIMScheduler", D.DDIMScheduler, {}, {}, "prev_sample"),
    ("PNDMScheduler", D.PNDMScheduler, {}, {}, "prev_sample"),
    ("UniPCMultistepScheduler", D.UniPCMultistepScheduler, {}, {}, "prev_sample"),
    ("DEISMultistepScheduler", D.DEISMultistepScheduler, {}, {}, "prev_sample"),
    ("LCMScheduler", D.LCMScheduler, {}, {}, "denoised"),
    ("TCDScheduler", D.TCDScheduler, {}, {}, "prev_sample"),
]
TOL = {"KDPM2AncestralDiscreteScheduler": 2e-5}  # diffusers' float32 sigma_down (test_samplers_kdiffusion.py)


def _run_jax(plan, x_T, noises, den):
    with jax.disable_jit():
        return np.asarray(smp.sample(den.jax, jnp.asarray(x_T), plan, noises=jnp.asarray(noises[: plan.nfe])))


def _compare(name, cls, file, kwargs, output, steps, *, lam=0.1, schedule=None, tol=None, t_atol=2e-3):
    """max |jaxdiff - diffusers from_config(file)| after asserting the timesteps agree (to t_atol; where that is
    1, the run uses diffusers' timesteps so the rest of the step is still compared at 1e-5)."""
    cfg = SchedulerConfig.from_dict(file)
    plan = smp.make_plan(name, steps, cfg, schedule=schedule, **kwargs)
    noise0, noises = make_noise(SHAPE, max(plan.nfe, 1), seed=steps)
    den = GaussianDenoiser.for_config({k: v for k, v in file.items() if not k.startswith("_")}, lam=lam)
    ref = run_diffusers(cls, steps, noise0, noises, denoiser=den, config=file, base={}, output=output,
                        step_kwargs=kwargs)
    assert plan.nfe == ref.nfe, name
    np.testing.assert_allclose(np.asarray(plan.tables["t"]), ref.timesteps.astype(np.float32), rtol=0, atol=t_atol,
                               err_msg=name)
    if t_atol >= 1:
        plan = plan.replace(tables={**plan.tables, "t": jnp.asarray(ref.timesteps, jnp.float32)})
    np.testing.assert_allclose(float(plan.init_noise_sigma), ref.init_noise_sigma, rtol=2e-6)
    x = _run_jax(plan, noise0 * float(plan.init_noise_sigma), noises, den)
    err = float(np.abs(x - ref.x).max())
    assert np.isfinite(ref.x).all()
    assert err <= (tol or TOL.get(name, 1e-5)), (name, file, steps, err)
    return x, ref


def test_class_defaults_are_diffusers():
    for name, defaults in DIFFUSERS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, name).__init__).parameters
        theirs = {k: p.default for k, p in params.items() if k != "self"}
        assert set(defaults) == set(theirs), (name, set(defaults) ^ set(theirs))
        for key, value in defaults.items():
            want = tuple(theirs[key]) if isinstance(theirs[key], list) else theirs[key]
            assert value == want, (name, key, value, want)


@pytest.mark.parametrize("case", CASES, ids=[c[0] + ("_sde" if c[2] else "") for c in CASES])
def test_missing_keys_take_the_class_defaults(case):
    """SD1.5's own file: Euler & co. and DPM-Solver / UniPC / DEIS run "linspace" (their default, 999 first),
    DDIM / DDPM clip x0 to [-1, 1], PNDM keeps the file's skip_prk_steps."""
    name, cls, extra, kwargs, output = case
    file = {**SD15_FILE, **extra}
    steps = 4 if cls in (D.LCMScheduler, D.TCDScheduler) else 10
    _compare(name, cls, file, kwargs, output, steps)
    if cls in (D.EulerDiscreteScheduler, D.DPMSolverMultistepScheduler, D.UniPCMultistepScheduler):
        assert float(smp.make_plan(name, steps, SchedulerConfig.from_dict(file)).tables["t"][0]) == 999.0
    if cls is D.EulerDiscreteScheduler:  # the canonical name runs the checkpoint's config too
        a = smp.make_plan("euler", steps, SchedulerConfig.from_dict(file)).tables["t"]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(smp.make_plan(name, steps, SchedulerConfig.from_dict(
            file)).tables["t"]))


@pytest.mark.parametrize("name,cls", [("DDIMScheduler", D.DDIMScheduler), ("DDPMScheduler", D.DDPMScheduler)])
def test_clip_sample_default_acts(name, cls):
    """lam = 0.8 pushes the x0 prediction past 1 at high noise: the clipped run matches diffusers' (whose class
    default is clip_sample=True) and differs from the file with clip_sample false."""
    x, _ = _compare(name, cls, SD15_FILE, {}, "prev_sample", 10, lam=0.8)
    plain, _ = _compare(name, cls, {**SD15_FILE, "clip_sample": False}, {}, "prev_sample", 10, lam=0.8)
    assert float(np.abs(x - plain).max()) > 1e-2
    _compare(name, cls, {**SD15_FILE, "clip_sample_range": 1.5}, {}, "prev_sample", 10, lam=0.8)


def test_timestep_samplers_without_schedule():
    """schedule=None runs each timestep sampler's own spacing, also on a file that asks for karras sigmas (the
    key belongs to Euler / DPM-Solver classes, diffusers' DDIM ignores it); an explicit pair that cannot run
    is one line naming what does."""
    cfg = SchedulerConfig.from_dict({**SD15_FILE, "use_karras_sigmas": True, "timestep_spacing": "leading"})
    for name, steps in (("ddim", 10), ("plms", 10), ("ddpm", 10), ("lcm", 4), ("tcd", 4)):
        for schedule in (None, "automatic", "default", "Automatic"):
            assert smp.make_plan(name, steps, cfg, schedule=schedule).nfe >= steps
        with pytest.raises(SamplerError) as e:
            smp.make_plan(name, steps, cfg, schedule="karras")
        assert "\n" not in str(e.value) and "euler" in str(e.value) and name in str(e.value)
    assert float(smp.make_plan("ddim", 10, cfg).tables["t"][0]) == 901.0  # leading, no karras
    # the k-samplers keep the file's karras; without it dpmpp_2m takes A1111's "Automatic" (karras) and
    # euler the checkpoint's spacing
    plain = SchedulerConfig.from_dict(SD15_FILE)
    karras = smp.build_tables("dpmpp_2m", 10, plain, schedule="karras")[1].tables["t"]
    np.testing.assert_array_equal(smp.build_tables("dpmpp_2m", 10, plain)[1].tables["t"], karras)
    np.testing.assert_array_equal(smp.build_tables("euler", 10, cfg)[1].tables["t"],
                                  smp.build_tables("euler", 10, cfg, schedule="karras")[1].tables["t"])
    assert smp.build_tables("euler", 10, plain)[1].tables["t"][1] == pytest.approx(888.0)  # linspace, no karras
    expo = smp.build_tables("dpmpp_2m_sde", 10, plain, schedule="exponential")[1].tables["t"]
    np.testing.assert_array_equal(smp.build_tables("dpmpp_2m_sde", 10, plain)[1].tables["t"], expo)


@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_final_sigma_min(sde):
    """final_sigmas_type="sigma_min" with karras / exponential / beta used to divide by the zero-length last
    step; diffusers runs it (the step is the identity). N = 20 makes the last step second order there."""
    extra = {"final_sigmas_type": "sigma_min", "timestep_spacing": "leading"}
    if sde:
        extra["algorithm_type"] = "sde-dpmsolver++"
    for kind in ("karras", "exponential", "beta"):
        for steps in (4, 20):
            # exponential / beta: diffusers truncates a float32-rounded t = 998.99999975 to 998 where ours is
            # exactly 999 (schedules.sigma_table): timesteps within 1, the solver compared on diffusers' t
            _compare("DPMSolverMultistepScheduler", D.DPMSolverMultistepScheduler,
                     {**SD15_FILE, **extra, f"use_{kind}_sigmas": True}, {}, "prev_sample", steps,
                     t_atol=2e-3 if kind == "karras" else 1.0)
    cfg = SchedulerConfig.from_dict({**SD15_FILE, **extra})
    den = GaussianDenoiser.for_config({k: v for k, v in SD15_FILE.items() if not k.startswith("_")})
    for schedule in ("normal", "simple", "sgm_uniform", "ddim_uniform", "beta_comfy", "ays", "default"):
        plan = smp.make_plan("dpmpp_2m_sde" if sde else "dpmpp_2m", 6, cfg, schedule=schedule)
        noise0, noises = make_noise(SHAPE, plan.nfe, seed=1)
        assert np.isfinite(_run_jax(plan, noise0, noises, den)).all(), schedule


def _sigmas(plan_tables):
    """VE sigma of each Euler evaluation from its c_in = 1 / sqrt(sigma^2 + 1)."""
    c = np.asarray(plan_tables["c_in"], np.float64)
    return np.sqrt(1.0 / c ** 2 - 1.0)


def test_ays_follows_the_model_family():
    cfg = SchedulerConfig()
    for family, table in (("sd1", "SD1"), ("sd2", "SD1"), ("sdxl", "SDXL"), ("SDXL", "SDXL")):
        for schedule, prefix in (("ays", ""), ("Align Your Steps", ""), ("ays_comfy", "COMFY_")):
            tab = smp.build_tables("euler", 10, cfg, schedule=schedule, model_family=family)[1].tables
            np.testing.assert_allclose(_sigmas(tab), AYS_SIGMAS[prefix + table][:10], rtol=1e-9)
    default = smp.build_tables("euler", 10, cfg, schedule="ays")[1].tables  # sd1 when no family is given
    np.testing.assert_allclose(_sigmas(default), AYS_SIGMAS["SD1"][:10], rtol=1e-9)
    sdxl = smp.build_tables("euler", 10, cfg, schedule="ays", model_family="sdxl")[1].tables
    assert float(np.abs(_sigmas(sdxl) - _sigmas(default)).max()) > 0.1
    with pytest.raises(SamplerError, match="model_family"):
        smp.make_plan("euler", 10, cfg, schedule="ays", model_family="sd3")


def test_refused_options_only_where_the_class_takes_them():
    """thresholding / use_lu_lambdas are refused in one line by the samplers whose diffusers class reads them;
    Euler's class has no such key, so diffusers (and jaxdiff) ignore it there. clip_sample: Heun refuses."""
    for key, refusing, ignoring in (("thresholding", ("ddim", "dpmpp_2m", "uni_pc_bh2"), ("euler", "heun")),
                                    ("use_lu_lambdas", ("dpmpp_2m", "dpmpp_2m_sde"), ("euler", "uni_pc_bh2"))):
        cfg = SchedulerConfig.from_dict({**SD15_FILE, key: True})
        for name in refusing:
            with pytest.raises(SamplerError, match=key) as e:
                smp.make_plan(name, 5, cfg)
            assert "\n" not in str(e.value)
        for name in ignoring:
            assert smp.make_plan(name, 5, cfg).nfe >= 5
    with pytest.raises(SamplerError, match="clip_sample"):
        smp.make_plan("heun", 5, SchedulerConfig.from_dict({**SD15_FILE, "clip_sample": True}))
    with pytest.raises(SamplerError, match="solver_order=3"):
        smp.make_plan("dpmpp_2m", 5, SchedulerConfig.from_dict({**SD15_FILE, "solver_order": 3}))
    with pytest.raises(SamplerError, match="skip_prk_steps"):  # PNDM's class default is PRK warm-up
        smp.make_plan("plms", 5, SchedulerConfig.from_dict({k: v for k, v in SD15_FILE.items()
                                                            if k != "skip_prk_steps"}))


def test_refused_names_and_table():
    for name, what in (("DPMSolverSinglestepScheduler", "Singlestep"), ("dpmpp_3m_k", "solver_order=3"),
                       ("EDMEulerScheduler", "EDM"), ("SASolverScheduler", "SA-Solver")):
        with pytest.raises(SamplerError, match=what) as e:
            smp.resolve(name)
        assert "\n" not in str(e.value)
    text = smp.sampler_table()
    for needle in ("dpmpp_2m", "euler_a", "dpmpp_2m_k", "DPM++ 2M", "EulerDiscreteScheduler", "karras",
                   "exponential", "solver_order", "ays_comfy"):
        assert needle in text, needle
    assert len(text.splitlines()) >= len(smp.SAMPLERS) + 1
