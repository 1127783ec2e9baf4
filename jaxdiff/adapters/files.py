"""LoRA / LyCORIS files on a pipeline's params, as pure functions over params trees, plus `AdapterSet`,
the small stateful holder a Pipeline owns.

    adapter = read_lora_file("style.safetensors", pipe.params)       # checked against the model
    params = apply(pipe.params, [(adapter, 0.8), (other, 0.5)])       # a new tree; the base untouched
    pipe.with_params(params)(...)                                     # the same compiled programs

`apply` computes each adapted kernel as W + Σ weight · scale · ΔW (DoRA layers renormalise, in order)
in float32, by default in numpy on the host (loading, re-weighting and unloading compile nothing), or
with `on_device=True` in one small jitted program per (kernel shape, factor shapes, adapter kinds) whose
weights are traced scalars. Leaves no adapter touches are shared with the base tree, not copied. Unloading is giving
back the base tree itself, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from convert import lora as lora_format
from convert.diffusers_layout import flatten
from convert.export import module_path_to_torch
from jaxdiff.adapters import lora as maths
from jaxdiff.errors import ConfigError

LoraFileError = lora_format.LoraFileError
# Pipeline component -> the convert.export ModuleList table its torch names follow.
COMPONENT_KINDS = {"unet": "unet", "text_encoder": "clip", "text_encoder_2": "clip"}

Params = Mapping[str, Any]          # component name -> param tree (nested dicts, no {"params": ...})


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """A LoRA file read against one model: component -> jaxdiff module path -> layer (torch layout)."""
    name: str
    source: str
    layers: Mapping[str, Mapping[tuple[str, ...], lora_format.LoraLayer]]
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(v) for v in self.layers.values())


def module_names(params: Params) -> dict[str, dict[str, tuple[str, ...]]]:
    """component -> {diffusers / transformers module path: jaxdiff module path} of every module with a
    Dense or Conv kernel, for the components a LoRA can adapt."""
    out = {}
    for component, kind in COMPONENT_KINDS.items():
        tree = params.get(component)
        if tree is None:
            continue
        out[component] = {module_path_to_torch(path[:-1], kind=kind): path[:-1]
                          for path, leaf in flatten(tree).items()
                          if path[-1] == "kernel" and len(leaf.shape) in (2, 4)}
    return out


def read_lora_file(path: str | os.PathLike, params: Params, *, name: str | None = None) -> LoraAdapter:
    """Reads a LoRA / LoCon / LoHa / LoKr file (any key style convert.lora knows) and checks every layer
    against the model's kernels.

    Args:
      path: a .safetensors file.
      params: component -> param tree (arrays or `jax.eval_shape` leaves; only shapes are read).
      name: the adapter's name (default: the file's stem).
    Raises:
      LoraFileError (a JaxdiffError) with one line naming the file: unreadable or truncated file, keys
      that match no module, rank mismatches, deltas that do not fit the kernel they name.
    """
    names = module_names(params)
    parsed = lora_format.read_lora(path, {c: set(m) for c, m in names.items()})
    return _check(parsed, params, names, name or Path(path).stem)


def from_state_dict(tensors: Mapping[str, np.ndarray], params: Params, *, name: str,
                    metadata: Mapping[str, str] | None = None, source: str = "LoRA") -> LoraAdapter:
    """`read_lora_file` for tensors already in memory (e.g. a pickled file read by a safe unpickler)."""
    names = module_names(params)
    parsed = lora_format.normalise(tensors, {c: set(m) for c, m in names.items()}, metadata=metadata,
                                   source=source)
    return _check(parsed, params, names, name)


def _check(parsed: lora_format.LoraFile, params: Params, names, name: str) -> LoraAdapter:
    layers: dict[str, dict[tuple[str, ...], lora_format.LoraLayer]] = {}
    kernels = {c: flatten(params[c]) for c in names}
    for (component, module), layer in parsed.layers.items():
        path = names[component][module]
        kshape = tuple(kernels[component][path + ("kernel",)].shape)
        tshape = maths.torch_shape(kshape)
        size, out = maths.delta_size(layer.kind, layer.factors)
        if size != math.prod(tshape) or (out is not None and out != tshape[0]):
            raise LoraFileError(f"{parsed.source}: {layer.key} ({layer.kind}, factors "
                                f"{ {k: tuple(v.shape) for k, v in layer.factors.items()} }) does not fit "
                                f"{component} {module} of shape {tshape}; is it for another model?")
        if layer.magnitude is not None and layer.magnitude.size not in (tshape[0], tshape[1]):
            raise LoraFileError(f"{parsed.source}: {layer.key}: DoRA magnitude of shape "
                                f"{layer.magnitude.shape} fits neither side of {tshape}")
        layers.setdefault(component, {})[path] = layer
    return LoraAdapter(name=name, source=parsed.source, layers=layers, metadata=dict(parsed.metadata))


def apply(base: Params, adapters: Sequence[tuple[LoraAdapter, Any]], *, on_device: bool = False
          ) -> dict[str, Any]:
    """base params with the weighted adapters merged in; `base` itself is not modified.

    Args:
      base: component -> param tree, as `pipe.params`.
      adapters: (adapter, weight) pairs, weight a float or {component: float} (components left out get
        1.0, as diffusers' set_adapters does).
      on_device: merge with jitted programs on the kernels' devices (one small program per kernel
        shape signature, compiled on first use) instead of in numpy on the host (compiles nothing:
        each adapted kernel is fetched, merged in float32 and put back with its sharding).
    Returns:
      component -> param tree of the same structure and dtypes; components and leaves no adapter
      touches are the base's own objects.
    """
    entries: dict[tuple[str, tuple[str, ...]], list] = {}
    for adapter, weight in adapters:
        for component, layers in adapter.layers.items():
            if component not in base:
                raise ConfigError(f"{adapter.source}: adapts {component}, which this pipeline does not have")
            w = float(weight.get(component, 1.0)) if isinstance(weight, Mapping) else float(weight)
            for path, layer in layers.items():
                entries.setdefault((component, path), []).append((layer, w))
    if not entries:
        return dict(base)
    flat = {c: flatten(base[c]) for c in {c for c, _ in entries}}
    out = dict(base)
    for (component, path), items in sorted(entries.items()):
        w = flat[component][path + ("kernel",)]
        kinds = tuple((layer.kind, layer.dora if layer.magnitude is not None else None) for layer, _ in items)
        layers = [{"f": dict(layer.factors), **({"m": layer.magnitude} if layer.magnitude is not None else {})}
                  for layer, _ in items]
        coeffs = np.asarray([[weight, layer.scale] for layer, weight in items], np.float32)
        if on_device:
            merged = _merge_kernel(maths.torch_shape(w.shape), kinds, w, jax.device_put(layers),
                                   jax.device_put(coeffs))
        else:
            merged = _merge_on_host(w, kinds, layers, coeffs)
        out[component] = _replace(out[component], path + ("kernel",), merged)
    return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_kernel(torch_shape: tuple[int, ...], kinds: tuple, w, layers, coeffs):
    """One kernel W [in, out] / [kh, kw, in, out] with its adapters merged, in W's dtype.

    One small program per (shapes, adapter kinds), shared by every kernel and every adapter file of the
    same shapes (a whole SDXL LoRA has a few dozen), and by any weights (coeffs [n, 2]: weight, scale).
    """
    acc = w.astype(jnp.float32)
    for (kind, rule), layer, (weight, scale) in zip(kinds, layers, coeffs):
        delta = maths.to_kernel_layout(maths.torch_delta(kind, layer["f"], torch_shape))
        if rule is None:
            acc = acc + (weight * scale) * delta
        else:
            acc = maths.dora(acc, delta, layer["m"], weight, scale, rule)
    return acc.astype(w.dtype)


def _merge_on_host(w, kinds: tuple, layers, coeffs):
    """`_merge_kernel` in numpy: fetch W, merge in float32, put it back where W lives."""
    host = np.asarray(jax.device_get(w))
    acc = host.astype(np.float32)
    tshape = maths.torch_shape(host.shape)
    for (kind, rule), layer, (weight, scale) in zip(kinds, layers, coeffs):
        delta = maths.to_kernel_layout(maths.torch_delta(kind, layer["f"], tshape, xp=np))
        if rule is None:
            acc = acc + (weight * scale) * delta
        else:
            acc = maths.dora(acc, delta, layer["m"], weight, scale, rule, xp=np)
    merged = acc.astype(host.dtype)
    # Same placement and commitment as W: a jitted program's cache key includes both, so anything else
    # would recompile the network for the merged params.
    if getattr(w, "committed", False):
        return jax.device_put(merged, w.sharding)
    return jax.device_put(merged)


def _replace(tree, path: tuple[str, ...], leaf):
    """A copy of `tree` with one leaf replaced: only the dicts along `path` are new, each of its type."""
    head, *rest = path
    node = dict(tree)
    node[head] = _replace(tree[head], tuple(rest), leaf) if rest else leaf
    return node if type(tree) is dict else type(tree)(node)


class AdapterSet:
    """Named adapters over one base params tree; `params` is the tree to run with.

        adapters = AdapterSet(pipe.params)
        adapters.load("a.safetensors", adapter_name="a", scale=0.8)
        adapters.set_adapters(["a", "b"], [0.5, 1.0])
        pipe.with_params(adapters.params)
        adapters.unload()              # adapters.params is the base tree again, the same objects

    Names and semantics follow diffusers' `load_lora_weights` / `set_adapters` / `delete_adapters` /
    `unload_lora_weights` / `fuse_lora` / `unfuse_lora`. The merged tree is computed when asked for and
    kept until the adapters or weights change.
    """

    def __init__(self, base: Params, *, on_device: bool = False):
        """on_device: as in `apply` (default: merge on the host, compiling nothing)."""
        self._on_device = on_device
        self._base = dict(base)
        self._unfused: dict[str, Any] | None = None   # the base before fuse(), for unfuse()
        self._adapters: dict[str, LoraAdapter] = {}
        self._active: dict[str, Any] = {}              # name -> weight, in application order
        self._cache: dict[str, Any] | None = None

    @property
    def base(self) -> dict[str, Any]:
        return self._base

    @property
    def names(self) -> list[str]:
        return list(self._adapters)

    @property
    def active(self) -> dict[str, Any]:
        return dict(self._active)

    @property
    def params(self) -> dict[str, Any]:
        if not self._active:
            return self._base
        if self._cache is None:
            self._cache = apply(self._base, [(self._adapters[n], w) for n, w in self._active.items()],
                                on_device=self._on_device)
        return self._cache

    def load(self, path: str | os.PathLike, *, adapter_name: str | None = None, scale: Any = 1.0) -> str:
        """Reads a file and activates it (with the adapters already active) at `scale`; returns its
        name (default `default_<n>`, as diffusers names them). Nothing changes if reading fails."""
        name = adapter_name or f"default_{len(self._adapters)}"
        if name in self._adapters:
            raise ConfigError(f"adapter name {name!r} is already in use; pass another adapter_name")
        self.add(read_lora_file(path, self._base, name=name), scale=scale)
        return name

    def add(self, adapter: LoraAdapter, *, scale: Any = 1.0) -> None:
        if adapter.name in self._adapters:
            raise ConfigError(f"adapter name {adapter.name!r} is already in use")
        self._adapters[adapter.name] = adapter
        self._active[adapter.name] = scale
        self._cache = None

    def set_adapters(self, names: str | Sequence[str], adapter_weights: Any = None) -> None:
        """Activates exactly `names` (others stay loaded, inactive) with the given weights (one for
        all, one per name, each a float or {component: float}; None: 1.0)."""
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self._adapters]
        if missing:
            raise ConfigError(f"no adapter named {', '.join(missing)}; loaded: {', '.join(self._adapters) or 'none'}")
        if adapter_weights is None or isinstance(adapter_weights, (int, float, Mapping)):
            weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        else:
            weights = list(adapter_weights)
            if len(weights) != len(names):
                raise ConfigError(f"{len(weights)} adapter weights for {len(names)} adapters")
        self._active = dict(zip(names, weights))
        self._cache = None

    def delete(self, names: str | Sequence[str]) -> None:
        for n in [names] if isinstance(names, str) else names:
            if n not in self._adapters:
                raise ConfigError(f"no adapter named {n!r}")
            del self._adapters[n]
            self._active.pop(n, None)
        self._cache = None

    def unload(self) -> None:
        """Drops every adapter: `params` is the base tree again (fused weights stay fused)."""
        self._adapters.clear()
        self._active.clear()
        self._cache = None

    def fuse(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
        """Makes the base the base with the (given, else active) adapters merged at lora_scale × their
        weights; they stay loaded but inactive, so `unload` then keeps the fused weights."""
        names = list(self._active) if adapter_names is None else list(adapter_names)
        pairs = [(self._adapters[n], _times(self._active.get(n, 1.0), lora_scale)) for n in names]
        if self._unfused is None:
            self._unfused = self._base
        self._base = apply(self._base, pairs, on_device=self._on_device)
        for n in names:
            self._active.pop(n, None)
        self._cache = None

    def unfuse(self) -> None:
        """Back to the base as it was before the first `fuse`."""
        if self._unfused is not None:
            self._base, self._unfused = self._unfused, None
            self._cache = None


def _times(weight, factor: float):
    if isinstance(weight, Mapping):
        return {k: float(v) * factor for k, v in weight.items()}
    return float(weight) * factor
