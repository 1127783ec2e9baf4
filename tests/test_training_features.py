"""Training features the parity / resume tests do not reach: validation images from `jaxdiff train`,
text-encoder training (gradients vs PyTorch), Adafactor in the train step, SDXL training from a latent
cache (both encoders, pooled embeddings, time ids) vs from images, and the CLI's objective flags.

XLA compiles dominate on CPU, so: the models are one-level UNets (the smallest that still take every
branch a train step takes: resnets, cross-attention transformer, time and text_time embeddings); each
expensive fixture builds one Trainer and compiles its step once; and the module compiles with
`jax_disable_most_optimizations` and a persistent compilation cache (the validation test's second,
identical generation program is a cache hit), both set for this module only and restored after. The
tolerances below hold with them.
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import (PNDMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from PIL import Image

import jaxdiff
from convert.diffusers_layout import convert_state_dict, flatten
from jaxdiff import bench, sharding
from jaxdiff.models import clip
from jaxdiff.training import cli
from jaxdiff.training import data as D
from jaxdiff.training import loss as L
from jaxdiff.training.optim import OptimConfig
from jaxdiff.training.trainer import Checkpointer, Models, TrainConfig, Trainer
from tests import helpers, tiny_pipelines


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles(tmp_path_factory):
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    restore_cache = bench.use_compilation_cache(tmp_path_factory.mktemp("xla_cache"))
    yield
    restore_cache()
    jax.config.update("jax_disable_most_optimizations", old)


def _micro_unet(**kw) -> UNet2DConditionModel:
    """One level (no down / upsampler), one cross-attention transformer per block plus the mid block."""
    return UNet2DConditionModel(block_out_channels=(32,), layers_per_block=1, sample_size=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                attention_head_dim=4, **kw).eval()


def _micro_sd1(folder):
    """SD1 style (conv projections, CLIP-L-like encoder with the real vocabulary, PNDM), one level."""
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=tiny_pipelines.vae(), text_encoder=tiny_pipelines.text_encoder(), tokenizer=tiny_pipelines.tokenizer(),
        unet=_micro_unet(cross_attention_dim=32),
        scheduler=PNDMScheduler.from_config({**tiny_pipelines.STOCK_SCHEDULER, "skip_prk_steps": True}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def _micro_sdxl(folder):
    """SDXL style: two encoders (the second projected and pooled), linear projections, text_time
    embedding of pooled (32) + 6 time ids (8 each), context 32 + 32."""
    torch.manual_seed(2)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_pipelines.vae(0.13025), text_encoder=tiny_pipelines.text_encoder(),
        tokenizer=tiny_pipelines.tokenizer(),
        text_encoder_2=tiny_pipelines.text_encoder(projection=True, act="gelu", legacy_eos=False),
        tokenizer_2=tiny_pipelines.tokenizer("!"),
        unet=_micro_unet(cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
        scheduler=EulerDiscreteScheduler.from_config(tiny_pipelines.STOCK_SCHEDULER))
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    return folder, _micro_sd1(folder), jaxdiff.load(folder)


def _one_device():
    return sharding.make_mesh(jax.devices()[:1])


def _image_folder(root, n, captions=True):
    """n random RGB images of mixed sizes (some need resize + crop), captioned in metadata.jsonl."""
    rng = np.random.default_rng(0)
    root.mkdir()
    lines = []
    for i in range(n):
        w, h = (24, 16) if i % 2 else (16, 20)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo number {i}" if captions else ""}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------------------ validation images
def test_validation_images_are_the_exported_models_images(sd1, tmp_path):
    """`jaxdiff train --validation-prompt P --validate-every 1` writes validation/<step>/<i>.png equal
    (bitwise) to generating with that step's params: step 2 = the exported final folder loaded with
    jaxdiff.load, step 1 = the step-1 checkpoint's params, same prompt, seed i and sampler steps."""
    model, _, _ = sd1
    out = tmp_path / "run"
    prompts = ["a red cube", "a blue ball"]
    argv = ["train", "--model", str(model), "--data", "synthetic", "--out", str(out), "--steps", "2",
            "--batch", "2", "--devices", "1", "--lr", "1e-2", "--resolution", "16", "--checkpoint-every", "1",
            "--log-every", "1",
            "--validate-every", "1", "--validation-steps", "2", "--no-progress"]
    for p in prompts:
        argv += ["--validation-prompt", p]
    assert cli.main(argv) == 0
    shots = {(s, i): np.asarray(Image.open(out / "validation" / f"{s:08d}" / f"{i:02d}.png"))
             for s in (1, 2) for i in range(2)}
    assert all(a.shape == (16, 16, 3) and a.dtype == np.uint8 for a in shots.values())

    final = jaxdiff.load(out / "final")
    for i, p in enumerate(prompts):
        img = final(p, height=16, width=16, steps=2, seed=i).images[0]
        np.testing.assert_array_equal(img, shots[(2, i)])
    # step 1: the checkpoint's params through the same (already compiled) generation program
    args = cli.register(argparse.ArgumentParser().add_subparsers()).parse_args(argv[1:])
    trainer, _, _ = cli.build(args)
    state, meta = Checkpointer(out / "checkpoints").restore(trainer, step=1)
    assert int(state.step) == 1 and meta["step"] == 1
    step1 = cli.pipeline_with_params(final, trainer.model_params(state))
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(step1(p, height=16, width=16, steps=2, seed=i).images[0], shots[(1, i)])
    # the images moved with training and differ by prompt/seed (so the equalities above say something)
    assert not np.array_equal(shots[(1, 0)], shots[(2, 0)]) and not np.array_equal(shots[(2, 0)], shots[(2, 1)])


