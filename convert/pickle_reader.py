"""Pickled PyTorch files (.ckpt / .pt / .pth / .bin) read as numpy, with no torch and no code run.

`torch.save` writes (torch >= 1.6; torch/serialization.py `_save`) an uncompressed zip:

    <root>/data.pkl        the object (a dict of tensors, often inside {"state_dict": ...}), pickle protocol 2
    <root>/data/<key>      each storage's raw bytes (little-endian unless <root>/byteorder says "big")

Inside data.pkl a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and a
storage is a persistent id `('storage', torch.<Type>Storage, key, location, numel)`. So a reader needs
only a handful of globals. `_SafeUnpickler.find_class` returns our own numpy stand-ins for exactly those
(the allow-list below, close to torch's own `weights_only` list and A1111's modules/safe.py) and refuses
every other global with a one-line error naming the file and the global, before anything is called:
a payload such as `os.system` or `builtins.exec` is never even imported.

torch's legacy (pre-1.6) format, consecutive pickles with the storages' bytes after the object, is read
through the same unpickler (`_load_legacy`); the even older tar format is refused with a clear message.

Offsets and strides count elements; tensors that share a storage (views, tied weights) become numpy
views of one buffer. Stored (uncompressed) storages are memory-mapped, so a multi-GB checkpoint is not
copied into memory until its tensors are used.

A leaf module: numpy, ml_dtypes (optional) and the standard library only.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import CheckpointError
from convert.formats import LazyTensor

try:
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

# Legacy storage classes -> element dtype (torch/storage.py `_dtype_to_storage_type_map`).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "HalfStorage": np.dtype("<f2"), "DoubleStorage": np.dtype("<f8"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"), "ComplexDoubleStorage": np.dtype("<c16"),
}
if _BF16 is not None:
    _STORAGE_DTYPES["BFloat16Storage"] = _BF16

# Magic number that opens torch's legacy (pre-1.6, non-zip) format (torch/serialization.py).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class PickleFileError(CheckpointError):
    """A pickled checkpoint is unreadable, truncated, or asks for code outside the allow-list."""


class _StorageType:
    """Stands in for `torch.<Type>Storage`: only its dtype matters."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Inert:
    """Stands in for known data-only objects that Lightning pickles next to the weights (callbacks,
    argparse namespaces). Construction arguments and state are dropped; nothing of the class runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _LazyStorage:
    """A stored (uncompressed) storage left in the file: contiguous tensors over it become LazyTensors,
    read only when converted (see convert.formats.LazyTensor)."""

    def __init__(self, path: Path, start: int, dtype: np.dtype, numel: int):
        self.path, self.start, self.dtype, self.size = path, start, dtype, numel
        self.itemsize = dtype.itemsize

    def array(self) -> np.ndarray:
        if self.size == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.start, shape=(self.size,))


def _contiguous_strides(size: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class _LegacyStorage:
    """A storage of the legacy format, whose bytes follow the object pickle: filled in afterwards."""

    def __init__(self, dtype: np.dtype, numel: int, offset: int = 0):
        self.dtype, self.numel, self.offset, self.array = dtype, numel, offset, None


class _Deferred:
    """A legacy-format tensor, rebuilt once its storage has been read (see `_load_legacy`)."""

    def __init__(self, storage: _LegacyStorage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def resolve(self) -> np.ndarray:
        return _rebuild_tensor(self.storage.array, self.storage.offset + self.offset, self.size, self.stride)


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    """`torch._utils._rebuild_tensor{,_v2}`: a (strided) view of the storage's flat array."""
    if isinstance(storage, _LegacyStorage):
        return _Deferred(storage, int(offset), size, stride)
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise ValueError(f"tensor of size {size}, stride {stride}, offset {offset}")
    if isinstance(storage, _LazyStorage):
        n = int(np.prod(size))
        if n and all(a == b for a, b, m in zip(stride, _contiguous_strides(size), size) if m > 1):
            if offset + n > storage.size:
                raise ValueError(f"tensor reaches element {offset + n - 1} of a storage of {storage.size}")
            return LazyTensor(storage.path, storage.start + offset * storage.itemsize, storage.dtype, size)
        storage = storage.array()
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise ValueError(f"tensor reaches element {last} of a storage of {storage.size}")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                           strides=tuple(s * item for s in stride), writeable=False)
    return view


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    """`torch._utils._rebuild_parameter{,_with_state}`: a Parameter is its data."""
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """`torch._tensor._rebuild_from_type_v2`: a tensor subclass; `func` is itself an allowed global."""
    return func(*args)


def _torch_size(*args):
    return tuple(*args) if args else ()


