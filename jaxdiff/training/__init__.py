"""Fine-tuning: data, objective, optimizer, sharded train step, checkpoints and the `jaxdiff train` CLI.

    from jaxdiff.training import Models, TrainConfig, Trainer, fit
    trainer = Trainer(Models.from_pipeline(jaxdiff.load(path)), TrainConfig(batch_size=8))
    state = fit(trainer, Loader(ImageFolder(folder, DataConfig(resolution=512)), global_batch=8,
                                tokenize=...), steps=1000, out_dir="run/")

LoRA (jaxdiff.training.lora) plugs in as `Trainer(..., adapter=...)`; see trainer.py's docstring.
"""
from jaxdiff.training.data import Cached, DataConfig, DataError, ImageFolder, Loader, Synthetic, cache_dataset
from jaxdiff.training.loss import LossConfig, NoiseTables
from jaxdiff.training.optim import EMAConfig, OptimConfig, ema_decay, ema_update, lr_schedule, make_optimizer
from jaxdiff.training.trainer import Checkpointer, Models, TrainConfig, Trainer, TrainState, fit

__all__ = ["Cached", "Checkpointer", "DataConfig", "DataError", "EMAConfig", "ImageFolder", "Loader",
           "LossConfig", "Models", "NoiseTables", "OptimConfig", "Synthetic", "TrainConfig", "TrainState",
           "Trainer", "cache_dataset", "ema_decay", "ema_update", "fit", "lr_schedule", "make_optimizer"]
