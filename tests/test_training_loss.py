"""Loss math vs diffusers' formulas (DDPMScheduler.add_noise / get_velocity, compute_snr, the min-SNR
weights of train_text_to_image.py), for every one of the 1000 training timesteps, float64 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from jaxdiff import schedules
from jaxdiff.errors import ConfigError
from jaxdiff.training import loss as L

T = 1000


def _sched(zero_snr=False, pred="epsilon"):
    cfg = schedules.SchedulerConfig(rescale_betas_zero_snr=zero_snr, prediction_type=pred)
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", rescale_betas_zero_snr=zero_snr)
    return cfg, ref


@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_match_diffusers(zero_snr):
    cfg, ref = _sched(zero_snr)
    tables = L.NoiseTables.from_scheduler(cfg)
    ab = np.asarray(tables.sqrt_alphas_cumprod, np.float64) ** 2
    # diffusers computes its table in float32; ours in float64 then cast: agree to float32 rounding.
    np.testing.assert_allclose(ab, ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-7)
    if zero_snr:
        assert float(tables.sqrt_alphas_cumprod[-1]) == 0.0


@pytest.mark.parametrize("zero_snr", [False, True])
def test_add_noise_velocity_snr_all_t(zero_snr):
    cfg, ref = _sched(zero_snr)
    tables = L.NoiseTables.from_scheduler(cfg)
    # diffusers gets the exact float64 table: the comparison covers our float32 tables and formulas.
    ref.alphas_cumprod = torch.tensor(schedules.alphas_cumprod(cfg))
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((T, 2, 2, 4)).astype(np.float32)
    noise = rng.standard_normal((T, 2, 2, 4)).astype(np.float32)
    t = np.arange(T)
    tt = torch.from_numpy(t)
    x0_t, noise_t = torch.from_numpy(x0).double(), torch.from_numpy(noise).double()

    got = np.asarray(L.add_noise(tables, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    want = ref.add_noise(x0_t, noise_t, tt).numpy()
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want))

    got = np.asarray(L.velocity(tables, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    want = ref.get_velocity(x0_t, noise_t, tt).numpy()
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want))

    got = np.asarray(L.snr(tables, jnp.asarray(t)), np.float64)
    want = compute_snr(ref, tt).numpy()
    # one float32 rounding of a ratio and a square: a few ulps, relative per t
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    if zero_snr:
        assert got[-1] == 0.0


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_min_snr_weights_all_t(pred):
    cfg, ref = _sched(False)
    tables = L.NoiseTables.from_scheduler(cfg)
    ref.alphas_cumprod = torch.tensor(schedules.alphas_cumprod(cfg))
    tt = torch.arange(T)
    gamma = 5.0
    s = compute_snr(ref, tt)
    # train_text_to_image.py, verbatim
    w = torch.stack([s, gamma * torch.ones_like(tt)], dim=1).min(dim=1)[0]
    w = w / s if pred == "epsilon" else w / (s + 1)
    got = np.asarray(L.min_snr_weights(L.snr(tables, jnp.arange(T)), gamma, pred), np.float64)
    np.testing.assert_allclose(got, w.numpy(), rtol=1e-6, atol=0)
    # eps: high-SNR (small t) steps are down-weighted, low-SNR ones keep weight 1; v: all below 1
    assert np.all(got <= 1.0 + 1e-7) and got.min() > 0 and got[0] < 0.01
    assert (got[-1] == 1.0) if pred == "epsilon" else (got[-1] < 0.01)


def test_min_snr_eps_at_zero_snr_is_finite():
    w = L.min_snr_weights(jnp.array([0.0, 1e-3, 10.0], jnp.float32), 5.0, "epsilon")
    np.testing.assert_allclose(np.asarray(w), [1.0, 1.0, 0.5], rtol=1e-6)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_batch_loss_offset_noise_and_input_perturbation(pred):
    """The full objective vs diffusers' training-script recipe with the same random draws."""
    cfg = L.LossConfig(snr_gamma=5.0, noise_offset=0.1, input_perturbation=0.1)
    sched_cfg, ref = _sched(False)
    tables = L.NoiseTables.from_scheduler(sched_cfg)
    ref.alphas_cumprod = torch.tensor(schedules.alphas_cumprod(sched_cfg))
    B, shape = 6, (4, 4, 4)
    key = jax.random.PRNGKey(3)
    d = jax.jit(L.draw, static_argnums=(2, 3, 4))(key, jnp.arange(B, dtype=jnp.int32), shape, cfg, T)
    x0 = jax.random.normal(jax.random.PRNGKey(4), (B, *shape))
    pred_out = jax.random.normal(jax.random.PRNGKey(5), (B, *shape))
    captured = {}

    def predict(z, t):
        captured["z"], captured["t"] = z, t
        return pred_out

    got = float(jnp.mean(L.diffusion_loss(predict, x0, d, tables, cfg, pred)))

    # Reconstruct diffusers' steps: noise = randn + offset * randn(B, C, 1, 1) ; new_noise = noise +
    # perturbation * randn ; noisy = add_noise(latents, new_noise, t) ; target = noise or velocity.
    n = int(np.prod(shape))
    z = np.stack([np.asarray(jax.random.normal(jax.random.split(jax.random.fold_in(key, i))[1], (3 * n + 4,)))
                  for i in range(B)]).astype(np.float64)
    n0, m = z[:, :n].reshape(B, *shape), z[:, n:2 * n].reshape(B, *shape)
    off = z[:, 3 * n:].reshape(B, 1, 1, 4)
    noise = torch.from_numpy(n0 + 0.1 * off)
    lat = torch.from_numpy(np.asarray(x0, np.float64))
    tt = torch.from_numpy(np.asarray(d.t, np.int64))
    assert tt.min() >= 0 and tt.max() < T and len(set(tt.tolist())) > 1
    noisy = ref.add_noise(lat, noise + 0.1 * torch.from_numpy(m), tt)
    np.testing.assert_allclose(np.asarray(captured["z"]), noisy.numpy(), rtol=0, atol=2e-6)
    target = noise if pred == "epsilon" else ref.get_velocity(lat, noise, tt)
    s = compute_snr(ref, tt)
    w = torch.stack([s, 5.0 * torch.ones_like(s)], dim=1).min(dim=1)[0]
    w = w / s if pred == "epsilon" else w / (s + 1)
    per = ((torch.from_numpy(np.asarray(pred_out, np.float64)) - target) ** 2).mean(dim=(1, 2, 3))
    want = float((per * w).mean())
    assert abs(got - want) <= 1e-6 * abs(want)


