"""TrainState and the sharded, jitted train step.

    models = Models.from_pipeline(jaxdiff.load(path), compute_dtype="bfloat16")
    trainer = Trainer(models, TrainConfig(batch_size=8, optim=OptimConfig(lr=1e-5)))
    state = trainer.init_state()
    state, metrics = trainer.step(state, trainer.put_batch(host_batch))

One step = one optimizer update: the global batch [B] is split into `accumulation` micro-batches of
B / k rows, their mean gradient is clipped and applied once, then the EMA is updated. Every sample's
timestep and noise derive from `fold_in(fold_in(state.key, state.step), row)` with `row` its index in
the global batch, so results do not depend on device count, fsdp, or k (up to summation order).

What is trained is a separate pytree, `state.trainable`; the frozen rest lives in `Trainer.frozen`
(never donated, never optimized). The loss merges the two before the forward pass:

* full fine-tune (adapter=None): trainable = {"unet": ...} (plus "text_encoder" with
  `train_text_encoder`), merged with a plain dict update;
* an adapter (e.g. LoRA, jaxdiff/training/lora.py) is any object with
      init(params: dict[str, tree], key) -> trainable tree
      merge(params: dict[str, tree], trainable) -> params   (traced inside the loss; pure)
  where `params` is {"unet": ..., "vae": ..., "text_encoder": ...[, "text_encoder_2": ...]}.
  Then every model param is frozen and only the adapter's tree is optimized, EMA'd and checkpointed.

Batch keys (host numpy arrays, leading axis B):
  image side, one of: "pixels" [B, H, W, 3] in [-1, 1] (VAE runs in the step, frozen),
    "moments" [B, h, w, 2C] cached VAE mean ++ logvar (fresh z_0 sample per step),
    "latents" [B, h, w, C] already scaled z_0 (synthetic / benchmark mode);
  text side, one of: "input_ids" [B, 77] int32 (+ "input_ids_2" for SDXL) or "context" [B, L, D]
    cached encoder states; SDXL also "text_embeds" [B, 1280] when cached and "time_ids" [B, 6].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import prediction, prompts, schedules, sharding
from jaxdiff.errors import ConfigError
from jaxdiff.training import loss as L
from jaxdiff.training import optim

REMAT = (None, "full", "dots", "blocks")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that shapes the compiled step.

    batch_size: global batch per optimizer step (all hosts, all micro-batches).
    accumulation: micro-batches per step; batch_size / accumulation rows each must split over devices.
    fsdp: size of the mesh's "fsdp" axis (params and optimizer state split over it); 1 = data parallel.
    fsdp_min_size: leaves with fewer elements stay replicated under fsdp.
    compute_dtype: activations / matmuls ("float32" | "bfloat16"); params, grads and optimizer
      state stay float32 (master weights).
    remat: None, "full" (the whole UNet forward recomputed in the backward pass; while that runs all of
      its activations are live again, so the peak is barely lower), "dots" (the same, keeping
      weight-matmul outputs) or "blocks" (each down / mid / up block checkpointed on its own: one
      block's activations live at a time, the setting that lowers peak memory).
    train_text_encoder: also fine-tune the (first) text encoder (needs "input_ids" batches).
    skip_nonfinite: a step whose loss or grads are not finite leaves params, optimizer state and EMA
      unchanged (it is counted in metrics["skipped"]).
    """
    batch_size: int = 1
    accumulation: int = 1
    seed: int = 0
    fsdp: int = 1
    fsdp_min_size: int = 1 << 18
    compute_dtype: str = "float32"
    remat: str | None = None
    train_text_encoder: bool = False
    skip_nonfinite: bool = True
    loss: L.LossConfig = L.LossConfig()
    optim: optim.OptimConfig = optim.OptimConfig()
    ema: optim.EMAConfig | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.accumulation < 1 or self.batch_size % self.accumulation:
            raise ConfigError(f"batch_size {self.batch_size} must be a positive multiple of accumulation "
                              f"{self.accumulation}")
        if self.remat not in REMAT:
            raise ConfigError(f"remat={self.remat!r}: expected one of {REMAT}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"compute_dtype={self.compute_dtype!r}: expected float32 or bfloat16")


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds (with the data position kept beside it as JSON)."""
    step: jax.Array        # [] int32: optimizer updates applied so far
    trainable: Any         # the optimized pytree (float32)
    opt_state: Any
    ema: Any               # EMA of `trainable`, or None
    key: jax.Array         # [2] uint32 base PRNG key; step s uses fold_in(key, s)


@dataclasses.dataclass
class Models:
    """The modules (at the compute dtype) and float32 params of one pipeline, plus its noise schedule."""
    unet: nn.Module
    params: dict[str, Any]                       # {"unet", "vae"?, "text_encoder"?, "text_encoder_2"?}
    scheduler: schedules.SchedulerConfig
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    text_encoder_2: nn.Module | None = None
    scaling_factor: float = 0.18215
    encoders: prompts.EncoderSpec | None = None   # text conditioning rules (jaxdiff.prompts.encode)

    def __post_init__(self):
        if self.encoders is None and self.text_encoder is not None:  # Models built by hand (scripts)
            mods = {n: m for n, m in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2))
                    if m is not None}
            self.encoders = prompts.EncoderSpec(
                names=tuple(mods), modules=tuple(mods.values()),
                layer_norm_eps=tuple(float(m.config.layer_norm_eps) for m in mods.values()),
                sdxl=self.unet.config.takes_text_time)

    @classmethod
    def from_pipeline(cls, pipe, compute_dtype: str = "float32") -> "Models":
        """Modules re-made at `compute_dtype`; params cast to float32 masters."""
        dtype = jnp.dtype(compute_dtype)
        comps = pipe.components()
        params = {name: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), c.params) for name, c in comps.items()}
        mods = {name: c.module.clone(dtype=dtype) for name, c in comps.items()}
        sched = schedules.SchedulerConfig.from_dict(pipe.scheduler_config or {}, "scheduler_config.json")
        return cls(unet=mods["unet"], params=params, scheduler=sched, vae=mods.get("vae"),
                   text_encoder=mods.get("text_encoder"), text_encoder_2=mods.get("text_encoder_2"),
                   scaling_factor=float(pipe.vae.config.scaling_factor),
                   encoders=prompts.encoder_spec(pipe, dtype))


def _tree_shardings(tree: Any, mesh, min_size: int) -> Any:
    return sharding.fsdp_param_shardings(tree, mesh, min_size=min_size)


class Trainer:
    """Builds the jitted step for one (models, config, mesh, adapter)."""

    def __init__(self, models: Models, config: TrainConfig, *, mesh=None, adapter=None):
        self.models = models
        self.config = config
        self.mesh = mesh if mesh is not None else sharding.make_mesh(fsdp=config.fsdp)
        self.adapter = adapter
        self.prediction_type = config.loss.prediction_type or models.scheduler.prediction_type
        if self.prediction_type not in prediction.TRAINABLE:
            raise ConfigError(f"cannot train a {self.prediction_type!r}-prediction model")
        micro = config.batch_size // config.accumulation
        if micro % self.mesh.size:
            raise ConfigError(f"each micro-batch ({micro} rows) must split evenly over {self.mesh.size} devices")
        train_keys = ["unet"] + (["text_encoder"] if config.train_text_encoder else [])
        if config.train_text_encoder and "text_encoder" not in models.params:
            raise ConfigError("train_text_encoder needs a text encoder in the model")
        self.train_keys = () if adapter is not None else tuple(train_keys)
        frozen = {k: v for k, v in models.params.items() if k not in self.train_keys}
        self.tables = L.NoiseTables.from_scheduler(models.scheduler)
        self.optimizer = optim.make_optimizer(config.optim)
        self.lr_schedule = optim.lr_schedule(config.optim)
        repl = sharding.replicated(self.mesh)
        self._frozen_sh = _tree_shardings(frozen, self.mesh, config.fsdp_min_size)
        self.frozen = sharding.shard_params(frozen, self._frozen_sh)
        self.tables = sharding.shard_params(self.tables, repl)
        self._state_sh = _tree_shardings(self.abstract_state(), self.mesh, config.fsdp_min_size)
        self._step = jax.jit(self._train_step, in_shardings=(self._state_sh, None, self._frozen_sh, repl),
                             out_shardings=(self._state_sh, repl), donate_argnums=(0,))
        self._grads = jax.jit(self._loss_and_grads)

    # ------------------------------------------------------------------------------ state
    def _init(self, key: jax.Array, params: dict[str, Any]) -> TrainState:
        """The first state, traced (jit places it straight onto the mesh)."""
        if self.adapter is not None:
            trainable = self.adapter.init(dict(params), jax.random.fold_in(key, 1 << 30))
        else:
            trainable = {k: params[k] for k in self.train_keys}
        trainable = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), trainable)
        ema = trainable if self.config.ema is not None else None
        return TrainState(step=jnp.int32(0), trainable=trainable, opt_state=self.optimizer.init(trainable),
                          ema=ema, key=key)

    def abstract_state(self) -> TrainState:
        """Shapes and dtypes of the state (leaves are jax.ShapeDtypeStruct)."""
        return jax.eval_shape(self._init, jax.random.PRNGKey(self.config.seed), self.models.params)

    def abstract_state_with_shardings(self) -> TrainState:
        """As `abstract_state`, each leaf carrying its mesh sharding (orbax restore target)."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.abstract_state(), self._state_sh)

    def init_state(self) -> TrainState:
        # Params enter through host memory once (a jit closing over them would embed them as constants).
        init = jax.jit(self._init, out_shardings=self._state_sh)
        return init(jax.random.PRNGKey(self.config.seed), self.models.params)

    def model_params(self, state: TrainState, *, ema: bool = False) -> dict[str, Any]:
        """The full params dict a pipeline uses: frozen params merged with the trained (or EMA) tree."""
        tree = state.ema if ema else state.trainable
        if ema and tree is None:
            raise ConfigError("this run keeps no EMA (TrainConfig.ema is None)")
        return self._merge(self.frozen, tree)

    def put_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows [B / processes, ...] -> global arrays split over the mesh."""
        return sharding.to_global_from_local(dict(host_batch), self.mesh)

    # ------------------------------------------------------------------------------ step
    def _merge(self, frozen, trainable):
        if self.adapter is not None:
            return self.adapter.merge(frozen, trainable)
        return {**frozen, **trainable}

    def _encode_text(self, params, batch):
        """-> (context [B, L, D], added_cond or None)."""
        m = self.models
        if "context" in batch:
            ctx = batch["context"]
            added = None
            if "time_ids" in batch:
                added = {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]}
            return ctx, added
        if m.text_encoder is None or m.encoders is None:
            raise ConfigError("batch has input_ids but the model has no text encoder")
        # The generation program's rules (SDXL: both encoders' penultimate layers, pooled from the second).
        ids = {"text_encoder": batch["input_ids"]}
        if "text_encoder_2" in m.encoders.names:
            ids["text_encoder_2"] = batch["input_ids_2"]
        ctx, pooled = prompts.encode(m.encoders, params, ids, None)
        if pooled is None:
            return ctx, None
        return ctx, {"text_embeds": pooled, "time_ids": batch["time_ids"]}

    def _x0(self, params, batch, d: L.Draw) -> jax.Array:
        """Scaled clean latents z_0 [B, h, w, C] (float32)."""
        m = self.models
        if "latents" in batch:
            return batch["latents"].astype(jnp.float32)
        if "moments" in batch:
            moments = batch["moments"].astype(jnp.float32)
        else:
            post = m.vae.apply({"params": params["vae"]}, batch["pixels"], method="encode")
            moments = jnp.concatenate([post.mean, post.logvar], axis=-1).astype(jnp.float32)
        return L.latents_from_moments(jax.lax.stop_gradient(moments), d.latent_noise, m.scaling_factor)

    def _latent_shape(self, batch) -> tuple[int, ...]:
        c = self.models.unet.config.in_channels
        if "latents" in batch:
            return tuple(batch["latents"].shape[1:3]) + (c,)
        if "moments" in batch:
            return tuple(batch["moments"].shape[1:3]) + (c,)
        f = 2 ** (len(self.models.vae.config.block_out_channels) - 1)
        h, w = batch["pixels"].shape[1:3]
        return (h // f, w // f, c)

    def _micro_loss(self, trainable, frozen, tables, batch, rows, key):
        """Mean weighted loss over one micro-batch; `rows` [b] are its global row indices."""
        params = self._merge(frozen, trainable)
        d = L.draw(key, rows, self._latent_shape(batch), self.config.loss, self.tables_len)
        x0 = self._x0(params, batch, d)
        context, added = self._encode_text(params, batch)
        unet = self.models.unet.clone(remat=True) if self.config.remat == "blocks" else self.models.unet

        def predict(p, z, t, ctx, add):
            return unet.apply({"params": p}, z, t, ctx, add)

        if self.config.remat == "full":
            predict = jax.checkpoint(predict)
        elif self.config.remat == "dots":
            predict = jax.checkpoint(predict, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        per = L.diffusion_loss(lambda z, t: predict(params["unet"], z, t, context, added), x0, d, tables,
                               self.config.loss, self.prediction_type)
        return jnp.mean(per)

    @property
    def tables_len(self) -> int:
        return self.models.scheduler.num_train_timesteps

    def _loss_and_grads(self, state: TrainState, batch, frozen, tables):
        """(loss [], grads like state.trainable): the mean over all micro-batches."""
        key = jax.random.fold_in(state.key, state.step)
        b = self.config.batch_size
        k = self.config.accumulation
        rows = jnp.arange(b, dtype=jnp.int32)
        grad_fn = jax.value_and_grad(self._micro_loss)
        if k == 1:
            return grad_fn(state.trainable, frozen, tables, batch, rows, key)
        # Micro-batch j = rows {a*k + j}: reshaping [B] -> [B/k, k] keeps each device's rows on that
        # device (the batch axis stays split), so no data moves between devices.
        split = lambda x: jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)  # noqa: E731
        micro = jax.tree.map(split, (dict(batch), rows))

        def body(carry, mb):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(state.trainable, frozen, tables, mb[0], mb[1], key)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.float32(0), zeros), micro)
        inv = jnp.float32(1.0 / k)
        return loss_sum * inv, jax.tree.map(lambda g: g * inv.astype(g.dtype), grad_sum)

    def _train_step(self, state: TrainState, batch, frozen, tables):
        loss, grads = self._loss_and_grads(state, batch, frozen, tables)
        ok = jnp.isfinite(loss) & optim.all_finite(grads)

        def apply(args):
            trainable, opt_state, ema = args
            updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            if ema is not None:
                ema = optim.ema_update(ema, trainable, optim.ema_decay(self.config.ema, state.step + 1))
            return trainable, opt_state, ema

        # A cond, not a leafwise select: the skipped branch is a pass-through (and XLA CPU compiles
        # a few hundred `where`s over the optimizer state very slowly).
        args = (state.trainable, state.opt_state, state.ema)
        if self.config.skip_nonfinite:
            trainable, opt_state, ema = jax.lax.cond(ok, apply, lambda a: a, args)
        else:
            trainable, opt_state, ema = apply(args)
        new = TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema, key=state.key)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": self._lr(state.step), "skipped": (~ok).astype(jnp.int32)}
        return new, metrics

    def _lr(self, step: jax.Array) -> jax.Array:
        with jax.numpy_dtype_promotion("standard"):  # optax schedules mix Python floats and int32
            return jnp.asarray(self.lr_schedule(step), jnp.float32)

    def step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        """One optimizer update. `state` is donated: use the returned one. batch: from `put_batch`."""
        return self._step(state, dict(batch), self.frozen, self.tables)

    def loss_and_grads(self, state: TrainState, batch: Mapping[str, jax.Array]):
        """(loss, grads) of the step `step` would take, without applying it (tests, debugging)."""
        return self._grads(state, dict(batch), self.frozen, self.tables)

    def compiled_memory(self, state: TrainState, batch) -> Any:
        """XLA's memory analysis of the compiled step (remat comparisons)."""
        return self._step.lower(state, dict(batch), self.frozen, self.tables).compile().memory_analysis()


# ------------------------------------------------------------------------------------ checkpoints
class Checkpointer:
    """Orbax checkpoints of a TrainState plus a JSON `meta` (data position, step), keeping the last N.

    Orbax writes each step into a temporary folder and renames it when complete, so a process killed
    mid-save leaves the previous checkpoints intact and `latest_step` never returns a partial one.
    """

    def __init__(self, directory, keep_last: int = 3):
        import orbax.checkpoint as ocp
        from pathlib import Path

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            # cleanup_tmp_directories: a save killed half-way leaves a temporary folder; remove it on
            # the next start so re-saving that step cannot collide with it.
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        step = int(state.step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(dict(meta))), force=True)
        self.manager.wait_until_finished()

    def restore(self, trainer: Trainer, step: int | None = None) -> tuple[TrainState, dict]:
        """The state placed on `trainer`'s mesh (any mesh: shardings come from the trainer) and meta."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"{self.directory}: no complete checkpoint to resume from")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(trainer.abstract_state_with_shardings()), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self.manager.close()


# ------------------------------------------------------------------------------------------- loop
def fit(trainer: Trainer, loader, *, steps: int, out_dir, checkpoint_every: int = 0, keep_last: int = 3,
        log_every: int = 1, resume: bool = False, validate=None, validate_every: int = 0,
        progress: bool = True) -> TrainState:
    """Train until `steps` optimizer updates, logging, checkpointing and validating on the way.

    Args:
      loader: a data.Loader (anything with next() -> host batch, state(), restore(state)).
      out_dir: gets checkpoints/, metrics.jsonl and tb/ (TensorBoard events).
      checkpoint_every: save every N steps (and always at the end); 0 = only at the end.
      resume: continue from the latest complete checkpoint in out_dir/checkpoints when there is one.
      validate: optional callable(trainer, state, step), called every `validate_every` steps.
    Returns:
      The final TrainState.
    """
    import time
    from pathlib import Path

    from tqdm import tqdm

    from jaxdiff.training.metrics import EventWriter, JsonlLog

    out_dir = Path(out_dir)
    ckpt = Checkpointer(out_dir / "checkpoints", keep_last)
    log = JsonlLog(out_dir / "metrics.jsonl")
    if resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(trainer)
        loader.restore(meta["data"])
        log.truncate_after(int(state.step))
    else:
        state = trainer.init_state()
    start = int(state.step)
    tb = EventWriter(out_dir / "tb") if jax.process_index() == 0 else None
    bar = tqdm(total=steps, initial=start, disable=not progress or jax.process_index() != 0,
               dynamic_ncols=True, unit="step")
    last = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            state, metrics = trainer.step(state, trainer.put_batch(next(loader)))
            if step % log_every == 0 or step == steps:
                m = {k: v.item() for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt = (now - last) / (log_every if step % log_every == 0 else 1)
                last = now
                record = {"step": step, **m, "step_time": dt,
                          "images_per_s": trainer.config.batch_size / max(dt, 1e-9)}
                if jax.process_index() == 0:
                    log.write(record)
                    tb.scalars(step, {k: v for k, v in record.items() if k != "step"})
                bar.set_postfix(loss=f"{m['loss']:.4f}", s_per_step=f"{dt:.3f}",
                                img_s=f"{record['images_per_s']:.1f}")
            bar.update(1)
            if (checkpoint_every and step % checkpoint_every == 0) or step == steps:
                ckpt.save(state, {"data": loader.state(), "step": step})
            if validate is not None and validate_every and step % validate_every == 0:
                validate(trainer, state, step)
    finally:
        bar.close()
        if tb is not None:
            tb.close()
        ckpt.close()
    return state
