"""Frozen keyword-only model configs, parsed from diffusers / transformers `config.json` dicts.

Every key a config.json may carry is either a field, metadata that does not change numerics (ignored),
or an upstream option jaxdiff accepts only at the values it implements (anything else is refused with a
ConfigError naming the key). Unknown keys are refused too: a key we have never seen may change numerics.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxdiff.config_parsing import freeze, parse_config
from jaxdiff.errors import ConfigError

# --- CLIP text encoder config (models/clip.py) ---------------------------------------------------------

# transformers' architectures for a CLIP text encoder -> whether it has `text_projection`.
_CLIP_ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
# Keys that do not change an encoder forward pass: dropout (off at inference), initializers (random
# init only), and generic PretrainedConfig keys older transformers wrote into text_config dicts
# (generation, labels, export flags).
_CLIP_IGNORED = frozenset({
    "dropout", "attention_dropout", "initializer_range", "initializer_factor",
    "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "id2label", "label2id", "length_penalty", "max_length",
    "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
    "output_scores", "prefix", "problem_type", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params", "temperature",
    "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p",
    "torchscript", "typical_p", "use_bfloat16", "gradient_checkpointing",
})


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPTextConfig:
    """CLIP text transformer (SD1 CLIP-L, SD2 OpenCLIP-H, SDXL OpenCLIP-bigG), keys as transformers'
    `CLIPTextConfig` config.json.

    A pre-LayerNorm causal transformer over 77 token positions: token + learned position embeddings,
    `num_hidden_layers` blocks of (LayerNorm, self-attention, LayerNorm, MLP), a final LayerNorm, and
    the pooled output read at the end-of-text token, optionally projected by `text_projection`.
    """
    vocab_size: int = 49408
    hidden_size: int = 512                  # D, the width of every hidden state
    intermediate_size: int = 2048           # MLP hidden width
    projection_dim: int = 512               # text_projection output width (used only with_projection)
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77       # token positions; input_ids may be at most this long
    hidden_act: str = "quick_gelu"          # "quick_gelu" (OpenAI CLIP, SD1) or "gelu" (OpenCLIP, SD2/SDXL)
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    # Selects the pooling rule: 2 (configs written before transformers PR #24773, which includes every
    # SD1 / SD2 / SDXL release) pools at argmax(input_ids), the highest id being <|endoftext|> 49407;
    # any other value pools at the first position holding eos_token_id.
    eos_token_id: int = 49407
    with_projection: bool = False           # CLIPTextModelWithProjection: pooled @ text_projection

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (quick_gelu, gelu)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str) -> "CLIPTextConfig":
        """Parse a transformers CLIPTextModel / CLIPTextModelWithProjection config.json dict.

        `architectures` (metadata to parse_config) decides whether the model has `text_projection`.
        """
        archs = freeze(raw.get("architectures") or ("CLIPTextModel",))
        unknown = [a for a in archs if a not in _CLIP_ARCHITECTURES]
        if unknown or len(archs) != 1:
            raise ConfigError(f"{source}: architectures={list(archs)!r} is not a CLIP text encoder jaxdiff "
                              f"implements (one of {', '.join(_CLIP_ARCHITECTURES)})")
        if "with_projection" in raw:  # a jaxdiff field, never an upstream key
            raise ConfigError(f"{source}: unknown config key 'with_projection'")
        config = parse_config(
            cls, raw, source=source,
            ignored=_CLIP_IGNORED,
            only_values={"hidden_act": ("quick_gelu", "gelu"), "model_type": ("clip_text_model",),
                         # Options that would change the graph; CLIP text encoders never set them.
                         "pruned_heads": ({},), "is_decoder": (False,), "add_cross_attention": (False,)})
        return dataclasses.replace(config, with_projection=_CLIP_ARCHITECTURES[archs[0]])

    @classmethod
    def clip_l(cls) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14 text encoder, SD 1.x (123.06M parameters)."""
        return cls(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)

    @classmethod
    def openclip_h(cls) -> "CLIPTextConfig":
        """OpenCLIP ViT-H/14 text encoder, SD 2.x, as diffusers ships it: the last of its 24 layers is
        dropped because SD2 conditions on the penultimate one (340.39M parameters)."""
        return cls(hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu", bos_token_id=0, eos_token_id=2)

    @classmethod
    def openclip_bigg(cls) -> "CLIPTextConfig":
        """OpenCLIP ViT-bigG/14 text encoder with projection, SDXL's text_encoder_2 (694.66M parameters)."""
        return cls(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                   num_attention_heads=20, hidden_act="gelu", bos_token_id=0, eos_token_id=2,
                   with_projection=True)

    @classmethod
    def tiny(cls, **overrides) -> "CLIPTextConfig":
        """For tests and the demo model: 2 layers of width 32 over the full CLIP vocabulary, so the real
        tokenizer's ids fit. `overrides` replace fields (e.g. with_projection=True)."""
        return dataclasses.replace(
            cls(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                num_attention_heads=4, hidden_act="gelu"), **overrides)


# --- UNet config (models/unet.py) ---------------------------------------------------------------------

_UNET_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_level(value, levels: int, name: str) -> tuple:
    """An int (same at every level) or one entry per level -> tuple of `levels` entries."""
    if isinstance(value, tuple):
        if len(value) != levels:
            raise ValueError(f"{name}={value!r} needs one entry per level ({levels})")
        return value
    return (value,) * levels


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """UNet2DConditionModel (SD1 / SD2 / SDXL / SDXL refiner / inpainting), fields as in diffusers' config.json.

    Block types are diffusers' strings so a config.json round-trips unchanged; only the cross-attention
    and plain resnet blocks exist (`has_cross_attention_down/up` give the semantic view). Per-level
    fields take an int or one value per level, like diffusers.

    Heads: diffusers' `attention_head_dim` is really the NUMBER of heads per level (its config misnames
    it; see diffusers issue 2011): diffusers resolves heads = num_attention_heads or attention_head_dim,
    and refuses a non-null num_attention_heads itself, so heads = attention_head_dim and head width =
    channels // heads. `heads_per_level` resolves that; up blocks use the levels reversed.

    Implemented embeddings: sinusoidal timestep (`flip_sin_to_cos`, `freq_shift`) -> time_embedding;
    `class_embed_type` None (with `num_class_embeds`: a learnt class table), "timestep", "identity",
    "projection", "simple_projection" (labels come in `added_cond["class_labels"]`);
    `addition_embed_type` "text_time" (SDXL: pooled text + sinusoidal embedding of the 6 or 5 time ids);
    `time_cond_proj_dim` (LCM-distilled models: `added_cond["timestep_cond"]` through time_embedding.cond_proj).
    """
    sample_size: int | tuple[int, int] | None = None   # default latent size (64 SD1, 96 SD2-768, 128 SDXL)
    in_channels: int = 4                           # 9 for inpainting (latents + mask + masked-image latents)
    out_channels: int = 4
    center_input_sample: bool = False              # sample -> 2 * sample - 1 before conv_in
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"   # None: no mid block
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2      # resnets per down level (up levels: one more)
    downsample_padding: int = 1                    # 0 = diffusers' asymmetric (0, 1, 0, 1) pad
    mid_block_scale_factor: float = 1.0            # mid-block resnets divide their residual sum by it
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280   # context width (768 SD1, 1024 SD2, 2048 SDXL)
    transformer_layers_per_block: int | tuple[int, ...] = 1   # BasicTransformerBlocks per Transformer2D
    attention_head_dim: int | tuple[int, ...] = 8    # = heads per level (diffusers' misnomer, above)
    use_linear_projection: bool = False            # proj_in/out as Linear (SD2, SDXL) instead of 1x1 conv
    upcast_attention: bool | None = False       # scores + softmax in float32 (SD2.1); null = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    addition_embed_type: str | None = None      # None or "text_time"
    addition_time_embed_dim: int | None = None  # per time-id sinusoid width (256 SDXL)
    projection_class_embeddings_input_dim: int | None = None   # 2816 SDXL, 2560 refiner
    time_embedding_dim: int | None = None       # None: 4 * block_out_channels[0]
    mid_block_only_cross_attention: bool | None = None   # only False / None implemented
    # LCM-distilled UNets: width of the guidance-scale embedding fed to time_embedding.cond_proj
    # (added_cond["timestep_cond"] [B, time_cond_proj_dim], diffusers' `timestep_cond`); None: no cond_proj.
    time_cond_proj_dim: int | None = None

    def __post_init__(self):
        # config.json may say null; the model treats it as False, and equal configs should compare equal.
        object.__setattr__(self, "upcast_attention", bool(self.upcast_attention))
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ValueError("block_out_channels must not be empty")
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError(f"down_block_types {self.down_block_types} and up_block_types "
                             f"{self.up_block_types} need one entry per level ({levels})")
        for kinds, allowed in ((self.down_block_types, _UNET_DOWN_BLOCKS), (self.up_block_types, _UNET_UP_BLOCKS)):
            for kind in kinds:
                if kind not in allowed:
                    raise ValueError(f"block type {kind!r} is not implemented (implemented: {allowed})")
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", None):
            raise ValueError(f"mid_block_type={self.mid_block_type!r} is not implemented")
        for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                     "attention_head_dim"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                _per_level(value, levels, name)
                if name == "transformer_layers_per_block" and any(isinstance(v, tuple) for v in value):
                    raise ValueError("per-resnet transformer_layers_per_block (asymmetric UNets) is not implemented")
        for level, (c, h) in enumerate(zip(self.block_out_channels, self.heads_per_level)):
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels[{level}]={c} is not divisible by norm_num_groups")
            if c % h:
                raise ValueError(f"block_out_channels[{level}]={c} does not split into {h} heads")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not implemented")
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if self.class_embed_type not in (None, "timestep", "identity", "projection", "simple_projection"):
            raise ValueError(f"class_embed_type={self.class_embed_type!r} is not implemented")
        if self.class_embed_type in ("projection", "simple_projection") and (
                self.projection_class_embeddings_input_dim is None):
            raise ValueError(f"class_embed_type={self.class_embed_type!r} needs projection_class_embeddings_input_dim")
        if self.time_cond_proj_dim is not None and self.time_cond_proj_dim < 1:
            raise ValueError(f"time_cond_proj_dim={self.time_cond_proj_dim} must be a positive int or null")
        if self.mid_block_only_cross_attention:
            raise ValueError("mid_block_only_cross_attention=True is not implemented")

    # --- resolved per-level views (down-block order; up blocks read them reversed) ---
    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads per level, resolved exactly as diffusers does (see the class docstring)."""
        return _per_level(self.attention_head_dim, self.levels, "attention heads")

    @property
    def layers_per_level(self) -> tuple[int, ...]:
        return _per_level(self.layers_per_block, self.levels, "layers_per_block")

    @property
    def transformer_layers_per_level(self) -> tuple[int, ...]:
        return _per_level(self.transformer_layers_per_block, self.levels, "transformer_layers_per_block")

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_level(self.cross_attention_dim, self.levels, "cross_attention_dim")

    @property
    def takes_text_time(self) -> bool:
        """SDXL-style added conditioning: a pooled text embedding and sinusoid-embedded time ids."""
        return self.addition_embed_type == "text_time"

    def time_id_count(self, pooled_dim: int) -> int:
        """How many time ids the added embedding takes, given the pooled text width (6 SDXL, 5 refiner)."""
        if not self.takes_text_time:
            return 0
        return (self.projection_class_embeddings_input_dim - pooled_dim) // self.addition_time_embed_dim

    @property
    def has_cross_attention_down(self) -> tuple[bool, ...]:
        return tuple(t == "CrossAttnDownBlock2D" for t in self.down_block_types)

    @property
    def has_cross_attention_up(self) -> tuple[bool, ...]:
        return tuple(t == "CrossAttnUpBlock2D" for t in self.up_block_types)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str) -> "UNetConfig":
        """Parse a diffusers UNet2DConditionModel config.json dict; refuse what jaxdiff does not implement."""
        return parse_config(
            cls, raw, source=source,
            # Numerics-free here: the head count of the "text" addition embedding, which is refused.
            ignored=frozenset({"addition_embed_type_num_heads"}),
            only_values={
                "act_fn": ("silu", "swish"),
                # Dropout only acts in training; the SD checkpoints are trained and shipped with 0.
                "dropout": (0.0, 0),
                "only_cross_attention": (False, (False,) * len(raw.get("block_out_channels", (0,) * 4))),
                "dual_cross_attention": (False,),
                "resnet_time_scale_shift": ("default",),
                "resnet_skip_time_act": (False,),
                "resnet_out_scale_factor": (1.0, 1),
                "time_embedding_type": ("positional",),
                "time_embedding_act_fn": (None,),
                "timestep_post_act": (None,),
                "conv_in_kernel": (3,),
                "conv_out_kernel": (3,),
                "attention_type": ("default",),
                "class_embeddings_concat": (False,),
                "cross_attention_norm": (None,),
                "encoder_hid_dim": (None,),
                "encoder_hid_dim_type": (None,),
                "reverse_transformer_layers_per_block": (None,),
                "mid_block_only_cross_attention": (None, False),
                "addition_embed_type": (None, "text_time"),
                "class_embed_type": (None, "timestep", "identity", "projection", "simple_projection"),
                "mid_block_type": ("UNetMidBlock2DCrossAttn", None),
                # diffusers 0.42 itself raises on a non-null value (the heads naming issue above).
                "num_attention_heads": (None,),
            })

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """Stable Diffusion 1.x (859.52M): 4 levels, 8 heads, 1x1-conv projections, CLIP-L context 768."""
        return cls(sample_size=64, cross_attention_dim=768, attention_head_dim=8)

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """Stable Diffusion 2.1 768-v (865.91M): heads 5/10/20/20 of width 64, linear projections,
        float32 attention scores, OpenCLIP-H context 1024."""
        return cls(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True)

    @classmethod
    def sdxl(cls) -> "UNetConfig":
        """SDXL base (2567.46M): 3 levels, 1/2/10 transformer layers, context 2048, text_time embedding."""
        return cls(sample_size=128, block_out_channels=(320, 640, 1280),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                   cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

    @classmethod
    def sdxl_refiner(cls) -> "UNetConfig":
        """SDXL refiner: 4 levels of 384..1536, 4 transformer layers, OpenCLIP-bigG context 1280 only,
        time ids carry an aesthetic score instead of the target size (5 ids: 1280 + 5 * 256 = 2560)."""
        return cls(sample_size=128, block_out_channels=(384, 768, 1536, 1536),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4,
                   cross_attention_dim=1280, use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)

    @classmethod
    def tiny(cls) -> "UNetConfig":
        """For tests and the demo only: SD1-shaped, 2 levels of 32/64 channels, 0.79M params."""
        return cls(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   attention_head_dim=2, cross_attention_dim=32)


# --- VAE config (models/vae.py) -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """AutoencoderKL (SD1 / SD2 / SDXL VAE), field names as in diffusers' `AutoencoderKL` config.json.

    The encoder has one level per entry of `block_out_channels`, each `layers_per_block` ResnetBlocks
    and a stride-2 conv except the last; the decoder mirrors it with `layers_per_block + 1` ResnetBlocks
    and a nearest x2 upsample + conv. Images are downsampled by 2 ** (levels - 1) (8 for SD).
    """
    in_channels: int = 3                    # image channels in
    out_channels: int = 3                   # image channels out
    block_out_channels: tuple[int, ...] = (64,)  # channels per level, finest first
    layers_per_block: int = 1               # encoder ResnetBlocks per level (decoder: one more)
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True    # single-head self-attention in both mid blocks
    use_quant_conv: bool = True             # 1x1 conv on the encoder's [mean, logvar] output
    use_post_quant_conv: bool = True        # 1x1 conv on the latents before the decoder
    # Latents given to / taken from the UNet are `z * scaling_factor`; encode/decode work on unscaled z.
    scaling_factor: float = 0.18215
    # diffusers' hint that this VAE overflows in float16; the pipeline then runs it in float32. It does not
    # change the module's numerics.
    force_upcast: bool = True
    # Pixels per tile of diffusers' tiled encode / decode (`enable_tiling()`; jaxdiff.vae_tiling). It does
    # not change the untiled numerics. diffusers' default is 32; released SD VAEs say 512 (SDXL 1024).
    sample_size: int | tuple[int, ...] = 32

    def __post_init__(self):
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {self.block_out_channels} must all be divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block} must be >= 1")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD / SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str) -> "VAEConfig":
        """Parse a diffusers AutoencoderKL config.json dict; refuse what jaxdiff's VAE does not implement."""
        levels = len(raw.get("block_out_channels", cls.block_out_channels))
        # Block types are strings upstream; jaxdiff implements exactly the plain encoder / decoder blocks,
        # one per level (diffusers indexes block_out_channels by block position, so counts must agree).
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            value = freeze(raw.get(key, (block,)))
            if value != (block,) * levels:
                raise ConfigError(f"{source}: {key}={list(value)!r} is not supported by jaxdiff (supported: "
                                  f"{levels} x {block!r}, one per entry of block_out_channels)")
        return parse_config(
            cls, raw, source=source,
            ignored=frozenset({"down_block_types", "up_block_types"}),
            only_values={
                "act_fn": ("silu",),
                # SD3 / Flux latent normalisation; SD1 / SD2 / SDXL VAEs have none.
                "shift_factor": (None,),
                "latents_mean": (None,),
                "latents_std": (None,),
            })

    @classmethod
    def sd(cls) -> "VAEConfig":
        """The SD 1.x / 2.x VAE (83.65M parameters)."""
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.18215,
                   sample_size=512)

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        """The SDXL VAE: SD's architecture, retrained, with a different latent scale."""
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.13025,
                   sample_size=1024)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """For tests only: two levels (downsample factor 2), a few thousand parameters."""
        return cls(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
