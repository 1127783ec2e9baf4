"""CLIP text encoder: parity with transformers' CLIPTextModel / CLIPTextModelWithProjection (float32,
tiny random configs written with save_pretrained), and full-size shapes and key maps without compute."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from convert.diffusers_layout import convert_state_dict, plan_conversion
from convert.formats import read_tensors
from jaxdiff.errors import ConfigError
from jaxdiff.models import clip
from jaxdiff.models.configs import CLIPTextConfig
from tests import helpers

VOCAB = 49408
BOS, EOS = 49406, 49407

# The text_encoder config.json files SD releases ship (written by transformers 4.2x), minus paths.
_COMMON = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
           "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
           "max_position_embeddings": 77, "model_type": "clip_text_model", "pad_token_id": 1,
           "torch_dtype": "float32", "transformers_version": "4.25.0", "vocab_size": 49408}
PUBLISHED = {
    "clip_l": {**_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
               "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
               "projection_dim": 768},
    "openclip_h": {**_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024,
                   "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
                   "projection_dim": 512},
    "openclip_bigg": {**_COMMON, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                      "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                      "num_hidden_layers": 32, "projection_dim": 1280},
}
PARAMS_M = {"clip_l": 123.06, "openclip_h": 340.39, "openclip_bigg": 694.66}  # shared/reference/numbers.md

_TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
             max_position_embeddings=77, projection_dim=24)
# name -> (transformers config kwargs, model class, pad id)
CASES = {
    # SD1: quick_gelu, legacy eos_token_id=2 (pool at argmax(ids)), padded with <|endoftext|>.
    "sd1": (dict(_TINY, vocab_size=VOCAB, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
                 pad_token_id=1), transformers.CLIPTextModel, EOS),
    # SD2: OpenCLIP-H style, exact gelu, padded with "!" (id 0).
    "sd2": (dict(_TINY, vocab_size=VOCAB, hidden_act="gelu", bos_token_id=0, eos_token_id=2,
                 pad_token_id=1), transformers.CLIPTextModel, 0),
    # SDXL encoder 2 style with projection and the modern eos_token_id (pool at the first EOS). Two
    # extra "added" tokens above EOS make argmax pooling and first-EOS pooling disagree.
    "bigg": (dict(_TINY, vocab_size=VOCAB + 2, hidden_act="gelu", bos_token_id=BOS, eos_token_id=EOS,
                  pad_token_id=1), transformers.CLIPTextModelWithProjection, 0),
}


def _ids(pad: int, rng: np.random.Generator, *, added_token: int | None = None) -> np.ndarray:
    """[3, 77] tokenizer-like ids: BOS, prompt, EOS, padding; one prompt fills all 77 positions."""
    rows = []
    for n in (5, 30, 75):
        prompt = rng.integers(1, 49000, n)
        if n == 5:
            prompt[2] = 2          # id 2 in a prompt: a "first position equal to 2" rule would pool here
            if added_token is not None:
                prompt[3] = added_token  # above EOS: an argmax rule would pool here
        row = np.full(77, pad, np.int64)
        row[0], row[1:n + 1], row[n + 1] = BOS, prompt, EOS
        rows.append(row)
    return np.stack(rows)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """A random tiny transformers model saved with save_pretrained and read back through jaxdiff, with
    both models' outputs on the same ids."""
    name = request.param
    kwargs, model_cls, pad = CASES[name]
    torch.manual_seed(0)
    model = model_cls(transformers.CLIPTextConfig(**kwargs)).eval()
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    ids = _ids(pad, np.random.default_rng(0), added_token=VOCAB + 1 if name == "bigg" else None)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
        # CLIPTextModelWithProjection's output has text_embeds but not the pooled state it projects.
        ref.pooled = getattr(model, "text_model", model)(torch.from_numpy(ids)).pooler_output

    config = CLIPTextConfig.from_dict(json.loads((path / "config.json").read_text()), str(path))
    tensors = clip.canonical_torch_keys(read_tensors(path / "model.safetensors"))
    params = convert_state_dict(tensors, clip.param_shapes(config), source=str(path),
                                ignore=clip.IGNORED_TORCH_KEYS)
    out = jax.jit(clip.CLIPTextModel(config).apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    return dict(name=name, config=config, params=params, ids=ids, ref=ref, out=out)


def test_parity_with_transformers(case):
    name, config, out, ref = case["name"], case["config"], case["out"], case["ref"]
    assert config.with_projection == (name == "bigg")
    assert config.hidden_act == CASES[name][0]["hidden_act"]
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    errors = {
        "last_hidden_state": helpers.max_rel_err(out.last_hidden_state, ref.last_hidden_state),
        "hidden_states[-2]": helpers.max_rel_err(out.hidden_states[-2], ref.hidden_states[-2]),
        "hidden_states[0]": helpers.max_rel_err(out.hidden_states[0], ref.hidden_states[0]),
        "pooled": helpers.max_rel_err(out.pooled, ref.pooled),
    }
    if name == "bigg":
        errors["text_embeds"] = helpers.max_rel_err(out.text_embeds, ref.text_embeds)
        assert out.text_embeds.shape == (3, _TINY["projection_dim"])
    else:
        assert out.text_embeds is None
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})
    for what, err in errors.items():
        assert err <= 1e-4, f"{name} {what}: max error {err:.2e} relative to the output's scale"
    # hidden_states[-1] is the last layer *before* the final LayerNorm, as transformers returns it.
    assert helpers.max_rel_err(out.hidden_states[-1], ref.hidden_states[-1]) <= 1e-4
    assert not np.allclose(out.hidden_states[-1], out.last_hidden_state, atol=1e-3)


