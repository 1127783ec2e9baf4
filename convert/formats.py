"""Readers and writers for tensor files: safetensors (single, sharded by an index) with strict checks.

This module is a leaf (numpy and the standard library only). safetensors is parsed here rather than
through the `safetensors` package so that bfloat16 loads into numpy (through ml_dtypes, which JAX ships)
and so that a truncated or hostile file fails with a message naming the file and the problem, before
any tensor is used.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes
of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
data block; offsets are relative to the start of the data block.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from convert.errors import CheckpointError

try:  # ml_dtypes comes with jax; convert/ must still import without it.
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
    _F8 = {"F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}
except ImportError:  # pragma: no cover
    _BF16, _F8 = None, {}

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"), **_F8,
}
if _BF16 is not None:
    _DTYPES["BF16"] = _BF16
_NAMES = {v: k for k, v in _DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class TensorFileError(CheckpointError):
    """A tensor file is missing, truncated, malformed or unsupported. The message names the file."""


class LazyTensor:
    """One tensor of a file, read (with pread, into fresh memory) when `np.asarray` converts it.

    Loading a multi-GB checkpoint then holds one source tensor at a time besides the converted params:
    a memory map would instead keep every page it touched resident in the process (its RSS). Row
    slices (`t[a:b]`), `.T` and `.reshape` are deferred, which is all the layout converters use.
    """

    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], ops: tuple = ()):
        self.path, self.offset, self.dtype, self.base_shape, self.ops = path, offset, dtype, shape, ops
        shape = tuple(shape)
        for op in ops:
            shape = shape[::-1] if op == "T" else op
        self.shape = shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __getitem__(self, index):
        if self.ops or not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("LazyTensor supports only a row slice of an unmodified tensor")
        start, stop, _ = index.indices(self.shape[0])
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        return LazyTensor(self.path, self.offset + start * row, self.dtype,
                          (max(stop - start, 0),) + self.shape[1:])

    @property
    def T(self) -> "LazyTensor":
        return LazyTensor(self.path, self.offset, self.dtype, self.base_shape, self.ops + ("T",))

    def reshape(self, *shape) -> "LazyTensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return LazyTensor(self.path, self.offset, self.dtype, self.base_shape, self.ops + (tuple(shape),))

    def __array__(self, dtype=None, copy=None):
        a = np.empty(self.base_shape, self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if f.readinto(memoryview(a.reshape(-1).view(np.uint8))) != a.nbytes:
                raise TensorFileError(f"{self.path}: truncated while reading a tensor; re-download it")
        for op in self.ops:
            a = a.T if op == "T" else a.reshape(op)
        return a if dtype is None else a.astype(dtype)

    def __repr__(self):
        return f"LazyTensor({self.path.name}, {self.dtype}, {self.shape})"


def read_safetensors(path: str | os.PathLike, *, lazy: bool = False) -> dict[str, np.ndarray]:
    """Reads every tensor of one .safetensors file.

    Returns read-only numpy arrays backed by a memory map of the file (no copy until used), or with
    `lazy=True` LazyTensors that read each tensor only when it is converted (for large checkpoints).
    Raises TensorFileError naming the file for anything truncated, overlapping or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise TensorFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise TensorFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise TensorFileError(f"{path}: truncated or not a safetensors file "
                                  f"(header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TensorFileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as e:
            raise TensorFileError(f"{path}: tensor {name!r} has unsupported dtype or missing field {e}") from None
        except (TypeError, ValueError):
            raise TensorFileError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise TensorFileError(f"{path}: tensor {name!r} has offsets {begin}..{end} that do not fit "
                                  f"shape {shape} of {info['dtype']}")
        if end > data_size:
            raise TensorFileError(f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data "
                                  f"block but only {data_size} bytes are present; re-download or re-save it")
        spans.append((begin, end, name, dtype, shape))
    spans.sort()
    for (_, end0, name0, *_), (begin1, _, name1, *_) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise TensorFileError(f"{path}: tensors {name0!r} and {name1!r} overlap")
    if not spans:
        return {}
    if lazy:
        return {name: LazyTensor(path, 8 + n + begin, dtype, shape) for begin, end, name, dtype, shape in spans}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(data_size,))
    return {name: data[begin:end].view(dtype).reshape(shape) for begin, end, name, dtype, shape in spans}


def read_sharded(index_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a sharded checkpoint through its `*.safetensors.index.json` (or `*.bin.index.json`) map."""
    index_path = Path(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except FileNotFoundError:
        raise TensorFileError(f"{index_path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise TensorFileError(f"{index_path}: not a valid shard index (needs a 'weight_map')") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        part = read_tensors(index_path.parent / shard)
        tensors.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise TensorFileError(f"{index_path}: {len(missing)} tensors listed in the index are not in their "
                              f"shards (e.g. {', '.join(missing[:3])})")
    return tensors


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .safetensors file, a pickled PyTorch file (.ckpt / .pt / .pth / .bin, through
    convert.pickle_reader) or a sharded `*.safetensors.index.json` / `*.bin.index.json`."""
    path = Path(path)
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return read_sharded(path)
    if name.endswith(".safetensors"):
        return read_safetensors(path)
    if name.endswith((".bin", ".ckpt", ".pt", ".pth")):
        from convert.pickle_reader import read_pickle_state_dict  # allow-list unpickler, no torch
        return read_pickle_state_dict(path)
    if name.endswith(".bin.index.json"):
        return read_sharded(path)
    raise TensorFileError(f"{path}: unknown tensor file type (expected .safetensors, .ckpt, .pt, .pth, .bin "
                          f"or a sharded index)")


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors to one .safetensors file atomically (a temp file renamed into place)."""
    path = Path(path)
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.require(np.asarray(tensors[name]), requirements="C")  # ascontiguousarray makes 0-d 1-d
        if a.dtype not in _NAMES:
            raise TensorFileError(f"{path}: cannot write tensor {name!r} of dtype {a.dtype}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the reference writer aligns the data block to 8 bytes
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for a in arrays:
                f.write(a.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike):
    """Yields a temporary sibling of `dst` to fill; when the block succeeds it takes `dst`'s place (an
    existing `dst` is removed only once the new folder is complete), when it fails it is deleted. So an
    interrupted write never leaves a half-written folder where a complete one is expected."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
