"""Single-file checkpoints (`v1-5-pruned-emaonly.safetensors`, `sd_xl_base_1.0.safetensors`, `*.ckpt`)
and separate VAE files -> Pipeline, and a Pipeline -> one original-layout `.safetensors`.

The key rules and every size live in convert.original_layout (a leaf); this module reads the file
(safetensors, or a pickled .ckpt through convert.pickle_reader's allow-list: no torch, no code from the
file), turns each network into its jaxdiff component through the same Kind table and strict
convert.diffusers_layout table as diffusers folders, one tensor at a time, and assembles the Pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from convert import export as _export
from convert import original_layout
from convert.diffusers_layout import plan_conversion, unflatten
from convert.formats import read_safetensors, read_tensors
from convert.pickle_reader import read_pickle_checkpoint
from jaxdiff import prediction
from jaxdiff.components import KINDS
from jaxdiff.errors import CheckpointError
from jaxdiff.pipeline import Pipeline
from jaxdiff.tokenizer import Tokenizer

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def read_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, info) of one .safetensors or pickled checkpoint; info may hold `global_step`."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, lazy=True), {}
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return read_pickle_checkpoint(path, lazy=True)
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r} (expected one of "
                          f"{', '.join(SUFFIXES)})")


def load_single_file(path, dtype, param_dtype, *, vae=None, prediction_type: str | None = None,
                     prefer_ema: bool = False) -> Pipeline:
    """A CompVis / SGM single file -> Pipeline (see `jaxdiff.load` for the arguments)."""
    path = Path(path)
    if prediction_type is not None and prediction_type not in prediction.TRAINABLE:
        raise CheckpointError(f"prediction_type={prediction_type!r}; expected one of {', '.join(prediction.TRAINABLE)}")
    tensors, info = read_file(path)
    step = info.get("global_step")
    conv = original_layout.to_diffusers(tensors, source=str(path), prefer_ema=prefer_ema,
                                        prediction_type=prediction_type,
                                        global_step=int(step) if step is not None else None)
    if vae is not None:
        conv.components["vae"] = vae_part(vae, conv.family)
    networks = {name: build_component(part, f"{path} ({name})", dtype, param_dtype)
                for name, part in conv.components.items()}
    # SD2's OpenCLIP pads with "!" (id 0); SD1's CLIP-L with the end token. SDXL's pair is the default.
    tokenizers = {"tokenizer": Tokenizer.bundled(pad_token="!")} if conv.family == "sd2" else {}
    return Pipeline.from_parts(networks, tokenizers, conv.scheduler, source=str(path),
                               pipeline_class=conv.pipeline_class)


def build_component(part: Mapping[str, Any], source: str, dtype, param_dtype):
    """{"class_name", "config", "tensors"} (diffusers names) -> a jaxdiff Component.

    The strict table of convert.diffusers_layout, applied one tensor at a time: each is read, laid out,
    cast and placed on the device before the next, so peak memory stays near the params' own size
    (a full-size SDXL file would otherwise sit in memory two or three times over).
    """
    kind = KINDS[part["class_name"]]
    config = kind.config_cls.from_dict(part["config"], source)
    tensors = kind.canonical_keys(part["tensors"])
    plan = plan_conversion({k: tuple(v.shape) for k, v in tensors.items()}, kind.param_shapes(config),
                           source=source, ignore=kind.ignore)
    flat = {}
    for path, (key, layout) in plan.items():
        a = layout(np.asarray(tensors[key]))
        if jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(param_dtype)  # a contiguous copy in the param dtype
        flat[path] = jax.device_put(np.ascontiguousarray(a))
    return kind.component(config, unflatten(flat), dtype)


def vae_part(vae, family: str) -> dict[str, Any]:
    """A separate VAE: an LDM VAE file (bare names, or under first_stage_model. / vae.), or a diffusers
    AutoencoderKL folder (config.json + weights). The scaling factor of a file comes from `family`."""
    vae = Path(vae)
    if vae.is_dir():
        config_file = vae / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_file}: cannot read a VAE config ({e})") from None
        if config.get("_class_name") != "AutoencoderKL":
            raise CheckpointError(f"{config_file}: a {config.get('_class_name')}, not an AutoencoderKL folder")
        from jaxdiff.loading import _weights_file  # the diffusers folder rules (safetensors, .bin, fp16)
        return {"class_name": "AutoencoderKL", "config": config,
                "tensors": read_tensors(_weights_file(vae, "diffusion_pytorch_model"))}
    if not vae.is_file():
        raise CheckpointError(f"{vae}: no such VAE file or folder")
    tensors, _ = read_file(vae)
    raw = original_layout.split_vae_file(tensors)
    if not raw:
        raise CheckpointError(f"{vae}: no VAE tensors (encoder.* / decoder.*, optionally under "
                              f"first_stage_model.); not a VAE file")
    return {"class_name": "AutoencoderKL", "config": original_layout.vae_config(raw, family, str(vae)),
            "tensors": original_layout.vae_to_diffusers(raw, str(vae))}


def export_single_file(pipe, dst, *, dtype: Any = None) -> None:
    """Writes a Pipeline as one original-layout `.safetensors` (CompVis SD1 / SD2, SGM SDXL names) that
    diffusers' `from_single_file`, ComfyUI and A1111 read.

    Args:
      pipe: a jaxdiff Pipeline.
      dst: the `.safetensors` file (written atomically).
      dtype: cast float params (np.float16...); None keeps their dtype.
    """
    from jaxdiff.export import _np_dtype, _part

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: single files are written as .safetensors")
    components = {}
    for name, component in pipe.components().items():
        part = _part(component)
        components[name] = {"config": _upstream_config(part), "params": part["params"]}
    _export.export_single_file(dst, components, dtype=_np_dtype(dtype))


def _upstream_config(part: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields original_layout.from_diffusers reads, from a jaxdiff config dict."""
    config = dict(part["config"])
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        if key in config and config[key] is not None:
            config[key] = list(config[key])
    return config


def load_controlnet_file(path, dtype, param_dtype):
    """A ControlNet 1.0 / 1.1 single file (control_model.* or bare cldm keys; .safetensors or pickled
    .pth / .ckpt through the allow-list unpickler) -> a ControlNet component."""
    path = Path(path)
    tensors, _ = read_file(path)
    config, state = original_layout.controlnet_to_diffusers(tensors, source=str(path))
    return build_component({"class_name": "ControlNetModel", "config": config, "tensors": state},
                           str(path), dtype, param_dtype)