# (module, name) -> what the unpickler gets instead. Nothing here can reach the file system or run code.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("_codecs", "encode"): lambda s, enc="latin-1": s.encode(enc),  # how protocol 2 pickles bytes
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): _torch_size,
    ("torch", "Tensor"): _Inert, ("torch.nn.parameter", "Parameter"): _Inert,
    # Data-only objects found in SD training checkpoints (sd-v1-4.ckpt carries a ModelCheckpoint
    # callback; A1111's modules/safe.py allows the same class).
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Inert,
    ("argparse", "Namespace"): _Inert,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}
# numpy scalars (a `global_step` saved as np.int64) rebuild through numpy's own reconstructor, which
# only turns bytes into a number.
try:
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy < 2
    from numpy.core.multiarray import scalar as _np_scalar
_ALLOWED.update({("numpy.core.multiarray", "scalar"): _np_scalar,
                 ("numpy._core.multiarray", "scalar"): _np_scalar, ("numpy", "dtype"): np.dtype})


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: Path, load_storage):
        super().__init__(file)
        self.source = source
        self.load_storage = load_storage

    def find_class(self, module, name):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise PickleFileError(f"{self.source}: refused to load: the pickle asks for {module}.{name}, "
                                  f"which is not part of a tensor file (no code from it was run); "
                                  f"only load it with PyTorch if you trust its author")
        return target

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise PickleFileError(f"{self.source}: unsupported persistent id {str(pid)[:80]} "
                                  f"(not a typed tensor storage)")
        _, storage_type, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) > 5 else None  # legacy format: (view key, offset, size) or None
        return self.load_storage(storage_type.dtype, str(key), int(numel), view)


def load_pickle(path: str | os.PathLike, *, lazy: bool = False) -> Any:
    """Unpickles a torch zip checkpoint with tensors as numpy arrays (read-only, possibly memory-mapped),
    or with `lazy=True` contiguous tensors of stored storages as convert.formats.LazyTensor (read when
    converted; a large checkpoint then never sits in memory whole).

    Raises:
      PickleFileError naming the file: not a torch zip, truncated, a global outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise PickleFileError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        if _is_legacy(path):
            return _load_legacy(path)
        raise PickleFileError(_not_zip_message(path))
    try:
        with zipfile.ZipFile(path) as zf:
            pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise PickleFileError(f"{path}: not a PyTorch checkpoint (expected one <root>/data.pkl in "
                                      f"the zip, found {len(pkls)})")
            root = pkls[0].rsplit("/", 1)[0]
            big = f"{root}/byteorder" in zf.namelist() and zf.read(f"{root}/byteorder").strip() == b"big"
            storages: dict[str, np.ndarray] = {}

            def load_storage(dtype: np.dtype, key: str, numel: int, view=None) -> np.ndarray:
                if key not in storages:
                    dt = dtype.newbyteorder(">") if big and dtype.itemsize > 1 else dtype
                    name = f"{root}/data/{key}"
                    if lazy and dt == dtype and zf.getinfo(name).compress_type == zipfile.ZIP_STORED:
                        start, size = _entry_span(path, zf, name)
                        if size < numel * dtype.itemsize:
                            raise PickleFileError(f"{path}: truncated file: storage {key} holds {size} "
                                                  f"bytes, expected {numel * dtype.itemsize}")
                        storages[key] = _LazyStorage(path, start, dtype, numel)
                        return storages[key]
                    raw = _entry_array(path, zf, name)
                    if raw.size < numel * dt.itemsize:
                        raise PickleFileError(f"{path}: truncated file: storage {key} holds {raw.size} "
                                              f"bytes, expected {numel * dt.itemsize}")
                    arr = raw[:numel * dt.itemsize].view(dt)
                    storages[key] = arr.astype(dtype) if dt != dtype else arr
                return storages[key]

            with zf.open(pkls[0]) as f:
                return _SafeUnpickler(f, source=path, load_storage=load_storage).load()
    except PickleFileError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise PickleFileError(f"{path}: truncated or corrupt PyTorch checkpoint ({e}); re-download it") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise PickleFileError(f"{path}: unreadable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def read_pickle_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a checkpoint as a flat {key: array} (see `read_pickle_checkpoint`)."""
    return read_pickle_checkpoint(path)[0]


