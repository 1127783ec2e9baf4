"""`jaxdiff.load`: a diffusers folder, a jaxdiff native folder or a single-file checkpoint -> Pipeline.

Single files (CompVis / SGM layout, .safetensors or pickled .ckpt) go through jaxdiff.single_file.

A diffusers folder is read component by component as its `model_index.json` lists them: each
network's `config.json` is parsed strictly (jaxdiff.models.configs), its weights are read from
safetensors (single, sharded through an index, or the `fp16` variant when that is all there is) and
mapped by convert.diffusers_layout's strict table onto the param shapes the config implies.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from convert.diffusers_layout import convert_state_dict, flatten
from convert.formats import read_tensors
from jaxdiff import checkpoint
from jaxdiff.components import KINDS, NATIVE_KINDS, cast_params
from jaxdiff.errors import CheckpointError, ConfigError
from jaxdiff.pipeline import Pipeline
from jaxdiff.tokenizer import Tokenizer

NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae")
TOKENIZERS = ("tokenizer", "tokenizer_2")
# model_index.json pipeline flags that change generation (see Pipeline.__init__).
PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt",)
# model_index.json entries that do not take part in generation; their folders are not read.
UNUSED = ("safety_checker", "feature_extractor", "image_encoder")


def load(path, dtype: Any = "float32", *, param_dtype: Any = None, vae=None, controlnet=None,
         prediction_type: str | None = None, prefer_ema: bool = False) -> Pipeline:
    """Loads a pipeline (see `_load`); `controlnet`: a ControlNet path or component, or a list of them
    (MultiControlNet), checked against the UNet (Pipeline.with_controlnet)."""
    pipe = _load(path, dtype, param_dtype=param_dtype, vae=vae, prediction_type=prediction_type,
                 prefer_ema=prefer_ema)
    if controlnet is None:
        return pipe
    if isinstance(controlnet, (str, Path)) or not isinstance(controlnet, (list, tuple)):
        controlnet = [controlnet]
    nets = [load_controlnet(n, dtype, param_dtype=param_dtype) if isinstance(n, (str, Path)) else n
            for n in controlnet]
    return pipe.with_controlnet(nets)


def _load(path, dtype: Any = "float32", *, param_dtype: Any = None, vae=None,
          prediction_type: str | None = None, prefer_ema: bool = False) -> Pipeline:
    """Loads a pipeline.

    Args:
      path: a diffusers folder (with model_index.json; safetensors or .bin weights), a jaxdiff folder
        written by `Pipeline.save`, a single-file checkpoint (.safetensors / .ckpt / .pt / .pth in
        the CompVis SD1 / SD2 or SGM SDXL layout), or a Hub id "org/name" already in the local
        Hugging Face cache (read offline; nothing is downloaded).
      dtype: compute dtype of the networks ("float32", "bfloat16", "float16").
      param_dtype: storage dtype of the params; defaults to `dtype`.
      vae: a separate VAE: a diffusers AutoencoderKL or AutoencoderTiny (TAESD) folder (any source), or
        (single files) an LDM VAE file.
      prediction_type: (single files) "epsilon" or "v_prediction", overriding the family default.
      prefer_ema: (single files) load the UNet's EMA weights (model_ema.*) instead of model.*.
    Raises:
      CheckpointError / ConfigError naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        path = _from_hub_cache(str(path))
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else dtype
    # A VAE folder (AutoencoderKL for folders, AutoencoderTiny for any source) replaces the loaded one.
    if vae is not None and Path(vae).is_dir() and (not path.is_file() or _vae_class(Path(vae)) == "AutoencoderTiny"):
        pipe = load(path, dtype, param_dtype=param_dtype, prediction_type=prediction_type, prefer_ema=prefer_ema)
        return _with_vae(pipe, Path(vae), dtype, param_dtype)
    # --- single files (issue 18) ---
    if path.is_file():
        from jaxdiff.single_file import load_single_file
        return load_single_file(path, dtype, param_dtype, vae=vae, prediction_type=prediction_type,
                                prefer_ema=prefer_ema)
    if vae is not None or prediction_type is not None or prefer_ema:
        raise CheckpointError(f"{path}: vae=, prediction_type= and prefer_ema= apply to single-file "
                              f"checkpoints; a folder carries its own")
    if checkpoint.is_native(path):
        return _load_native(path, dtype, param_dtype)
    if (path / "model_index.json").is_file():
        return _load_diffusers(path, dtype, param_dtype)
    raise CheckpointError(f"{path}: not a model folder: it has neither model_index.json (diffusers) nor "
                          f"{checkpoint.INDEX} (jaxdiff)")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _from_hub_cache(name: str) -> Path:
    """An "org/name" Hub id -> its snapshot folder in the local Hugging Face cache (huggingface_hub's
    own cache lookup, HF_HUB_CACHE / HF_HOME honoured; offline: never a download)."""
    if not _HUB_ID.match(name):
        raise CheckpointError(f"{name}: no such file or folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name}: no such file or folder, and no Hub model of that id in the local "
                              f"Hugging Face cache (download it first, e.g. `hf download {name}`)") from None


