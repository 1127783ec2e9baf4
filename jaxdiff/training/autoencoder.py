"""Training an AutoencoderKL from scratch: reconstruction + KL (the first stage of Latent Diffusion).

    trainer = AutoencoderTrainer(AutoencoderKL(cfg), params, AutoencoderLossConfig(kl_weight=1e-4),
                                 OptimConfig(lr=1e-3), ema=EMAConfig(decay=0.999))
    state = trainer.init_state()
    state, metrics = trainer.step(state, images)        # images [B, H, W, 3] in [-1, 1]
    params = trainer.params(state, ema=True)
    cfg = dataclasses.replace(cfg, scaling_factor=latent_scaling_factor(module, params, images))

The objective, per image (Rombach et al. 2022 without the adversarial term, which a from-scratch toy
VAE does not need):

    z   = mean + std * n,  n ~ N(0, I)                         (reparameterised posterior sample)
    rec = mean |x - D(z)|  (or squared, reconstruction="l2")   over pixels and channels
        + edge_weight * mean |grad x - grad D(z)|               a cheap perceptual proxy: the same
                                                               distance on horizontal / vertical
                                                               finite differences, which weighs edges
                                                               (what blurry reconstructions lose)
    kl  = KL(q(z|x) || N(0, I)) / latent elements               (DiagonalGaussian.kl, per element)
    loss = rec + kl_weight * kl

The per-element KL keeps `kl_weight` independent of the image and latent size. The step reuses the
diffusion trainer's pieces: TrainState, optim.make_optimizer (clipping, warmup, schedules), the
non-finite guard and the diffusers EMA. Randomness: the posterior noise of row i at step s comes from
fold_in(fold_in(key, s), i), so a step does not depend on how the batch is laid out.

train="decoder" fine-tunes the decoder alone (decoder + post_quant_conv; the encoder and quant_conv are
frozen and get no optimizer state), as Stability's sd-vae-ft-mse / ft-ema did: the posterior, hence every
cached latent and any diffusion model trained on them, stays exactly as it was, while the decoded images
sharpen. The KL term then has no gradient and only reports.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import sharding
from jaxdiff.errors import ConfigError
from jaxdiff.training import optim
from jaxdiff.training.trainer import TrainState

RECONSTRUCTIONS = ("l1", "l2")
# train= -> the top-level AutoencoderKL param groups that are trained (None: all of them).
TRAINABLE_GROUPS = {"all": None, "decoder": ("decoder", "post_quant_conv")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderLossConfig:
    """reconstruction: "l1" or "l2" pixel distance; edge_weight: weight of the finite-difference term
    (0 = off); kl_weight: weight of the per-element KL."""
    reconstruction: str = "l1"
    edge_weight: float = 0.0
    kl_weight: float = 1e-4

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"reconstruction={self.reconstruction!r}: expected one of {RECONSTRUCTIONS}")
        if self.edge_weight < 0 or self.kl_weight < 0:
            raise ConfigError(f"edge_weight and kl_weight must be >= 0 (got {self.edge_weight}, {self.kl_weight})")


def _distance(a: jax.Array, b: jax.Array, kind: str) -> jax.Array:
    """Per-row mean distance [B] between two [B, ...] arrays."""
    d = jnp.abs(a - b) if kind == "l1" else jnp.square(a - b)
    return jnp.mean(d, axis=tuple(range(1, d.ndim)))


def _edges(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Horizontal and vertical finite differences of [B, H, W, C]: [B, H, W-1, C], [B, H-1, W, C]."""
    return x[:, :, 1:] - x[:, :, :-1], x[:, 1:] - x[:, :-1]


