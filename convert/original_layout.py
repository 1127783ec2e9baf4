"""Single-file Stable Diffusion checkpoints (CompVis SD1 / SD2, SGM SDXL base / refiner) <-> diffusers names.

One file holds every network under a prefix (shared/reference/formats.md §1.1):

    model.diffusion_model.*                 UNet, LDM `openaimodel.UNetModel` names
    first_stage_model.*                     AutoencoderKL, LDM names
    cond_stage_model.transformer.*          SD1 CLIP-L: a transformers CLIPTextModel state dict verbatim
    cond_stage_model.model.*                SD2 OpenCLIP ViT-H text tower
    conditioner.embedders.0.transformer.*   SDXL base CLIP-L;  conditioner.embedders.1.model.*  its bigG
    conditioner.embedders.0.model.*         SDXL refiner bigG (its only encoder)
    model_ema.*                             EMA copy of the UNet, dots removed (§1.8)

`to_diffusers` splits such a state dict into diffusers / transformers state dicts plus the config.json
dicts those networks need; `from_diffusers` goes back. Every size (levels, widths, resnets per level,
transformer depth, context width, in-channels 4 / 8 / 9, CLIP width, depth and MLP width) is read from
tensor shapes, never from a table of released sizes, so tiny and pruned files load too. What shapes
cannot say is a family rule: heads (SD1 UNets 8 heads; SD2 and SDXL UNets 64 channels per head; CLIP
64 channels per head), GroupNorm's 32 groups (LDM `normalization`), the VAE scaling factor, the
scheduler and the prediction type.

Module renames follow diffusers' loaders/single_file_utils.py (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`) and scripts/convert_diffusers_to_original_
{stable_diffusion,sdxl}.py, written here as one prefix table per network that both directions share.

A leaf module: numpy only, never imports jaxdiff.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Mapping

import numpy as np

from convert.errors import CheckpointError

UNET = "model.diffusion_model."
EMA = "model_ema."
VAE_PREFIXES = ("first_stage_model.", "vae.")  # diffusers' LDM_VAE_KEYS
# family -> {diffusers component: (file prefix, "hf" | "openclip")}
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")},
    "sdxl_refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", "openclip")},
}
FAMILIES = tuple(TEXT_ENCODERS)
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025, "sdxl_refiner": 0.13025}
SAMPLE_SIZE = {"sd1": 64, "sd2": 64, "sdxl": 128, "sdxl_refiner": 128}  # latent pixels; SD2-v: 96
TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}  # SDXL micro-conditioning ids (formats.md §1.5)
HEAD_CHANNELS = 64
SD1_HEADS = 8
GROUPS = 32
# SD2-base 512's training step count: diffusers' legacy loader calls a `v2` file epsilon only when
# its global_step is this (single_file_utils.py `_legacy_load_scheduler`), v-prediction otherwise.
SD2_BASE_GLOBAL_STEP = 875000
# The stock SD training schedule (shared/reference/numbers.md; diffusers SCHEDULER_DEFAULT_CONFIG).
STOCK_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                      clip_sample=False, timestep_spacing="leading")
SCHEDULER_CLASS = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler", "sdxl": "EulerDiscreteScheduler",
                   "sdxl_refiner": "EulerDiscreteScheduler"}
# Entries no converter consumes (formats.md §1.6); anything else unknown is an error.
IGNORED = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
           "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
           "sqrt_recipm1_alphas_cumprod", "posterior_*", "lvlb_weights", "logvar", "model_ema.decay",
           "model_ema.num_updates", "denoiser.*", "*.position_ids", "*.logit_scale", "*.attn_mask",
           "loss.*", "first_stage_model.loss.*", "model_ema.*")


class OriginalLayoutError(CheckpointError):
    """A single-file checkpoint whose keys or shapes are not a Stable Diffusion model this reads."""


@dataclasses.dataclass
class Converted:
    """A single file in diffusers terms.

    family: "sd1" | "sd2" | "sdxl" | "sdxl_refiner"; components: diffusers name -> {"class_name",
    "config" (a config.json dict), "tensors" (torch-layout state dict)}; scheduler: a
    scheduler_config.json dict; pipeline_class: the diffusers pipeline class.
    """
    family: str
    components: dict[str, dict[str, Any]]
    scheduler: dict[str, Any]
    pipeline_class: str


# ----------------------------------------------------------------------------------------- renaming

_RESNET_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_VAE = {"nin_shortcut": "conv_shortcut"}
_ATTN_VAE = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename(key: str, table: Mapping[str, tuple[str, Mapping[str, str]]]) -> str | None:
    """`key` renamed by the longest module prefix of `table` and that module's sub-renames, or None."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        hit = table.get(".".join(parts[:n]))
        if hit is None:
            continue
        new_prefix, subs = hit
        rest = parts[n:]
        for m in range(len(rest) - 1, 0, -1):
            sub = subs.get(".".join(rest[:m]))
            if sub is not None:
                rest = sub.split(".") + rest[m:]
                break
        return ".".join(([new_prefix] if new_prefix else []) + rest)
    return None


