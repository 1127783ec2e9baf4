"""Reproduces the bundled demo model (jaxdiff/assets/demo_model) from a seed, with jaxdiff's own training code.

    python scripts/train_demo_model.py                   # the full recipe (see the README's model card)
    python scripts/train_demo_model.py --quick --out /tmp/demo   # a smoke run: a few steps of each stage

Stages, all determined by --seed:
1. data: `jaxdiff.demo.shapes.make_dataset(seed, n, split="train")`: 64x64 shapes with captions; the
   held-out (colour, shape, position) triples never appear;
2. VAE: a tiny AutoencoderKL (downsample 4: 64x64x3 -> 16x16x8) trained with
   jaxdiff.training.autoencoder (L1 + edge L1 + KL), then its decoder alone fine-tuned (the latents do
   not change), then the latent scaling factor is measured;
3. latents: the training set's posterior moments are cached once;
4. diffusion: a tiny UNet with cross-attention and a tiny CLIP text encoder over the real CLIP BPE
   vocabulary, trained jointly by jaxdiff.training.trainer.Trainer (train_text_encoder=True, v-prediction
   on a zero-terminal-SNR schedule, 10% caption dropout for classifier-free guidance, EMA), on cached
   moments, in four phases: layout (the noisiest steps drawn 4x as often), detail (min-SNR-5), prompts
   (captions without size / position phrases too), polish (the prompts phase again at half the lr);
5. save: the EMA weights as a native jaxdiff folder, params stored in float16 to keep the asset small.

Prints one JSON line per log interval and writes `<out>/training_log.json` (configs, timings, losses).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jaxdiff.components import NATIVE_KINDS  # noqa: E402
from jaxdiff.demo import detector, shapes  # noqa: E402
from jaxdiff.models.configs import CLIPTextConfig, UNetConfig, VAEConfig  # noqa: E402
from jaxdiff.models.presets import host_init  # noqa: E402
from jaxdiff.pipeline import Pipeline  # noqa: E402
from jaxdiff.schedules import SchedulerConfig  # noqa: E402
from jaxdiff.tokenizer import Tokenizer  # noqa: E402
from jaxdiff.training import autoencoder as AE  # noqa: E402
from jaxdiff.training import optim  # noqa: E402
from jaxdiff.training.loss import LossConfig  # noqa: E402
from jaxdiff.training.trainer import Models, TrainConfig, Trainer  # noqa: E402

DEFAULT_OUT = ROOT / "jaxdiff" / "assets" / "demo_model"
# SD 1.x's betas rescaled to zero terminal SNR, with v-prediction and trailing spacing (Lin et al. 2023,
# "Common Diffusion Noise Schedules and Sample Steps are Flawed"), DPM++ 2M Karras as the model's own
# sampler. Why: SD's schedule leaves sqrt(ab_T) = 0.068 of the image in the noisiest training input,
# and a 20 px shape's location survives it (summed over its ~5x5 latent pixels). Run 4, trained on that
# schedule with an epsilon target, learnt to read the layout from the noise: with a fixed seed all nine
# position prompts drew the shape in the same place (position 13.5% held-out, chance 11%). At zero
# terminal SNR the first sampling step sees no image at all, and v-prediction makes it predict the clean
# latent from the prompt alone.
SCHEDULER_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000,
                    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                    "timestep_spacing": "trailing", "steps_offset": 1,
                    "use_karras_sigmas": True, "solver_order": 2, "algorithm_type": "dpmsolver++"}

# 8 latent channels, not SD's 4: the first runs' 4-channel VAE turned small shapes into blurred circles
# and drifted their colours (yellow on gray read as orange), and 8 channels cost the UNet almost nothing.
LATENT_CHANNELS = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """Every number of a run. The defaults are the shipped model's."""
    seed: int = 0
    resolution: int = 64
    n_images: int = 12_000          # training scenes (captions repeat; positions and sizes jitter)
    vae_steps: int = 1500
    vae_images: int = 4000          # the VAE sees the first 4000 scenes (plenty for flat shapes)
    vae_batch: int = 16             # whole images: GroupNorm statistics must be those of a whole image
    vae_lr: float = 2e-3
    vae_gate: float = 0.85          # the detector must read the VAE's reconstructions this well (the
                                    # shipped VAE: colour 100%, class 98.5%, position 100%)
    decoder_steps: int = 2400       # decoder-only fine-tuning on all n_images (the encoder is frozen)
    decoder_lr: float = 2e-3
    steps: int = 4000               # layout phase
    detail_steps: int = 1500        # detail phase, from the layout phase's EMA weights
    batch: int = 32
    lr: float = 2e-3
    detail_lr: float = 1e-3
    prompt_steps: int = 3600        # prompts phase, from the detail phase's EMA weights
    prompt_lr: float = 5e-4
    polish_steps: int = 3600        # polish phase: the prompts phase again, from its EMA weights, at half
    polish_lr: float = 2.5e-4       # its lr (a warm restart of the cosine schedule)
    warmup: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    log_every: int = 50
    toy: bool = False               # toy architectures (model_configs(quick=True))

    @classmethod
    def quick(cls) -> "Recipe":
        """A smoke run of every stage (CI): seconds per stage, the loss must still fall."""
        return cls(resolution=16, n_images=256, vae_steps=30, vae_images=256, vae_batch=8, vae_gate=0.0,
                   decoder_steps=10, steps=30, detail_steps=10, prompt_steps=10, polish_steps=10, batch=8,
                   warmup=3, log_every=10, lr=3e-3, vae_lr=3e-3, ema_decay=0.9, toy=True)