def read_pickle_checkpoint(path: str | os.PathLike, *, lazy: bool = False
                           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, info): the flat {key: array} and the scalar entries around it (e.g. `global_step`).

    Lightning wrappers (`{"state_dict": {...}, "global_step": ..., "optimizer_states": ...}`) are
    unwrapped as diffusers does (`while "state_dict" in checkpoint`, single_file_utils.py
    `load_single_file_checkpoint`); entries that are not tensors (steps, epochs, callbacks) are dropped
    from the tensors, and the int / float / str ones are returned in `info`.
    """
    obj = load_pickle(path, lazy=lazy)
    info: dict[str, Any] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info.update({str(k): v for k, v in obj.items() if isinstance(v, (int, float, str, np.generic))})
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise PickleFileError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, (np.ndarray, LazyTensor))}
    if not tensors:
        raise PickleFileError(f"{path}: no tensors at the top level (keys: {', '.join(map(str, list(obj)[:5]))})")
    return tensors, info


def _entry_array(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """One zip member's bytes as uint8: a memory map for stored members, a copy for compressed ones."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(zf.read(name), np.uint8)
    start, size = _entry_span(path, zf, name)
    if size == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size,))


def _entry_span(path: Path, zf: zipfile.ZipFile, name: str) -> tuple[int, int]:
    """(file offset, size) of a stored zip member's data."""
    info = zf.getinfo(name)
    # The local header (30 bytes + name + extra) precedes the data; its lengths may differ from the
    # central directory's, so read them from the local header itself (zip APPNOTE 4.3.7).
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise PickleFileError(f"{path}: corrupt zip entry {name}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > path.stat().st_size:
        raise PickleFileError(f"{path}: truncated file: {name} runs past the end; re-download it")
    return start, info.file_size


def _is_legacy(path: Path) -> bool:
    """Whether the file opens with the legacy format's pickled magic number (reading an int runs nothing)."""
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":
            return False
        f.seek(0)
        try:
            return _SafeUnpickler(f, source=path, load_storage=None).load() == _LEGACY_MAGIC
        except Exception:
            return False


def _load_legacy(path: Path) -> Any:
    """torch's pre-1.6 format (torch/serialization.py `_legacy_save`): consecutive pickles of the magic
    number, the protocol version, sys_info, the object (storages as persistent ids), the storage keys;
    then each storage as an int64 element count and its raw bytes, in the keys' order."""
    storages: dict[str, _LegacyStorage] = {}

    def load_storage(dtype: np.dtype, key: str, numel: int, view=None):
        root = storages.setdefault(key, _LegacyStorage(dtype, numel))
        if view is None:
            return root
        _view_key, offset, _size = view  # a view into a larger storage: its bytes from an element offset
        return _ViewOf(root, int(offset))

    try:
        with open(path, "rb") as f:
            for _ in range(3):  # magic, protocol version, sys_info
                info = _SafeUnpickler(f, source=path, load_storage=None).load()
            if isinstance(info, dict) and not info.get("little_endian", True):
                raise PickleFileError(f"{path}: a big-endian legacy checkpoint; re-save it as .safetensors")
            obj = _SafeUnpickler(f, source=path, load_storage=load_storage).load()
            keys = _SafeUnpickler(f, source=path, load_storage=None).load()
            for key in keys:
                storage = storages[str(key)]
                (numel,) = struct.unpack("<q", f.read(8))
                data = f.read(numel * storage.dtype.itemsize)
                if len(data) != numel * storage.dtype.itemsize:
                    raise PickleFileError(f"{path}: truncated file (storage {key}); re-download it")
                storage.array = np.frombuffer(data, storage.dtype)
    except PickleFileError:
        raise
    except (EOFError, OSError, struct.error, KeyError) as e:
        raise PickleFileError(f"{path}: truncated or corrupt legacy PyTorch checkpoint ({e}); re-download it") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise PickleFileError(f"{path}: unreadable legacy PyTorch checkpoint ({type(e).__name__}: {e})") from None
    try:
        return _resolve(obj)
    except ValueError as e:
        raise PickleFileError(f"{path}: unreadable legacy PyTorch checkpoint ({e})") from None


class _ViewOf(_LegacyStorage):
    """A legacy storage view: the root's bytes from an element offset on."""

    def __init__(self, root: _LegacyStorage, offset: int):
        self.root, self.dtype, self.offset = root, root.dtype, offset

    @property
    def array(self):
        return self.root.array


def _resolve(obj):
    """Rebuilds the deferred legacy tensors inside dicts, lists and tuples."""
    if isinstance(obj, _Deferred):
        return obj.resolve()
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _resolve(v)
        return obj
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def _not_zip_message(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80":
        return f"{path}: a bare pickle, not a PyTorch checkpoint; re-save it as .safetensors"
    return f"{path}: not a PyTorch checkpoint (not a zip archive); truncated or another file type"
