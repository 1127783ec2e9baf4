"""`jaxdiff train`: fine-tune a model on an image folder (or cached latents, or synthetic data).

    jaxdiff train --model sd15/ --data photos/ --out run/ --steps 2000 --batch 8 --lr 1e-5 \\
        --resolution 512 --ema-decay 0.9999 --checkpoint-every 500 [--resume]

Writes run/checkpoints/<step>/ (orbax: params, optimizer state, EMA, step, PRNG key, data position),
run/metrics.jsonl, run/tb/ (TensorBoard), run/validation/<step>/*.png and, at the end, run/final/ (the
fine-tuned pipeline in jaxdiff's native format, EMA weights when an EMA is kept). `--resume` continues
exactly from the latest complete checkpoint.

`register(subparsers)` adds the subcommand to jaxdiff/cli.py's parser; `python -m
jaxdiff.training.cli train ...` runs it standalone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="fine-tune a model on an image folder")
    p.add_argument("--model", required=True, help="diffusers folder or jaxdiff native folder")
    p.add_argument("--data", required=True,
                   help="image folder (metadata.jsonl / metadata.csv / .txt captions), a latent cache folder "
                        "(from --cache-latents), or 'synthetic'")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, final model)")
    p.add_argument("--steps", type=int, required=True, help="optimizer updates in total")
    p.add_argument("--batch", type=int, default=1, help="global batch per update (all devices, all hosts)")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per update")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--random-crop", action="store_true", help="random instead of center crop")
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.add_argument("--caption-column", default="text")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode the folder once (VAE moments + text states) into OUT/cache and train from it")
    p.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lr-schedule", choices=("constant", "cosine", "linear"), default="constant")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="default: the model's scheduler config")
    p.add_argument("--snr-gamma", type=float, default=None)
    p.add_argument("--noise-offset", type=float, default=0.0)
    p.add_argument("--input-perturbation", type=float, default=0.0)
    p.add_argument("--timestep-bias-strategy", choices=("none", "later", "earlier", "range"), default="none",
                   help="draw some timesteps more often (diffusers' SDXL script): later = the noisiest")
    p.add_argument("--timestep-bias-multiplier", type=float, default=1.0)
    p.add_argument("--timestep-bias-portion", type=float, default=0.25, help="share of timesteps (later/earlier)")
    p.add_argument("--timestep-bias-begin", type=int, default=0, help="range start (strategy range)")
    p.add_argument("--timestep-bias-end", type=int, default=1000, help="range end, exclusive (strategy range)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="0 = no EMA")
    p.add_argument("--ema-warmup", action="store_true", help="inv_gamma/power EMA warmup")
    p.add_argument("--ema-update-after", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                   help="bf16 compute over float32 master weights")
    p.add_argument("--remat", choices=("full", "dots", "blocks"), default=None,
                   help="recompute the UNet in backward (blocks: per block, the one that saves memory)")
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--fsdp", type=int, default=1, help="devices sharing each param shard")
    p.add_argument("--devices", type=int, default=None,
                   help="train on this process's first N devices (default: every device of every process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--validation-prompt", action="append", default=[], help="repeatable")
    p.add_argument("--validate-every", type=int, default=0)
    p.add_argument("--validation-steps", type=int, default=20, help="sampler steps per validation image")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)
    return p


def build(args):
    """(trainer, loader, pipe) from parsed flags; no training happens here."""
    import jaxdiff
    from jaxdiff.errors import ConfigError
    from jaxdiff.training import data as D
    from jaxdiff.training.loss import LossConfig
    from jaxdiff.training.optim import EMAConfig, OptimConfig
    from jaxdiff.training.trainer import Models, TrainConfig, Trainer

    pipe = jaxdiff.load(args.model)
    compute = "bfloat16" if args.mixed_precision == "bf16" else "float32"
    ema = None
    if args.ema_decay:
        ema = EMAConfig(decay=args.ema_decay, use_warmup=args.ema_warmup, update_after_step=args.ema_update_after)
    cfg = TrainConfig(
        batch_size=args.batch, accumulation=args.accumulation, seed=args.seed, fsdp=args.fsdp,
        compute_dtype=compute, remat=args.remat, train_text_encoder=args.train_text_encoder,
        loss=LossConfig(prediction_type=args.prediction_type, snr_gamma=args.snr_gamma,
                        noise_offset=args.noise_offset, input_perturbation=args.input_perturbation,
                        timestep_bias_strategy=args.timestep_bias_strategy,
                        timestep_bias_multiplier=args.timestep_bias_multiplier,
                        timestep_bias_portion=args.timestep_bias_portion,
                        timestep_bias_begin=args.timestep_bias_begin, timestep_bias_end=args.timestep_bias_end),
        optim=OptimConfig(optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                          max_grad_norm=args.max_grad_norm or None, schedule=args.lr_schedule,
                          warmup_steps=args.warmup, total_steps=args.steps),
        ema=ema)
    mesh = None
    if args.devices is not None:
        import jax

        from jaxdiff import sharding
        if jax.process_count() > 1 or not 1 <= args.devices <= jax.local_device_count():
            raise ConfigError(f"--devices {args.devices}: expected 1..{jax.local_device_count()} on a single "
                              f"process ({jax.process_count()} processes here)")
        mesh = sharding.make_mesh(jax.devices()[:args.devices], fsdp=args.fsdp)
    trainer = Trainer(Models.from_pipeline(pipe, compute), cfg, mesh=mesh)
    dcfg = D.DataConfig(resolution=args.resolution, center_crop=not args.random_crop,
                        random_flip=args.random_flip, caption_dropout=args.caption_dropout,
                        caption_column=args.caption_column)
    sdxl = pipe.family.text_time
    if pipe.family.is_refiner:
        raise ConfigError("training a refiner-style model (text_encoder_2 only, aesthetic-score time ids) "
                          "is not supported")
    tokenize = None
    if args.data == "synthetic":
        f = pipe.vae.config.downsample_factor
        h = args.resolution // f
        pooled = pipe.text_encoder_2.config.projection_dim if sdxl else None
        dataset = D.Synthetic(max(args.batch * 64, 1024), (h, h, pipe.unet.config.in_channels),
                              (77, pipe.unet.config.cross_attention_dim), pooled_dim=pooled, vae_factor=f)
    elif (Path(args.data) / "moments.npy").is_file():
        dataset = D.Cached(args.data, args.caption_dropout)
    else:
        folder = D.ImageFolder(args.data, dcfg, time_ids=sdxl)
        if args.cache_latents:
            if args.train_text_encoder:
                raise ConfigError("--cache-latents freezes the text encoder; drop --train-text-encoder")
            cache = Path(args.out) / "cache"
            if not (cache / "moments.npy").is_file():
                D.cache_dataset(folder, cache, encode_images=_vae_moments(pipe), encode_text=text_encoder_fn(pipe))
            dataset = D.Cached(cache, args.caption_dropout)
        else:
            dataset = folder
            tokenize = tokenizer_fn(pipe)
    if isinstance(dataset, D.Cached) and sdxl != (dataset.text_embeds is not None):
        raise ConfigError(f"{args.data}: a {'non-' * sdxl}SDXL latent cache does not fit this "
                          f"{'SDXL' if sdxl else 'non-SDXL'} model")
    loader = D.Loader(dataset, global_batch=args.batch, seed=args.seed, tokenize=tokenize)
    return trainer, loader, pipe


def tokenizer_fn(pipe):
    """captions -> the token-id batch keys the train step reads ("input_ids", SDXL also "input_ids_2")."""
    def tokenize(captions):
        ids = {"input_ids": pipe.tokenizer(captions)}
        if pipe.text_encoder_2 is not None:
            ids["input_ids_2"] = pipe.tokenizer_2(captions)
        return ids
    return tokenize


def text_encoder_fn(pipe):
    """captions -> what a latent cache stores: the context [b, 77, D] (SD1/SD2), or for SDXL
    {"context": both encoders' penultimate states [b, 77, D1 + D2], "text_embeds": pooled [b, P]},
    by the same rules as generation (jaxdiff.prompts.encode) and the uncached train step."""
    import jax
    import numpy as np

    from jaxdiff import prompts

    spec = prompts.encoder_spec(pipe)
    params = {name: getattr(pipe, name).params for name in spec.names}
    encode = jax.jit(lambda p, ids: prompts.encode(spec, p, ids, None))
    tokenize = tokenizer_fn(pipe)

    def run(captions):
        tokens = tokenize(captions)
        ids = {"text_encoder": tokens["input_ids"]}
        if "input_ids_2" in tokens:
            ids["text_encoder_2"] = tokens["input_ids_2"]
        context, pooled = encode(params, ids)
        if pooled is None:
            return np.asarray(context)
        return {"context": np.asarray(context), "text_embeds": np.asarray(pooled)}
    return run


def _vae_moments(pipe):
    import numpy as np

    def encode(pixels):
        post = pipe.vae.encode(pixels)
        return np.concatenate([np.asarray(post.mean), np.asarray(post.logvar)], axis=-1)
    return encode


def pipeline_with_params(pipe, params):
    """`pipe` over the trainer's params (host copies: fsdp-sharded arrays may span hosts). The result
    shares `pipe`'s compiled generation programs, so a validation never compiles them again."""
    import jax

    return pipe.with_params({name: jax.device_get(p) for name, p in params.items()})


def _validator(args, pipe):
    """Validation images from fixed prompts and seeds (prompt i uses seed i) with the current params
    (the EMA when one is kept, as the final export): OUT/validation/<step:08d>/<i:02d>.png."""
    if not args.validation_prompt or not args.validate_every:
        return None
    def validate(trainer, state, step):
        from PIL import Image

        vpipe = pipeline_with_params(pipe, trainer.model_params(state, ema=state.ema is not None))
        folder = Path(args.out) / "validation" / f"{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(args.validation_prompt):
            img = vpipe(prompt, height=args.resolution, width=args.resolution, steps=args.validation_steps,
                          seed=i).images[0]
            Image.fromarray(img).save(folder / f"{i:02d}.png")
    return validate


def run(args) -> None:
    from jaxdiff.training.trainer import fit

    trainer, loader, pipe = build(args)
    state = fit(trainer, loader, steps=args.steps, out_dir=args.out, checkpoint_every=args.checkpoint_every,
                keep_last=args.keep_last, log_every=args.log_every, resume=args.resume,
                validate=_validator(args, pipe), validate_every=args.validate_every,
                progress=not args.no_progress)
    import jax
    if jax.process_index() == 0:
        final = pipeline_with_params(pipe, trainer.model_params(state, ema=state.ema is not None))
        final.save(Path(args.out) / "final")
        print(f"wrote {Path(args.out) / 'final'} (step {int(state.step)})")


def main(argv=None) -> int:
    """Standalone entry point: `python -m jaxdiff.training.cli train ...`."""
    from jaxdiff.cli import _Parser
    from jaxdiff.errors import JaxdiffError

    parser = _Parser(prog="jaxdiff")
    register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except JaxdiffError as e:
        print(f"jaxdiff: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
