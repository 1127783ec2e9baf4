"""The seams the feature work builds on: ModelFamily decided once at load, params as arguments
(`pipe.params`, `pipe(..., params=)`, `pipe.with_params`) without recompiling, and the typed request."""
import jax
import numpy as np
import pytest

from jaxdiff import sharding
from jaxdiff.errors import JaxdiffError
from jaxdiff.family import family_of

H = W = 16
KW = dict(height=H, width=W, steps=2, sampler="euler", schedule=None, guidance_scale=5.0, seed=3)


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh(jax.devices()[:1])


@pytest.mark.parametrize("name, label, time_ids, encoders", [
    ("sd1", "sd1", 0, ("text_encoder",)),
    ("sd1_inpaint", "sd1-inpaint", 0, ("text_encoder",)),
    ("sd2", "sd2-v", 0, ("text_encoder",)),  # the tiny SD2 is a 768-v style model (DDIM, v_prediction)
    ("sdxl", "sdxl", 6, ("text_encoder", "text_encoder_2")),
    ("sdxl_refiner", "refiner", 5, ("text_encoder_2",)),
])
def test_family_detected_at_load(tiny_pipeline, name, label, time_ids, encoders):
    ref, pipe, _ = tiny_pipeline(name)
    fam = pipe.family
    assert (fam.label, fam.time_ids, fam.encoders) == (label, time_ids, encoders)
    assert fam.latent_channels == ref.vae.config.latent_channels
    assert fam.unet_in_channels == ref.unet.config.in_channels
    assert fam.default_size == (ref.unet.config.sample_size * ref.vae_scale_factor,) * 2
    # diffusers' own view of the refiner / base split and the SDXL zero-negative default agree
    assert fam.is_refiner == bool(getattr(ref.config, "requires_aesthetics_score", False))
    assert fam.zero_negative_default == bool(getattr(ref.config, "force_zeros_for_empty_prompt", False))


def test_sd2_v_from_the_scheduler_config(tiny_pipeline):
    _, pipe, _ = tiny_pipeline("sd2")
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    assert pipe.family.default_scheduler_config()["prediction_type"] == "v_prediction"
    eps = family_of(pipe.components(), {**pipe.scheduler_config, "prediction_type": "epsilon"})
    assert eps.name == "sd2" and family_of(pipe.components(), None).name == "sd2"


def _perturbed(tree, scale=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: (np.asarray(a) + scale * rng.standard_normal(a.shape)).astype(np.asarray(a).dtype), tree)


def _count_compiles():
    seen = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: seen.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    return seen


def test_with_params_compiles_nothing_and_changes_only_the_weights(tiny_pipeline, mesh1):
    _, pipe, _ = tiny_pipeline("sd1")
    base = pipe(["a cat"], mesh=mesh1, **KW)
    new_unet = _perturbed(pipe.params["unet"])
    compiles = _count_compiles()
    swapped = pipe.with_params({"unet": new_unet})
    out = swapped(["a cat"], mesh=mesh1, **KW)
    through_arg = pipe(["a cat"], mesh=mesh1, params={"unet": new_unet}, **KW)
    again = pipe(["a cat"], mesh=mesh1, **KW)
    n_compiles = len(compiles)
    compiles.append("stop")  # the listener stays registered; later compiles are not this test's
    assert n_compiles == 0
    assert swapped.params["unet"] is new_unet and swapped.params["vae"] is pipe.params["vae"]
    assert swapped.family == pipe.family and swapped.runner(mesh1) is pipe.runner(mesh1)
    assert not np.array_equal(out.latents, base.latents)
    np.testing.assert_array_equal(through_arg.images, out.images)
    np.testing.assert_array_equal(again.images, base.images)  # the original weights are untouched


def test_with_params_refuses_trees_that_do_not_fit(tiny_pipeline):
    _, pipe, _ = tiny_pipeline("sd1")
    with pytest.raises(JaxdiffError, match="components are"):
        pipe.with_params({"text_encoder_2": pipe.params["unet"]})
    bad = jax.tree_util.tree_map(lambda a: a, pipe.params["unet"])
    bad["conv_in"] = {"kernel": np.zeros((1, 1, 1, 1), np.float32), "bias": bad["conv_in"]["bias"]}
    with pytest.raises(JaxdiffError, match="do not match"):
        pipe.with_params({"unet": bad})


def test_lower_is_the_program_a_call_runs(tiny_pipeline, mesh1):
    """`pipe.lower(...)` (bench's seam) compiles to an executable that gives the call's images."""
    _, pipe, _ = tiny_pipeline("sd1")
    compiled = pipe.lower(["a cat"], mesh=mesh1, **KW).compile()
    assert compiled.cost_analysis() is not None
    from jaxdiff import request
    req = request.build(pipe, ["a cat"], **KW)
    runner = pipe.runner(mesh1)
    args, _ = runner.arguments(pipe.params, req.inputs, req.plan, req.seed, req.guidance)
    got = compiled(*args)
    np.testing.assert_array_equal(np.asarray(got["images"])[:1], pipe(["a cat"], mesh=mesh1, **KW).images)


def test_request_errors_are_one_line(tiny_pipeline):
    _, pipe, _ = tiny_pipeline("sd1")
    from jaxdiff import request
    for kwargs, match in ((dict(height=12), "multiple of 8"), (dict(mask=np.ones((16, 16))), "needs an init"),
                          (dict(strength=0.5), "only with an init image"), (dict(guidance_rescale=2.0), r"\[0, 1\]"),
                          (dict(indices=[0, 0]), "indices must be 1")):
        with pytest.raises(JaxdiffError, match=match) as e:
            request.build(pipe, "a cat", **{**KW, **kwargs})
        assert "\n" not in str(e.value)


def test_generation_makes_no_implicit_transfers(tiny_pipeline, mesh1):
    """A whole request (txt2img and img2img, one program or stepped with progress) under JAX's
    "disallow" transfer guard: host data reaches the devices only through jaxdiff.sharding.to_global,
    the one explicit allow, and results come back through the explicit gather."""
    _, pipe, _ = tiny_pipeline("sd1")
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    want = [pipe(["a cat"], mesh=mesh1, **KW), pipe(["a cat"], mesh=mesh1, image=image, **KW)]
    steps = []
    with jax.transfer_guard("disallow"):
        got = [pipe(["a cat"], mesh=mesh1, **KW), pipe(["a cat"], mesh=mesh1, image=image, **KW),
               pipe(["a cat"], mesh=mesh1, progress=lambda done, total: steps.append(done), **KW)]
    for g, w in zip(got, want + want[:1]):
        np.testing.assert_array_equal(g.images, w.images)
    assert steps == [1, 2]
