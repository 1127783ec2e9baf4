"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for jaxdiff's networks.

A targeted Dense layer with kernel W [in, out] gets two trainable factors, down [in, r] and up [r, out],
and computes

    y = x @ (W + s * down @ up) + b,        s = alpha / r

which is PEFT's `W + (alpha / r) * B @ A` with A = down.T [r, in] and B = up.T [out, r] in torch layout.
`up` starts at zero, so an initialised LoRA leaves the network's output unchanged.

The LoRA tree mirrors the param tree down to the targeted modules:

    lora["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"] = {"down": .., "up": ..}

so it is an ordinary pytree for optax, orbax and sharding. Targets are regexes matched against
'/'-joined module paths, so one config works on a bare UNet tree and on a tree of components
({"unet": ..., "text_encoder": ...}) alike.

Two equal forwards (the tests check it): `merge` folds the factors into the kernels (one cheap
[in, r] @ [r, out] product per layer, then the stock network runs), and `apply_unmerged` adds the
low-rank branch to each targeted Dense call through flax's method interception.

    cfg = LoRAConfig(rank=4)                          # UNet attention q/k/v/out, alpha = rank
    adapter = LoRAAdapter(cfg)
    lora = adapter.init(unet_params, key)             # the trainable params
    out = unet.module.apply({"params": adapter.merge(unet_params, lora)}, x, t, ctx)
    export(lora, "my_lora.safetensors", cfg, style="kohya")
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convert import export as _export
from convert.diffusers_layout import flatten, unflatten
from jaxdiff.errors import ConfigError

