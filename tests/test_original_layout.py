"""convert.original_layout's key rules on their own: full-size key sets and the configs read back from
their shapes (shape-only, no weights), the OpenCLIP q/k/v split and join, EMA names, and errors."""
from __future__ import annotations

import numpy as np
import pytest

from convert import original_layout as ol
from convert.diffusers_layout import flatten
from convert.export import torch_key, torch_shape
from jaxdiff.components import KINDS
from jaxdiff.models.configs import CLIPTextConfig, UNetConfig, VAEConfig

_ZERO = np.zeros((), np.int8)


def _shape_only(kind_name: str, config, torch_kind: str) -> dict[str, np.ndarray]:
    """A diffusers state dict of zero-stride int8 views with the torch shapes of `config`'s params."""
    shapes = flatten(KINDS[kind_name].param_shapes(config))
    return {torch_key(p, kind=torch_kind): np.broadcast_to(_ZERO, torch_shape(p, s.shape)) for p, s in shapes.items()}


def _clip_cfg(c: CLIPTextConfig) -> dict:
    return {"hidden_act": c.hidden_act}


FULL = {
    "sd1": (UNetConfig.sd15(), VAEConfig.sd(), {"text_encoder": CLIPTextConfig.clip_l()}),
    "sd2": (UNetConfig.sd21(), VAEConfig.sd(), {"text_encoder": CLIPTextConfig.openclip_h()}),
    "sdxl": (UNetConfig.sdxl(), VAEConfig.sdxl(), {"text_encoder": CLIPTextConfig.clip_l(),
                                                   "text_encoder_2": CLIPTextConfig.openclip_bigg()}),
    "sdxl_refiner": (UNetConfig.sdxl_refiner(), VAEConfig.sdxl(), {"text_encoder_2": CLIPTextConfig.openclip_bigg()}),
}
# Keys and shapes of the released files (formats.md §1.3-1.5: SDXL's first upsampler sits at
# output_blocks.2.2 since that up level has attention; SD2's OpenCLIP keeps 24 blocks; bigG's q/k/v are
# one in_proj).
RELEASED = {
    "sd1": {"model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
            "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1)},
    "sd2": {"cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.text_projection": (1024, 1024),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320)},
    "sdxl": {"model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280),
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)},
    "sdxl_refiner": {"model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
                     "model.diffusion_model.output_blocks.8.2.conv.weight": (768, 768, 3, 3),
                     "conditioner.embedders.0.model.transformer.resblocks.31.ln_2.bias": (1280,)},
}


@pytest.mark.parametrize("family", list(FULL))
def test_full_size_layout_and_configs_from_shapes(family):
    ucfg, vcfg, clips = FULL[family]
    parts = {"unet": {"config": {"block_out_channels": ucfg.block_out_channels,
                                 "layers_per_block": ucfg.layers_per_block,
                                 "down_block_types": ucfg.down_block_types, "up_block_types": ucfg.up_block_types},
                      "tensors": _shape_only("UNet2DConditionModel", ucfg, "unet")},
             "vae": {"config": {"block_out_channels": vcfg.block_out_channels},
                     "tensors": _shape_only("AutoencoderKL", vcfg, "vae")}}
    for name, c in clips.items():
        cls = "CLIPTextModelWithProjection" if c.with_projection else "CLIPTextModel"
        parts[name] = {"config": _clip_cfg(c), "tensors": _shape_only(cls, c, "clip")}
    if family == "sd2":  # the released file has 24 blocks; the pipeline keeps 23
        assert ol.family_of(parts) == "sd2"
    tensors = ol.from_diffusers(parts)
    for key, shape in RELEASED[family].items():
        assert tensors[key].shape == shape, key
    conv = ol.to_diffusers(tensors, source=family)
    assert conv.family == family
    for name, part in conv.components.items():
        cfg = KINDS[part["class_name"]].config_cls.from_dict(part["config"], name)
        if name == "unet":
            want = ucfg
            # What a file cannot say and the family default supplies.
            assert cfg.sample_size == (96 if family == "sd2" else want.sample_size)
        elif name == "vae":
            want = vcfg
        else:
            want = clips[name]
            assert cfg.projection_dim == want.projection_dim or not want.with_projection
        fields = [f for f in vars(want) if f not in ("sample_size", "projection_dim")]
        diff = {f: (getattr(cfg, f), getattr(want, f)) for f in fields if getattr(cfg, f) != getattr(want, f)}
        # transformer_layers_per_block of a level without attention carries no weights.
        if family == "sdxl_refiner":
            diff.pop("transformer_layers_per_block", None)
        assert not diff, f"{family} {name}: {diff}"
        # And every converted tensor lands on a param of that config (the strict table).
        expect = {torch_key(p, kind="unet" if name == "unet" else "vae" if name == "vae" else "clip")
                  for p in flatten(KINDS[part["class_name"]].param_shapes(cfg))}
        assert set(part["tensors"]) == expect, f"{family} {name}: {sorted(set(part['tensors']) ^ expect)[:4]}"


def test_openclip_qkv_split_join_and_projection_transpose():
    rng = np.random.default_rng(0)
    w, layers = 64, 3
    hf = {"text_model.embeddings.token_embedding.weight": rng.standard_normal((10, w)),
          "text_model.embeddings.position_embedding.weight": rng.standard_normal((77, w)),
          "text_model.final_layer_norm.weight": rng.standard_normal(w),
          "text_model.final_layer_norm.bias": rng.standard_normal(w),
          "text_projection.weight": rng.standard_normal((32, w))}
    for i in range(layers):
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
            hf[f"text_model.encoder.layers.{i}.{m}.weight"] = rng.standard_normal((w, w))
            hf[f"text_model.encoder.layers.{i}.{m}.bias"] = rng.standard_normal(w)
        for m, shape in (("layer_norm1", (w,)), ("layer_norm2", (w,)), ("mlp.fc1", (4 * w, w)), ("mlp.fc2", (w, 4 * w))):
            hf[f"text_model.encoder.layers.{i}.{m}.weight"] = rng.standard_normal(shape)
            hf[f"text_model.encoder.layers.{i}.{m}.bias"] = rng.standard_normal(shape[:1])
    oc = ol.hf_to_openclip(hf)
    np.testing.assert_array_equal(oc["transformer.resblocks.1.attn.in_proj_weight"][w:2 * w],
                                  hf["text_model.encoder.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(oc["text_projection"], hf["text_projection.weight"].T)
    back = ol.openclip_to_hf(oc, layers=layers, projection=True, source="x")
    assert set(back) == set(hf)
    for k in hf:
        np.testing.assert_array_equal(back[k], hf[k])
    # SD2: an identity block is appended on write and the file's last block is dropped on read.
    sd2 = ol.hf_to_openclip({k: v for k, v in hf.items() if k != "text_projection.weight"}, extra_identity_layer=True)
    assert not np.any(sd2[f"transformer.resblocks.{layers}.attn.in_proj_weight"])
    assert ol.openclip_to_hf(sd2, layers=layers, projection=False, source="x").keys() == \
        {k for k in hf if k != "text_projection.weight"}


def test_ema_names_follow_diffusers():
    assert ol.ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_unknown_and_foreign_tensors_are_refused():
    with pytest.raises(ol.OriginalLayoutError, match="not a Stable Diffusion checkpoint"):
        ol.to_diffusers({"lora_unet_x.alpha": np.zeros(())}, source="f.safetensors")
    with pytest.raises(ol.OriginalLayoutError, match="without a known text encoder"):
        ol.to_diffusers({"model.diffusion_model.out.2.weight": np.zeros((4, 320, 3, 3))}, source="f")