# ------------------------------------------------------------------ text encoder + Adafactor step
TE_B = 2
ADAFACTOR = dict(lr=1e-3, weight_decay=1e-2, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def te_run(sd1):
    """One Trainer fine-tuning UNet + text encoder with Adafactor: grads (loss_and_grads) and one step."""
    _, ref, pipe = sd1
    cfg = TrainConfig(batch_size=TE_B, seed=3, train_text_encoder=True,
                      optim=OptimConfig(optimizer="adafactor", **ADAFACTOR),
                      loss=L.LossConfig(prediction_type="epsilon"))
    trainer = Trainer(Models.from_pipeline(pipe), cfg, mesh=_one_device())
    rng = np.random.default_rng(1)
    host = {"latents": rng.standard_normal((TE_B, 8, 8, 4)).astype(np.float32),
            "input_ids": pipe.tokenizer(["a photo of a cat", "two dogs on a red sofa"])}
    batch = trainer.put_batch(host)
    state = trainer.init_state()
    before = jax.device_get(state.trainable)
    loss, grads = trainer.loss_and_grads(state, batch)
    loss, grads = float(loss), jax.device_get(grads)
    new_state, metrics = trainer.step(state, batch)
    draw = jax.jit(L.draw, static_argnums=(2, 3, 4))(jax.random.fold_in(jax.random.PRNGKey(3), 0),
                                                     jnp.arange(TE_B, dtype=jnp.int32), (8, 8, 4), cfg.loss, 1000)
    return dict(ref=ref, pipe=pipe, host=host, before=before, loss=loss, grads=grads, draw=jax.device_get(draw),
                after=jax.device_get(new_state.trainable), metrics=jax.device_get(metrics))


def test_text_encoder_gradients_match_torch(te_run):
    """Loss and per-tensor gradients of UNet AND text encoder vs diffusers' UNet2DConditionModel fed by
    transformers' CLIPTextModel (train_text_to_image.py with the encoder unfrozen): same latents, token
    ids, timesteps and noise; torch autograd as the reference (not finite differences). rel-L2 <= 1e-4."""
    r = te_run
    ref = r["ref"]
    unet, te = ref.unet.train(), ref.text_encoder.train()
    for m in (unet, te):
        m.zero_grad()
    sched = DDPMScheduler.from_config(ref.scheduler.config)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))  # noqa: E731
    lat, noise = nchw(r["host"]["latents"]), nchw(r["draw"].noise)
    t = torch.from_numpy(np.asarray(r["draw"].t).astype(np.int64))
    ctx = te(torch.from_numpy(np.asarray(r["host"]["input_ids"]).astype(np.int64))).last_hidden_state
    pred = unet(sched.add_noise(lat, noise, t), t, ctx).sample
    ref_loss = torch.nn.functional.mse_loss(pred, noise)
    ref_loss.backward()
    assert abs(r["loss"] - ref_loss.item()) <= 1e-5 * ref_loss.item()

    pipe = r["pipe"]
    worst = {}
    for name, module, shapes, canon, ignore in (
            ("unet", unet, jax.eval_shape(lambda: pipe.unet.params), dict, ()),
            ("text_encoder", te, jax.eval_shape(lambda: pipe.text_encoder.params), clip.canonical_torch_keys,
             clip.IGNORED_TORCH_KEYS)):
        g_ref = {n: p.grad.numpy().copy() for n, p in module.named_parameters() if p.grad is not None}
        g_ref = flatten(convert_state_dict(canon(g_ref), shapes, source=f"torch {name} grads", ignore=ignore))
        g_jax = flatten(r["grads"][name])
        assert set(g_ref) == set(g_jax)
        # The key projection's bias shifts every score of a query row equally, which softmax ignores:
        # its true gradient is 0 and both sides hold float32 noise, so it is checked absolutely.
        zero = {k for k in g_ref if k[-2:] == ("k_proj", "bias")}
        scale = max(float(np.linalg.norm(g)) for g in g_ref.values())
        assert all(np.linalg.norm(g_jax[k]) <= 1e-6 * scale for k in zero)
        errs = sorted((helpers.rel_l2(g_jax[k], g_ref[k]), "/".join(k)) for k in g_ref if k not in zero)
        worst[name] = errs[-1]
        assert errs[-1][0] <= 1e-4, (name, errs[-3:])
    # the step moved every text-encoder tensor
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(r["before"]["text_encoder"]),
                                                      jax.tree.leaves(r["after"]["text_encoder"]))]
    assert all(moved), sum(moved)
    print(f"loss rel err {abs(r['loss'] - ref_loss.item()) / ref_loss.item():.1e}; worst grad rel-L2 {worst}")


