"""One train step vs diffusers' UNet2DConditionModel + torch.optim.AdamW on the same weights, batch,
timesteps and noise (float32, matmul precision highest): loss, per-tensor gradients, params after one
update. Also: a tiny model overfits 8 latents."""
import jax
import jax.numpy as jnp
import copy

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import jaxdiff
from convert.diffusers_layout import convert_state_dict, flatten
from jaxdiff.training import loss as L
from jaxdiff.training.optim import OptimConfig
from jaxdiff.training.trainer import Models, TrainConfig, Trainer
from tests import helpers

B, CTX_LEN = 8, 8


@pytest.fixture(scope="module")
def sd(tiny_pipeline):
    ref, pipe, _ = tiny_pipeline("sd1")
    return ref, pipe


def _leaf(tree, torch_key):
    """The flax leaf of a torch parameter name (numeric child index joined with '_')."""
    from convert.diffusers_layout import source_key_to_path
    *parents, last = source_key_to_path(torch_key)
    node = tree
    for part in parents:
        node = node[part]
    if last == "weight":  # kernel (Conv / Dense) or scale (norms), per the naming rule
        last = "kernel" if "kernel" in node else "scale"
    return node[last]


def test_one_step_parity_then_overfit(sd):
    """One compile of the step serves both checks (compiles dominate this suite's time on CPU)."""
    pred = "epsilon"  # the v target's formula is checked in test_training_loss
    ref_pipe, pipe = sd
    models = Models.from_pipeline(pipe)
    ocfg = OptimConfig(lr=1e-3, weight_decay=1e-2, max_grad_norm=1.0)
    cfg = TrainConfig(batch_size=B, seed=7, optim=ocfg, loss=L.LossConfig(prediction_type=pred))
    mesh = jaxdiff.sharding.make_mesh(jax.devices()[:1])
    trainer = Trainer(models, cfg, mesh=mesh)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((B, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((B, CTX_LEN, 32)).astype(np.float32)
    batch = trainer.put_batch({"latents": latents, "context": context})
    state = trainer.init_state()
    loss, grads = trainer.loss_and_grads(state, batch)
    d = jax.jit(L.draw, static_argnums=(2, 3, 4))(jax.random.fold_in(jax.random.PRNGKey(7), 0),
                                                  jnp.arange(B, dtype=jnp.int32), (8, 8, 4), cfg.loss, 1000)
    new_state, metrics = trainer.step(state, batch)

    # --- PyTorch: diffusers' train_text_to_image.py inner loop on the same numbers ---
    unet = copy.deepcopy(ref_pipe.unet).train()  # the session's shared pipeline keeps its weights
    sched = DDPMScheduler.from_config(ref_pipe.scheduler.config)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))  # noqa: E731
    lat, noise, t = nchw(latents), nchw(d.noise), torch.from_numpy(np.asarray(d.t).astype(np.int64))
    noisy = sched.add_noise(lat, noise, t)
    target = noise if pred == "epsilon" else sched.get_velocity(lat, noise, t)
    out = unet(noisy, t, torch.from_numpy(context)).sample
    ref_loss = torch.nn.functional.mse_loss(out.float(), target.float(), reduction="mean")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    opt.zero_grad()
    ref_loss.backward()
    g_ref = {n: p.grad.numpy().copy() for n, p in unet.named_parameters()}  # before clipping
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    shapes = jax.eval_shape(lambda: pipe.unet.params)

    assert abs(float(loss) - ref_loss.item()) <= 1e-5 * float(ref_loss)
    assert float(metrics["loss"]) == float(loss)
    g_ref = flatten(convert_state_dict(g_ref, shapes, source="torch grads"))
    g_jax = flatten(jax.tree.map(np.asarray, grads["unet"]))
    assert set(g_ref) == set(g_jax)
    errs = sorted(((helpers.rel_l2(g_jax[k], g_ref[k]), "/".join(k), float(np.linalg.norm(g_ref[k]))) for k in g_ref),
                  reverse=True)
    worst = errs[0][0]
    assert worst <= 1e-4, errs[:4]

    # AdamW from the same gradients: torch's update fed JAX's grads equals optax's (<= 1e-6). End to end
    # (each side its own grads) the first Adam step is lr * g / (|g| + eps) per element, so elements whose
    # grad is within float32 noise of 0 may move by up to ~lr: that bound is checked separately.
    with torch.no_grad():
        for n, p in unet.named_parameters():
            g = np.asarray(_leaf(grads["unet"], n))
            p.grad = torch.from_numpy(np.ascontiguousarray(
                g.transpose(3, 2, 0, 1) if g.ndim == 4 else (g.T if g.ndim == 2 else g)))
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    p_ref = flatten(convert_state_dict({n: p.detach().numpy() for n, p in unet.named_parameters()}, shapes,
                                       source="torch params"))
    p_jax = flatten(jax.tree.map(np.asarray, new_state.trainable["unet"]))
    p_max = max(float(np.max(np.abs(p_jax[k] - p_ref[k]))) for k in p_ref)
    assert p_max <= 1e-6, p_max
    print(f"[{pred}] loss rel err {abs(float(loss) - ref_loss.item()) / ref_loss.item():.2e}, "
          f"worst grad rel-L2 {worst:.2e}, params after AdamW (same grads) max abs diff {p_max:.2e}")

    # --- overfit: 8 latents, loss at a fixed (t, noise) draw falls by half ---
    def eval_loss(st):
        return float(trainer.loss_and_grads(st.replace(step=jnp.int32(0)), batch)[0])

    state = new_state
    first = eval_loss(state)
    for _ in range(60):
        state, metrics = trainer.step(state, batch)
    last = eval_loss(state)
    print(f"overfit: fixed-draw loss {first:.4f} -> {last:.4f}")
    assert last <= 0.5 * first
