"""jaxdiff's native format: one folder, a `jaxdiff.json` index and per component `config.json` +
`params.safetensors`, with params stored under their Flax paths ('down_blocks_0/resnets_1/conv1/kernel')
in the layout the models use, so loading needs no conversion.

    out/
      jaxdiff.json              {"format": "jaxdiff", "version": 1, "components": {"unet": "UNet", ...}}
      unet/config.json          the config dataclass's fields
      unet/params.safetensors
      tokenizer/...             tokenizer files, copied
      scheduler/scheduler_config.json

Writes go to a temporary sibling folder that is renamed into place at the end, so an interrupted save
never leaves a half-written model where a complete one is expected.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.diffusers_layout import flatten, unflatten
from convert.formats import atomic_folder, read_safetensors, write_safetensors
from jaxdiff.errors import CheckpointError
from jaxdiff.config_parsing import freeze

INDEX = "jaxdiff.json"
FORMAT_VERSION = 1


def is_native(path: Path) -> bool:
    return (path / INDEX).is_file()


def config_to_dict(config) -> dict[str, Any]:
    """A config dataclass as JSON-ready fields (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls, raw: Mapping[str, Any], source: str):
    """Inverse of config_to_dict: the fields are jaxdiff's own, so no upstream parsing is needed."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise CheckpointError(f"{source}: unknown config fields {unknown}; was it written by a newer jaxdiff?")
    return cls(**{k: freeze(v) for k, v in raw.items()})


def save_params(folder: Path, params: Mapping[str, Any]) -> None:
    """Writes a param tree as `params.safetensors` keyed by '/'-joined paths."""
    flat = {"/".join(path): np.asarray(leaf) for path, leaf in flatten(params).items()}
    write_safetensors(folder / "params.safetensors", flat, metadata={"format": "jaxdiff"})


def load_params(folder: Path) -> dict[str, Any]:
    """Reads a `params.safetensors` written by save_params into a nested dict of numpy arrays."""
    flat = read_safetensors(folder / "params.safetensors")
    return unflatten({tuple(k.split("/")): np.array(v) for k, v in flat.items()})


def write_folder(dst: str | os.PathLike, components: Mapping[str, tuple[str, Any, Mapping | None]],
                 extra_dirs: Mapping[str, Path] = (), extra_json: Mapping[str, Mapping] = (),
                 pipeline: Mapping[str, Any] | None = None) -> None:
    """Writes a native folder atomically.

    Args:
      dst: the folder to create or replace.
      components: name -> (kind, config dataclass, param tree or None).
      extra_dirs: name -> a folder copied as is (tokenizers).
      extra_json: "name/file.json" -> JSON content (scheduler config).
      pipeline: free-form facts about the whole pipeline (its upstream class), kept in the index.
    """
    dst = Path(dst)
    if dst.exists() and not is_native(dst):
        raise CheckpointError(f"{dst}: exists and is not a jaxdiff folder; refusing to overwrite it")
    with atomic_folder(dst) as tmp:
        index = {"format": "jaxdiff", "version": FORMAT_VERSION, "components": {},
                 "pipeline": dict(pipeline or {})}
        for name, (kind, config, params) in components.items():
            (tmp / name).mkdir()
            (tmp / name / "config.json").write_text(json.dumps(config_to_dict(config), indent=1))
            if params is not None:
                save_params(tmp / name, params)
            index["components"][name] = kind
        for name, src in dict(extra_dirs).items():
            shutil.copytree(src, tmp / name)
            index["components"][name] = "files"
        for rel, content in dict(extra_json).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(content, indent=1))
            index["components"][Path(rel).parts[0]] = "files"
        (tmp / INDEX).write_text(json.dumps(index, indent=1))


def read_index(src: Path) -> dict[str, str]:
    """The component table of a native folder: name -> kind."""
    try:
        index = json.loads((src / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{src / INDEX}: unreadable ({e})") from None
    if index.get("format") != "jaxdiff" or index.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{src / INDEX}: not a jaxdiff v{FORMAT_VERSION} index")
    return index["components"]