def load_controlnet(path, dtype: Any = "float32", *, param_dtype: Any = None):
    """Loads a ControlNet: a diffusers ControlNetModel folder (config.json + weights) or a single file
    in the original ControlNet 1.0 / 1.1 layout (.safetensors / .pth / .ckpt; see
    convert.original_layout.controlnet_to_diffusers).

    Returns a jaxdiff.components.ControlNet (config, module, params), for `jaxdiff.load(base,
    controlnet=...)` or `Pipeline.with_controlnet`.
    """
    from jaxdiff.components import CONTROLNET
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else dtype
    if path.is_file():
        from jaxdiff.single_file import load_controlnet_file
        return load_controlnet_file(path, dtype, param_dtype)
    raw = _read_json(path / "config.json")
    cls = raw.get("_class_name")
    if cls not in CONTROLNET.upstream:
        raise ConfigError(f"{path / 'config.json'}: _class_name={cls!r} is not a ControlNetModel")
    config = CONTROLNET.config_cls.from_dict(raw, str(path / "config.json"))
    weights = _weights_file(path, CONTROLNET.weight_stem)
    params = convert_state_dict(read_tensors(weights), CONTROLNET.param_shapes(config), source=str(weights),
                                ignore=CONTROLNET.ignore)
    return CONTROLNET.component(config, cast_params(params, param_dtype), dtype)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _weights_file(folder: Path, stem: str) -> Path:
    """The weights of one diffusers component, as diffusers itself would pick them (no variant asked;
    safetensors before pickled .bin)."""
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json",
                 f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json"):
        if (folder / name).is_file():
            return folder / name
    # Pickled weights, read by convert.pickle_reader's allow-list unpickler (issue 18). transformers
    # names them pytorch_model.bin where its safetensors are model.safetensors.
    bin_stem = "pytorch_model" if stem == "model" else stem
    for name in (f"{bin_stem}.bin", f"{bin_stem}.bin.index.json", f"{bin_stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file ({stem}.safetensors or a sharded index)")


def _load_diffusers(root: Path, dtype, param_dtype) -> Pipeline:
    index = _read_json(root / "model_index.json")
    networks, tokenizers, scheduler = {}, {}, None
    for name, entry in index.items():
        if (name.startswith("_") or name in PIPELINE_OPTIONS or not isinstance(entry, list)
                or entry[1] is None or name in UNUSED):
            continue
        library, cls = entry
        folder = root / name
        if name in NETWORKS:
            kind = KINDS.get(cls)
            if kind is None:
                raise ConfigError(f"{root / 'model_index.json'}: {name} is a {cls}, which jaxdiff does not "
                                  f"implement (supported: {', '.join(sorted(KINDS))})")
            raw = _read_json(folder / "config.json")
            config = kind.config_cls.from_dict(raw, str(folder / "config.json"))
            weights = _weights_file(folder, kind.weight_stem)
            tensors = kind.canonical_keys(read_tensors(weights))
            params = convert_state_dict(tensors, kind.param_shapes(config),
                                        source=str(weights), ignore=kind.ignore)
            networks[name] = kind.component(config, cast_params(params, param_dtype), dtype)
        elif name in TOKENIZERS or name == "scheduler":
            scheduler = _read_auxiliary(name, folder, tokenizers, scheduler)
        else:
            raise ConfigError(f"{root / 'model_index.json'}: component {name!r} ({library}.{cls}) is not "
                              f"supported by jaxdiff")
    options = {k: index[k] for k in PIPELINE_OPTIONS if k in index}
    return Pipeline.from_parts(networks, tokenizers, scheduler, source=str(root),
                               pipeline_class=index.get("_class_name"), options=options)