def model_configs(quick: bool = False) -> tuple[CLIPTextConfig, UNetConfig, VAEConfig]:
    """The demo model's architecture, sized for a 2-core CPU (training and a < 30 s first generation):

    * text encoder: CLIP-style, width 64, 2 layers, 4 heads, the full 49408-token CLIP vocabulary;
    * VAE: 8/16/32 channels, 3 levels = downsample 4: 64x64x3 <-> 16x16x8 latents, no attention
      (a small shape is about 5 latent pixels wide: downsample 8 left too little room for its outline);
    * UNet: 4 levels of 32/64/64/64 channels at 16x16, 8x8, 4x4 and 2x2; cross-attention at 8x8, 4x4,
      2x2 and in the mid block (attention at 16x16 would triple the cost). The 2x2 level costs 2% more
      FLOPs than 3 levels; there each cell touches the zero padding on two sides, the only positional
      signal a diffusers UNet has.

    GroupNorm groups are few on purpose. A group normalises away its spatial mean, and on these flat
    images a group of 1-2 channels (SD's 32 groups at 8-32 channels) carries almost nothing else: the
    first full run's VAE (4 groups of 2 channels before its output conv) could not tell the background
    colour, let alone the shape's. The VAE uses 1 group (LayerNorm over H, W, C), the UNet 8-16
    channels per group.

    quick=True: one-level toys of the same kinds (VAE factor 1, for 16x16 images), for the CI smoke run,
    where compile time dominates.
    scaling_factor is a placeholder until the VAE is trained.
    """
    if quick:
        clip = CLIPTextConfig.tiny(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=1,
                                   num_attention_heads=2)
        unet = UNetConfig(sample_size=16, block_out_channels=(16,), layers_per_block=1, norm_num_groups=4,
                          down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                          mid_block_type=None, attention_head_dim=2, cross_attention_dim=clip.hidden_size)
        vae = VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        mid_block_add_attention=False, scaling_factor=1.0, force_upcast=False)
        return clip, unet, vae
    clip = CLIPTextConfig.tiny(hidden_size=64, intermediate_size=256, projection_dim=64, num_hidden_layers=2,
                               num_attention_heads=4)
    unet = UNetConfig(sample_size=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                      block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=4,
                      down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                      up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                      attention_head_dim=4, cross_attention_dim=clip.hidden_size)
    vae = VAEConfig(block_out_channels=(8, 16, 32), layers_per_block=1, latent_channels=LATENT_CHANNELS,
                    norm_num_groups=1, mid_block_add_attention=False, scaling_factor=1.0, force_upcast=False)
    return clip, unet, vae


def _flat(tree, prefix=()) -> dict:
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, prefix + (k,)).items()}
    return {prefix: tree}


