"""Optimizers, learning-rate schedules, the non-finite guard and the EMA of params.

    opt = make_optimizer(OptimConfig(lr=1e-5, schedule="cosine", warmup_steps=100, total_steps=10_000))
    ema = EMAConfig(decay=0.9999, use_warmup=True)
    d = ema_decay(ema, step)                    # diffusers EMAModel.get_decay, traced
    ema_params = ema_update(ema_params, params, d)

Gradient accumulation is not an optax wrapper here: the train step (trainer.py) scans over k
micro-batches and applies one update with their mean gradient, so "one step" always means one
optimizer update (schedules, EMA and checkpoints count the same thing) and k micro-batches of b equal
one batch of k*b up to summation order.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdiff.errors import ConfigError

OPTIMIZERS = ("adamw", "adafactor")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer and LR schedule. Defaults are diffusers' train_text_to_image.py defaults.

    optimizer: "adamw" (torch.optim.AdamW semantics: decoupled weight decay, bias correction) or
      "adafactor" (factored second moments; memory for SDXL-size full fine-tunes).
    lr: peak learning rate. schedule: "constant" | "cosine" | "linear" decay after a linear warmup of
      `warmup_steps` from 0; cosine and linear decay to `end_lr_ratio * lr` at `total_steps`.
    max_grad_norm: global-norm clipping threshold; None = no clipping.
    """
    optimizer: str = "adamw"
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    end_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        if self.schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr schedule {self.schedule!r}: expected one of {LR_SCHEDULES}")
        if self.schedule != "constant" and not self.total_steps:
            raise ConfigError(f"the {self.schedule} schedule needs total_steps")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError(f"lr must be > 0 and warmup_steps >= 0 (got {self.lr}, {self.warmup_steps})")


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """step (the count of applied updates, from 0) -> learning rate."""
    w = cfg.warmup_steps
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - w, 1), alpha=cfg.end_lr_ratio)
    else:
        main = optax.linear_schedule(cfg.lr, cfg.lr * cfg.end_lr_ratio, max(cfg.total_steps - w, 1))
    if w == 0:
        return main
    # diffusers' get_scheduler warmup: lr * step / warmup (0 at step 0) then the main schedule.
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, w), main], [w])


def make_optimizer(cfg: OptimConfig, mask: Any = None) -> optax.GradientTransformation:
    """clip_by_global_norm -> adamw | adafactor, with the schedule folded in.

    Args:
      mask: optional pytree of bools (or a callable of params) selecting which leaves get weight
        decay, as optax.adamw's `mask`; None decays every leaf (torch AdamW over all params).
    """
    sched = lr_schedule(cfg)
    if cfg.optimizer == "adamw":
        opt = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=mask)
    else:
        # Adafactor with an explicit LR (no relative step), decoupled weight decay as AdamW's.
        opt = optax.adafactor(sched, multiply_by_parameter_scale=False, clipping_threshold=None,
                              weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask,
                              momentum=None)
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return _standard_promotion(opt)


def _standard_promotion(opt: optax.GradientTransformation) -> optax.GradientTransformation:
    """optax mixes Python floats with int32 step counts (bias correction, schedules); run it under
    standard dtype promotion so it also works where the caller set jax_numpy_dtype_promotion=strict.
    Every value optax returns keeps the dtype of the params / state it was given."""
    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return opt.init(params)

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return opt.update(updates, state, params)

    return optax.GradientTransformation(init, update)


def all_finite(tree: Any) -> jax.Array:
    """[] bool: every float leaf of `tree` is finite (the guard that skips a NaN / inf update)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def select_tree(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise `pred ? on_true : on_false` for two pytrees of the same structure."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


# ------------------------------------------------------------------------------------------- EMA
@dataclasses.dataclass(frozen=True, kw_only=True)
class EMAConfig:
    """diffusers' `EMAModel(decay, min_decay, update_after_step, use_ema_warmup, inv_gamma, power)`."""
    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3


def ema_decay(cfg: EMAConfig, optimization_step: jax.Array) -> jax.Array:
    """EMAModel.get_decay(optimization_step), traced. `optimization_step` counts updates from 1 (diffusers
    increments its counter before asking for the decay), so call it with `state.step + 1`.

    Returns [] float32: 0 while step - update_after_step - 1 <= 0 (the EMA copies the params), then
    1 - (1 + s / inv_gamma) ** -power (warmup) or (1 + s) / (10 + s), clipped to [min_decay, decay].
    """
    s = jnp.maximum(0, jnp.asarray(optimization_step, jnp.int32) - cfg.update_after_step - 1)
    sf = s.astype(jnp.float32)
    if cfg.use_warmup:
        d = 1 - (1 + sf / jnp.float32(cfg.inv_gamma)) ** jnp.float32(-cfg.power)
    else:
        d = (1 + sf) / (10 + sf)
    d = jnp.maximum(jnp.minimum(d, jnp.float32(cfg.decay)), jnp.float32(cfg.min_decay))
    return jnp.where(s <= 0, jnp.float32(0), d)


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    """ema <- ema - (1 - decay) (ema - params), diffusers' in-place form, leaf dtypes kept."""
    one_minus = 1 - decay

    def upd(e, p):
        return (e - one_minus.astype(e.dtype) * (e - p.astype(e.dtype))).astype(e.dtype)

    return jax.tree.map(upd, ema, params)