def test_adafactor_step_equals_optax_by_hand(te_run):
    """The trainer's Adafactor step = clip_by_global_norm(1) then optax.adafactor (explicit lr, no
    parameter scaling, no update clipping, no momentum, decoupled weight decay) applied by hand to the
    gradients `loss_and_grads` returned, over UNet + text encoder (incl. factored second moments of the
    49408 x 32 token embedding). Not bitwise: the two programs fuse differently."""
    r = te_run
    opt = optax.chain(optax.clip_by_global_norm(ADAFACTOR["max_grad_norm"]),
                      optax.adafactor(ADAFACTOR["lr"], multiply_by_parameter_scale=False, clipping_threshold=None,
                                      weight_decay_rate=ADAFACTOR["weight_decay"], momentum=None))

    @jax.jit  # one program: op-by-op dispatch over ~200 leaves is slower than compiling it
    def by_hand(params, grads):
        with jax.numpy_dtype_promotion("standard"):
            updates, _ = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates)

    want = jax.device_get(by_hand(r["before"], r["grads"]))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(r["after"]), jax.tree.leaves(want)))
    step = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(r["after"]), jax.tree.leaves(r["before"])))
    print(f"adafactor: max |trainer - by hand| {diff:.1e}, largest param change {step:.1e}")
    assert int(r["metrics"]["skipped"]) == 0 and step > 1e-4
    assert diff <= 1e-6 * max(step, 1.0)


