"""jaxdiff.schedules against diffusers' set_timesteps, class by class (host tables only, no JAX).

Tolerances: timesteps that are integers (spacings, rounded karras) must match exactly. Sigmas: rtol 2e-6
plus atol 5e-7, because diffusers computes 1 - alphas_cumprod in float32 where alphas_cumprod ~ 1: at
sigma_min = 0.029 that cancellation alone is 4e-7 absolute (1.3e-5 relative); float64 is the truth here.
Fractional timesteps (sigma -> t for karras / exponential / beta / AYS) come from diffusers' float32 log
sigmas; they agree within 2e-3 in t units (the UNet input changes by < 1e-5 relative, see the parity tests).
"""
import copy

import diffusers
import numpy as np
import pytest
import torch

from jaxdiff import schedules as S
from jaxdiff.errors import ConfigError, SamplerError
from tests.sampler_reference import SD_CONFIG
from tests.sampler_reference import make_scheduler as _make_scheduler

# diffusers' _sigma_to_t calls np.array on torch tensors: a numpy-2 DeprecationWarning per sigma (~170k per
# run); pytest records each one, which costs seconds.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]
STEPS = (1, 2, 3, 4, 10, 14, 15, 20, 50)
SPACINGS = ("leading", "trailing", "linspace")
MAIN = ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler")
# diffusers class -> our family (how it builds timesteps) and the schedules it supports
CLASSES = {
    "EulerDiscreteScheduler": ("euler", ("default", "karras", "exponential", "beta")),
    "EulerAncestralDiscreteScheduler": ("euler", ("default",)),
    "HeunDiscreteScheduler": ("euler", ("default", "karras", "exponential", "beta")),
    "LMSDiscreteScheduler": ("euler", ("default", "karras", "exponential", "beta")),
    "KDPM2DiscreteScheduler": ("kdpm2", ("default", "karras", "exponential", "beta")),
    "DPMSolverMultistepScheduler": ("dpm", ("default", "karras", "exponential", "beta")),
}


_KDPM2_BY_TRAINING = {}