def autoencoder_loss(module, params: Any, images: jax.Array, noise_key: jax.Array, rows: jax.Array,
                     cfg: AutoencoderLossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss over the batch and its parts.

    Args:
      module: an AutoencoderKL.
      params: its params (without the outer {"params": ...}).
      images: [B, H, W, C] in [-1, 1].
      noise_key: the step's key; row i's posterior noise comes from fold_in(noise_key, rows[i]).
      rows: [B] int32 global row indices.
    Returns:
      (loss [], {"reconstruction", "edges", "kl"} each []).
    """
    x = images.astype(jnp.float32)
    post = module.apply({"params": params}, x, method="encode")
    mean = post.mean.astype(jnp.float32)
    logvar = post.logvar.astype(jnp.float32)
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), mean.shape[1:], jnp.float32))(rows)
    z = mean + jnp.exp(jnp.float32(0.5) * logvar) * eps
    recon = module.apply({"params": params}, z, method="decode").astype(jnp.float32)
    rec = _distance(recon, x, cfg.reconstruction)
    edges = jnp.zeros_like(rec)
    if cfg.edge_weight:
        (rh, rv), (xh, xv) = _edges(recon), _edges(x)
        edges = 0.5 * (_distance(rh, xh, cfg.reconstruction) + _distance(rv, xv, cfg.reconstruction))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    per_row = rec + jnp.float32(cfg.edge_weight) * edges + jnp.float32(cfg.kl_weight) * kl
    parts = {"reconstruction": jnp.mean(rec), "edges": jnp.mean(edges), "kl": jnp.mean(kl)}
    return jnp.mean(per_row), parts


class AutoencoderTrainer:
    """The jitted VAE train step, data parallel over `mesh` (default: every device).

    train: "all" (from scratch) or "decoder" (decoder-only fine-tuning; see the module docstring). The
    state's `trainable` / `ema` hold the trained groups only; `params(state)` returns the whole VAE.
    """

    def __init__(self, module, params: Any, loss: AutoencoderLossConfig = AutoencoderLossConfig(),
                 optim_config: optim.OptimConfig = optim.OptimConfig(), *, ema: optim.EMAConfig | None = None,
                 seed: int = 0, mesh=None, train: str = "all"):
        if train not in TRAINABLE_GROUPS:
            raise ConfigError(f"train={train!r}: expected one of {tuple(TRAINABLE_GROUPS)}")
        self.module = module
        self.loss_config = loss
        self.ema_config = ema
        self.seed = seed
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.optimizer = optim.make_optimizer(optim_config)
        params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
        groups = TRAINABLE_GROUPS[train] or tuple(params)
        missing = [g for g in groups if g not in params]
        if missing:
            raise ConfigError(f"train={train!r}: the VAE params have no {missing} (have {sorted(params)})")
        self._params = {k: v for k, v in params.items() if k in groups}
        repl = sharding.replicated(self.mesh)
        self._frozen = jax.device_put({k: v for k, v in params.items() if k not in groups}, repl)
        self._step = jax.jit(self._train_step, in_shardings=(repl, repl, None), out_shardings=(repl, repl),
                             donate_argnums=(0,))

    def init_state(self) -> TrainState:
        """Step 0: the given params, fresh optimizer state, EMA = params (when an EMA is kept)."""
        repl = sharding.replicated(self.mesh)

        def init(params):
            return TrainState(step=jnp.int32(0), trainable=params, opt_state=self.optimizer.init(params),
                              ema=params if self.ema_config is not None else None,
                              key=jax.random.PRNGKey(self.seed))

        return jax.jit(init, out_shardings=repl)(self._params)

    def _train_step(self, state: TrainState, frozen: Any, images: jax.Array):
        key = jax.random.fold_in(state.key, state.step)
        rows = jnp.arange(images.shape[0], dtype=jnp.int32)
        (loss, parts), grads = jax.value_and_grad(
            lambda p: autoencoder_loss(self.module, {**frozen, **p}, images, key, rows, self.loss_config),
            has_aux=True)(state.trainable)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ok = jnp.isfinite(loss) & optim.all_finite(grads)
        trainable = optim.select_tree(ok, trainable, state.trainable)
        opt_state = optim.select_tree(ok, opt_state, state.opt_state)
        ema = state.ema
        if ema is not None:
            ema = optim.ema_update(ema, trainable, optim.ema_decay(self.ema_config, state.step + 1))
            ema = optim.select_tree(ok, ema, state.ema)
        metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
                   "skipped": (~ok).astype(jnp.int32)}
        return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema,
                          key=state.key), metrics

    def step(self, state: TrainState, images) -> tuple[TrainState, dict]:
        """One update on images [B, H, W, C] in [-1, 1] (host numpy; B divisible by the device count).
        `state` is donated: use the returned one."""
        batch = sharding.to_global_from_local(np.asarray(images, np.float32), self.mesh)
        return self._step(state, self._frozen, batch)

    def params(self, state: TrainState, *, ema: bool = False) -> Any:
        """Host float32 params of the whole VAE (the trained groups' EMA with ema=True)."""
        tree = state.ema if ema else state.trainable
        if tree is None:
            raise ConfigError("this run keeps no EMA (ema=None)")
        return jax.tree.map(np.asarray, jax.device_get({**self._frozen, **tree}))


def encode_moments(module, params: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Posterior moments of a data set, for the diffusion trainer's cached "moments" batches.

    images: [N, H, W, C] in [-1, 1] (host) -> [N, h, w, 2 * latent_channels] float32 (mean ++ logvar).
    """
    enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    out = []
    for i in range(0, len(images), batch_size):
        chunk = np.asarray(images[i:i + batch_size], np.float32)
        post = enc(params, chunk)
        out.append(np.concatenate([np.asarray(post.mean), np.asarray(post.logvar)], axis=-1))
    return np.concatenate(out).astype(np.float32)


def latent_scaling_factor(moments: np.ndarray) -> float:
    """1 / std of the posterior means: scales latents to unit variance, as SD's 0.18215 was chosen."""
    c = moments.shape[-1] // 2
    return float(1.0 / np.std(moments[..., :c]))
