"""LoRA maths on jaxdiff param trees: target selection, merge, the unmerged path, and the dense deltas of
the adapters people download (LoRA / LoCon / LoHa / LoKr, DoRA). Conv-aware: Dense kernels [in, out] and
Conv kernels [kh, kw, in, out] (1x1 and 3x3) alike.

Two forms of adapter live here:

* jaxdiff's own factors (what `jaxdiff.training.lora` trains): a tree mirroring the param tree down to
  the adapted modules, each holding {"down": [..., in, r], "up": [r, out]} in jaxdiff layout. A Dense
  module has down [in, r]; a Conv module down [kh, kw, in, r] (the low-rank conv of LoCon: the down
  conv has the module's kernel, stride and padding, the up conv is 1x1). The kernel gains
    W + s * tensordot(down, up)      (s = alpha / r)
  which is PEFT's `W + s * B @ A` with A = down.T, B = up.T in torch layout.
* file layers (convert.lora.LoraLayer): factors in torch layout, turned into a dense torch-layout delta
  [out, in(, kh, kw)] by `torch_delta`, then into jaxdiff layout by `to_kernel_layout` (Dense: .T,
  Conv: OIHW -> HWIO), the same transposes convert/diffusers_layout.py applies to weights.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convert.diffusers_layout import flatten, unflatten
from jaxdiff.errors import ConfigError


def target_modules(params: Mapping[str, Any], patterns: Sequence[str]) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{module path: kernel shape} of the Dense (2-D kernel) and Conv (4-D kernel) modules whose
    '/'-joined path fully matches one of the regexes. Reads shapes only (works on `jax.eval_shape`
    trees). Raises ConfigError when nothing matches: an adapter that adapts nothing is a mistake."""
    compiled = [re.compile(p) for p in patterns]
    found = {}
    for path, leaf in flatten(params).items():
        if path[-1] != "kernel" or len(leaf.shape) not in (2, 4):
            continue
        module = path[:-1]
        if any(p.fullmatch("/".join(module)) for p in compiled):
            found[module] = tuple(leaf.shape)
    if not found:
        raise ConfigError(f"LoRA targets {tuple(patterns)} match no Dense or Conv layer of these params")
    return found


