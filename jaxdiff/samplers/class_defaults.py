"""The __init__ defaults of the diffusers scheduler classes jaxdiff's samplers follow (diffusers 0.42.1).

diffusers' `SchedulerClass.from_config(config)` keeps the keys of `config` that the class takes, ignores the
others, and gives every key absent from the file the class's own default. A checkpoint's scheduler_config.json
usually lists only what its author's class wrote: SD1.5's (PNDMScheduler, 2022) has no `timestep_spacing`,
so diffusers' Euler and DPM++ 2M run it with their default "linspace", DDIM with `clip_sample=True`.
`SchedulerConfig.for_class` applies this table the same way. tests/test_sampler_defaults.py checks every
entry against `inspect.signature(cls.__init__)` of the installed diffusers.
"""
from __future__ import annotations

import math

# Shared by every class below: the training schedule keys and their (non-SD) defaults.
_LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0}
_SIGMA_KINDS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SHIFT = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
          "time_shift_type": "exponential"}
_CONSISTENCY = {**_LINEAR, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
                "set_alpha_to_one": True, **_THRESHOLD, "timestep_spacing": "leading", "timestep_scaling": 10.0,
                "rescale_betas_zero_snr": False}

DIFFUSERS_DEFAULTS: dict[str, dict] = {
    "EulerDiscreteScheduler": {**_LINEAR, "interpolation_type": "linear", **_SIGMA_KINDS, "sigma_min": None,
                               "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
                               "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {**_LINEAR, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "HeunDiscreteScheduler": {**_LINEAR, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMA_KINDS,
                              "clip_sample": False, "clip_sample_range": 1.0, "timestep_spacing": "linspace"},
    "KDPM2DiscreteScheduler": {**_LINEAR, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMA_KINDS,
                               "timestep_spacing": "linspace"},
    "KDPM2AncestralDiscreteScheduler": {**_LINEAR, "beta_start": 0.00085, "beta_end": 0.012, **_SIGMA_KINDS,
                                        "timestep_spacing": "linspace"},
    "LMSDiscreteScheduler": {**_LINEAR, **_SIGMA_KINDS, "timestep_spacing": "linspace"},
    "DPMSolverMultistepScheduler": {
        **_LINEAR, "solver_order": 2, **_THRESHOLD, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, **_SIGMA_KINDS, "use_lu_lambdas": False, **_SHIFT,
        "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "variance_type": None,
        "timestep_spacing": "linspace", "rescale_betas_zero_snr": False},
    "DDPMScheduler": {**_LINEAR, "variance_type": "fixed_small", "clip_sample": True, **_THRESHOLD,
                      "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "DDIMScheduler": {**_LINEAR, "clip_sample": True, "set_alpha_to_one": True, **_THRESHOLD,
                      "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False},
    "PNDMScheduler": {**_LINEAR, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"},
    "UniPCMultistepScheduler": {
        **_LINEAR, "solver_order": 2, **_THRESHOLD, "predict_x0": True, "solver_type": "bh2",
        "lower_order_final": True, "disable_corrector": (), "solver_p": None, **_SIGMA_KINDS, **_SHIFT,
        "timestep_spacing": "linspace", "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
        "sigma_min": None, "sigma_max": None, "shift_terminal": None},
    "DEISMultistepScheduler": {**_LINEAR, "solver_order": 2, **_THRESHOLD, "algorithm_type": "deis",
                               "solver_type": "logrho", "lower_order_final": True, **_SIGMA_KINDS, **_SHIFT,
                               "timestep_spacing": "linspace"},
    "LCMScheduler": dict(_CONSISTENCY),
    "TCDScheduler": dict(_CONSISTENCY),
}
