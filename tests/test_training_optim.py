"""Optimizer pieces: LR schedules vs diffusers' get_scheduler, EMA vs diffusers' EMAModel over a run,
the non-finite guard, and Adafactor making progress."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from jaxdiff.errors import ConfigError
from jaxdiff.training import optim


@pytest.mark.parametrize("name,ours", [("constant_with_warmup", "constant"), ("cosine", "cosine"),
                                       ("linear", "linear")])
def test_lr_schedules_match_diffusers(name, ours):
    lr, warmup, total = 1e-3, 10, 50
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    sched = optim.lr_schedule(optim.OptimConfig(lr=lr, schedule=ours, warmup_steps=warmup, total_steps=total))
    want = []
    for _ in range(total):
        want.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    got = [float(sched(i)) for i in range(total)]
    # optax evaluates in float32: near the end of a decay that is ~1e-7 of the peak lr absolute
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * lr)
    assert got[0] == 0.0 and abs(got[warmup] - lr) < 1e-9


def test_bad_configs_refused():
    with pytest.raises(ConfigError):
        optim.OptimConfig(schedule="cosine")  # no total_steps
    with pytest.raises(ConfigError):
        optim.OptimConfig(optimizer="sgd")


@pytest.mark.parametrize("cfg", [
    optim.EMAConfig(decay=0.999, update_after_step=3),
    optim.EMAConfig(decay=0.99, min_decay=0.5, use_warmup=True, inv_gamma=1.0, power=0.75),
    optim.EMAConfig(decay=0.9, use_warmup=True, inv_gamma=2.0, power=2 / 3, update_after_step=1),
])
def test_ema_matches_diffusers_emamodel(cfg):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 5)).astype(np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    ref = EMAModel([tp], decay=cfg.decay, min_decay=cfg.min_decay, update_after_step=cfg.update_after_step,
                   use_ema_warmup=cfg.use_warmup, inv_gamma=cfg.inv_gamma, power=cfg.power)
    ema = {"w": jnp.asarray(p0)}
    step = jax.jit(lambda e, p, s: optim.ema_update(e, p, optim.ema_decay(cfg, s + 1)))
    decays, want_decays = [], []
    for s in range(40):  # s = number of updates applied before this one (TrainState.step)
        p = rng.standard_normal((3, 5)).astype(np.float32)
        with torch.no_grad():
            tp.copy_(torch.from_numpy(p))
        ref.step([tp])
        want_decays.append(ref.cur_decay_value)
        decays.append(float(optim.ema_decay(cfg, jnp.int32(s + 1))))
        ema = step(ema, {"w": jnp.asarray(p)}, jnp.int32(s))
    np.testing.assert_allclose(decays, want_decays, rtol=1e-6, atol=0)
    got = np.asarray(ema["w"])
    want = ref.shadow_params[0].numpy()
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want))
    assert decays[0] == 0.0 and max(decays) <= cfg.decay


def test_all_finite_and_select():
    good = {"a": jnp.ones(3), "n": jnp.arange(3)}
    bad = {"a": jnp.array([1.0, jnp.nan, 0.0]), "n": jnp.arange(3)}
    assert bool(optim.all_finite(good)) and not bool(optim.all_finite(bad))
    assert not bool(optim.all_finite({"a": jnp.array([jnp.inf])}))
    out = optim.select_tree(optim.all_finite(bad), bad, good)
    np.testing.assert_array_equal(np.asarray(out["a"]), np.ones(3))


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizers_descend(name):
    cfg = optim.OptimConfig(optimizer=name, lr=0.05, schedule="cosine", warmup_steps=2, total_steps=60,
                            weight_decay=0.0)
    opt = optim.make_optimizer(cfg)
    target = jnp.arange(12.0).reshape(3, 4) / 10
    params = {"w": jnp.zeros((3, 4))}
    state = opt.init(params)
    loss = lambda p: jnp.sum((p["w"] - target) ** 2)  # noqa: E731

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    first = float(loss(params))
    for _ in range(60):
        params, state = step(params, state)
    assert float(loss(params)) < 0.1 * first
