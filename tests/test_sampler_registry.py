"""The sampler registry: canonical names, A1111 / ComfyUI / diffusers aliases, and clear errors."""
import pytest

import jaxdiff.samplers as smp
from jaxdiff.errors import JaxdiffError, SamplerError
from jaxdiff.schedules import SchedulerConfig

KDIFFUSION = ("euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde",
              "dpmpp_2s_ancestral", "dpmpp_sde")


def test_canonical_names_listed():
    assert set(KDIFFUSION) <= set(smp.SAMPLERS)
    for name in smp.SAMPLERS:
        assert smp.resolve(name) == (name, None)


@pytest.mark.parametrize("alias, expected", [
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("DPM++ 2M", ("dpmpp_2m", None)), ("Euler a", ("euler_ancestral", None)),
    ("Euler", ("euler", None)), ("Heun", ("heun", None)), ("DPM2 a Karras", ("dpm_2_ancestral", "karras")),
    ("LMS Karras", ("lms", "karras")), ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")),
    ("DPM++ 2S a", ("dpmpp_2s_ancestral", None)), ("DPM++ SDE Exponential", ("dpmpp_sde", "exponential")),
    ("dpm++ 2m karras", ("dpmpp_2m", "karras")),  # case-insensitive
    # diffusers class names run the checkpoint's own spacing when no schedule is given
    ("EulerDiscreteScheduler", ("euler", "default")), ("KDPM2AncestralDiscreteScheduler", ("dpm_2_ancestral", "default")),
    ("DPMSolverMultistepScheduler", ("dpmpp_2m", "default")), ("LMSDiscreteScheduler", ("lms", "default")),
    # InvokeAI: "_k" is karras, plain names the checkpoint's spacing (dpmpp_2m stays ours: A1111's meaning)
    ("euler_a", ("euler_ancestral", "default")), ("dpmpp_2m_k", ("dpmpp_2m", "karras")),
    ("dpmpp_2m_sde_k", ("dpmpp_2m_sde", "karras")), ("kdpm_2_a", ("dpm_2_ancestral", "default")),
    ("unipc_k", ("uni_pc_bh2", "karras")), ("deis_k", ("deis", "karras")), ("dpmpp_2m", ("dpmpp_2m", None)),
])
def test_aliases(alias, expected):
    assert smp.resolve(alias) == expected


def test_comfy_pairs_and_schedule_spellings():
    assert smp.resolve("dpmpp_2m", "karras") == ("dpmpp_2m", "karras")
    assert smp.resolve("euler", "normal") == ("euler", "normal")
    assert smp.resolve("euler", "sgm_uniform") == ("euler", "sgm_uniform")
    assert smp.resolve("euler", "SGM Uniform") == ("euler", "sgm_uniform")  # A1111 spelling
    assert smp.resolve("euler", "Align Your Steps") == ("euler", "ays")
    assert smp.resolve("euler", "Automatic") == ("euler", None)
    assert smp.resolve("DPMSolverMultistepScheduler", options={"algorithm_type": "sde-dpmsolver++"}) == (
        "dpmpp_2m_sde", "default")
    assert smp.resolve("DPMSolverMultistepScheduler", "karras") == ("dpmpp_2m", "karras")  # a soft default only


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(SamplerError, match="valid samplers: .*dpmpp_2m") as e:
        smp.resolve("DPM++ 9M")
    assert isinstance(e.value, JaxdiffError)
    with pytest.raises(SamplerError, match="valid schedules: .*karras"):
        smp.resolve("euler", "hyperbolic")
    with pytest.raises(SamplerError, match="implies schedule"):
        smp.resolve("DPM++ 2M Karras", "exponential")


def test_bad_plans():
    cfg = SchedulerConfig()
    for steps in (0, -3, 2.5, True):
        with pytest.raises(SamplerError, match="steps"):
            smp.make_plan("euler", steps, cfg)
    for strength in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(SamplerError, match="strength"):
            smp.make_plan("euler", 20, cfg, strength=strength)
    with pytest.raises(SamplerError, match="no denoising step"):
        smp.make_plan("euler", 4, cfg, strength=0.2)  # int(4 * 0.2) = 0
    with pytest.raises(SamplerError, match="does not take option"):
        smp.make_plan("euler", 4, cfg, eta=0.5)
    with pytest.raises(SamplerError, match="unknown schedule"):
        smp.make_plan("euler", 4, cfg, schedule="hyperbolic")
    # churn (Karras et al. s_churn > 0) is euler / heun / dpm_2's (tests/test_samplers_new.py); others refuse it
    with pytest.raises(SamplerError, match="does not take option.*s_churn"):
        smp.make_plan("euler_ancestral", 4, cfg, s_churn=1.0)


def test_plan_shapes_and_nfe():
    """NFE per samplers.md: Heun / DPM2 / 2S a / SDE 2N-1, the rest N; tables are float32 [K]."""
    cfg = SchedulerConfig()
    n = 7
    expected = {"euler": n, "euler_ancestral": n, "lms": n, "dpmpp_2m": n, "dpmpp_2m_sde": n,
                "heun": 2 * n - 1, "dpm_2": 2 * n - 1, "dpm_2_ancestral": 2 * n - 1,
                "dpmpp_2s_ancestral": 2 * n - 1, "dpmpp_sde": 2 * n - 1}
    for name, nfe in expected.items():
        plan = smp.make_plan(name, n, cfg)
        assert plan.nfe == nfe, name
        assert all(v.shape[0] == nfe and v.dtype.name == "float32" for v in plan.tables.values())
    # AYS / karras / normal plans of one sampler and length share a pytree structure (one executable)
    import jax
    structs = {jax.tree_util.tree_structure(smp.make_plan("euler", 10, cfg, schedule=s)) for s in
               ("karras", "ays", "normal", None)}
    assert len(structs) == 1
