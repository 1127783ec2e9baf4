"""Export to PyTorch tools: a Pipeline or one network -> a diffusers folder, LoRA -> safetensors.

    from jaxdiff.export import export_pipeline, export_model
    export_pipeline(pipe, "out/sd15-finetuned")     # StableDiffusion(XL)Pipeline.from_pretrained reads it
    export_model(pipe.unet, "out/unet")             # UNet2DConditionModel.from_pretrained reads it
    export_single_file(pipe, "out/model.safetensors")  # one original-layout file (from_single_file, ComfyUI)

The layout work lives in convert/export.py (a leaf that never imports jaxdiff); this module only turns
jaxdiff objects into the plain dicts it takes. LoRA export is `jaxdiff.training.lora.export`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from convert import export as _export
from jaxdiff.components import Component, kind_of


def upstream_class(component: Component) -> str:
    """The diffusers / transformers class a component is exported as."""
    return kind_of(component).export_class(component.config)


def _part(component: Component) -> dict[str, Any]:
    return {"class_name": upstream_class(component), "config": dataclasses.asdict(component.config),
            "params": _to_numpy(component.params)}


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def export_model(component: Component, dst: str | os.PathLike, *, dtype: Any = None) -> None:
    """Writes one network as a `from_pretrained` folder (config.json + safetensors in torch layout).

    Args:
      component: pipe.unet, pipe.vae, pipe.text_encoder or pipe.text_encoder_2 (params may be replaced,
        e.g. by a fine-tuned tree, through `Component(module, params, config)`).
      dst: the folder; created if missing, files inside replaced.
      dtype: cast float params (np.float16, "bfloat16"...); None keeps their dtype.
    """
    part = _part(component)
    _export.write_model_folder(dst, part["class_name"], part["config"], part["params"],
                               dtype=_np_dtype(dtype))


def export_pipeline(pipe, dst: str | os.PathLike, *, dtype: Any = None, overwrite: bool = False) -> None:
    """Writes a whole pipeline as a diffusers folder (model_index.json, unet/, vae/, text_encoder(_2)/,
    tokenizer(_2)/, scheduler/) that `StableDiffusionPipeline` / `StableDiffusionXLPipeline`
    `.from_pretrained(dst)` load with no missing or unexpected keys.

    Args:
      pipe: a jaxdiff Pipeline (its components' current params are written).
      dst: the folder; written atomically.
      dtype: cast float params; None keeps their dtype.
      overwrite: replace an existing folder.
    """
    components = {name: _part(c) for name, c in pipe.components().items()}
    pipeline_class = pipe.pipeline_class or (
        "StableDiffusionXLPipeline" if pipe.family.is_sdxl else "StableDiffusionPipeline")
    scheduler = pipe.scheduler_config
    if scheduler is None or "_class_name" not in scheduler:
        # The stock training schedule and the scheduler class the family ships with (jaxdiff.family).
        scheduler = {**pipe.family.default_scheduler_config(), **(scheduler or {})}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {}
        for name in ("tokenizer", "tokenizer_2"):
            tok = getattr(pipe, name, None)
            if tok is not None and (name == "tokenizer" or pipe.family.is_sdxl):
                tok.save(Path(tmp) / name)
                tokenizers[name] = Path(tmp) / name
        _export.export_diffusers_folder(dst, components, pipeline_class=pipeline_class,
                                        scheduler_config=scheduler, tokenizer_dirs=tokenizers,
                                        dtype=_np_dtype(dtype), overwrite=overwrite)


def _np_dtype(dtype):
    """"bfloat16" / jnp.bfloat16 / np.float16 -> a numpy dtype (bfloat16 through ml_dtypes)."""
    if dtype is None:
        return None
    return np.dtype(jnp.dtype(dtype))


def export_single_file(pipe, dst: str | os.PathLike, *, dtype: Any = None) -> None:
    """One original-layout `.safetensors` (see jaxdiff.single_file.export_single_file; issue 18)."""
    from jaxdiff.single_file import export_single_file as _write
    _write(pipe, dst, dtype=dtype)
