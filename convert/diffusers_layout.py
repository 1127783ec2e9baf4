"""diffusers / transformers state dicts -> jaxdiff param trees, by one strict naming rule.

jaxdiff's Flax param paths mirror the PyTorch module paths, with a numeric child index joined to its
parent by `_`:

    down_blocks.0.resnets.1.conv1.weight   <->  down_blocks_0/resnets_1/conv1/kernel
    ff.net.0.proj.weight                   <->  ff/net_0/proj/kernel
    text_model.embeddings.token_embedding.weight <-> text_model/embeddings/token_embedding/embedding

so the table is derived, not written: each source key names exactly one target path, and the leaf
`weight` becomes whichever of `kernel` (Dense: [out, in] -> [in, out]; Conv: [O, I, kh, kw] ->
[kh, kw, I, O]), `scale` (norms) or `embedding` the target has. The conversion is strict: every
source tensor is used, every target param is filled and every shape is checked; the error lists what
is missing, left over or mis-shaped.

A leaf module: numpy only, never imports jaxdiff.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable, Mapping

import numpy as np

from convert.errors import CheckpointError

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_INDEX = re.compile(r"^\d+$")


class MappingError(CheckpointError):
    """Source tensors and model params do not correspond one to one."""


def source_key_to_path(key: str) -> tuple[str, ...]:
    """'down_blocks.0.resnets.1.conv1.weight' -> ('down_blocks_0', 'resnets_1', 'conv1', 'weight')."""
    out: list[str] = []
    for part in key.split("."):
        if _INDEX.match(part) and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {path tuple: leaf}."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """{path tuple: leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def _kernel_from_torch(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # Conv2d [O, I, kh, kw] -> [kh, kw, I, O]
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 2:  # Linear [out, in] -> [in, out]
        return a.T
    return a


def _kernel_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def plan_conversion(source_shapes: Mapping[str, tuple[int, ...]], target: Mapping[str, Any], *,
                    source: str = "checkpoint", ignore: tuple[str, ...] = ()
                    ) -> dict[tuple[str, ...], tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """Matches every source key to one target param, checking shapes, without touching data.

    Args:
      source_shapes: torch state-dict key -> shape (the file's layout).
      target: the model's param tree (nested dicts; leaves have `.shape`), without {"params": ...}.
      source: the file or folder named in errors.
      ignore: glob patterns of source keys that carry no params (buffers such as `*.position_ids`).
    Returns:
      target path -> (source key, function turning the source array into the target layout).
    Raises:
      MappingError listing missing, left-over and mis-shaped tensors.
    """
    targets = {path: tuple(leaf.shape) for path, leaf in flatten(target).items()}
    plan, leftover, misshaped, seen = {}, [], [], set()
    for key, shape in source_shapes.items():
        if any(fnmatch.fnmatchcase(key, pat) for pat in ignore):
            continue
        *module, leaf = source_key_to_path(key)
        module = tuple(module)
        if leaf == "weight":
            candidates = [module + (name,) for name in _WEIGHT_LEAVES if module + (name,) in targets]
        else:
            candidates = [module + (leaf,)] if module + (leaf,) in targets else []
        if len(candidates) != 1 or candidates[0] in plan:
            leftover.append(key)
            continue
        path = candidates[0]
        seen.add(path)
        fn = _kernel_from_torch if path[-1] == "kernel" else _identity
        got = _kernel_shape(tuple(shape)) if fn is _kernel_from_torch else tuple(shape)
        if got != targets[path]:
            misshaped.append(f"{key} {tuple(shape)} vs model {'/'.join(path)} {targets[path]}")
            continue
        plan[path] = (key, fn)
    missing = ["/".join(p) for p in targets if p not in seen]
    if missing or leftover or misshaped:
        raise MappingError(f"{source}: weights do not fit the model config: " + "; ".join(
            f"{len(items)} {what} ({', '.join(sorted(items)[:4])}{', ...' if len(items) > 4 else ''})"
            for what, items in (("missing", missing), ("left over", leftover), ("mis-shaped", misshaped))
            if items))
    return plan


def convert_state_dict(tensors: Mapping[str, np.ndarray], target: Mapping[str, Any], *,
                       source: str = "checkpoint", ignore: tuple[str, ...] = (),
                       dtype: Any = None) -> dict[str, Any]:
    """Converts a torch-layout state dict into a jaxdiff param tree (nested dict of numpy arrays).

    Args:
      tensors: torch state-dict key -> array (numpy, any float dtype).
      target: the model's param tree or its `jax.eval_shape` (leaves have `.shape`).
      source, ignore: as in `plan_conversion`.
      dtype: cast every param to this dtype (None keeps the file's dtype).
    """
    plan = plan_conversion({k: tuple(v.shape) for k, v in tensors.items()}, target,
                           source=source, ignore=ignore)
    out = {}
    for path, (key, fn) in plan.items():
        a = np.ascontiguousarray(fn(np.asarray(tensors[key])))
        out[path] = a.astype(dtype) if dtype is not None else a
    return unflatten(out)