def _unflat(flat: dict) -> dict:
    """{"a/b/c": array} -> {"a": {"b": {"c": array}}} (the inverse of _flat joined with "/")."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def _save_flat(path: Path, tree: dict, **extra) -> None:
    """A nested params dict as one .npz with "a/b/c" keys (read back with _unflat)."""
    np.savez(path, **extra, **{"/".join(k): v for k, v in _flat(tree).items()})


def _ends(prefix: str, losses: list) -> dict:
    """Mean loss of the first and last 10 steps (None when there are none: a stage reused from a file
    saved before losses were kept)."""
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None  # noqa: E731
    return {f"{prefix}first": mean(losses[:10]), f"{prefix}last": mean(losses[-10:])}


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _log(record: dict, log: list) -> None:
    log.append(record)
    print(json.dumps(record), flush=True)


# The VAE's initial posterior log-variance (quant_conv's logvar bias). At 0 the posterior noise has std 1,
# as large as the latents themselves, and Adam moves a bias ~lr per step: the first full run spent its
# 600 steps with the decoder seeing mostly noise and learnt only a blur. e^-3 = 0.05 starts it informative.
VAE_LOGVAR_INIT = -6.0


def train_vae(r: Recipe, vae_cfg: VAEConfig, images: np.ndarray, log: list,
              decoder_of: dict | None = None) -> tuple[dict, list[float]]:
    """Stage 2: images uint8 [N, R, R, 3] -> (EMA params, losses per step): a VAE from random weights on
    the first r.vae_images images, or, given `decoder_of` (VAE params), its decoder fine-tuned on all of
    them for r.decoder_steps with the encoder frozen, so the latents do not change.

    The first VAE drew small diamonds with rounded corners: the detector read 43% of held-out small
    diamonds' reconstructions as diamonds (every other size / class 97-100%), a ceiling on what the
    diffusion model over its latents could score; its loss was still falling after 1,500 steps on 4,000
    images. Only the decoder is trained further, so the diffusion phases keep their latents.
    """
    module = NATIVE_KINDS["VAE"].build(vae_cfg, jnp.float32)
    if decoder_of is None:
        stage, steps, lr, seed, train = "vae", r.vae_steps, r.vae_lr, r.seed, "all"
        params = host_init(NATIVE_KINDS["VAE"].param_shapes(vae_cfg), r.seed + 1)
        params["quant_conv"]["bias"][vae_cfg.latent_channels:] = VAE_LOGVAR_INIT
        images = images[:r.vae_images]
    else:
        stage, steps, lr, seed, train = "vae_decoder", r.decoder_steps, r.decoder_lr, r.seed + 10, "decoder"
        params = decoder_of
    trainer = AE.AutoencoderTrainer(
        module, params, AE.AutoencoderLossConfig(reconstruction="l1", edge_weight=1.0, kl_weight=1e-5),
        optim.OptimConfig(lr=lr, schedule="cosine", warmup_steps=min(50, steps // 10),
                          total_steps=steps, end_lr_ratio=0.05, weight_decay=0.0),
        ema=optim.EMAConfig(decay=r.ema_decay, use_warmup=True, power=3 / 4), seed=seed,
        mesh=_one_device_mesh(), train=train)
    state = trainer.init_state()
    rng = np.random.default_rng(seed)
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = rng.integers(len(images), size=r.vae_batch)
        state, m = trainer.step(state, images[idx].astype(np.float32) / 127.5 - 1.0)
        losses.append(float(m["loss"]))
        if (step + 1) % r.log_every == 0 or step == steps - 1:
            _log({"stage": stage, "step": step + 1, "loss": float(np.mean(losses[-r.log_every:])),
                  "reconstruction": float(m["reconstruction"]), "kl": float(m["kl"]),
                  "seconds": round(time.time() - t0, 1)}, log)
    return trainer.params(state, ema=True), losses


def reconstruction_scores(vae_cfg: VAEConfig, params: dict, images: np.ndarray, scenes) -> dict[str, float]:
    """The detector's accuracy on the VAE's reconstructions (posterior means) of images uint8 [N, R, R, 3]:
    an upper bound on what a diffusion model over these latents can score."""
    module = NATIVE_KINDS["VAE"].build(vae_cfg, jnp.float32)
    roundtrip = jax.jit(lambda p, x: module.apply(
        {"params": p}, module.apply({"params": p}, x, method="encode").mean, method="decode"))
    recon = np.asarray(roundtrip(params, images.astype(np.float32) / 127.5 - 1.0))
    recon = np.clip((recon + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return detector.score([detector.detect(x) for x in recon], scenes)


def caption_ids(tokenizer: Tokenizer, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, 77] int32, empty-prompt ids [77]): unique captions are tokenized once."""
    unique = sorted(set(captions))
    table = dict(zip(unique, tokenizer(unique)))
    return np.stack([table[c] for c in captions]), tokenizer("")[0]


