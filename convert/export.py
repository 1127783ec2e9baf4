"""jaxdiff param trees -> PyTorch layouts: diffusers folders, original-layout single files and LoRA files
(kohya / A1111 and diffusers).

The inverse of convert.diffusers_layout. A Flax path component `<name>_<N>` is a child of a torch
ModuleList exactly when `<name>` is one of that library's ModuleList containers, so the inverse is an
explicit table, not a guess:

    down_blocks_0/resnets_1/conv1/kernel   ->  down_blocks.0.resnets.1.conv1.weight   (down_blocks, resnets)
    attn1/to_out_0/kernel                  ->  attn1.to_out.0.weight                  (to_out)
    ff/net_0/proj/kernel                   ->  ff.net.0.proj.weight                   (net)
    time_embedding/linear_1/kernel         ->  time_embedding.linear_1.weight          (linear_1 is a Linear)

Leaves go back to torch: Dense `kernel` [in, out] -> `weight` [out, in]; Conv `kernel` [kh, kw, I, O] ->
`weight` [O, I, kh, kw]; norm `scale` and Embed `embedding` -> `weight`; `bias` stays.

CLIP text encoders are written under `text_model.` (what every released SD checkpoint and transformers
< 5 use; transformers 5 still loads it with no missing or unexpected keys).

A leaf module: numpy, json and convert.formats only; it never imports jaxdiff.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.diffusers_layout import flatten
from convert.errors import CheckpointError
from convert.formats import atomic_folder, write_safetensors

# The diffusers release whose folder format this writes (and the tests load with). diffusers reads
# `_diffusers_version` only to warn about much newer files.
DIFFUSERS_VERSION = "0.42.1"

# torch ModuleList attributes, per model kind. Any other `<name>_<N>` component is a plain attribute
# whose name ends in a digit (`linear_1`, `conv_norm_out`...) and is kept as is.
MODULE_LISTS = {
    # UNet2DConditionModel: blocks, their resnets / Transformer2DModels / resamplers, the
    # BasicTransformerBlocks, Attention.to_out = [Linear, Dropout], FeedForward.net = [GEGLU, Dropout, Linear].
    "unet": frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                       "transformer_blocks", "to_out", "net"}),
    # AutoencoderKL: Encoder.down_blocks, Decoder.up_blocks, their resnets / resamplers, the mid-block
    # attention (an Attention, so to_out too).
    "vae": frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                      "to_out"}),
    # transformers CLIPTextModel(WithProjection): CLIPEncoder.layers.
    "clip": frozenset({"layers"}),
}
_INDEXED = re.compile(r"^(.+)_(\d+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def module_path_to_torch(path: tuple[str, ...], *, kind: str) -> str:
    """('down_blocks_0', 'attentions_0', 'proj_in') -> 'down_blocks.0.attentions.0.proj_in' (no leaf)."""
    lists = _lists(kind)
    parts = []
    for part in path:
        m = _INDEXED.match(part)
        parts.extend((m.group(1), m.group(2)) if m and m.group(1) in lists else (part,))
    return ".".join(parts)


def torch_key(path: tuple[str, ...], *, kind: str) -> str:
    """A Flax param path -> its torch state-dict key ('.../conv1/kernel' -> '....conv1.weight')."""
    *module, leaf = path
    if leaf not in _LEAVES:
        raise CheckpointError(f"{'/'.join(path)}: no torch counterpart for a param named {leaf!r}")
    return f"{module_path_to_torch(tuple(module), kind=kind)}.{_LEAVES[leaf]}"


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax param: kernels transpose, everything else keeps its shape."""
    if path[-1] != "kernel":
        return tuple(shape)
    if len(shape) == 4:  # [kh, kw, I, O] -> [O, I, kh, kw]
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:  # [in, out] -> [out, in]
        return (shape[1], shape[0])
    raise CheckpointError(f"{'/'.join(path)}: kernel of rank {len(shape)}; only Dense and 2D Conv exist")


