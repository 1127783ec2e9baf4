"""Export to PyTorch: the inverse naming rule against real diffusers / transformers key sets (full size,
shapes only), value round trips, and exported folders loaded back by diffusers' from_pretrained with
no missing or unexpected keys and the same outputs."""
import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTextConfig as HFCLIPTextConfig

import jaxdiff
from convert import export
from convert.diffusers_layout import flatten, plan_conversion
from convert.errors import CheckpointError
from convert.formats import read_safetensors
from jaxdiff.components import CLIP, UNET, VAE_KIND, UNet
from jaxdiff.export import export_model, export_pipeline
from jaxdiff.models.clip import canonical_torch_keys
from jaxdiff.models.configs import CLIPTextConfig, UNetConfig, VAEConfig
from jaxdiff.training import lora as lora_lib
from tests import tiny_pipelines


def test_module_path_rule():
    key = lambda path, kind="unet": export.torch_key(tuple(path.split("/")), kind=kind)
    assert key("down_blocks_0/resnets_1/conv1/kernel") == "down_blocks.0.resnets.1.conv1.weight"
    assert key("mid_block/attentions_0/transformer_blocks_0/attn1/to_out_0/bias") == \
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"
    assert key("up_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel") == \
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    assert key("time_embedding/linear_1/kernel") == "time_embedding.linear_1.weight"   # a Linear, not a list
    assert key("conv_norm_out/scale") == "conv_norm_out.weight"
    assert key("text_model/encoder/layers_11/mlp/fc1/kernel", "clip") == \
        "text_model.encoder.layers.11.mlp.fc1.weight"
    assert key("text_model/embeddings/token_embedding/embedding", "clip") == \
        "text_model.embeddings.token_embedding.weight"
    with pytest.raises(CheckpointError):
        key("conv_in/kernel_scale")
    with pytest.raises(ValueError):
        key("conv_in/kernel", "t5")
    conv = np.arange(3 * 3 * 4 * 5, dtype=np.float32).reshape(3, 3, 4, 5)       # [kh, kw, I, O]
    assert export.to_torch_layout(("c", "kernel"), conv).shape == (5, 4, 3, 3)
    np.testing.assert_array_equal(export.to_torch_layout(("c", "kernel"), conv)[2, 1], conv[:, :, 1, 2])


# --- full-size key sets, shapes only ---------------------------------------------------------------

def _meta_state_shapes(build) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _hf_clip(cfg: CLIPTextConfig, projection: bool):
    hf = HFCLIPTextConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                             if f.name != "with_projection"})
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(hf)


def _diffusers_unet(cfg: UNetConfig):
    return UNet2DConditionModel(**dataclasses.asdict(cfg))


FULL_SIZE = {
    "sd15_unet": (UNET, UNetConfig.sd15, "unet", _diffusers_unet),
    "sdxl_unet": (UNET, UNetConfig.sdxl, "unet", _diffusers_unet),
    "sd_vae": (VAE_KIND, VAEConfig.sd, "vae", lambda c: AutoencoderKL(**{
        k: v for k, v in export.upstream_config("AutoencoderKL", dataclasses.asdict(c)).items()
        if not k.startswith("_")})),
    "clip_l": (CLIP, CLIPTextConfig.clip_l, "clip", lambda c: _hf_clip(c, False)),
    "openclip_bigg": (CLIP, CLIPTextConfig.openclip_bigg, "clip", lambda c: _hf_clip(c, True)),
}


@functools.lru_cache(maxsize=None)
def full_size_shapes(name):
    kind, preset, _, _ = FULL_SIZE[name]
    return kind.param_shapes(preset())


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_inverse_equals_upstream_keys(name):
    kind, preset, model_kind, build = FULL_SIZE[name]
    cfg = preset()
    upstream = {k: v for k, v in _meta_state_shapes(lambda: build(cfg)).items()
                if not k.endswith("position_ids")}
    if model_kind == "clip":   # transformers 5 drops `text_model.` on a plain CLIPTextModel
        upstream = canonical_torch_keys(upstream)
    ours = {export.torch_key(path, kind=model_kind): export.torch_shape(path, tuple(leaf.shape))
            for path, leaf in flatten(full_size_shapes(name)).items()}
    assert sorted(set(ours) ^ set(upstream)) == []
    assert {k: ours[k] for k in upstream if ours[k] != upstream[k]} == {}
    # The forward rule maps every one of these keys back to the path it came from.
    plan = plan_conversion(upstream, full_size_shapes(name))
    assert all(export.torch_key(path, kind=model_kind) == key for path, (key, _) in plan.items())