def _invert(table: Mapping[str, tuple[str, Mapping[str, str]]]) -> dict[str, tuple[str, dict[str, str]]]:
    return {new: (old, {v: k for k, v in subs.items()}) for old, (new, subs) in table.items()}


def _apply(tensors: Mapping[str, np.ndarray], table, *, source: str, what: str) -> dict[str, np.ndarray]:
    out, unknown = {}, []
    for key, value in tensors.items():
        new = _rename(key, table)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise OriginalLayoutError(f"{source}: {len(unknown)} {what} tensors fit no known module "
                                  f"({', '.join(sorted(unknown)[:4])}); not a Stable Diffusion checkpoint "
                                  f"this version reads")
    return out


# --------------------------------------------------------------------------------------------- UNet

@dataclasses.dataclass(frozen=True)
class UNetShape:
    """The structure of an LDM UNet, read from its keys: per level channels, attention and depth."""
    channels: tuple[int, ...]
    layers: int                      # resnets per down level (up levels: one more)
    attn_down: tuple[bool, ...]
    attn_up: tuple[bool, ...]        # per diffusers up block (coarsest first)
    mid_attention: bool


def unet_table(s: UNetShape) -> dict[str, tuple[str, dict[str, str]]]:
    """LDM module prefix -> (diffusers module prefix, sub-renames), formats.md §1.3."""
    L, n = s.layers, len(s.channels)
    t = {"time_embed.0": ("time_embedding.linear_1", {}), "time_embed.2": ("time_embedding.linear_2", {}),
         "input_blocks.0.0": ("conv_in", {}), "out.0": ("conv_norm_out", {}), "out.2": ("conv_out", {}),
         "label_emb.0.0": ("add_embedding.linear_1", {}), "label_emb.0.2": ("add_embedding.linear_2", {}),
         "middle_block.0": ("mid_block.resnets.0", _RESNET_UNET),
         f"middle_block.{2 if s.mid_attention else 1}": ("mid_block.resnets.1", _RESNET_UNET)}
    if s.mid_attention:
        t["middle_block.1"] = ("mid_block.attentions.0", {})
    for b in range(n):
        for j in range(L):
            i = 1 + b * (L + 1) + j
            t[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", _RESNET_UNET)
            if s.attn_down[b]:
                t[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", {})
        if b < n - 1:
            t[f"input_blocks.{(b + 1) * (L + 1)}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", {})
        for j in range(L + 1):
            i = b * (L + 1) + j
            t[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", _RESNET_UNET)
            if s.attn_up[b]:
                t[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", {})
        if b < n - 1:  # the upsampler follows the last resnet (and its attention, if any)
            i = b * (L + 1) + L
            t[f"output_blocks.{i}.{2 if s.attn_up[b] else 1}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", {})
    return t


def _count(keys, pattern: str) -> int:
    """How many distinct integers fill `{}` in keys matching `pattern` (a prefix with one `{}`)."""
    rx = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)") + r"\.")
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def unet_shape(u: Mapping[str, np.ndarray], source: str, *, down_only: bool = False) -> UNetShape:
    """Reads levels, widths and attention placement from an LDM UNet state dict (prefix removed).
    down_only: a ControlNet (no output blocks): the up half is taken as the mirror of the down half."""
    try:
        n_in = _count(u, "input_blocks.{}")
        levels: list[list[int]] = [[]]
        for i in range(1, n_in):
            if f"input_blocks.{i}.0.op.weight" in u:
                levels.append([])
            else:
                levels[-1].append(i)
        L = len(levels[0])
        if L == 0 or any(len(lv) != L for lv in levels):
            raise OriginalLayoutError(f"{source}: UNet levels have unequal resnet counts "
                                      f"{[len(lv) for lv in levels]}; not an SD UNet")
        channels = tuple(int(u[f"input_blocks.{lv[0]}.0.out_layers.3.weight"].shape[0]) for lv in levels)
        attn_down = tuple(f"input_blocks.{lv[0]}.1.norm.weight" in u for lv in levels)
        n = len(levels)
        attn_up = (tuple(reversed(attn_down)) if down_only else
                   tuple(f"output_blocks.{b * (L + 1)}.1.norm.weight" in u for b in range(n)))
        mid_attention = "middle_block.1.norm.weight" in u
    except KeyError as e:
        raise OriginalLayoutError(f"{source}: UNet tensor {e} is missing; truncated or not an SD UNet") from None
    return UNetShape(channels, L, attn_down, attn_up, mid_attention)


def _depth(u, prefix: str) -> int:
    return _count(u, prefix + ".transformer_blocks.{}")


def unet_config(u: Mapping[str, np.ndarray], family: str, *, pooled_dim: int | None, sample_size: int,
                source: str, down_only: bool = False) -> tuple[dict[str, Any], UNetShape]:
    """A diffusers UNet2DConditionModel config.json dict for an LDM UNet state dict (prefix removed);
    down_only: a ControlNet's trunk (see unet_shape; out_channels is then the input's)."""
    s = unet_shape(u, source, down_only=down_only)
    L, n = s.layers, len(s.channels)
    try:
        conv_in = u["input_blocks.0.0.weight"]
        first_attn = next((f"input_blocks.{1 + b * (L + 1)}.1" for b in range(n) if s.attn_down[b]), None)
        if first_attn is None:
            raise OriginalLayoutError(f"{source}: the UNet has no cross-attention; not a text-to-image SD UNet")
        context = int(u[f"{first_attn}.transformer_blocks.0.attn2.to_k.weight"].shape[1])
        linear = u[f"{first_attn}.proj_in.weight"].ndim == 2
        time_dim = int(u["time_embed.0.weight"].shape[0])
        out_channels = int((u["input_blocks.0.0.weight"] if down_only else u["out.2.weight"]).shape[
            1 if down_only else 0])
    except KeyError as e:
        raise OriginalLayoutError(f"{source}: UNet tensor {e} is missing; truncated or not an SD UNet") from None
    if list(s.attn_up) != list(reversed(s.attn_down)):
        raise OriginalLayoutError(f"{source}: UNet attention placement {s.attn_down} / {s.attn_up} is not "
                                  f"mirrored; not an SD UNet")
    mid_depth = _depth(u, "middle_block.1") if s.mid_attention else 1
    depth = [_depth(u, f"input_blocks.{1 + b * (L + 1)}.1") if s.attn_down[b]
             else (mid_depth if b == n - 1 else 1) for b in range(n)]
    if depth[-1] != mid_depth:
        raise OriginalLayoutError(f"{source}: mid-block depth {mid_depth} differs from the last level's "
                                  f"{depth[-1]}; not an SD UNet")
    if family == "sd1":
        heads: Any = SD1_HEADS
    else:
        bad = [c for c, a in zip(s.channels, s.attn_down) if a and c % HEAD_CHANNELS]
        if bad:
            raise OriginalLayoutError(f"{source}: UNet widths {bad} are not multiples of the "
                                      f"{HEAD_CHANNELS}-channel heads {family} uses")
        heads = [max(c // HEAD_CHANNELS, 1) for c in s.channels]
    cfg: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": int(conv_in.shape[1]), "out_channels": out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s.attn_down],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in s.attn_up],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if s.mid_attention else None,
        "block_out_channels": list(s.channels), "layers_per_block": L, "norm_num_groups": GROUPS,
        "cross_attention_dim": context, "attention_head_dim": heads,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "use_linear_projection": bool(linear), "upcast_attention": family == "sd2",
    }
    if time_dim != 4 * s.channels[0]:
        cfg["time_embedding_dim"] = time_dim
    if "label_emb.0.0.weight" in u:
        if family not in TIME_IDS:
            raise OriginalLayoutError(f"{source}: a class-conditioned UNet (label_emb) outside SDXL "
                                      f"(unCLIP / upscaler) is not supported")
        adm = int(u["label_emb.0.0.weight"].shape[1])
        ids = TIME_IDS[family]
        time_embed = (adm - pooled_dim) // ids if pooled_dim is not None else 256
        if pooled_dim is not None and (adm - pooled_dim) % ids:
            raise OriginalLayoutError(f"{source}: label_emb input {adm} is not pooled {pooled_dim} + {ids} "
                                      f"time ids")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=time_embed,
                   projection_class_embeddings_input_dim=adm)
    elif family in TIME_IDS:
        raise OriginalLayoutError(f"{source}: SDXL file without the UNet's label_emb (added conditioning)")
    return cfg, s


def ema_key(unet_key: str) -> str:
    """'model.diffusion_model.input_blocks.0.0.weight' -> 'model_ema.diffusion_modelinput_blocks00weight'
    (diffusers `convert_ldm_unet_checkpoint`: every dot after `model.` removed)."""
    return EMA + "".join(unet_key.split(".")[1:])


# ---------------------------------------------------------------------------------------------- VAE

def vae_table(n_levels: int) -> dict[str, tuple[str, dict[str, str]]]:
    """LDM VAE module prefix -> (diffusers prefix, sub-renames), formats.md §1.4 (decoder order reversed)."""
    t: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        t.update({f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
                  f"{part}.norm_out": (f"{part}.conv_norm_out", {}),
                  f"{part}.mid.block_1": (f"{part}.mid_block.resnets.0", _RESNET_VAE),
                  f"{part}.mid.block_2": (f"{part}.mid_block.resnets.1", _RESNET_VAE),
                  f"{part}.mid.attn_1": (f"{part}.mid_block.attentions.0", _ATTN_VAE)})
    for i in range(n_levels):
        for j in range(8):  # resnets per level are read from keys; 8 covers any SD VAE
            t[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _RESNET_VAE)
            t[f"decoder.up.{n_levels - 1 - i}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", _RESNET_VAE)
        t[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", {})
        t[f"decoder.up.{n_levels - 1 - i}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", {})
    return t


_VAE_ATTN_WEIGHT = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def vae_config(v: Mapping[str, np.ndarray], family: str, source: str) -> dict[str, Any]:
    """A diffusers AutoencoderKL config.json dict for an LDM VAE state dict (prefix removed)."""
    try:
        n = _count(v, "encoder.down.{}")
        layers = _count(v, "encoder.down.0.block.{}")
        channels = [int(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(n)]
        cfg = {"_class_name": "AutoencoderKL", "in_channels": int(v["encoder.conv_in.weight"].shape[1]),
               "out_channels": int(v["decoder.conv_out.weight"].shape[0]),
               "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
               "block_out_channels": channels, "layers_per_block": layers,
               "latent_channels": int(v["decoder.conv_in.weight"].shape[1]), "norm_num_groups": GROUPS,
               "scaling_factor": VAE_SCALING[family], "sample_size": SAMPLE_SIZE[family] * 8,
               "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in v,
               "use_quant_conv": "quant_conv.weight" in v, "use_post_quant_conv": "post_quant_conv.weight" in v}
    except KeyError as e:
        raise OriginalLayoutError(f"{source}: VAE tensor {e} is missing; truncated or not an SD VAE") from None
    if n == 0 or layers == 0:
        raise OriginalLayoutError(f"{source}: no VAE encoder levels (encoder.down.*) found")
    return cfg


def vae_to_diffusers(v: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """LDM VAE state dict (prefix removed) -> diffusers AutoencoderKL state dict."""
    out = _apply(v, vae_table(_count(v, "encoder.down.{}")), source=source, what="VAE")
    for k, a in out.items():  # mid-attention 1x1 convs -> Linear (diffusers `conv_attn_to_linear`)
        if _VAE_ATTN_WEIGHT.match(k) and a.ndim == 4:
            out[k] = a.reshape(a.shape[:2])
    return out


def vae_from_diffusers(d: Mapping[str, np.ndarray], n_levels: int) -> dict[str, np.ndarray]:
    out = _apply(d, _invert(vae_table(n_levels)), source="diffusers VAE", what="VAE")
    for k, a in list(out.items()):
        if re.match(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", k) and a.ndim == 2:
            out[k] = a.reshape(a.shape + (1, 1))
    return out


def split_vae_file(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A standalone VAE file's tensors (bare LDM names, or under first_stage_model. / vae.)."""
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: a for k, a in tensors.items() if k.startswith(prefix)}
    return {k: a for k, a in tensors.items()
            if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}


# ------------------------------------------------------------------------------------ text encoders

_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}


def openclip_to_hf(t: Mapping[str, np.ndarray], *, layers: int, projection: bool, source: str
                   ) -> dict[str, np.ndarray]:
    """OpenCLIP text tower (prefix removed) -> transformers CLIPTextModel(WithProjection) state dict.

    Keeps the first `layers` resblocks (SD2 drops the last); `in_proj` [3W, W] splits into q, k, v by
    rows; `text_projection` [W, P] (used as x @ P) becomes the Linear weight [P, W].
    """
    width = int(t["token_embedding.weight"].shape[1])
    out, unknown = {}, []
    for key, a in t.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = a
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = a
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".", 1)[1]] = a
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = a.T
        elif key in ("logit_scale", "attn_mask"):
            continue
        elif m := re.match(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key):
            i, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if i >= layers:
                continue
            base = f"text_model.encoder.layers.{i}."
            if module not in _OPENCLIP_LAYER:
                unknown.append(key)
                continue
            out[f"{base}{_OPENCLIP_LAYER[module]}.{leaf}"] = a
        elif m := re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            i, leaf = int(m.group(1)), m.group(2)
            if i >= layers:
                continue
            if a.shape[0] != 3 * width:
                raise OriginalLayoutError(f"{source}: {key} has {a.shape[0]} rows, expected 3 x {width}")
            for n, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"text_model.encoder.layers.{i}.self_attn.{name}.{leaf}"] = a[n * width:(n + 1) * width]
        else:
            unknown.append(key)
    if unknown:
        raise OriginalLayoutError(f"{source}: unknown OpenCLIP tensors ({', '.join(sorted(unknown)[:4])})")
    return out


def hf_to_openclip(d: Mapping[str, np.ndarray], *, extra_identity_layer: bool = False
                   ) -> dict[str, np.ndarray]:
    """The inverse of `openclip_to_hf`. `extra_identity_layer` appends an all-zero resblock (an identity:
    every sublayer's residual is zero) and an identity `text_projection`, so an SD2 text encoder of N
    layers is written as the N + 1 blocks readers expect to drop one of."""
    inverse = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out, qkv = {}, {}
    for key, a in d.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = a
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = a
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = a
        elif key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(a.T)
        elif key.endswith("position_ids"):
            continue
        elif m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = a
        elif m := re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            if m.group(2) not in inverse:
                raise OriginalLayoutError(f"CLIP tensor {key} has no OpenCLIP counterpart")
            out[f"transformer.resblocks.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"] = a
        else:
            raise OriginalLayoutError(f"CLIP tensor {key} has no OpenCLIP counterpart")
    for (i, leaf), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate([parts["q"], parts["k"], parts["v"]])
    if extra_identity_layer:
        n = 1 + max(i for i, _ in qkv)
        for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            out[key.replace(".0.", f".{n}.", 1)] = np.zeros_like(out[key])
        width = out["token_embedding.weight"].shape[1]
        out.setdefault("text_projection", np.eye(width, dtype=out["token_embedding.weight"].dtype))
    return out


def clip_config(d: Mapping[str, np.ndarray], *, openclip: bool, projection: bool, source: str) -> dict[str, Any]:
    """A transformers CLIPTextConfig dict for a converted (HF-named) text encoder state dict."""
    try:
        vocab, width = (int(x) for x in d["text_model.embeddings.token_embedding.weight"].shape)
        positions = int(d["text_model.embeddings.position_embedding.weight"].shape[0])
        mlp = int(d["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise OriginalLayoutError(f"{source}: text encoder tensor {e} is missing; truncated file") from None
    if width % HEAD_CHANNELS:
        raise OriginalLayoutError(f"{source}: text encoder width {width} is not a multiple of the "
                                  f"{HEAD_CHANNELS}-channel CLIP heads")
    layers = len({k.split(".")[3] for k in d if k.startswith("text_model.encoder.layers.")})
    cfg = {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
           "model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": width,
           "intermediate_size": mlp, "num_hidden_layers": layers,
           "num_attention_heads": width // HEAD_CHANNELS, "max_position_embeddings": positions,
           "hidden_act": "gelu" if openclip else "quick_gelu", "layer_norm_eps": 1e-5,
           # The ids the released configs carry (openai/clip-vit-large-patch14 and the SD2 / SDXL
           # text_encoder folders derived from it); eos 2 selects argmax pooling in transformers.
           "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
           "projection_dim": int(d["text_projection.weight"].shape[0]) if projection else width}
    return cfg


def _hf_clip(t: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A CLIP-L state dict as stored (some old SD1 files lack `text_model.`; ComfyUI inserts it)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): a for k, a in t.items()}


# ------------------------------------------------------------------------------------------- family

def detect_family(keys, source: str) -> str:
    """sd1 / sd2 / sdxl / sdxl_refiner, from which text-encoder prefixes the file has."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(UNET):
        raise OriginalLayoutError(f"{source}: no {UNET}* tensors: not a Stable Diffusion checkpoint "
                                  f"(a LoRA, VAE, embedding or another model type?)")
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl_refiner"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise OriginalLayoutError(f"{source}: a UNet without a known text encoder (cond_stage_model.* or "
                              f"conditioner.embedders.*); UNet-only files are not supported")


def _strip(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: a for k, a in tensors.items() if k.startswith(prefix)}


def to_diffusers(tensors: Mapping[str, np.ndarray], *, source: str, prefer_ema: bool = False,
                 prediction_type: str | None = None, global_step: int | None = None) -> Converted:
    """A single-file checkpoint -> diffusers components, configs, scheduler.

    Args:
      tensors: the file's flat state dict (Lightning `state_dict` already unwrapped).
      source: the file, named in errors.
      prefer_ema: take the UNet from `model_ema.*` (files without it are an error); by default the
        `model.*` weights are used, as diffusers, A1111 and ComfyUI do.
      prediction_type: "epsilon" / "v_prediction" overrides the family default.
      global_step: the Lightning `global_step`, when the file has one (SD2 prediction type, below).
    """
    family = detect_family(tensors, source)
    used: set[str] = set()
    components: dict[str, dict[str, Any]] = {}
    pooled = None
    for name, (prefix, style) in TEXT_ENCODERS[family].items():
        raw = _strip(tensors, prefix)
        used.update(prefix + k for k in raw)
        projection = name == "text_encoder_2"
        if style == "hf":
            d = _hf_clip(raw)
        else:
            n = _count(raw, "transformer.resblocks.{}")
            # SD2 conditions on the penultimate layer: diffusers' SD2 text encoder has 23 of the file's
            # 24 blocks (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE); SDXL keeps all and uses hidden_states[-2].
            d = openclip_to_hf(raw, layers=n - 1 if family == "sd2" else n, projection=projection,
                               source=source)
            if projection:
                if "text_projection.weight" not in d:
                    raise OriginalLayoutError(f"{source}: {prefix}text_projection is missing")
                pooled = int(d["text_projection.weight"].shape[0])
        cfg = clip_config(d, openclip=style == "openclip", projection=projection, source=source)
        components[name] = {"class_name": cfg["architectures"][0], "config": cfg, "tensors": d}

    unet_keys = [k for k in tensors if k.startswith(UNET)]
    used.update(unet_keys)
    if prefer_ema:
        missing = [k for k in unet_keys if ema_key(k) not in tensors]
        if len(missing) == len(unet_keys):
            raise OriginalLayoutError(f"{source}: prefer_ema=True but the file has no EMA weights (model_ema.*)")
        if missing:
            raise OriginalLayoutError(f"{source}: EMA weights incomplete: {len(missing)} UNet tensors have no "
                                      f"model_ema.* copy (e.g. {ema_key(missing[0])})")
        u = {k[len(UNET):]: tensors[ema_key(k)] for k in unet_keys}
    else:
        u = {k[len(UNET):]: tensors[k] for k in unet_keys}
    in_channels = int(u["input_blocks.0.0.weight"].shape[1]) if "input_blocks.0.0.weight" in u else 4
    if prediction_type is None:
        v = family == "sd2" and in_channels == 4 and global_step != SD2_BASE_GLOBAL_STEP
        prediction_type = "v_prediction" if v else "epsilon"
    sample = 96 if family == "sd2" and prediction_type == "v_prediction" else SAMPLE_SIZE[family]
    ucfg, shape = unet_config(u, family, pooled_dim=pooled, sample_size=sample, source=source)
    components["unet"] = {"class_name": "UNet2DConditionModel", "config": ucfg,
                          "tensors": _apply(u, unet_table(shape), source=source, what="UNet")}

    vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in tensors)), None)
    if vae_prefix is None:
        raise OriginalLayoutError(f"{source}: no VAE (first_stage_model.*) in the file; pass vae= a VAE file")
    v_raw = {k: a for k, a in _strip(tensors, vae_prefix).items() if not k.startswith("loss.")}
    used.update(vae_prefix + k for k in v_raw)
    components["vae"] = {"class_name": "AutoencoderKL", "config": vae_config(v_raw, family, source),
                         "tensors": vae_to_diffusers(v_raw, source)}

    extra = [k for k in tensors if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in IGNORED)]
    if extra:
        raise OriginalLayoutError(f"{source}: {len(extra)} tensors belong to no known network "
                                  f"({', '.join(sorted(extra)[:4])})")
    scheduler = {"_class_name": SCHEDULER_CLASS[family], **STOCK_SCHEDULE, "prediction_type": prediction_type}
    if family == "sd1":
        scheduler["skip_prk_steps"] = True
    if in_channels == 9:
        pipeline_class = "StableDiffusionXLInpaintPipeline" if family in TIME_IDS else "StableDiffusionInpaintPipeline"
    else:
        pipeline_class = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                          "sdxl": "StableDiffusionXLPipeline", "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}[family]
    return Converted(family, components, scheduler, pipeline_class)


# ------------------------------------------------------------------------------------------- writer

def family_of(components: Mapping[str, Mapping[str, Any]]) -> str:
    """The family of a set of diffusers components: {name: {"config": ...}} (text encoders decide)."""
    if "text_encoder_2" in components:
        return "sdxl" if "text_encoder" in components else "sdxl_refiner"
    act = components["text_encoder"]["config"].get("hidden_act")
    return "sd2" if act == "gelu" else "sd1"


def from_diffusers(components: Mapping[str, Mapping[str, Any]], *, family: str | None = None,
                   ema_unet: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """diffusers / transformers state dicts -> one original-layout state dict.

    Args:
      components: "unet", "vae", "text_encoder", "text_encoder_2" -> {"config": config.json dict (the
        UNet's layers_per_block and block types, the VAE's levels are read from it), "tensors": state dict}.
      family: as `family_of` decides when None.
      ema_unet: a second UNet state dict (diffusers names) written as `model_ema.*`.
    """
    family = family or family_of(components)
    out: dict[str, np.ndarray] = {}
    ucfg = components["unet"]["config"]
    n = len(ucfg["block_out_channels"])
    shape = UNetShape(tuple(ucfg["block_out_channels"]), int(ucfg["layers_per_block"]),
                      tuple(t.startswith("CrossAttn") for t in ucfg["down_block_types"]),
                      tuple(t.startswith("CrossAttn") for t in ucfg["up_block_types"]),
                      ucfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None)
    if isinstance(ucfg["layers_per_block"], (list, tuple)) or n != len(ucfg["up_block_types"]):
        raise OriginalLayoutError("per-level layers_per_block has no original-layout form")
    table = _invert(unet_table(shape))
    u = _apply(components["unet"]["tensors"], table, source="diffusers UNet", what="UNet")
    out.update({UNET + k: a for k, a in u.items()})
    if ema_unet is not None:
        e = _apply(ema_unet, table, source="EMA UNet", what="UNet")
        out.update({ema_key(UNET + k): a for k, a in e.items()})
    vcfg = components["vae"]["config"]
    v = vae_from_diffusers(components["vae"]["tensors"], len(vcfg["block_out_channels"]))
    out.update({"first_stage_model." + k: a for k, a in v.items()})
    for name, (prefix, style) in TEXT_ENCODERS[family].items():
        d = components[name]["tensors"]
        if style == "hf":
            out.update({prefix + k: a for k, a in d.items() if not k.endswith("position_ids")})
        else:
            out.update({prefix + k: a for k, a in hf_to_openclip(d, extra_identity_layer=family == "sd2").items()})
    return out


# ------------------------------------------------------------------------------- ControlNet 1.0 / 1.1

CONTROLNET = "control_model."  # diffusers' LDM_CONTROLNET_KEY; files are also shipped with bare keys


def _hint_indices(c: Mapping[str, np.ndarray], source: str) -> list[int]:
    """The conv indices of `input_hint_block` (convs at even places, SiLUs between: 0, 2, ..., 2m)."""
    idx = sorted({int(m.group(1)) for k in c if (m := re.match(r"input_hint_block\.(\d+)\.weight$", k))})
    if not idx or idx != list(range(0, 2 * len(idx), 2)) or len(idx) % 2:
        raise OriginalLayoutError(f"{source}: input_hint_block convs {idx} are not the ControlNet hint encoder "
                                  f"(conv_in, pairs of convs, conv_out at indices 0, 2, 4, ...)")
    return idx


def controlnet_table(s: UNetShape, hint: list[int]) -> dict[str, tuple[str, dict[str, str]]]:
    """cldm ControlNet module prefix -> (diffusers ControlNetModel prefix, sub-renames): the UNet's down
    half and mid block (unet_table), the hint encoder, zero convs and the mid output conv (diffusers
    single_file_utils.convert_controlnet_checkpoint)."""
    t = {k: v for k, v in unet_table(s).items() if not k.startswith(("output_blocks", "out."))}
    t["input_hint_block.0"] = ("controlnet_cond_embedding.conv_in", {})
    for j, i in enumerate(hint[1:-1]):
        t[f"input_hint_block.{i}"] = (f"controlnet_cond_embedding.blocks.{j}", {})
    t[f"input_hint_block.{hint[-1]}"] = ("controlnet_cond_embedding.conv_out", {})
    n_skips = 1 + len(s.channels) * s.layers + len(s.channels) - 1
    for i in range(n_skips):
        t[f"zero_convs.{i}.0"] = (f"controlnet_down_blocks.{i}", {})
    t["middle_block_out.0"] = ("controlnet_mid_block", {})
    return t


def controlnet_family(c: Mapping[str, np.ndarray]) -> str:
    """sdxl (added embedding label_emb), sd2 (linear attention projections) or sd1, from the keys."""
    if "label_emb.0.0.weight" in c:
        return "sdxl"
    linear = any(k.endswith(".1.proj_in.weight") and np.ndim(c[k]) == 2 for k in c if k.startswith("input_blocks."))
    return "sd2" if linear else "sd1"


def controlnet_to_diffusers(tensors: Mapping[str, np.ndarray], *, source: str, family: str | None = None
                            ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A ControlNet 1.0 / 1.1 file (`control_model.*` or bare cldm keys) -> (diffusers ControlNetModel
    config.json dict, diffusers state dict). Sizes come from shapes; heads and upcasting from the family
    (sd1: 8 heads; sd2 / sdxl: 64-channel heads), read from the keys unless given. global_pool_conditions
    (the shuffle model) cannot be read from weights: it is False; a diffusers folder carries it.
    """
    if any(k.startswith(CONTROLNET) for k in tensors):
        c = _strip(tensors, CONTROLNET)
    elif "time_embed.0.weight" in tensors and "input_hint_block.0.weight" in tensors:
        c = dict(tensors)
    else:
        raise OriginalLayoutError(f"{source}: no control_model.* or bare input_hint_block / zero_convs tensors: "
                                  f"not a ControlNet 1.x file")
    family = family or controlnet_family(c)
    pooled = None
    if family == "sdxl":
        pooled = int(c["label_emb.0.0.weight"].shape[1]) - TIME_IDS["sdxl"] * 256
    cfg, shape = unet_config(c, family, pooled_dim=pooled, sample_size=SAMPLE_SIZE[family], source=source,
                             down_only=True)
    hint = _hint_indices(c, source)
    widths = [int(c["input_hint_block.0.weight"].shape[0])] + [
        int(c[f"input_hint_block.{i}.weight"].shape[0]) for i in hint[2:-1:2]]
    for key in ("up_block_types", "out_channels", "sample_size"):
        cfg.pop(key, None)
    if "time_embedding_dim" in cfg:
        raise OriginalLayoutError(f"{source}: a ControlNet with a time embedding width other than 4 x "
                                  f"{shape.channels[0]} is not a diffusers ControlNetModel")
    cfg.update(_class_name="ControlNetModel", conditioning_channels=int(c["input_hint_block.0.weight"].shape[1]),
               conditioning_embedding_out_channels=widths)
    state = _apply(c, controlnet_table(shape, hint), source=source, what="ControlNet")
    return cfg, state


def controlnet_from_diffusers(d: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
                              prefix: str = CONTROLNET) -> dict[str, np.ndarray]:
    """A diffusers ControlNetModel state dict -> the cldm single-file layout (keys under `prefix`)."""
    levels = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    attn = tuple(t == "CrossAttnDownBlock2D" for t in config["down_block_types"])
    shape = UNetShape(tuple(config["block_out_channels"]), layers, attn, tuple(reversed(attn)),
                      config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None)
    n_hint = 2 + 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    hint = list(range(0, 2 * n_hint, 2))
    table = _invert(controlnet_table(shape, hint))
    out = _apply(d, table, source="diffusers ControlNet", what="ControlNet")
    del levels
    return {prefix + k: v for k, v in out.items()}