def test_draw_is_layout_independent():
    """Row i's draw depends only on (key, i): a sub-batch of rows equals the same rows of the batch."""
    cfg = L.LossConfig(noise_offset=0.05)
    key = jax.random.PRNGKey(0)
    draw = jax.jit(L.draw, static_argnums=(2, 3, 4))
    full = draw(key, jnp.arange(8, dtype=jnp.int32), (2, 2, 4), cfg, T)
    part = draw(key, jnp.array([5, 2], jnp.int32), (2, 2, 4), cfg, T)
    np.testing.assert_array_equal(np.asarray(part.noise), np.asarray(full.noise)[[5, 2]])
    np.testing.assert_array_equal(np.asarray(part.t), np.asarray(full.t)[[5, 2]])


def test_latents_from_moments():
    mean = jnp.full((1, 2, 2, 4), 0.5)
    logvar = jnp.full((1, 2, 2, 4), np.log(0.04), jnp.float32)
    eps = jnp.ones((1, 2, 2, 4))
    z = L.latents_from_moments(jnp.concatenate([mean, logvar], -1), eps, 0.18215)
    np.testing.assert_allclose(np.asarray(z), (0.5 + 0.2) * 0.18215, rtol=1e-6)


def _diffusers_timestep_weights(strategy, multiplier, portion, begin, end, num_timesteps):
    """generate_timestep_weights from diffusers' examples/text_to_image/train_text_to_image_sdxl.py, verbatim
    but for its args namespace (the examples are not part of the installed package)."""
    weights = torch.ones(num_timesteps)
    num_to_bias = int(portion * num_timesteps)
    if strategy == "later":
        bias_indices = slice(-num_to_bias, None)
    elif strategy == "earlier":
        bias_indices = slice(0, num_to_bias)
    elif strategy == "range":
        bias_indices = slice(begin, end)
    else:
        return weights
    weights[bias_indices] *= multiplier
    weights /= weights.sum()
    return weights


@pytest.mark.parametrize("strategy,multiplier,portion,begin,end", [
    ("later", 4.0, 0.15, 0, 1000), ("earlier", 2.5, 0.3, 0, 1000), ("range", 3.0, 0.25, 200, 700)])
def test_timestep_bias_weights_and_draws(strategy, multiplier, portion, begin, end):
    cfg = L.LossConfig(timestep_bias_strategy=strategy, timestep_bias_multiplier=multiplier,
                       timestep_bias_portion=portion, timestep_bias_begin=begin, timestep_bias_end=end)
    got = L.timestep_weights(cfg, T)
    want = _diffusers_timestep_weights(strategy, multiplier, portion, begin, end, T).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)   # torch's weights are float32
    # The draws follow the weights: the biased share of 20000 draws within 4 standard errors.
    n = 20000
    t = np.asarray(jax.jit(L.draw, static_argnums=(2, 3, 4))(
        jax.random.PRNGKey(0), jnp.arange(n, dtype=jnp.int32), (1, 1, 1), cfg, T).t)
    biased = got > got.min()
    p = got[biased].sum()
    share = biased[t].mean()
    assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n), (share, p)
    assert t.min() >= 0 and t.max() < T


def test_timestep_bias_respects_t_range_and_none_is_uniform():
    cfg = L.LossConfig(timestep_bias_strategy="later", timestep_bias_multiplier=2.0, t_min=100, t_max=900)
    w = L.timestep_weights(cfg, T)
    assert w[:100].sum() == 0 and w[900:].sum() == 0 and abs(w.sum() - 1) < 1e-12
    assert L.timestep_weights(L.LossConfig(), T) is None
    assert L.timestep_weights(L.LossConfig(timestep_bias_strategy="later"), T) is None  # multiplier 1
    with pytest.raises(ConfigError, match="timestep_bias_strategy"):
        L.LossConfig(timestep_bias_strategy="late")
    with pytest.raises(ConfigError, match="multiplier"):
        L.LossConfig(timestep_bias_strategy="later", timestep_bias_multiplier=0.0)