# --------------------------------------------------------------------------- SDXL cached training
def test_sdxl_cached_step_equals_uncached(tmp_path):
    """SDXL from a latent cache (VAE moments; context of both encoders' penultimate layers; pooled
    text_embeds; per-image time ids) vs from the images and captions: the batches agree on time ids,
    and a train step's loss (same key, so same t / noise / latent sample) agrees within 1e-5 relative."""
    ref_dir = tmp_path / "sdxl"
    _micro_sdxl(ref_dir)
    pipe = jaxdiff.load(ref_dir)
    folder = D.ImageFolder(_image_folder(tmp_path / "imgs", 2), D.DataConfig(resolution=16), time_ids=True)
    cache = D.cache_dataset(folder, tmp_path / "cache", encode_images=cli._vae_moments(pipe),
                            encode_text=cli.text_encoder_fn(pipe))
    cached = D.Cached(cache)
    assert cached.text_embeds.shape == (2, 32) and cached.context.shape == (2, 77, 64)
    b_cached = next(D.Loader(cached, global_batch=2, process_index=0, process_count=1))
    b_images = next(D.Loader(folder, global_batch=2, tokenize=cli.tokenizer_fn(pipe), process_index=0,
                             process_count=1))
    assert set(b_cached) == {"moments", "context", "text_embeds", "time_ids"}
    assert set(b_images) == {"pixels", "input_ids", "input_ids_2", "time_ids"}
    np.testing.assert_array_equal(b_cached["time_ids"], b_images["time_ids"])
    assert b_images["time_ids"].tolist() != [[16, 16, 0, 0, 16, 16]] * 2  # real sizes and crops

    trainer = Trainer(Models.from_pipeline(pipe), TrainConfig(batch_size=2, seed=5, optim=OptimConfig(lr=1e-3)),
                      mesh=_one_device())
    losses, moved = {}, {}
    for name, host in (("cached", b_cached), ("images", b_images)):
        state = trainer.init_state()
        before = jax.device_get(state.trainable)
        state, metrics = trainer.step(state, trainer.put_batch(host))
        m = jax.device_get(metrics)
        assert int(m["skipped"]) == 0 and np.isfinite(m["loss"])
        losses[name] = float(m["loss"])
        moved[name] = max(float(np.max(np.abs(a - b)))
                          for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.trainable))))
    rel = abs(losses["cached"] - losses["images"]) / losses["images"]
    print(f"sdxl loss cached {losses['cached']:.6f} images {losses['images']:.6f} rel {rel:.1e}")
    assert rel <= 1e-5 and moved["cached"] > 0


def test_sdxl_cache_caption_dropout_swaps_context_and_pooled(tmp_path):
    """Caption dropout on an SDXL cache replaces BOTH the context and the pooled embedding by the
    empty prompt's (as dropping the caption before encoding would); time ids stay the image's."""
    folder = D.ImageFolder(_image_folder(tmp_path / "imgs", 4), D.DataConfig(resolution=8), time_ids=True)
    enc = lambda caps: {"context": np.array([[[len(c)]] for c in caps], np.float32),  # noqa: E731
                        "text_embeds": np.array([[len(c), 1.0] for c in caps], np.float32)}
    cache = D.cache_dataset(folder, tmp_path / "c", batch_size=3, encode_images=lambda px: px[:, ::2, ::2],
                            encode_text=enc)
    ds = D.Cached(cache, caption_dropout=0.5)
    drops = 0
    for s in range(60):
        x = ds.get(1, D.sample_rng(s, 0, 1))
        dropped = x["context"].item() == 0
        assert (x["text_embeds"][0] == 0) == dropped  # both or neither
        np.testing.assert_array_equal(x["time_ids"], ds.time_ids[1])
        drops += dropped
    assert 15 <= drops <= 45
    (cache / "time_ids.npy").unlink()
    with pytest.raises(D.DataError, match="incomplete SDXL cache"):
        D.Cached(cache)


