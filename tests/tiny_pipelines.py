"""Tiny random diffusers pipelines written with save_pretrained: the PyTorch references of the tests.

Each builder returns the torch pipeline and writes it to a folder; torch's RNG is seeded so the
weights are the same every run. The configs are tiny but take the branches full-size models take
(see each builder's docstring).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "jaxdiff" / "assets" / "clip_tokenizer"
# The stock SD config (numbers.md); from_config drops keys a scheduler class does not take.
STOCK_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                       clip_sample=False, timestep_spacing="leading")


def tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """transformers' CLIPTokenizer over jaxdiff's bundled CLIP vocabulary (SD1 pads with the end token,
    SD2 / SDXL's second encoder with '!')."""
    return CLIPTokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"), pad_token=pad_token)


def text_encoder(*, projection: bool = False, legacy_eos: bool = True, act: str = "quick_gelu",
                 hidden: int = 32, layers: int = 2):
    """A CLIP text transformer with the real 49408-token vocabulary and a tiny width.

    legacy_eos: eos_token_id=2 as openai/clip-vit-large-patch14's config says (pooling then uses the
    argmax of the ids); False uses 49407 as OpenCLIP-derived configs do.
    """
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden + 5,
                         num_attention_heads=4, num_hidden_layers=layers, max_position_embeddings=77,
                         hidden_act=act, projection_dim=hidden, bos_token_id=0 if legacy_eos else 49406,
                         eos_token_id=2 if legacy_eos else 49407, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                         scaling_factor=scaling_factor).eval()


def sd1(folder: Path, *, in_channels: int = 4) -> StableDiffusionPipeline:
    """SD1 style: conv proj_in/out, 8 heads' worth of heads by attention_head_dim, context 32, PNDM."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=in_channels,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=text_encoder(), tokenizer=tokenizer(), unet=unet,
        scheduler=PNDMScheduler.from_config({**STOCK_SCHEDULER, "skip_prk_steps": True}), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def sd2(folder: Path) -> StableDiffusionPipeline:
    """SD2 style: per-level head dims, linear projection, upcast attention, gelu CLIP padded with '!',
    v-prediction DDIM."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(4, 8), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=8).eval()
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=text_encoder(act="gelu", legacy_eos=False), tokenizer=tokenizer("!"),
        unet=unet, scheduler=DDIMScheduler.from_config(
            {**STOCK_SCHEDULER, "prediction_type": "v_prediction"}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def sdxl(folder: Path) -> StableDiffusionXLPipeline:
    """SDXL style: two encoders (the second projected, pooled), text_time added embedding, several
    transformer layers per block, linear projection, context = 32 + 32."""
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae(0.13025), text_encoder=text_encoder(), tokenizer=tokenizer(),
        text_encoder_2=text_encoder(projection=True, act="gelu", legacy_eos=False),
        tokenizer_2=tokenizer("!"), unet=unet, scheduler=EulerDiscreteScheduler.from_config(STOCK_SCHEDULER))
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def sd1_inpaint(folder: Path):
    """A 9-channel inpainting UNet (latents + mask + masked-image latents) in SD1 style, saved as
    diffusers' StableDiffusionInpaintPipeline."""
    from diffusers import StableDiffusionInpaintPipeline
    base = sd1(folder, in_channels=9)
    pipe = StableDiffusionInpaintPipeline(**base.components)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def sdxl_refiner(folder: Path):
    """SDXL refiner style: only the second (projected) encoder, context 32, 5 time ids (original size,
    crop, aesthetic score), saved as StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 5 * 8, norm_num_groups=8).eval()
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae(0.13025), text_encoder=None, tokenizer=None,
        text_encoder_2=text_encoder(projection=True, act="gelu", legacy_eos=False), tokenizer_2=tokenizer("!"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(STOCK_SCHEDULER),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
