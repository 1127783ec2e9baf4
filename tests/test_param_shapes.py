"""Kind.param_shapes (traced once per config, inputs made inside the trace) gives exactly the tree the
plain `jax.eval_shape(module.init)` gives, for every config preset the tests use; cast_params keeps
values and dtypes."""
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import components
from jaxdiff.components import CLIP, UNET, VAE_KIND, cast_params
from jaxdiff.models.configs import CLIPTextConfig, UNetConfig, VAEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_demo_model  # noqa: E402  (the demo model's configs)

# Every preset the tests use, but UNetConfig.sdxl_refiner: 25 s of CPU to trace twice, through the
# same code path as sdxl (the full-size UNets already take 45 s here).
DEMO = train_demo_model.model_configs()
QUICK = train_demo_model.model_configs(quick=True)
CASES = {
    "clip_tiny": (CLIP, CLIPTextConfig.tiny()),
    "clip_tiny_projection": (CLIP, CLIPTextConfig.tiny(with_projection=True)),
    "clip_l": (CLIP, CLIPTextConfig.clip_l()),
    "clip_demo": (CLIP, DEMO[0]),
    "clip_quick": (CLIP, QUICK[0]),
    "unet_tiny": (UNET, UNetConfig.tiny()),
    "unet_sd15": (UNET, UNetConfig.sd15()),
    "unet_sdxl": (UNET, UNetConfig.sdxl()),
    "unet_demo": (UNET, DEMO[1]),
    "unet_quick": (UNET, QUICK[1]),
    "vae_tiny": (VAE_KIND, VAEConfig.tiny()),
    "vae_sd": (VAE_KIND, VAEConfig.sd()),
    "vae_demo": (VAE_KIND, DEMO[2]),
    "vae_quick": (VAE_KIND, QUICK[2]),
}


def _reference(kind, config) -> dict:
    """The way param_shapes was computed before: example inputs built eagerly, one eval_shape."""
    module = kind.build(config, jnp.float32)
    makers, method = kind.init_args(config)
    args = [make() for make in makers]
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, method=method))["params"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tree_as_eval_shape_of_init(case):
    kind, config = CASES[case]
    components._SHAPES_CACHE.pop((kind, config), None)  # trace, whatever ran before
    got, want = kind.param_shapes(config), _reference(kind, config)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in got_leaves)
    assert [(g.shape, g.dtype) for g in got_leaves] == [(w.shape, w.dtype) for w in want_leaves]


def test_cached_tree_is_fresh_per_call():
    first = UNET.param_shapes(UNetConfig.tiny())
    first.pop("conv_in")
    first["time_embedding"].clear()
    again = UNET.param_shapes(UNetConfig.tiny())
    assert "conv_in" in again and again["time_embedding"]
    assert again == _reference(UNET, UNetConfig.tiny())


def test_cast_params_values_and_dtypes():
    params = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
              "ids": np.arange(4, dtype=np.int32)}
    out = cast_params(params, "bfloat16")
    assert isinstance(out["a"]["kernel"], jax.Array) and out["a"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"], np.float32), params["a"]["kernel"])
    assert out["ids"].dtype == jnp.int32  # only float leaves are cast
    np.testing.assert_array_equal(np.asarray(out["ids"]), params["ids"])


@pytest.fixture
def compile_cache(tmp_path):
    """JAX's persistent compilation cache pointed at tmp_path for one test (restored afterwards)."""
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_enable_compilation_cache", True)
    yield tmp_path
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_enable_compilation_cache", before[1])


def test_disk_cache_across_processes(compile_cache, monkeypatch):
    """With the compilation cache on, a tree traced once is read back by a later process (simulated by
    emptying the in-process cache) without tracing; an unreadable file is traced again."""
    config = VAEConfig.tiny()
    components._SHAPES_CACHE.clear()
    want = _reference(VAE_KIND, config)
    assert VAE_KIND.param_shapes(config) == want
    files = list((compile_cache / "jaxdiff-param-shapes").glob("*.json"))
    assert len(files) == 1

    components._SHAPES_CACHE.clear()
    traced = []
    original = components.Kind._trace_param_shapes
    monkeypatch.setattr(components.Kind, "_trace_param_shapes",
                        lambda self, cfg: traced.append(cfg) or original(self, cfg))
    assert VAE_KIND.param_shapes(config) == want and not traced

    components._SHAPES_CACHE.clear()
    files[0].write_text("{not json")
    assert VAE_KIND.param_shapes(config) == want and traced == [config]

    # Another config is another file (and another tree).
    other = dataclasses.replace(config, latent_channels=8)
    assert VAE_KIND.param_shapes(other) == _reference(VAE_KIND, other) != want
    assert len(list((compile_cache / "jaxdiff-param-shapes").glob("*.json"))) == 2
