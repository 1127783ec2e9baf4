"""Textual-inversion files -> named token vectors (a leaf: numpy and convert/ only).

Formats (shared/reference/formats.md section 4; A1111 modules/textual_inversion/textual_inversion.py,
diffusers loaders/textual_inversion.py):

| file                                   | content                                   | token when none is given |
|----------------------------------------|-------------------------------------------|--------------------------|
| A1111 `.pt` / `.bin` (pickled)         | `string_to_param {"*": [n, D]}`, `name`...| file stem (A1111)        |
| A1111 / kohya `.safetensors`           | `{"emb_params": [n, D]}`                  | file stem                |
| SDXL `.safetensors`                    | `{"clip_l": [n, 768], "clip_g": [n, 1280]}`| file stem               |
| diffusers `learned_embeds.safetensors` | `{token: [D] or [n, D]}`                  | the key (diffusers)      |

A `.bin` that is really a safetensors file (some trainers write those) is read as one. Pickled files
are read by the caller's unpickler (convert/pickle_reader.py) and handed to `embedding_from_state_dict`;
this module never unpickles. A 1-D vector is one token ([1, D]); n vectors make n tokens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from convert.errors import CheckpointError
from convert.formats import read_safetensors

ANY_ENCODER = "*"        # vectors for whichever encoder has their width (SD1 / SD2 files)
SDXL_KEYS = ("clip_l", "clip_g")  # SDXL files: CLIP-L (text_encoder) and bigG (text_encoder_2) vectors
DIFFUSERS_STEM = "learned_embeds"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
SAFETENSORS_MAGIC_MAX = 100 * 1024 * 1024


class EmbeddingFileError(CheckpointError):
    """A textual-inversion file that cannot be used. The message names the file."""


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One textual-inversion term.

    Attributes:
      name: the token written in prompts.
      vectors: "*" -> float32 [n, D] (fits the encoder of width D), or "clip_l" and "clip_g" -> [n, D_l]
        and [n, D_g] (SDXL; both with the same n).
      path: the file it came from.
      sha256: the file's sha256 hex digest (A1111's "TI hashes" show its first 12 characters).
    """
    name: str
    vectors: Mapping[str, np.ndarray]
    path: str
    sha256: str

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then '{'; zip and pickle do not."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < SAFETENSORS_MAGIC_MAX and head[8:9] == b"{"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _as_vectors(value, path, key: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim == 1:
        array = array[None]
    floating = array.dtype.kind == "f" or array.dtype.name == "bfloat16"
    if array.ndim != 2 or 0 in array.shape or not floating:
        raise EmbeddingFileError(f"{path}: {key!r} has shape {tuple(np.shape(value))} and dtype "
                                 f"{getattr(value, 'dtype', type(value).__name__)}; a textual-inversion "
                                 f"embedding is [vectors, width] floats")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise EmbeddingFileError(f"{path}: {key!r} holds NaN or infinite values")
    return array


def embedding_from_state_dict(state: Mapping, path: str | os.PathLike, *, token: str | None = None,
                              sha256: str = "") -> Embedding:
    """A loaded file's contents -> Embedding (the format table of the module docstring).

    Args:
      state: name -> array, or A1111's pickled dict (`string_to_param`, `name`, ...) with arrays.
      path: the file, for the default token (its stem) and messages.
      token: the token to use instead of the default.
    """
    path = Path(path)
    stem = path.name.split(".")[0]
    if not isinstance(state, Mapping) or not state:
        raise EmbeddingFileError(f"{path}: empty or not a textual-inversion file")
    if "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingFileError(f"{path}: string_to_param must hold exactly one term (A1111 asserts "
                                     f"the same), found {len(params) if isinstance(params, Mapping) else params!r}")
        vectors = {ANY_ENCODER: _as_vectors(next(iter(params.values())), path, "string_to_param")}
        name = stem
    elif set(SDXL_KEYS) <= set(state):
        vectors = {k: _as_vectors(state[k], path, k) for k in SDXL_KEYS}
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise EmbeddingFileError(f"{path}: clip_l has {vectors['clip_l'].shape[0]} vectors but clip_g "
                                     f"{vectors['clip_g'].shape[0]}")
        name = stem
    elif len(state) == 1:
        key, value = next(iter(state.items()))
        vectors = {ANY_ENCODER: _as_vectors(value, path, key)}
        # diffusers' files name the token in their key; A1111 / kohya files use the file's stem.
        name = key if stem == DIFFUSERS_STEM and key != "emb_params" else stem
    else:
        raise EmbeddingFileError(f"{path}: not a textual-inversion file (keys {sorted(map(str, state))[:6]}; "
                                 f"expected emb_params, string_to_param, clip_l + clip_g, or one token)")
    name = token if token is not None else name
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise EmbeddingFileError(f"{path}: {name!r} cannot be a prompt token; pass token=...")
    return Embedding(name=name, vectors=vectors, path=str(path), sha256=sha256)


def read_embedding(path: str | os.PathLike, *, token: str | None = None) -> Embedding:
    """Reads a textual-inversion file: .safetensors, or a pickled A1111 `.pt` / diffusers `.bin` read
    through the allow-list unpickler (convert/pickle_reader.py: no code from the file runs).

    Raises:
      EmbeddingFileError / TensorFileError / PickleFileError: missing, truncated or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFileError(f"{path}: no such file")
    if not _is_safetensors(path):
        from convert.pickle_reader import load_pickle
        return embedding_from_state_dict(load_pickle(path), path, token=token, sha256=_sha256(path))
    return embedding_from_state_dict(read_safetensors(path), path, token=token, sha256=_sha256(path))


def read_embeddings_dir(folder: str | os.PathLike) -> tuple[list[Embedding], list[tuple[str, str]]]:
    """Every embedding file in `folder` (A1111's embeddings directory, recursively), by its stem.

    Returns:
      (embeddings, skipped): the files read, and (path, reason) for those that could not be
      (pickled files, broken files); A1111 also lists what it skips rather than failing.
      `*.preview.*` images are ignored, as A1111 ignores them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingFileError(f"{folder}: no such directory")
    loaded, skipped = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in EMBEDDING_SUFFIXES or ".preview." in path.name:
            continue
        try:
            loaded.append(read_embedding(path))
        except CheckpointError as e:
            skipped.append((str(path), str(e)))
    return loaded, skipped