def _vae_class(folder: Path) -> str:
    return str(_read_json(folder / "config.json").get("_class_name", "AutoencoderKL"))


def _with_vae(pipe: Pipeline, folder: Path, dtype, param_dtype) -> Pipeline:
    """`pipe` with the VAE of a diffusers AutoencoderKL / AutoencoderTiny folder instead of its own."""
    cls = _vae_class(folder)
    kind = KINDS.get(cls)
    if cls not in ("AutoencoderKL", "AutoencoderTiny") or kind is None:
        raise ConfigError(f"{folder / 'config.json'}: a {cls}, not a VAE (AutoencoderKL or AutoencoderTiny)")
    config = kind.config_cls.from_dict(_read_json(folder / "config.json"), str(folder / "config.json"))
    if config.latent_channels != pipe.family.latent_channels:
        raise CheckpointError(f"{folder}: this VAE has {config.latent_channels} latent channels, the model "
                              f"{pipe.family.latent_channels}; it belongs to another model family")
    weights = _weights_file(folder, kind.weight_stem)
    params = convert_state_dict(kind.canonical_keys(read_tensors(weights)), kind.param_shapes(config),
                                source=str(weights), ignore=kind.ignore)
    networks = {**pipe.components(), "vae": kind.component(config, cast_params(params, param_dtype), dtype)}
    tokenizers = {n: t for n in TOKENIZERS if (t := getattr(pipe, n)) is not None}
    return Pipeline.from_parts(networks, tokenizers, pipe.scheduler_config, source=str(folder),
                               pipeline_class=pipe.pipeline_class, options=pipe.options)


def _load_native(root: Path, dtype, param_dtype) -> Pipeline:
    networks, tokenizers, scheduler = {}, {}, None
    for name, kind_name in checkpoint.read_index(root).items():
        folder = root / name
        if kind_name in NATIVE_KINDS:
            kind = NATIVE_KINDS[kind_name]
            config = checkpoint.config_from_dict(kind.config_cls, _read_json(folder / "config.json"),
                                                 str(folder / "config.json"))
            params = checkpoint.load_params(folder)
            # The same strict shape check as for upstream files: a hand-edited folder fails loudly.
            _check_native(params, kind.param_shapes(config), folder)
            networks[name] = kind.component(config, cast_params(params, param_dtype), dtype)
        elif name in TOKENIZERS or name == "scheduler":
            scheduler = _read_auxiliary(name, folder, tokenizers, scheduler)
        else:
            raise CheckpointError(f"{root / checkpoint.INDEX}: unknown component {name!r} ({kind_name})")
    meta = _read_json(root / checkpoint.INDEX).get("pipeline", {})
    return Pipeline.from_parts(networks, tokenizers, scheduler, source=str(root),
                               pipeline_class=meta.get("class"), options=meta.get("options"))


def _read_auxiliary(name: str, folder: Path, tokenizers: dict, scheduler: dict | None) -> dict | None:
    """Reads a tokenizer folder into `tokenizers`, or returns the scheduler config (same layout in both
    formats). Returns the scheduler config as it now stands."""
    if name in TOKENIZERS:
        tokenizers[name] = Tokenizer.from_folder(folder)
        return scheduler
    return _read_json(folder / "scheduler_config.json")


def _check_native(params, shapes, folder: Path) -> None:
    got = {p: tuple(a.shape) for p, a in flatten(params).items()}
    want = {p: tuple(s.shape) for p, s in flatten(shapes).items()}
    if got != want:
        missing = sorted("/".join(p) for p in set(want) - set(got))
        extra = sorted("/".join(p) for p in set(got) - set(want))
        bad = sorted("/".join(p) for p in set(got) & set(want) if got[p] != want[p])
        raise CheckpointError(f"{folder / 'params.safetensors'}: params do not fit config.json: "
                              f"missing {missing[:4]}, left over {extra[:4]}, mis-shaped {bad[:4]}")