def to_torch_layout(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
    """One Flax param array -> the torch layout of the same tensor (contiguous)."""
    if path[-1] == "kernel":
        torch_shape(path, a.shape)  # validates the rank
        a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    return np.ascontiguousarray(a)


def to_torch_state_dict(params: Mapping[str, Any], *, kind: str, dtype: Any = None) -> dict[str, np.ndarray]:
    """A jaxdiff param tree -> a torch state dict (key -> numpy array in torch layout).

    Args:
      params: nested dict of arrays (numpy or jax), without the outer {"params": ...}.
      kind: "unet", "vae" or "clip": selects the ModuleList table.
      dtype: cast float tensors to this dtype (None keeps the params' dtype).
    Returns:
      {torch key: array}, the exact key set and shapes of the diffusers / transformers model.
    """
    out = {}
    for path, leaf in flatten(params).items():
        key = torch_key(path, kind=kind)
        if key in out:  # only possible if two Flax names collapse to one torch key
            raise CheckpointError(f"{'/'.join(path)}: torch key {key} produced twice")
        a = to_torch_layout(path, np.asarray(leaf))
        out[key] = a.astype(dtype) if dtype is not None and np.issubdtype(a.dtype, np.floating) else a
    return out


def _lists(kind: str) -> frozenset:
    try:
        return MODULE_LISTS[kind]
    except KeyError:
        raise ValueError(f"kind={kind!r}; expected one of {', '.join(MODULE_LISTS)}") from None


# --- diffusers folders --------------------------------------------------------------------------------

# Upstream class -> (library, model kind, weights file).
CLASSES = {
    "UNet2DConditionModel": ("diffusers", "unet", "diffusion_pytorch_model.safetensors"),
    "AutoencoderKL": ("diffusers", "vae", "diffusion_pytorch_model.safetensors"),
    "CLIPTextModel": ("transformers", "clip", "model.safetensors"),
    "CLIPTextModelWithProjection": ("transformers", "clip", "model.safetensors"),
}


# Options jaxdiff implements only at one value (UNetConfig / VAEConfig refuse others on reading), written
# out so the folder does not depend on the defaults of whichever diffusers reads it.
_FIXED = {
    "UNet2DConditionModel": dict(
        act_fn="silu", dropout=0.0, only_cross_attention=False, dual_cross_attention=False,
        resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
        time_embedding_type="positional", time_embedding_act_fn=None, timestep_post_act=None,
        time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3, attention_type="default",
        class_embeddings_concat=False, cross_attention_norm=None, encoder_hid_dim=None,
        encoder_hid_dim_type=None, reverse_transformer_layers_per_block=None),
    "AutoencoderKL": dict(act_fn="silu", shift_factor=None, latents_mean=None, latents_std=None),
}


def upstream_config(class_name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A jaxdiff config (as a dict of its dataclass fields, which use upstream names) -> config.json.

    Adds what the upstream class needs beyond the numbers: `_class_name` / `_diffusers_version` for
    diffusers models, the block types AutoencoderKL sizes itself by, and `architectures` / `model_type`
    for transformers' CLIP (which also replace jaxdiff's own `with_projection` field).
    """
    cfg = json.loads(json.dumps(dict(fields)))  # tuples -> lists, a deep copy
    if class_name not in CLASSES:
        raise ValueError(f"{class_name}: jaxdiff exports only {', '.join(CLASSES)}")
    library = CLASSES[class_name][0]
    cfg.update(_FIXED.get(class_name, {}))
    if class_name == "AutoencoderKL":
        # diffusers' defaults are single-level; the block lists must match block_out_channels.
        levels = len(cfg["block_out_channels"])
        cfg.update(down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    if library == "diffusers":
        return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **cfg}
    projection = cfg.pop("with_projection", False)
    if projection != (class_name == "CLIPTextModelWithProjection"):
        raise ValueError(f"{class_name}: config says with_projection={projection}")
    return {"architectures": [class_name], "model_type": "clip_text_model", **cfg}


def write_model_folder(folder: str | os.PathLike, class_name: str, fields: Mapping[str, Any],
                       params: Mapping[str, Any], *, dtype: Any = None) -> None:
    """Writes one model as `from_pretrained` reads it: config.json + weights in torch layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = upstream_config(class_name, fields)  # validates class_name
    _, kind, weights = CLASSES[class_name]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(folder / weights, to_torch_state_dict(params, kind=kind, dtype=dtype),
                      metadata={"format": "pt"})


def export_diffusers_folder(dst: str | os.PathLike, components: Mapping[str, Mapping[str, Any]], *,
                            pipeline_class: str, scheduler_config: Mapping[str, Any],
                            tokenizer_dirs: Mapping[str, str | os.PathLike] = (),
                            dtype: Any = None, overwrite: bool = False) -> None:
    """Writes a diffusers pipeline folder that `DiffusionPipeline.from_pretrained(dst)` loads.

    Args:
      dst: the folder to create (written to a temporary sibling, renamed into place when complete).
      components: name ("unet", "vae", "text_encoder", "text_encoder_2") -> {"class_name": upstream
        class, "config": dict of config fields, "params": param tree}.
      pipeline_class: "StableDiffusionPipeline", "StableDiffusionXLPipeline", ...
      scheduler_config: a scheduler_config.json dict with its `_class_name`.
      tokenizer_dirs: name ("tokenizer", "tokenizer_2") -> a folder written by save_pretrained, copied.
      dtype: cast float params (e.g. np.float16); None keeps them.
      overwrite: replace an existing `dst` (otherwise an existing folder is an error).
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: exists; pass overwrite=True to replace it")
    if "_class_name" not in scheduler_config:
        raise ValueError("scheduler_config needs its '_class_name' (the scheduler class diffusers builds)")
    with atomic_folder(dst) as tmp:
        index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": DIFFUSERS_VERSION}
        for name, part in components.items():
            write_model_folder(tmp / name, part["class_name"], part["config"], part["params"], dtype=dtype)
            index[name] = [CLASSES[part["class_name"]][0], part["class_name"]]
        for name, src in dict(tokenizer_dirs).items():
            shutil.copytree(src, tmp / name)
            index[name] = ["transformers", "CLIPTokenizer"]
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(scheduler_config), indent=2))
        index["scheduler"] = ["diffusers", scheduler_config["_class_name"]]
        # Optional parts the SD pipelines' constructors take; null means "not present".
        if pipeline_class.startswith("StableDiffusionXL"):
            index.update(feature_extractor=[None, None], image_encoder=[None, None])
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None],
                         image_encoder=[None, None], requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- single files (CompVis / SGM original layout) -------------------------------------------------------

def export_single_file(dst: str | os.PathLike, components: Mapping[str, Mapping[str, Any]], *,
                       dtype: Any = None, family: str | None = None) -> None:
    """Writes a pipeline as one original-layout `.safetensors` (convert.original_layout's names) that
    diffusers' `from_single_file`, ComfyUI and A1111 read.

    Args:
      dst: the file (written atomically).
      components: name ("unet", "vae", "text_encoder", "text_encoder_2") -> {"config": dict of config
        fields, "params": jaxdiff param tree}.
      dtype: cast float params (e.g. np.float16); None keeps them.
      family: "sd1" | "sd2" | "sdxl" | "sdxl_refiner"; None decides from the text encoders.
    """
    from convert import original_layout
    kinds = {"unet": "unet", "vae": "vae", "text_encoder": "clip", "text_encoder_2": "clip"}
    parts = {name: {"config": dict(part["config"]),
                    "tensors": to_torch_state_dict(part["params"], kind=kinds[name], dtype=dtype)}
             for name, part in components.items()}
    tensors = original_layout.from_diffusers(parts, family=family)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst, tensors, metadata={"format": "pt"})


# --- LoRA files --------------------------------------------------------------------------------------

# Component name -> (model kind, diffusers state-dict prefix, kohya prefix SD1, kohya prefix SDXL).
LORA_COMPONENTS = {
    "unet": ("unet", "unet", "lora_unet", "lora_unet"),
    "text_encoder": ("clip", "text_encoder", "lora_te", "lora_te1"),
    "text_encoder_2": ("clip", "text_encoder_2", None, "lora_te2"),
}


def lora_state_dict(lora: Mapping[str, Mapping[str, Any]], *, style: str, alpha: float,
                    rank: int | None = None, sdxl: bool = False, dtype: Any = np.float32
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """LoRA factors -> (tensors, safetensors metadata) in kohya / A1111 or diffusers (PEFT) key style.

    Args:
      lora: component ("unet", "text_encoder", "text_encoder_2") -> a tree whose leaves sit at module
        paths: {..., "attn1": {"to_q": {"down": [in, r], "up": [r, out]}}}, so that the module's
        kernel [in, out] gains (alpha / r) * down @ up.
      style: "kohya": `lora_unet_<torch module path with _>.lora_down.weight` [r, in], `.lora_up.weight`
        [out, r], scalar `.alpha` (text encoders: `lora_te_`, or `lora_te1_` / `lora_te2_` for SDXL);
        "diffusers": `unet.<module path>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r].
      alpha: the LoRA alpha; the delta is (alpha / rank) * up @ down in torch layout.
      rank: checked against the factors' shapes when given.
      sdxl: kohya text-encoder prefixes lora_te1_ / lora_te2_ instead of lora_te_.
      dtype: dtype of the written tensors.

    diffusers 0.42 reads a PEFT-style file's alpha only from the `lora_adapter_metadata` JSON; older
    diffusers, ComfyUI and PEFT loaders without it use scale 1. So the diffusers style folds alpha / r
    into lora_B and records lora_alpha = r: every loader then applies the same delta.
    """
    if style not in ("kohya", "diffusers"):
        raise ValueError(f"style={style!r}; expected 'kohya' or 'diffusers'")
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, Any] = {}
    for component, tree in lora.items():
        if component not in LORA_COMPONENTS:
            raise ValueError(f"LoRA for {component!r}; exportable: {', '.join(LORA_COMPONENTS)}")
        kind, prefix, kohya_sd1, kohya_sdxl = LORA_COMPONENTS[component]
        kohya = kohya_sdxl if sdxl else kohya_sd1
        if style == "kohya" and kohya is None:
            raise ValueError(f"{component} only exists in SDXL; pass sdxl=True")
        modules = _lora_modules(tree)
        for path, (down, up) in modules.items():
            r = down.shape[1]
            if rank is not None and r != rank:
                raise ValueError(f"{component}/{'/'.join(path)}: factors of rank {r}, expected {rank}")
            torch_path = module_path_to_torch(path, kind=kind)
            down_t, up_t = np.asarray(down, np.float64).T, np.asarray(up, np.float64).T  # [r, in], [out, r]
            if style == "kohya":
                name = f"{kohya}_{torch_path.replace('.', '_')}"
                tensors[f"{name}.lora_down.weight"] = down_t.astype(dtype)
                tensors[f"{name}.lora_up.weight"] = up_t.astype(dtype)
                tensors[f"{name}.alpha"] = np.asarray(alpha, dtype)
            else:
                tensors[f"{prefix}.{torch_path}.lora_A.weight"] = down_t.astype(dtype)
                tensors[f"{prefix}.{torch_path}.lora_B.weight"] = (up_t * (alpha / r)).astype(dtype)
        if style == "diffusers" and modules:
            ranks = {down.shape[1] for down, _ in modules.values()}
            if len(ranks) != 1:
                raise ValueError(f"{component}: mixed ranks {sorted(ranks)} are not exported yet")
            r = ranks.pop()
            # PEFT matches target_modules as dotted suffixes of module names; transformers 5's plain
            # CLIPTextModel has no `text_model.` level, so the CLIP targets leave it out (the suffix
            # still matches transformers 4's names).
            targets = sorted(module_path_to_torch(p, kind=kind).removeprefix("text_model.") for p in modules)
            metadata.update({f"{prefix}.r": r, f"{prefix}.lora_alpha": r, f"{prefix}.target_modules": targets})
    meta = {"format": "pt"}
    if metadata:
        meta["lora_adapter_metadata"] = json.dumps(metadata, indent=2, sort_keys=True)
    return tensors, meta


def export_lora(lora: Mapping[str, Mapping[str, Any]], dst: str | os.PathLike, *, style: str,
                alpha: float, rank: int | None = None, sdxl: bool = False, dtype: Any = np.float32) -> None:
    """Writes LoRA factors to one .safetensors file; arguments as in `lora_state_dict`."""
    tensors, meta = lora_state_dict(lora, style=style, alpha=alpha, rank=rank, sdxl=sdxl, dtype=dtype)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(dst, tensors, metadata=meta)


def _lora_modules(tree: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """{module path: (down [in, r], up [r, out])} from a tree with {"down", "up"} leaves per module."""
    flat = flatten(tree)
    modules = {}
    for path in flat:
        if path[-1] not in ("down", "up"):
            raise CheckpointError(f"LoRA leaf {'/'.join(path)}: expected 'down' or 'up'")
        module = path[:-1]
        if module in modules:
            continue
        try:
            down, up = np.asarray(flat[module + ("down",)]), np.asarray(flat[module + ("up",)])
        except KeyError:
            raise CheckpointError(f"LoRA module {'/'.join(module)} lacks its down or up factor") from None
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != up.shape[0]:
            raise CheckpointError(f"LoRA module {'/'.join(module)}: down {down.shape} and up {up.shape} "
                                  f"are not [in, r] and [r, out]")
        modules[module] = (down, up)
    return modules