def make_scheduler(cls, over=None):
    """The harness's make_scheduler, but KDPM2 (whose __init__ runs a 0.7 s-CPU set_timesteps(1000) and
    reads nothing but the training keys) is built once per training schedule and re-configured."""
    if cls is not diffusers.KDPM2DiscreteScheduler:
        return _make_scheduler(cls, over)
    cfg = {**SD_CONFIG, **(over or {})}
    training = {k: cfg[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    key = tuple(training.values())
    if key not in _KDPM2_BY_TRAINING:
        _KDPM2_BY_TRAINING[key] = _make_scheduler(cls, training)
    sch = copy.deepcopy(_KDPM2_BY_TRAINING[key])
    sch.register_to_config(**{k: v for k, v in cfg.items() if k in sch.config})
    return sch


def _cfg(**over):
    return S.SchedulerConfig.from_dict({**SD_CONFIG, **over})


def _check_sigmas(ours, theirs, derived=False, rtol=2e-6):
    """rtol 2e-6, plus the float32 cancellation in diffusers' 1 - alphas_cumprod: one float32 ulp at 1
    (6e-8) there moves sigma by 6e-8 / (2 sigma), i.e. 1e-6 at sigma = 0.03. Derived tables (karras /
    exponential / beta) interpolate from that sigma_min, so inner points inherit up to 1.3e-5 relative."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    tol = (2e-5 if derived else rtol) * np.abs(theirs) + 6e-8 / np.maximum(theirs, 1e-3)
    bad = np.abs(ours - theirs) > tol
    assert not bad.any(), f"sigmas differ at {np.nonzero(bad)[0]}: {ours[bad]} vs {theirs[bad]}"


def _check_timesteps(ours, theirs, integer):
    if integer:
        np.testing.assert_array_equal(ours.astype(np.float32), np.asarray(theirs, np.float32))
    else:
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-3)


def _base_table(sch_cls_name, sch):
    """Undo the Heun / KDPM2 interleaving: the per-step timesteps and sigmas."""
    t, s = sch.timesteps.numpy().astype(np.float64), sch.sigmas.numpy().astype(np.float64)
    if sch_cls_name == "HeunDiscreteScheduler":
        return np.concatenate([t[:1], t[1::2]]), np.concatenate([s[:1], s[1:-1:2], s[-1:]])
    if sch_cls_name == "KDPM2DiscreteScheduler":
        return np.concatenate([t[:1], t[2::2]]), np.concatenate([s[:1], s[1:-3:2], s[-1:]])
    return t, s


@pytest.mark.parametrize("cls_name", list(CLASSES))
@pytest.mark.parametrize("spacing", SPACINGS)
def test_tables_match_diffusers(cls_name, spacing):
    family, schedules = CLASSES[cls_name]
    cls = getattr(diffusers, cls_name)
    for schedule in schedules:
        over = {"timestep_spacing": spacing}
        if schedule != "default":
            over[f"use_{schedule}_sigmas"] = True
        cfg = _cfg(**over)
        sch = make_scheduler(cls, over)  # set_timesteps resets all state; one instance per config is enough
        # the full step sweep on the two most used classes; the rest on a subset (test time)
        for steps in STEPS if cls_name in MAIN else (1, 3, 15, 50):
            sch.set_timesteps(steps)
            tab = S.sigma_table(cfg, steps, S.resolve_schedule(cfg, None), family=family)
            t, s = _base_table(cls_name, sch)
            # exact: spaced tables (linspace ones are float32 in both) and rounded ones
            exact = schedule == "default" or family == "dpm" or (family == "kdpm2" and schedule == "karras")
            if family == "dpm" and schedule in ("exponential", "beta"):
                # DPMSolverMultistep truncates these fractional t (int64 cast); at t = 999 its float32
                # log sigmas give 998.99998 -> 998 where float64 gives 999. Off by at most one, only there.
                np.testing.assert_allclose(tab.timesteps, t, rtol=0, atol=1)
                assert np.sum(tab.timesteps != t) <= 1
            else:
                _check_timesteps(tab.timesteps, t, exact)
            _check_sigmas(tab.sigmas, s, derived=schedule != "default")
            _check_sigmas([tab.init_noise_sigma], [float(sch.init_noise_sigma)])


@pytest.mark.parametrize("cls_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_zero_snr_and_schedules(cls_name, prediction_type):
    """Zero-SNR (trailing, as it requires) and the three beta schedules, against diffusers."""
    family = CLASSES[cls_name][0]
    cls = getattr(diffusers, cls_name)
    for over in ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
                 {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
                 {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}):
        over = dict(over, prediction_type=prediction_type)
        sch = make_scheduler(cls, over)
        for steps in (1, 4, 15, 50):
            sch.set_timesteps(steps)
            tab = S.sigma_table(_cfg(**over), steps, "default", family=family)
            _check_timesteps(tab.timesteps, sch.timesteps.numpy(), True)
            # squaredcos_cap_v2 ends at alphas_cumprod = 2.4e-9 after 1000 float32 products in diffusers:
            # its sigma_max (20291) carries ~7e-6 relative error there.
            rtol = 1e-5 if over.get("beta_schedule") == "squaredcos_cap_v2" else 2e-6
            _check_sigmas(tab.sigmas, sch.sigmas.numpy().astype(np.float64), rtol=rtol)
            _check_sigmas([tab.init_noise_sigma], [float(sch.init_noise_sigma)], rtol=rtol)


def test_alphas_cumprod_and_zero_snr():
    for over in ({}, {"beta_schedule": "linear"}, {"beta_schedule": "squaredcos_cap_v2"},
                 {"rescale_betas_zero_snr": True}):
        ref = make_scheduler(diffusers.DDIMScheduler, over).alphas_cumprod.numpy()
        ours = S.alphas_cumprod(_cfg(**over))
        np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=1e-7)
    ab = S.alphas_cumprod(_cfg(rescale_betas_zero_snr=True))
    assert ab[-1] == 0.0 and S.train_sigmas(_cfg(rescale_betas_zero_snr=True))[-1] == pytest.approx(4096, rel=1e-6)


def test_spacings_and_steps_offset():
    """The documented quirks: leading never reaches 999 and strides T//N (T//(N+1) for DPM); offset."""
    cfg = _cfg()
    np.testing.assert_array_equal(S.spaced_timesteps(cfg, 20)[:3], [951, 901, 851])
    np.testing.assert_array_equal(S.spaced_timesteps(cfg, 10, family="dpm")[:3], [901, 811, 721])
    np.testing.assert_array_equal(S.spaced_timesteps(_cfg(steps_offset=0), 20)[:2], [950, 900])
    assert S.spaced_timesteps(_cfg(timestep_spacing="trailing"), 20)[0] == 999
    for steps in (1, 7, 50):  # DDIM's own leading table is the same as the k family's
        sch = make_scheduler(diffusers.DDIMScheduler)
        sch.set_timesteps(steps)
        np.testing.assert_array_equal(S.spaced_timesteps(cfg, steps), sch.timesteps.numpy())


def test_ays_tables():
    """Align Your Steps: the 10-step tables are diffusers' AysSchedules; other counts interpolate in log
    sigma (ComfyUI) and keep the endpoints."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    for model, key in (("SD1", "StableDiffusionSigmas"), ("SDXL", "StableDiffusionXLSigmas")):
        np.testing.assert_allclose(S.ays_sigmas(model, 10), AysSchedules[key], rtol=1e-12)
        for steps in (4, 20, 32):
            sig = S.ays_sigmas(model, steps)
            assert len(sig) == steps + 1 and sig[-1] == 0.0 and sig[0] == pytest.approx(14.615)
            assert np.all(np.diff(sig) < 0)
            # log-linear: at 20 steps every other interpolated point is a table entry
            if steps == 20:
                np.testing.assert_allclose(sig[:-1:2], S.AYS_SIGMAS[model][:-1], rtol=1e-12)
    # diffusers' Euler with sigmas=AYS gives the same timesteps as ours
    sch = make_scheduler(diffusers.EulerDiscreteScheduler)
    sch.set_timesteps(sigmas=AysSchedules["StableDiffusionSigmas"])
    tab = S.sigma_table(_cfg(), 10, "ays", family="euler")
    _check_timesteps(tab.timesteps, sch.timesteps.numpy(), False)
    _check_sigmas(tab.sigmas, sch.sigmas.numpy().astype(np.float64))


def test_comfy_schedules():
    """ComfyUI's normal / simple / sgm_uniform / ddim_uniform (comfy/samplers.py), by their definitions."""
    cfg = _cfg()
    sig = S.train_sigmas(cfg)
    simple = S.comfy_sigmas(cfg, 4, "simple")
    np.testing.assert_allclose(simple, [sig[999], sig[749], sig[499], sig[249], 0.0])
    normal = S.comfy_sigmas(cfg, 3, "normal")  # linspace(999, 0, 3) in t, sigma interpolated in log
    np.testing.assert_allclose(normal[[0, 2, 3]], [sig[999], sig[0], 0.0])
    assert normal[1] == pytest.approx(np.exp(0.5 * (np.log(sig[499]) + np.log(sig[500]))))
    sgm = S.comfy_sigmas(cfg, 4, "sgm_uniform")  # linspace(999, 0, 5)[:-1]
    assert len(sgm) == 5 and sgm[0] == pytest.approx(sig[999]) and sgm[-1] == 0.0
    ddim = S.comfy_sigmas(cfg, 7, "ddim_uniform")  # stride 142 from t=1: 8 sigmas > steps, plus 0
    np.testing.assert_allclose(ddim[:-1], sig[1::142][::-1])
    assert len(ddim) == 9
    import scipy.stats
    for steps, n_kept in ((10, 10), (200, 199)):  # ComfyUI beta_scheduler, transcribed loop
        sigs, last_t = [], -1
        for t in np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999):
            if t != last_t:
                sigs.append(sig[int(t)])
            last_t = t
        beta = S.comfy_sigmas(cfg, steps, "beta_comfy")
        np.testing.assert_allclose(beta, sigs + [0.0], rtol=1e-12)
        assert len(beta) == n_kept + 1  # 200 steps: one repeated timestep dropped
    import jaxdiff.samplers as smp  # the scan length follows the table: 199 evaluations for 200 steps
    assert smp.make_plan("euler", 200, cfg, schedule="beta_comfy").nfe == 199
    assert smp.make_plan("heun", 200, cfg, schedule="beta_comfy").nfe == 2 * 199 - 1


def test_config_parsing():
    cfg = S.SchedulerConfig.from_dict({**SD_CONFIG, "_class_name": "DPMSolverMultistepScheduler",
                                       "use_karras_sigmas": True, "solver_order": 2, "thresholding": False})
    assert cfg.class_name == "DPMSolverMultistepScheduler" and cfg.default("solver_order") == 2
    assert S.resolve_schedule(cfg, None) == "karras"
    assert S.resolve_schedule(_cfg(), None) == "default"
    # clip_sample is parsed (DDIM / DDPM / LCM / TCD implement it, Heun refuses it: tests/test_sampler_defaults.py)
    assert S.SchedulerConfig.from_dict({**SD_CONFIG, "clip_sample": True}).default("clip_sample") is True
    for bad in ({"trained_betas": [0.1] * 1000}, {"lambda_min_clipped": -5.1},
                {"timestep_type": "continuous"}, {"interpolation_type": "log_linear"}, {"made_up_key": 1}):
        with pytest.raises(ConfigError):
            S.SchedulerConfig.from_dict({**SD_CONFIG, **bad})
    with pytest.raises(ConfigError):
        S.SchedulerConfig.from_dict({**SD_CONFIG, "beta_schedule": "sigmoid"})
    with pytest.raises(SamplerError, match="valid schedules"):
        S.resolve_schedule(cfg, "nonsense")
    with pytest.raises(SamplerError, match="steps"):
        S.sigma_table(cfg, 0, "karras", family="euler")
    # torch is only the reference: the library module must not import it
    assert "torch" not in S.__dict__ and torch is not None


def test_kl_optimal_linear_quadratic_polyexponential():
    """Against torch transcriptions of ComfyUI's kl_optimal_scheduler / linear_quadratic_schedule (comfy/samplers.py)
    and k-diffusion's get_sigmas_polyexponential (A1111's Polyexponential, rho 1), in float64 over the model's
    sigma extremes."""
    import math as m

    cfg = _cfg()
    sig = S.train_sigmas(cfg)
    lo, hi = float(sig[0]), float(sig[-1])
    for n in (2, 5, 10, 25):
        idx = torch.arange(n, dtype=torch.float64).div_(n - 1)
        kl = torch.zeros(n + 1, dtype=torch.float64)
        kl[:-1] = (idx * m.atan(lo) + (1 - idx) * m.atan(hi)).tan_()
        np.testing.assert_allclose(S.comfy_sigmas(cfg, n, "kl_optimal"), kl.numpy(), rtol=1e-12)
        ls = n // 2
        lin = [i * 0.025 / ls for i in range(ls)]
        tnsd = ls - 0.025 * n
        qs = n - ls
        qc, lc = tnsd / (ls * qs ** 2), 0.025 / ls - 2 * tnsd / qs ** 2
        quad = [qc * i ** 2 + lc * i + qc * ls ** 2 for i in range(ls, n)]
        lq = torch.tensor([1.0 - v for v in lin + quad + [1.0]], dtype=torch.float64) * hi
        np.testing.assert_allclose(S.comfy_sigmas(cfg, n, "linear_quadratic"), lq.numpy(), rtol=1e-12, atol=1e-12)
        ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** 1.0
        poly = torch.exp(ramp * (m.log(hi) - m.log(lo)) + m.log(lo))
        np.testing.assert_allclose(S.comfy_sigmas(cfg, n, "polyexponential"), np.append(poly.numpy(), 0.0),
                                   rtol=1e-12)
    import jaxdiff.samplers as smp
    assert smp.resolve("euler", "KL Optimal") == ("euler", "kl_optimal")
    assert smp.resolve("euler", "Polyexponential") == ("euler", "polyexponential")
    tab = smp.build_tables("euler", 10, cfg, schedule="kl_optimal")[1].tables
    np.testing.assert_allclose(np.sqrt(1 / tab["c_in"] ** 2 - 1), S.comfy_sigmas(cfg, 10, "kl_optimal")[:-1],
                               rtol=1e-9)


def test_laplace_and_vp():
    """Against torch transcriptions of k-diffusion's get_sigmas_laplace / get_sigmas_vp as ComfyUI's LaplaceScheduler
    (no trailing 0: steps - 1 sampler steps ending at sigma_min) and VPScheduler (+ 0) nodes use them."""
    import jaxdiff.samplers as smp

    cfg = _cfg()
    sig = S.train_sigmas(cfg)
    lo, hi = float(sig[0]), float(sig[-1])
    for n in (2, 5, 20):
        x = torch.linspace(0, 1, n, dtype=torch.float64)
        lmb = 0.0 - 0.5 * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
        np.testing.assert_allclose(S.comfy_sigmas(cfg, n, "laplace"), torch.clamp(torch.exp(lmb), lo, hi).numpy(),
                                   rtol=1e-12)
        t = torch.linspace(1, 1e-3, n, dtype=torch.float64)
        vp = torch.sqrt(torch.special.expm1(19.9 * t ** 2 / 2 + 0.1 * t))
        np.testing.assert_allclose(S.comfy_sigmas(cfg, n, "vp"), np.append(vp.numpy(), 0.0), rtol=1e-12)
    plan = smp.build_tables("euler", 6, cfg, schedule="laplace")[1]
    assert len(plan.tables["t"]) == 5  # ComfyUI's node: 6 sigmas, 5 steps
    table = S.sigma_table(cfg, 6, "laplace", family="euler").sigmas
    assert len(table) == 6 and table[-1] == pytest.approx(lo, rel=1e-12)  # the last step ends at sigma_min, not 0
    with pytest.raises(SamplerError, match="laplace"):
        smp.make_plan("euler", 1, cfg, schedule="laplace")
