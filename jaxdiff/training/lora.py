"""The trainable LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
config, init, the trainer hook and export. The maths (targets, merge, the unmerged path; Dense and Conv
alike) lives in jaxdiff.adapters.lora, which inference uses without importing training/.

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
low-rank branch to each targeted Dense / Conv call through flax's method interception. A targeted Conv
(kernel [kh, kw, in, out]) gets down [kh, kw, in, r] and up [r, out] (LoCon).

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

import jax
import jax.numpy as jnp
import numpy as np

from convert import export as _export
from convert.diffusers_layout import unflatten
from jaxdiff.adapters import lora as _maths
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


def target_modules(params: Mapping[str, Any], config: LoRAConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{module path: kernel shape} of the Dense (and Conv) layers the config targets; see
    jaxdiff.adapters.lora.target_modules."""
    return _maths.target_modules(params, config.targets)


def init(params: Mapping[str, Any], config: LoRAConfig, key: jax.Array) -> dict[str, Any]:
    """Fresh LoRA factors (float32) for every targeted module: `down` random, `up` zero.

    Module i (in sorted path order) draws from fold_in(key, i), so the draw does not depend on how the
    param dict happens to be ordered. `params` may be a `jax.eval_shape` tree: only shapes are read.
    """
    out = {}
    for i, (module, shape) in enumerate(sorted(target_modules(params, config).items())):
        k = jax.random.fold_in(key, i)
        down_shape = (*shape[:-1], config.rank)          # Dense [in, r]; Conv [kh, kw, in, r]
        if config.init == "gaussian":
            down = jax.random.normal(k, down_shape, jnp.float32) / config.rank
        else:
            bound = 1.0 / math.sqrt(math.prod(shape[:-1]))  # kaiming over the fan-in (in * kh * kw)
            down = jax.random.uniform(k, down_shape, jnp.float32, -bound, bound)
        out[module + ("down",)] = down
        out[module + ("up",)] = jnp.zeros((config.rank, shape[-1]), jnp.float32)  # [r, out]
    return unflatten(out)


factors = _maths.factors
merge = _maths.merge
apply_unmerged = _maths.apply_unmerged


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