# diffusers' LoRA training scripts' targets: the q/k/v/out projections of every self- (attn1) and
# cross-attention (attn2) in the UNet's transformer blocks (PEFT target_modules to_q/to_k/to_v/to_out.0).
UNET_ATTENTION = (r"(?:.*/)?attn[12]/(?:to_q|to_k|to_v|to_out_0)",)
# ... and of the CLIP text encoders (q_proj/k_proj/v_proj/out_proj).
TEXT_ENCODER_ATTENTION = (r"(?:.*/)?self_attn/(?:q_proj|k_proj|v_proj|out_proj)",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Which Dense layers get LoRA factors, and how they start."""
    rank: int = 4                              # r
    alpha: float | None = None                 # None: alpha = rank (scale 1), diffusers' scripts' default
    targets: tuple[str, ...] = UNET_ATTENTION  # regexes, full match against '/'-joined module paths
    # "gaussian": down ~ N(0, (1/r)^2), diffusers' scripts' init_lora_weights="gaussian";
    # "kaiming": PEFT's default kaiming_uniform_(a=sqrt(5)), i.e. down ~ U(-1/sqrt(in), 1/sqrt(in)).
    init: str = "gaussian"

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"LoRA rank={self.rank} must be >= 1")
        if self.init not in ("gaussian", "kaiming"):
            raise ConfigError(f"LoRA init={self.init!r}; expected 'gaussian' or 'kaiming'")
        for pattern in self.targets:
            re.compile(pattern)

    @property
    def alpha_value(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """s = alpha / r, the factor on down @ up."""
        return self.alpha_value / self.rank


def target_modules(params: Mapping[str, Any], config: LoRAConfig) -> dict[tuple[str, ...], tuple[int, int]]:
    """{module path: (in, out)} of the Dense layers the config targets (modules with a 2-D kernel).

    Works on arrays and on `jax.eval_shape` trees. Raises ConfigError if nothing matches, since a LoRA
    that adapts nothing trains nothing.
    """
    patterns = [re.compile(p) for p in config.targets]
    found = {}
    for path, leaf in flatten(params).items():
        if path[-1] != "kernel" or len(leaf.shape) != 2:
            continue
        module = path[:-1]
        if any(p.fullmatch("/".join(module)) for p in patterns):
            found[module] = tuple(leaf.shape)
    if not found:
        raise ConfigError(f"LoRA targets {config.targets} match no Dense layer of these params")
    return found


def init(params: Mapping[str, Any], config: LoRAConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh LoRA factors (float32) for every targeted module: `down` random, `up` zero.

    Module i (in sorted path order) draws from fold_in(key, i), so the draw does not depend on how the
    param dict happens to be ordered. `params` may be a `jax.eval_shape` tree: only shapes are read.
    """
    out = {}
    for i, (module, (fan_in, fan_out)) in enumerate(sorted(target_modules(params, config).items())):
        k = jax.random.fold_in(key, i)
        if config.init == "gaussian":
            down = jax.random.normal(k, (fan_in, config.rank), jnp.float32) / config.rank
        else:
            bound = 1.0 / math.sqrt(fan_in)
            down = jax.random.uniform(k, (fan_in, config.rank), jnp.float32, -bound, bound)
        out[module + ("down",)] = down                                       # [in, r]
        out[module + ("up",)] = jnp.zeros((config.rank, fan_out), jnp.float32)  # [r, out]
    return unflatten(out)


def factors(lora: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
    """{module path: (down [in, r], up [r, out])}."""
    flat = flatten(lora)
    return {path[:-1]: (flat[path[:-1] + ("down",)], flat[path[:-1] + ("up",)])
            for path in flat if path[-1] == "down"}


def merge(params: Mapping[str, Any], lora: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """params with each targeted kernel replaced by W + scale * down @ up (in W's dtype).

    Untouched leaves are shared, not copied. Differentiable in both arguments; jit it with the rest of
    the step. The product is formed in float32 whatever W's storage dtype.
    """
    flat = dict(flatten(params))
    for module, (down, up) in factors(lora).items():
        path = module + ("kernel",)
        if path not in flat:
            raise ConfigError(f"LoRA module {'/'.join(module)} is not in these params")
        w = flat[path]
        delta = jnp.matmul(down.astype(jnp.float32), up.astype(jnp.float32))   # [in, out]
        if delta.shape != w.shape:
            raise ConfigError(f"LoRA {'/'.join(module)}: delta {delta.shape} vs kernel {w.shape}")
        flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return unflatten(flat)


def apply_unmerged(module: nn.Module, params: Mapping[str, Any], lora: Mapping[str, Any], scale: float,
                   *args, **kwargs):
    """`module.apply({"params": params}, *args, **kwargs)` with y += scale * (x @ down) @ up added to each
    targeted Dense call, leaving the kernels as they are.

    Module paths are those of `module`'s own param tree (lora must be for this module, not a tree of
    components).
    """
    table = factors(lora)

    def add_lora(next_fun, call_args, call_kwargs, context):
        y = next_fun(*call_args, **call_kwargs)
        mod = context.module
        if isinstance(mod, nn.Dense) and context.method_name == "__call__" and mod.path in table:
            down, up = table[mod.path]
            x = call_args[0]
            h = jnp.matmul(x, down.astype(x.dtype))                     # [..., r]
            y = y + (scale * jnp.matmul(h, up.astype(x.dtype))).astype(y.dtype)
        return y

    with nn.intercept_methods(add_lora):
        return module.apply({"params": params}, *args, **kwargs)


class LoRAAdapter:
    """The trainer's adapter hook: the trainable params are the LoRA factors, the base is frozen.

        trainable = adapter.init(params, key)
        loss(adapter.merge(params, trainable), batch)    # grads flow to trainable only
    """

    def __init__(self, config: LoRAConfig = LoRAConfig()):
        self.config = config

    def init(self, params: Mapping[str, Any], key: jax.Array) -> dict[str, Any]:
        return init(params, self.config, key)

    def merge(self, params: Mapping[str, Any], trainable: Mapping[str, Any]) -> dict[str, Any]:
        return merge(params, trainable, self.config.scale)


def export(lora: Mapping[str, Any], dst, config: LoRAConfig, *, style: str = "kohya", sdxl: bool = False,
           component: str = "unet", dtype: Any = np.float32) -> None:
    """Writes LoRA factors as .safetensors for other tools (see convert.export.lora_state_dict).

    Args:
      lora: factors of one component (e.g. a UNet LoRA) or a tree of components {"unet": ...,
        "text_encoder": ..., "text_encoder_2": ...}.
      dst: the file to write.
      config: the LoRAConfig the factors were made with (rank and alpha).
      style: "kohya" (A1111 / ComfyUI / kohya-ss) or "diffusers" (`pipe.load_lora_weights`, PEFT keys).
      sdxl: SDXL text-encoder naming for kohya (lora_te1_ / lora_te2_).
      component: which component `lora` belongs to when it is not a tree of components.
    """
    if not set(lora) <= set(_export.LORA_COMPONENTS):
        lora = {component: lora}
    host = jax.tree_util.tree_map(np.asarray, dict(lora))
    _export.export_lora(host, dst, style=style, alpha=config.alpha_value, rank=config.rank, sdxl=sdxl,
                        dtype=dtype)