# Stage 4's objectives. Layout: plain v-loss, which in clean-latent terms weights step t by 1 + snr_t, so
# the zero-SNR steps that decide the layout keep weight 1 (min-SNR-gamma would weight them by snr_t = 0);
# the noisiest 15% of the timesteps (t >= 850, where the shape's place is not yet readable from z_t) are
# drawn 4x as often, 41% of the samples: only there does the prompt's position word lower the loss.
# Detail: then uniform timesteps with min-SNR-5, which weighs the mid-noise steps where outlines form.
LAYOUT_LOSS = LossConfig(snr_gamma=None, timestep_bias_strategy="later", timestep_bias_multiplier=4.0,
                         timestep_bias_portion=0.15)
DETAIL_LOSS = LossConfig(snr_gamma=5.0)
# Prompts: plain v-loss over uniform timesteps (every step weighted alike in v terms: both the zero-SNR
# steps that pick the background and the layout, and the mid-noise steps that draw the outline), at a
# lower lr, on captions that sometimes leave out the size and / or position phrase. Every training caption
# names both, so "a red circle on a blue background" (the README's first prompt) was out of distribution:
# after the first two phases the model drew it on a gray background (the background read 23% on 48 such
# prompts). Run 5 used LAYOUT_LOSS here for 600 steps: it fixed the backgrounds but cost 6.5 points of
# class (75% -> 68.5% held-out): the noisiest steps drawn 4x as often took the model off the outlines.
PROMPT_LOSS = LossConfig(snr_gamma=None)
# P(full caption, no size, no position, neither) in the prompts phase.
CAPTION_VARIANTS = ((True, True), (False, True), (True, False), (False, False))
CAPTION_VARIANT_P = (0.55, 0.15, 0.15, 0.15)


def train_diffusion(r: Recipe, clip_cfg, unet_cfg, vae_cfg, vae_params, moments: np.ndarray,
                    ids: np.ndarray, empty_ids: np.ndarray, log: list, *, phase: str = "layout",
                    init: dict | None = None):
    """Stage 4: joint UNet + text-encoder training on cached moments -> (Trainer, final state, losses).

    phase "layout" starts from random weights (LAYOUT_LOSS, r.steps at r.lr); "detail" continues from
    `init` ({"unet", "text_encoder"} params) with DETAIL_LOSS for r.detail_steps at r.detail_lr; "prompts"
    continues with PROMPT_LOSS for r.prompt_steps at r.prompt_lr; "polish" repeats it for r.polish_steps at
    r.polish_lr. ids: [N, 77], or [N, V, 77] caption variants (CAPTION_VARIANTS, drawn with
    CAPTION_VARIANT_P) for the prompts and polish phases.
    """
    if init is None:
        init = {"unet": host_init(NATIVE_KINDS["UNet"].param_shapes(unet_cfg), r.seed + 2, zero=("conv_out",)),
                "text_encoder": host_init(NATIVE_KINDS["TextEncoder"].param_shapes(clip_cfg), r.seed + 3)}
    params = {"unet": init["unet"], "text_encoder": init["text_encoder"], "vae": vae_params}
    steps, lr, loss, seed_offset = {"layout": (r.steps, r.lr, LAYOUT_LOSS, 0),
                                    "detail": (r.detail_steps, r.detail_lr, DETAIL_LOSS, 1),
                                    "prompts": (r.prompt_steps, r.prompt_lr, PROMPT_LOSS, 2),
                                    "polish": (r.polish_steps, r.polish_lr, PROMPT_LOSS, 3)}[phase]
    models = Models(unet=NATIVE_KINDS["UNet"].build(unet_cfg, jnp.float32), params=params,
                    scheduler=SchedulerConfig.from_dict(SCHEDULER_CONFIG),
                    vae=NATIVE_KINDS["VAE"].build(vae_cfg, jnp.float32),
                    text_encoder=NATIVE_KINDS["TextEncoder"].build(clip_cfg, jnp.float32),
                    scaling_factor=vae_cfg.scaling_factor)
    config = TrainConfig(
        batch_size=r.batch, seed=r.seed + seed_offset, train_text_encoder=True, loss=loss,
        optim=optim.OptimConfig(lr=lr, schedule="cosine", warmup_steps=r.warmup, total_steps=steps,
                                end_lr_ratio=0.05, weight_decay=0.0),
        ema=optim.EMAConfig(decay=r.ema_decay, use_warmup=True, power=3 / 4))
    trainer = Trainer(models, config, mesh=_one_device_mesh())
    state = trainer.init_state()
    rng = np.random.default_rng([r.seed, 12 + seed_offset])
    losses, t0 = [], time.time()
    for step in range(steps):
        idx = rng.integers(len(moments), size=r.batch)
        if ids.ndim == 3:   # one caption variant per sample
            batch_ids = ids[idx, rng.choice(ids.shape[1], size=r.batch, p=CAPTION_VARIANT_P)]
        else:
            batch_ids = ids[idx].copy()
        batch_ids[rng.random(r.batch) < r.caption_dropout] = empty_ids   # unconditional rows for CFG
        state, m = trainer.step(state, trainer.put_batch({"moments": moments[idx], "input_ids": batch_ids}))
        losses.append(float(m["loss"]))
        if (step + 1) % r.log_every == 0 or step == steps - 1:
            _log({"stage": f"diffusion_{phase}", "step": step + 1, "loss": float(np.mean(losses[-r.log_every:])),
                  "lr": float(m["lr"]), "seconds": round(time.time() - t0, 1)}, log)
    return trainer, state, losses


