"""Tiny random diffusers pipelines whose sizes follow the single-file family rules, and a writer that
turns one into an original-layout single file.

A single file cannot say its head count or GroupNorm groups, so a reader applies the family's rule
(SD1 UNets 8 heads; SD2 / SDXL UNets and every CLIP 64 channels per head; 32 groups). These builders
use widths that are multiples of 64 / 32 so the rules give back the very configs the diffusers folders
hold; `from_single_file(file, config=folder)` then reads the file with those configs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from convert import original_layout
from convert.formats import write_safetensors
from tests.tiny_pipelines import STOCK_SCHEDULER, tokenizer

WIDTH = 64  # CLIP width: one 64-channel head


def clip(*, openclip: bool, projection: bool = False, layers: int = 2, width: int = WIDTH):
    """diffusers tells SDXL files apart by `resblocks.9` of the OpenCLIP tower, so SDXL's has 10 layers;
    and it tells SDXL's two encoders apart by width, so bigG is wider than CLIP-L there."""
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                         num_attention_heads=width // 64,
                         num_hidden_layers=layers, max_position_embeddings=77,
                         hidden_act="gelu" if openclip else "quick_gelu", projection_dim=width,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(scaling_factor: float):
    return AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, scaling_factor=scaling_factor).eval()


def _unet(**kw):
    base = dict(layers_per_block=1, sample_size=8, out_channels=4, norm_num_groups=32)
    return UNet2DConditionModel(**{**base, **kw}).eval()


def sd1(folder: Path, *, in_channels: int = 4):
    torch.manual_seed(10)
    unet = _unet(block_out_channels=(32, 64), in_channels=in_channels,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH,
                 attention_head_dim=8)
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=vae(0.18215), text_encoder=clip(openclip=False), tokenizer=tokenizer(), unet=unet,
               scheduler=PNDMScheduler.from_config({**STOCK_SCHEDULER, "skip_prk_steps": True}),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def sd1_inpaint(folder: Path):
    return sd1(folder, in_channels=9)


def sd2(folder: Path):
    """SD2-768-v style: 64-channel heads, linear projection, upcast attention, OpenCLIP (gelu, '!')."""
    torch.manual_seed(11)
    unet = _unet(block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=WIDTH,
                 attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=True)
    pipe = StableDiffusionPipeline(
        vae=vae(0.18215), text_encoder=clip(openclip=True), tokenizer=tokenizer("!"), unet=unet,
        scheduler=DDIMScheduler.from_config({**STOCK_SCHEDULER, "prediction_type": "v_prediction"}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def sdxl(folder: Path):
    torch.manual_seed(12)
    unet = _unet(block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=3 * WIDTH,
                 attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=2 * WIDTH + 6 * 8)
    pipe = StableDiffusionXLPipeline(
        vae=vae(0.13025), text_encoder=clip(openclip=False), tokenizer=tokenizer(),
        text_encoder_2=clip(openclip=True, projection=True, layers=10, width=2 * WIDTH), tokenizer_2=tokenizer("!"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(STOCK_SCHEDULER))
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def sdxl_refiner(folder: Path):
    torch.manual_seed(13)
    unet = _unet(block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=WIDTH,
                 attention_head_dim=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=WIDTH + 5 * 8)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae(0.13025), text_encoder=None, tokenizer=None,
        text_encoder_2=clip(openclip=True, projection=True, layers=10), tokenizer_2=tokenizer("!"), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(STOCK_SCHEDULER),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


BUILDERS = {"sd1": sd1, "sd2": sd2, "sd1_inpaint": sd1_inpaint, "sdxl": sdxl, "sdxl_refiner": sdxl_refiner}
FAMILY = {"sd1": "sd1", "sd2": "sd2", "sd1_inpaint": "sd1", "sdxl": "sdxl", "sdxl_refiner": "sdxl_refiner"}


def state_dict(module, dtype=np.float32) -> dict[str, np.ndarray]:
    """A torch module's state dict as numpy; CLIP keys under `text_model.` as released files have them
    (transformers >= 5.6 flattens CLIPTextModel's)."""
    sd = {k: v.detach().float().numpy().astype(dtype) for k, v in module.state_dict().items()
          if not k.endswith("position_ids")}
    if isinstance(module, (CLIPTextModel, CLIPTextModelWithProjection)):
        sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    return sd


def diffusers_parts(pipe, folder: Path, dtype=np.float32) -> dict[str, dict]:
    """{name: {"config": the folder's config.json, "tensors": torch state dict as numpy}}."""
    parts = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            parts[name] = {"config": json.loads((folder / name / "config.json").read_text()),
                           "tensors": state_dict(module, dtype)}
    return parts


def write_single_file(pipe, folder: Path, path: Path, *, dtype=np.float32, ema_unet=None,
                      wrap: str | None = None, extra: dict | None = None) -> Path:
    """The pipeline as one original-layout file: .safetensors, or .ckpt written by torch.save (`wrap`
    "lightning": {"state_dict": ..., "global_step": ...}; None: a flat dict)."""
    tensors = original_layout.from_diffusers(diffusers_parts(pipe, folder, dtype),
                                             ema_unet=None if ema_unet is None else state_dict(ema_unet, dtype))
    tensors.update(extra or {})
    if path.suffix == ".safetensors":
        write_safetensors(path, tensors)
    else:
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        torch.save({"state_dict": sd, "global_step": 123, "epoch": 1} if wrap == "lightning" else sd, path)
    return path
