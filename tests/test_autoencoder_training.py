"""jaxdiff.training.autoencoder: decoder-only fine-tuning freezes exactly the encoder half."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import sharding
from jaxdiff.components import NATIVE_KINDS
from jaxdiff.errors import ConfigError
from jaxdiff.models.configs import VAEConfig
from jaxdiff.training import autoencoder as AE
from jaxdiff.training import optim

CFG = VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                mid_block_add_attention=False, scaling_factor=1.0, force_upcast=False)


def _vae():
    module = NATIVE_KINDS["VAE"].build(CFG, jnp.float32)
    shapes = NATIVE_KINDS["VAE"].param_shapes(CFG)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    return module, params


def _trainer(train):
    module, params = _vae()
    return params, AE.AutoencoderTrainer(module, params, AE.AutoencoderLossConfig(edge_weight=1.0),
                                         optim.OptimConfig(lr=1e-2, warmup_steps=0), train=train,
                                         mesh=sharding.make_mesh(jax.devices()[:1]))


def test_decoder_only_keeps_the_encoder_and_trains_the_decoder():
    params, trainer = _trainer("decoder")
    state = trainer.init_state()
    assert set(state.trainable) == {"decoder", "post_quant_conv"}      # no optimizer state for the rest
    images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    for _ in range(3):
        state, metrics = trainer.step(state, images)
    assert np.isfinite(float(metrics["loss"]))
    out = trainer.params(state)
    assert set(out) == set(params)
    for group in ("encoder", "quant_conv"):
        for a, b in zip(jax.tree.leaves(out[group]), jax.tree.leaves(params[group])):
            np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out["decoder"]),
                                                         jax.tree.leaves(params["decoder"]))]
    assert any(changed)


def test_all_trains_the_encoder_too():
    params, trainer = _trainer("all")
    state = trainer.init_state()
    images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    state, _ = trainer.step(state, images)
    out = trainer.params(state)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out["encoder"]),
                                                         jax.tree.leaves(params["encoder"])))


def test_unknown_trainable_group_is_a_config_error():
    module, params = _vae()
    with pytest.raises(ConfigError, match="train='encoder'"):
        AE.AutoencoderTrainer(module, params, train="encoder")