def _one_device_mesh():
    """The recipe runs on one device so its numbers do not depend on the machine's device count."""
    from jaxdiff import sharding
    return sharding.make_mesh(jax.devices()[:1])


def build_pipeline(clip_cfg, unet_cfg, vae_cfg, params: dict, tokenizer: Tokenizer,
                   dtype=np.float16) -> Pipeline:
    """A Pipeline over the trained params, stored as `dtype` (float16 halves the asset)."""
    cast = lambda tree: jax.tree.map(lambda a: np.asarray(a, dtype), tree)  # noqa: E731
    nets = {"unet": ("UNet", unet_cfg), "vae": ("VAE", vae_cfg), "text_encoder": ("TextEncoder", clip_cfg)}
    comps = {name: NATIVE_KINDS[kind].component(cfg, cast(params[name]), jnp.float32)
             for name, (kind, cfg) in nets.items()}
    return Pipeline.from_parts(comps, {"tokenizer": tokenizer}, SCHEDULER_CONFIG, source="demo recipe",
                               pipeline_class="StableDiffusionPipeline")


# Every stage's result is saved beside the output folder as .<out>.<stage>.npz; --reuse reads it back.
STAGES = ("vae", "decoder", "layout", "detail", "prompts", "polish")


def run(r: Recipe, out: Path, *, reuse: tuple[str, ...] = ()) -> dict:
    """The whole recipe; returns the training log (also written to out/training_log.json).

    reuse: stages (of STAGES) to read back from an earlier run with the same `out` instead of training.
    """
    unknown = sorted(set(reuse) - set(STAGES))
    if unknown:
        raise SystemExit(f"--reuse: unknown stage(s) {unknown} (stages: {', '.join(STAGES)})")
    saved = lambda name: out.parent / f".{out.name}.{name}.npz"  # noqa: E731
    missing = [saved(s).name for s in reuse if not saved(s).exists()]
    if missing:
        raise SystemExit(f"--reuse: no saved {missing} in {out.parent}; run those stages first, without --reuse")
    log: list = []
    times = {}
    t = time.time()
    images, captions, scenes = shapes.make_dataset(r.seed, r.n_images, split="train", resolution=r.resolution)
    times["data_s"] = time.time() - t
    clip_cfg, unet_cfg, vae_cfg = model_configs(r.toy)

    out.parent.mkdir(parents=True, exist_ok=True)

    def stage(name: str, logged: str, train):
        """One stage -> (params, losses per step): `train()` run, its result saved beside `out` as
        .<out>.<name>.npz (raw float32, before the folder: a failed save must not cost the training run),
        or read back from there when `name` is in `reuse`. Logged and timed as `logged`."""
        t, path = time.time(), saved(name)
        if name in reuse:
            stored = dict(np.load(path))
            losses = list(stored.pop("_losses", []))   # files saved before losses were kept have none
            _log({"stage": logged, "reused": str(path)}, log)
            params = _unflat(stored)
        else:
            params, losses = train()
            _save_flat(path, params, _losses=np.asarray(losses))
        times[f"{logged}_s"] = time.time() - t
        return params, losses

    first_vae, vae_losses = stage("vae", "vae", lambda: train_vae(r, vae_cfg, images, log))
    vae_params, decoder_losses = stage("decoder", "vae_decoder",
                                       lambda: train_vae(r, vae_cfg, images, log, decoder_of=first_vae))
    n_gate = min(200, len(images))
    gate = reconstruction_scores(vae_cfg, vae_params, images[:n_gate], scenes[:n_gate])
    _log({"stage": "vae_gate", **gate}, log)
    if min(gate[k] for k in ("color", "shape", "position")) < r.vae_gate:
        raise SystemExit(f"the VAE fails its gate: the detector reads its reconstructions at {gate}, below "
                         f"{r.vae_gate}; train it longer (--vae-steps) before the diffusion stage")

    t = time.time()
    vae_module = NATIVE_KINDS["VAE"].build(vae_cfg, jnp.float32)
    moments = AE.encode_moments(vae_module, vae_params, images.astype(np.float32) / 127.5 - 1.0)
    vae_cfg = dataclasses.replace(vae_cfg, scaling_factor=round(AE.latent_scaling_factor(moments), 5))
    tokenizer = Tokenizer.bundled()
    ids, empty = caption_ids(tokenizer, captions)
    variant_ids = np.stack([caption_ids(tokenizer, [shapes.caption(sc, size=a, position=b) for sc in scenes])[0]
                            for a, b in CAPTION_VARIANTS], axis=1)                     # [N, V, 77]
    times["cache_s"] = time.time() - t

    def phase(name: str, ids_, init):
        """One diffusion phase -> (its EMA {"unet", "text_encoder"} weights, losses)."""
        def train():
            trainer, state, losses = train_diffusion(r, clip_cfg, unet_cfg, vae_cfg, vae_params, moments, ids_,
                                                     empty, log, phase=name, init=init)
            ema = jax.tree.map(np.asarray, jax.device_get(trainer.model_params(state, ema=True)))
            return {k: ema[k] for k in ("unet", "text_encoder")}, losses
        return stage(name, f"diffusion_{name}", train)

    layout, layout_losses = phase("layout", ids, None)
    detail, detail_losses = phase("detail", ids, layout)
    prompts, losses = phase("prompts", variant_ids, detail)
    final, polish_losses = phase("polish", variant_ids, prompts)

    params = {**final, "vae": vae_params}
    pipe = build_pipeline(clip_cfg, unet_cfg, vae_cfg, params, tokenizer)
    pipe.save(out)
    times = {k: round(v, 1) for k, v in times.items()}
    summary = {
        "recipe": dataclasses.asdict(r), "times": times, "total_s": round(sum(times.values()), 1),
        "params": {name: count(params[name]) for name in ("text_encoder", "unet", "vae")},
        "scaling_factor": vae_cfg.scaling_factor, "vae_reconstruction_scores": gate,
        "vae_loss": {**_ends("", vae_losses), **_ends("decoder_", decoder_losses)},
        "diffusion_loss": {**_ends("layout_", layout_losses), **_ends("detail_", detail_losses),
                           **_ends("prompts_", losses), **_ends("polish_", polish_losses)},
        "devices": str(jax.devices()[0]), "jax": jax.__version__, "log": log,
    }
    (out / "training_log.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run (seconds per stage)")
    p.add_argument("--steps", type=int, help="diffusion steps (default: the recipe's)")
    p.add_argument("--detail-steps", type=int, help="detail-phase diffusion steps (default: the recipe's)")
    p.add_argument("--vae-steps", type=int, help="VAE steps (default: the recipe's)")
    p.add_argument("--vae-gate", type=float, help="minimum detector accuracy on the VAE's reconstructions "
                   "(colour, class, position) to go on to the diffusion stage (default: the recipe's)")
    p.add_argument("--reuse", nargs="+", choices=STAGES, default=(), metavar="STAGE",
                   help="skip these stages and use the weights an earlier run of this --out saved beside it "
                        f"(.<out>.<stage>.npz); stages: {', '.join(STAGES)}")
    args = p.parse_args(argv)
    r = Recipe.quick() if args.quick else Recipe()
    flags = {"seed": args.seed, "steps": args.steps, "vae_steps": args.vae_steps, "vae_gate": args.vae_gate,
             "detail_steps": args.detail_steps}
    over = {k: v for k, v in flags.items() if v is not None}
    r = dataclasses.replace(r, **over)
    summary = run(r, args.out, reuse=tuple(args.reuse))
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