def test_time_ids_follow_resize_crop_and_flip(tmp_path):
    """time_ids = (original h, w, crop top, left, R, R) with the corner in the (flipped) resized image:
    the returned pixels equal that crop of the flipped resized image, as diffusers' SDXL script does."""
    root = tmp_path / "one"
    root.mkdir()
    src = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)  # h 16, w 24
    Image.fromarray(src).save(root / "a.png")
    cfg = D.DataConfig(resolution=8, center_crop=False, random_flip=True)
    resized = np.asarray(Image.fromarray(src).resize((12, 8), Image.BICUBIC), np.float32) / 127.5 - 1.0
    seen = set()
    for s in range(30):
        px, ids = D.load_image_and_time_ids(root / "a.png", cfg, np.random.default_rng(s))
        h0, w0, top, left, r1, r2 = ids.astype(int)
        assert (h0, w0, r1, r2, top) == (16, 24, 8, 8, 0)
        flipped = not np.allclose(px, resized[top:top + 8, left:left + 8])
        view = resized[:, ::-1] if flipped else resized
        np.testing.assert_allclose(px, view[top:top + 8, left:left + 8], atol=1e-6)
        seen.add((flipped, left))
    assert len({f for f, _ in seen}) == 2 and len({l for _, l in seen}) > 2
    _, ids = D.load_image_and_time_ids(root / "a.png", D.DataConfig(resolution=8), np.random.default_rng(0))
    assert ids.tolist() == [16, 24, 0, 2, 8, 8]  # center crop of the 12 x 8 resize


# ------------------------------------------------------------------------ objective flags (no compile)
def test_cli_objective_flags_reach_the_trainer(sd1, tmp_path):
    """--noise-offset / --input-perturbation / --snr-gamma / --prediction-type / --caption-dropout /
    --optimizer / --timestep-bias-* end up in the step's config and the data set; a zero-terminal-SNR scheduler config
    gives the trainer a noise table whose last step has no signal."""
    model, _, pipe = sd1
    args = cli.register(argparse.ArgumentParser().add_subparsers()).parse_args(
        ["--model", str(model), "--data", str(_image_folder(tmp_path / "imgs", 8)),
         "--out", str(tmp_path / "o"), "--steps", "1", "--batch", "8", "--noise-offset", "0.1",
         "--input-perturbation", "0.05", "--snr-gamma", "5", "--prediction-type", "v_prediction",
         "--caption-dropout", "0.25", "--optimizer", "adafactor", "--resolution", "16",
         "--timestep-bias-strategy", "range", "--timestep-bias-multiplier", "3", "--timestep-bias-begin", "10",
         "--timestep-bias-end", "20"])
    trainer, loader, _ = cli.build(args)
    lc = trainer.config.loss
    assert (lc.noise_offset, lc.input_perturbation, lc.snr_gamma) == (0.1, 0.05, 5.0)
    assert (lc.timestep_bias_strategy, lc.timestep_bias_multiplier, lc.timestep_bias_begin,
            lc.timestep_bias_end) == ("range", 3.0, 10, 20)
    assert trainer.prediction_type == "v_prediction" and trainer.config.optim.optimizer == "adafactor"
    assert loader.dataset.cfg.caption_dropout == 0.25 and "input_ids" in next(loader)
    assert float(trainer.tables.sqrt_alphas_cumprod[-1]) > 0.01

    zsnr = Models.from_pipeline(pipe)
    zsnr.scheduler = type(zsnr.scheduler).from_dict({**pipe.scheduler_config, "rescale_betas_zero_snr": True},
                                                    "scheduler_config.json")
    tables = Trainer(zsnr, TrainConfig(batch_size=1), mesh=_one_device()).tables
    assert float(tables.sqrt_alphas_cumprod[-1]) == 0.0 and float(tables.sqrt_one_minus_alphas_cumprod[-1]) == 1.0