def factors(lora: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
    """{module path: (down [..., in, r], up [r, out])}."""
    flat = flatten(lora)
    return {path[:-1]: (flat[path[:-1] + ("down",)], flat[path[:-1] + ("up",)])
            for path in flat if path[-1] == "down"}


def lowrank_delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """down [..., in, r], up [r, out] -> the kernel delta [..., in, out], in float32."""
    return jnp.tensordot(down.astype(jnp.float32), up.astype(jnp.float32), axes=1)


def merge(params: Mapping[str, Any], lora: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """params with each adapted kernel replaced by W + scale * tensordot(down, up) (in W's dtype).

    Untouched leaves are shared, not copied. Differentiable in both arguments; jit it with the rest of
    the step. The product is formed in float32 whatever W's storage dtype.
    """
    flat = dict(flatten(params))
    for module, (down, up) in factors(lora).items():
        path = module + ("kernel",)
        if path not in flat:
            raise ConfigError(f"LoRA module {'/'.join(module)} is not in these params")
        w = flat[path]
        delta = lowrank_delta(down, up)
        if delta.shape != w.shape:
            raise ConfigError(f"LoRA {'/'.join(module)}: delta {delta.shape} vs kernel {w.shape}")
        flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return unflatten(flat)


def apply_unmerged(module: nn.Module, params: Mapping[str, Any], lora: Mapping[str, Any], scale: float,
                   *args, **kwargs):
    """`module.apply({"params": params}, *args, **kwargs)` with the low-rank branch added to each adapted
    layer's output, leaving the kernels as they are:
      Dense: y += scale * (x @ down) @ up
      Conv:  y += scale * conv(x, down; the module's strides and padding) @ up

    Module paths are those of `module`'s own param tree (lora must be for this module, not a tree of
    components).
    """
    table = factors(lora)

    def add_lora(next_fun, call_args, call_kwargs, context):
        y = next_fun(*call_args, **call_kwargs)
        mod = context.module
        if context.method_name != "__call__" or mod.path not in table or not isinstance(mod, (nn.Dense, nn.Conv)):
            return y
        down, up = table[mod.path]
        x = call_args[0]
        if isinstance(mod, nn.Conv):
            h = _conv_like(mod, x, down.astype(x.dtype))                # [B, H', W', r]
        else:
            h = jnp.matmul(x, down.astype(x.dtype))                     # [..., r]
        return y + (scale * jnp.matmul(h, up.astype(x.dtype))).astype(y.dtype)

    with nn.intercept_methods(add_lora):
        return module.apply({"params": params}, *args, **kwargs)


def _conv_like(mod: nn.Conv, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [B, H, W, C] convolved with `kernel` [kh, kw, C, r] the way `mod` convolves (stride, padding)."""
    padding = mod.padding
    if isinstance(padding, int):
        padding = ((padding, padding),) * 2
    elif not isinstance(padding, str):
        padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    strides = mod.strides or 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# --- file adapters: dense deltas in torch layout ---------------------------------------------------

def torch_shape(kernel_shape: Sequence[int]) -> tuple[int, ...]:
    """jaxdiff kernel shape -> the torch weight shape (Dense [in, out] -> [out, in]; HWIO -> OIHW)."""
    if len(kernel_shape) == 2:
        return (kernel_shape[1], kernel_shape[0])
    kh, kw, cin, cout = kernel_shape
    return (cout, cin, kh, kw)


def to_kernel_layout(delta: jax.Array) -> jax.Array:
    """A torch-layout delta [out, in] / [out, in, kh, kw] -> jaxdiff layout [in, out] / [kh, kw, in, out]."""
    return delta.T if delta.ndim == 2 else delta.transpose(2, 3, 1, 0)


def _cp(t, wa, wb, xp):
    """Tucker rebuild (A1111 `lyco_helpers.make_weight_cp`): t [r, r, k, k], wa [r, out], wb [r, in]
    -> [out, in, k, k]."""
    return xp.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def torch_delta(kind: str, f: Mapping[str, jax.Array], shape: Sequence[int], xp=jnp) -> jax.Array:
    """The dense delta of one file layer (before its scale), float32, torch layout `shape`; xp is jnp
    (inside jit) or numpy (on the host, compiling nothing).

    kind "lora": up @ down (LoCon kxk: ΔW[o, i] = Σ_r up[o, r] down[r, i, :, :], kohya `merge_to`;
      Tucker: einsum(mid, up, down), A1111 `rebuild_cp_decomposition`).
    kind "loha": (w1_a @ w1_b) ⊙ (w2_a @ w2_b), each factor Tucker-rebuilt when t1 / t2 exist
      (LyCORIS `loha.py`, A1111 `network_hada.py`).
    kind "lokr": kron(w1, w2), w1 = w1_a @ w1_b when factorised, w2 likewise or Tucker with t2; for a
      conv w1 is unsqueezed to [a, b, 1, 1] (A1111 `network_lokr.make_kron`, ComfyUI `lokr.py`).
    """
    f = {k: xp.asarray(v, xp.float32) for k, v in f.items()}
    if kind == "lora":
        up = f["up"].reshape(f["up"].shape[0], -1)                 # [out, r]
        down = f["down"].reshape(f["down"].shape[0], -1)           # [r, in*k*k]
        if "mid" in f:
            return xp.einsum("nmkl,in,mj->ijkl", f["mid"], up, down).reshape(shape)
        return (up @ down).reshape(shape)
    if kind == "loha":
        halves = []
        for i in "12":
            a, b = f[f"w{i}_a"], f[f"w{i}_b"]
            halves.append(_cp(f[f"t{i}"], a, b, xp) if f"t{i}" in f else a @ b)
        return (halves[0] * halves[1]).reshape(shape)
    if kind == "lokr":
        w1 = f["w1"] if "w1" in f else f["w1_a"] @ f["w1_b"]
        if "w2" in f:
            w2 = f["w2"]
        elif "t2" in f:
            w2 = _cp(f["t2"], f["w2_a"], f["w2_b"], xp)
        else:
            w2 = f["w2_a"] @ f["w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return xp.kron(w1, w2).reshape(shape)
    raise ValueError(f"unknown adapter kind {kind!r}")


def delta_size(kind: str, f: Mapping[str, Any]) -> tuple[int, int | None]:
    """(number of elements, output channels or None) of `torch_delta`'s result before the reshape:
    checked against the target kernel without computing anything."""
    def n(a):
        return math.prod(a.shape)

    if kind == "lora":
        out, down = f["up"].shape[0], f["down"]
        spatial = f["mid"].shape[2] * f["mid"].shape[3] if "mid" in f else 1
        return out * (n(down) // down.shape[0]) * spatial, out
    if kind == "loha":
        sizes = []
        for i in "12":
            a, b, t = f[f"w{i}_a"], f[f"w{i}_b"], f.get(f"t{i}")
            sizes.append(a.shape[1] * b.shape[1] * t.shape[2] * t.shape[3] if t is not None
                         else a.shape[0] * b.shape[1])
        return (sizes[0] if sizes[0] == sizes[1] else -1), None
    w1 = n(f["w1"]) if "w1" in f else f["w1_a"].shape[0] * f["w1_b"].shape[1]
    if "w2" in f:
        w2 = n(f["w2"])
    elif "t2" in f:
        w2 = f["w2_a"].shape[1] * f["w2_b"].shape[1] * f["t2"].shape[2] * f["t2"].shape[3]
    else:
        w2 = f["w2_a"].shape[0] * f["w2_b"].shape[1]
    return w1 * w2, None


def dora(w: jax.Array, delta: jax.Array, magnitude: jax.Array, weight, scale, rule: str, xp=jnp) -> jax.Array:
    """DoRA (Liu et al. 2024) in jaxdiff layout: w, delta [..., in, out] float32; magnitude per output
    channel (PEFT's `lora_magnitude_vector`; `dora_scale` [out, 1, ...] from LyCORIS >= 2024-12) or per
    input channel (`dora_scale` [1, in, ...] from older LyCORIS); formats.md §3.6.

    rule "peft": W' = m (W + w s Δ) / ‖W + w s Δ‖ (PEFT's merge; the user's weight is in the scaling).
    rule "blend": W'' = m (W + s Δ) / ‖W + s Δ‖, then W + w (W'' - W) (A1111 / ComfyUI strength).
    """
    # PEFT's vector is per output channel whatever its shape ([out]; convs [1, out, 1, 1]); for
    # `dora_scale` ComfyUI's test: per output when its first dim is the weight's output dim.
    per_output = rule == "peft" or magnitude.shape[0] == w.shape[-1]
    axis = w.ndim - 1 if per_output else w.ndim - 2
    m = xp.asarray(magnitude, xp.float32).reshape(-1)
    m = m.reshape([m.shape[0] if a == axis else 1 for a in range(w.ndim)])
    others = tuple(a for a in range(w.ndim) if a != axis)

    def decompose(v):
        return m * v / (xp.sqrt(xp.sum(v * v, axis=others, keepdims=True)) + 1e-12)

    if rule == "peft":
        return decompose(w + weight * scale * delta)
    return w + weight * (decompose(w + scale * delta) - w)