def test_sd15_kohya_keys_equal_diffusers_converter():
    """The kohya LoRA key set for SD1.5's UNet attention targets is exactly what diffusers'
    convert_state_dict_to_kohya makes of the PEFT state dict for the same targets."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    cfg = lora_lib.LoRAConfig(rank=4, alpha=4.0)
    targets = lora_lib.target_modules(full_size_shapes("sd15_unet"), cfg)
    lora = {"unet": {}}
    for module, (fan_in, fan_out) in targets.items():
        node = lora["unet"]
        for part in module:
            node = node.setdefault(part, {})
        node.update(down=np.zeros((fan_in, 4), np.float32), up=np.zeros((4, fan_out), np.float32))
    ours, _ = export.lora_state_dict(lora, style="kohya", alpha=4.0, rank=4)

    with torch.device("meta"):
        unet = _diffusers_unet(UNetConfig.sd15())
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                unet)
    peft_sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    theirs = convert_state_dict_to_kohya(peft_sd)
    assert len(targets) == 128   # 16 transformer blocks x 2 attentions x 4 projections
    assert set(ours) == set(theirs)
    assert {k: ours[k].shape for k in ours} == {k: tuple(theirs[k].shape) for k in theirs}


# --- tiny models: values and diffusers loading ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, build in (("sd1", tiny_pipelines.sd1), ("sdxl", tiny_pipelines.sdxl)):
        ref = build(root / name)
        pipe = jaxdiff.load(root / name)
        export_pipeline(pipe, root / f"{name}_out")
        out[name] = (ref, pipe, root / name, root / f"{name}_out")
    return out


NETWORKS = {"unet": ("unet", "diffusion_pytorch_model"), "vae": ("vae", "diffusion_pytorch_model"),
            "text_encoder": ("clip", "model"), "text_encoder_2": ("clip", "model")}


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_values_round_trip_bitwise(tiny, name):
    """read upstream file -> jaxdiff params -> to_torch_state_dict gives the file back, bit for bit."""
    _, pipe, src, _ = tiny[name]
    for comp, c in pipe.components().items():
        kind, stem = NETWORKS[comp]
        want = canonical_torch_keys(read_safetensors(src / comp / f"{stem}.safetensors")) if kind == "clip" \
            else read_safetensors(src / comp / f"{stem}.safetensors")
        got = export.to_torch_state_dict(c.params, kind=kind)
        assert set(got) == set(want), comp
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{comp} {k}")


def _loading_info(cls, folder):
    _, info = cls.from_pretrained(folder, output_loading_info=True)
    return {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_exported_pipeline_loads_in_diffusers(tiny, name):
    ref, _, _, dst = tiny[name]
    index = json.loads((dst / "model_index.json").read_text())
    assert index["_class_name"] == type(ref).__name__
    for comp, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                      ("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if hasattr(ref, comp):
            info = _loading_info(cls, dst / comp)
            assert all(not v for v in info.values()), (comp, info)
    pipe = (StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline).from_pretrained(dst)
    assert type(pipe.scheduler) is type(ref.scheduler)
    assert pipe.scheduler.config.beta_schedule == ref.scheduler.config.beta_schedule
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(ref, comp):
            a, b = getattr(ref, comp).state_dict(), getattr(pipe, comp).state_dict()
            assert set(a) == set(b), comp
            assert all(torch.equal(a[k], b[k]) for k in a), comp
    prompt = ["a red panda", ""]
    for tok in ("tokenizer", "tokenizer_2"):
        if hasattr(ref, tok):
            assert getattr(pipe, tok)(prompt).input_ids == getattr(ref, tok)(prompt).input_ids
    # Same weights, so the same numbers: the UNet output is identical.
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    ctx = torch.from_numpy(rng.standard_normal((1, 77, ref.unet.config.cross_attention_dim)).astype(np.float32))
    added = None
    if name == "sdxl":
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        want = ref.unet(x, 500, ctx, added_cond_kwargs=added).sample
        got = pipe.unet(x, 500, ctx, added_cond_kwargs=added).sample
    assert float((want - got).abs().max()) <= 1e-6 * float(want.abs().max())


def test_fine_tuned_unet_exports_its_own_params(tiny, tmp_path):
    """Changed params (a stand-in for a fine-tune) are what gets written: diffusers' UNet on the exported
    folder equals jaxdiff's UNet on the changed params (float32, 1e-4 of the output scale)."""
    _, pipe, _, _ = tiny["sd1"]
    rng = np.random.default_rng(1)   # numpy: eager jax.random per leaf would compile per shape
    tuned = jax.tree_util.tree_map(
        lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(np.float32), pipe.unet.params)
    unet = UNet(pipe.unet.module, tuned, pipe.unet.config)
    export_model(unet, tmp_path / "unet")
    export_model(unet, tmp_path / "unet_bf16", dtype="bfloat16")
    assert {v.dtype.name for v in read_safetensors(tmp_path / "unet_bf16" / "diffusion_pytorch_model.safetensors").values()} == {"bfloat16"}
    assert all(not v for v in _loading_info(UNet2DConditionModel, tmp_path / "unet_bf16").values())

    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    t = np.array([981, 1], np.int32)
    want = np.asarray(unet(x, t, ctx))
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        got = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
                  torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    base = np.asarray(pipe.unet(x, t, ctx))
    assert np.abs(want - base).max() > 0.05 * np.abs(base).max()   # the change is visible
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_existing_folder_is_not_overwritten(tiny, tmp_path):
    _, pipe, _, _ = tiny["sd1"]
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        export_pipeline(pipe, tmp_path / "out")
    export_pipeline(pipe, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model_index.json").is_file()