def test_pooling_rule_follows_eos_token_id(case):
    """Pooled = last_hidden_state at the tokenizer's end token, checked against hand-picked positions
    rather than transformers, so a mistake shared with it would show. The ids hold a 2 inside a prompt
    (the legacy eos_token_id=2 configs must not pool there) and, for "bigg", an added token above EOS
    (the modern rule must not pool at argmax)."""
    out, ids = case["out"], case["ids"]
    eos_pos = np.argmax(ids == EOS, axis=1)
    np.testing.assert_array_equal(out.pooled, np.asarray(out.last_hidden_state)[np.arange(3), eos_pos])


@pytest.mark.parametrize("case", ["bigg"], indirect=True)  # one case covers the dtype plumbing
def test_bfloat16_compute_runs_close_to_float32(case):
    f32 = case["out"]
    bf16 = jax.jit(clip.CLIPTextModel(case["config"], dtype=jnp.bfloat16).apply)(
        {"params": case["params"]}, jnp.asarray(case["ids"], jnp.int32))
    assert bf16.last_hidden_state.dtype == bf16.text_embeds.dtype == jnp.bfloat16
    for a, b in ((bf16.last_hidden_state, f32.last_hidden_state), (bf16.text_embeds, f32.text_embeds)):
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        # bf16 has an 8-bit mantissa; 3 layers of rounding stay within a few percent of the scale.
        assert err <= 5e-2 * float(jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_params_and_key_map(name):
    """Presets == the published configs; param counts; every transformers key maps, none left over."""
    raw = PUBLISHED[name]
    config = CLIPTextConfig.from_dict(raw, name)
    assert config == getattr(CLIPTextConfig, name)()
    shapes = clip.param_shapes(config)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert round(count / 1e6, 2) == PARAMS_M[name]

    hf_config = transformers.CLIPTextConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    model_cls = getattr(transformers, raw["architectures"][0])
    with torch.device("meta"):
        model = model_cls(hf_config)
    source = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = plan_conversion(clip.canonical_torch_keys(source), shapes, source=name,
                           ignore=clip.IGNORED_TORCH_KEYS)
    assert len(plan) == len(jax.tree.leaves(shapes))
    # Files from transformers < 4.31 (every SD release): `text_model.` prefix and a position_ids buffer.
    legacy = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): s
              for k, s in source.items()}
    legacy["text_model.embeddings.position_ids"] = (1, 77)
    assert len(plan_conversion(clip.canonical_torch_keys(legacy), shapes, source=name,
                               ignore=clip.IGNORED_TORCH_KEYS)) == len(plan)


def test_canonical_torch_keys():
    plain = {"embeddings.token_embedding.weight": 1, "final_layer_norm.bias": 2}
    assert clip.canonical_torch_keys(plain) == {"text_model.embeddings.token_embedding.weight": 1,
                                                "text_model.final_layer_norm.bias": 2}
    prefixed = {"text_model.final_layer_norm.bias": 2, "text_projection.weight": 3}
    assert clip.canonical_torch_keys(prefixed) == prefixed


def test_config_refusals():
    raw = dict(PUBLISHED["clip_l"])
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPTextConfig.from_dict({**raw, "hidden_act": "relu"}, "cfg.json")
    with pytest.raises(ConfigError, match="architectures"):
        CLIPTextConfig.from_dict({**raw, "architectures": ["CLIPVisionModel"]}, "cfg.json")
    with pytest.raises(ConfigError, match="unknown config key"):
        CLIPTextConfig.from_dict({**raw, "rope_theta": 10000.0}, "cfg.json")
    with pytest.raises(ConfigError, match="unknown config key"):
        CLIPTextConfig.from_dict({**raw, "with_projection": True}, "cfg.json")
    # No architectures key (hand-written configs): a plain CLIPTextModel.
    no_arch = {k: v for k, v in raw.items() if k != "architectures"}
    assert CLIPTextConfig.from_dict(no_arch, "cfg.json") == CLIPTextConfig.clip_l()
    with pytest.raises(ValueError, match="input_ids"):
        clip.CLIPTextModel(CLIPTextConfig.tiny()).init(jax.random.PRNGKey(0), jnp.zeros((1, 78), jnp.int32))


def test_tiny_preset_takes_overrides():
    tiny = CLIPTextConfig.tiny(with_projection=True)
    assert tiny.with_projection and tiny.vocab_size == VOCAB
    assert dataclasses.replace(tiny, with_projection=False) == CLIPTextConfig.tiny()
