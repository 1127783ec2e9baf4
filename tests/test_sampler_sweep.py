"""Every sampler x every schedule either runs to a finite result or refuses with one line (SamplerError).

Every schedule at 4 steps on the stock SD config (every field given), and no schedule / "default" on SD1.5's
own scheduler file (keys missing: the class defaults apply) at 4 and 12 steps. One jitted driver per
(sampler kind, scan length) with the plan as its argument, so the ~300 runs cost ~40 compiles. What is
refused today is listed, so a pair that starts or stops working shows up here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff.samplers as smp
from jaxdiff.errors import SamplerError
from jaxdiff.schedules import SCHEDULES, SchedulerConfig
from tests.sampler_reference import SD_CONFIG, GaussianDenoiser, jax_model

SD15_FILE = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1}
TIMESTEP_ONLY = {"ddim", "ddpm", "plms", "lcm", "tcd"}  # their diffusers classes take no sigma schedule
PARAMS = GaussianDenoiser.for_config(SD_CONFIG, lam=0.1).jax_params()
_RUN = jax.jit(lambda plan, x, key, params: smp.sample(lambda a, t: jax_model(a, t, params),
                                                       smp.initial_latents(plan, x), plan, key))


def _runs(name, cfg, schedule, steps, bound=50.0):
    """None if it ran finite (and below `bound`); the refusal message otherwise."""
    try:
        plan = smp.make_plan(name, steps, cfg, schedule=schedule)
    except SamplerError as e:
        assert str(e) and "\n" not in str(e), (name, schedule)
        return str(e)
    for col, table in plan.tables.items():
        assert np.isfinite(np.asarray(table)).all(), (name, schedule, col)
    x = _RUN(plan.replace(prediction_type="-"), jnp.ones((1, 2, 2, 4)) * 0.7, jax.random.PRNGKey(0), PARAMS)
    assert np.isfinite(np.asarray(x)).all() and float(jnp.abs(x).max()) < bound, (name, schedule, steps)
    return None


@pytest.mark.parametrize("name", smp.SAMPLERS)
def test_every_schedule_runs_or_refuses(name):
    steps = 4
    refused = {s for s in (None,) + SCHEDULES if _runs(name, SchedulerConfig(), s, steps) is not None}
    expected = {s for s in SCHEDULES if s != "default"} if name in TIMESTEP_ONLY else set()
    assert refused == expected, (name, sorted(map(str, refused ^ expected)))
    # zero-SNR with epsilon prediction: the timestep samplers refuse in one line (x0 undefined at
    # alphas_cumprod = 0), the sigma samplers clamp it as diffusers' Euler / DPM-Solver do
    zero_snr = SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    message = _runs(name, zero_snr, None, steps, bound=np.inf)  # the sweep's denoiser is not zero-SNR: finite only
    if name in ("ddim", "ddpm", "lcm", "tcd"):
        assert "zero-SNR" in message, (name, message)
    assert message is None or name in ("ddim", "ddpm", "lcm", "tcd", "plms", "deis"), (name, message)
    file_cfg = SchedulerConfig.from_dict(SD15_FILE)
    for steps in (4, 12):
        if name in ("lcm", "tcd") and steps > 4:
            continue
        for schedule in (None, "default"):
            assert _runs(name, file_cfg, schedule, steps) is None, (name, schedule, steps)
