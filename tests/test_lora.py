"""LoRA: init leaves the output unchanged, merged == unmerged (forward and gradients), and exported
files (kohya and diffusers key styles) load with diffusers' `load_lora_weights` with no unexpected keys
and reproduce jaxdiff's merged networks."""
import contextlib
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import jaxdiff
from convert.diffusers_layout import flatten, unflatten
from convert.formats import read_safetensors, write_safetensors
from jaxdiff.components import CLIP, UNET
from jaxdiff.errors import ConfigError
from jaxdiff.models.configs import CLIPTextConfig, UNetConfig
from jaxdiff.training import lora as L
from tests import tiny_pipelines

# Modules in float32 agree to 1e-4 relative to the output's scale (DESIGN.md, Tests).
RTOL = 1e-4


# Jitted once for the module: eager merge would compile each small op per kernel shape.
MERGE = jax.jit(L.merge)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def random_params(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def randomize_up(lora, seed=1, std=0.2):
    """A trained-looking LoRA: non-zero `up` (numpy RNG: eager jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    return {path: (rng.standard_normal(a.shape).astype(np.float32) * std if path[-1] == "up" else a)
            for path, a in flatten(lora).items()}


unflat = unflatten


# --- the adapter itself -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_unet():
    cfg = UNetConfig.tiny()
    module = UNET.build(cfg, jnp.float32)
    params = random_params(UNET.param_shapes(cfg))
    rng = np.random.default_rng(2)
    inputs = (rng.standard_normal((2, 8, 8, 4)).astype(np.float32), np.array([981, 1], np.int32),
              rng.standard_normal((2, 7, 32)).astype(np.float32))
    return module, params, inputs


def test_targets_and_init(tiny_unet):
    _, params, _ = tiny_unet
    cfg = L.LoRAConfig(rank=4)
    targets = L.target_modules(params, cfg)
    # tiny UNet: transformer blocks in down level 0 (1), the mid block (1) and up level 1 (2), each with
    # self- and cross-attention of 4 projections.
    n_blocks = sum(1 for p in flatten(params) if p[-3:] == ("attn1", "to_q", "kernel"))
    assert n_blocks == 4 and len(targets) == 8 * n_blocks
    assert all(m[-1] in ("to_q", "to_k", "to_v", "to_out_0") and m[-2] in ("attn1", "attn2") for m in targets)
    lora = L.init(params, cfg, jax.random.PRNGKey(0))
    downs = np.concatenate([np.ravel(d) for d, _ in L.factors(lora).values()])
    assert all(not np.any(u) for _, u in L.factors(lora).values())
    assert abs(downs.std() - 1 / 4) < 0.02   # gaussian: std 1/r
    kaiming = L.init(params, L.LoRAConfig(rank=4, init="kaiming"), jax.random.PRNGKey(0))
    for module, (down, _) in L.factors(kaiming).items():
        assert np.abs(down).max() <= 1 / np.sqrt(targets[module][0])
    for d, u in L.factors(lora).values():
        assert d.shape[1] == u.shape[0] == 4
    with pytest.raises(ConfigError, match="match no Dense"):
        L.target_modules(params, L.LoRAConfig(targets=(r".*/q_proj",)))
    with pytest.raises(ConfigError):
        L.LoRAConfig(rank=0)


def test_zero_init_is_the_base_and_merged_equals_unmerged(tiny_unet):
    module, params, inputs = tiny_unet
    cfg = L.LoRAConfig(rank=4, alpha=8.0)
    adapter = L.LoRAAdapter(cfg)
    lora = adapter.init(params, jax.random.PRNGKey(0))
    fwd = jax.jit(lambda p: module.apply({"params": p}, *inputs))
    unmerged = jax.jit(lambda p, lo: L.apply_unmerged(module, p, lo, cfg.scale, *inputs))
    base = np.asarray(fwd(params))
    # up = 0: the merged kernels equal the base ones exactly, so the same program gives the same bits.
    merge = jax.jit(adapter.merge)
    np.testing.assert_array_equal(np.asarray(fwd(merge(params, lora))), base)
    # The unmerged branch adds exact zeros, but it is another XLA program (other fusions): float32
    # rounding only.
    assert rel_err(np.asarray(unmerged(params, lora)), base) <= 1e-6

    trained = unflat(randomize_up(lora))
    merged = merge(params, trained)
    merged_out = np.asarray(fwd(merged))
    assert rel_err(merged_out, base) > 0.05               # the LoRA changes the output...
    assert rel_err(np.asarray(unmerged(params, trained)), merged_out) <= 1e-5   # ...the same way both ways
    # merge is W + (alpha / r) * down @ up on each kernel, nothing else changes.
    merged = flatten(merged)
    for path, a in flatten(params).items():
        factors = L.factors(trained).get(path[:-1])
        want = a if factors is None or path[-1] != "kernel" else a + 2.0 * factors[0] @ factors[1]
        np.testing.assert_allclose(np.asarray(merged[path]), want, rtol=1e-6, atol=1e-6)


def test_gradients_merged_equal_unmerged():
    """On a tiny CLIP encoder: d loss / d LoRA is the same through the merged kernels and through the
    unmerged branch, and at init only `up` gets a gradient (down's is zero because up is)."""
    cfg_te = CLIPTextConfig.tiny()
    module = CLIP.build(cfg_te, jnp.float32)
    params = random_params(CLIP.param_shapes(cfg_te))
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 49408, (2, 77)), jnp.int32)
    cfg = L.LoRAConfig(rank=2, alpha=3.0, targets=L.TEXT_ENCODER_ATTENTION)
    lora = L.init(params, cfg, jax.random.PRNGKey(1))
    assert len(L.factors(lora)) == 4 * cfg_te.num_hidden_layers

    def loss_merged(lo):
        return jnp.mean(module.apply({"params": L.merge(params, lo, cfg.scale)}, ids).last_hidden_state ** 2)

    def loss_unmerged(lo):
        return jnp.mean(L.apply_unmerged(module, params, lo, cfg.scale, ids).last_hidden_state ** 2)

    g0 = flatten(jax.jit(jax.grad(loss_merged))(lora))
    assert all(not np.any(g) for p, g in g0.items() if p[-1] == "down")
    assert all(np.any(g) for p, g in g0.items() if p[-1] == "up")
    trained = unflat(randomize_up(lora, std=0.5))
    gm = flatten(jax.jit(jax.grad(loss_merged))(trained))
    gu = flatten(jax.jit(jax.grad(loss_unmerged))(trained))
    for path in gm:
        g, h = np.asarray(gm[path], np.float64), np.asarray(gu[path], np.float64)
        assert np.linalg.norm(g - h) <= 1e-4 * np.linalg.norm(h), path


def test_unmerged_lora_reaches_the_feed_forward_run_in_token_blocks():
    """The CPU feed-forward runs inside nn.scan (layers.feed_forward_token_chunk); the unmerged branch,
    added by method interception, must still reach its Dense layers there, as merged kernels do."""
    from jaxdiff.models.layers import BasicTransformerBlock
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 8))
    ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 8))
    module = BasicTransformerBlock(heads=2, head_dim=4, ff_token_chunk=4)
    params = module.init(jax.random.PRNGKey(0), x, ctx)["params"]
    cfg = L.LoRAConfig(rank=2, alpha=2.0, targets=("ff/net_0/proj", "ff/net_2", "attn1/to_q"))
    lora = unflat(randomize_up(L.init(params, cfg, jax.random.PRNGKey(3)), std=0.5))
    assert len(L.factors(lora)) == 3
    base = module.apply({"params": params}, x, ctx)
    merged = module.apply({"params": L.merge(params, lora, cfg.scale)}, x, ctx)
    unmerged = jax.jit(lambda lo: L.apply_unmerged(module, params, lo, cfg.scale, x, ctx))(lora)
    assert np.abs(merged - base).max() > 0.1
    np.testing.assert_allclose(unmerged, merged, rtol=0, atol=RTOL * float(np.abs(merged).max()))


# --- export, loaded by diffusers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for name, build in (("sd1", tiny_pipelines.sd1), ("sdxl", tiny_pipelines.sdxl)):
        build(root / name)
        pipe = jaxdiff.load(root / name)
        # One jitted forward per network, reused with base and merged params (one compile each).
        fwd = {n: jax.jit(c.module.apply) for n, c in pipe.components().items()}
        out[name] = (root / name, pipe, fwd)
    return out


@contextlib.contextmanager
def captured_logs():
    """Every warning diffusers / transformers / peft log or raise as a Python warning."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Keep(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield records
    for lg in loggers:
        lg.removeHandler(handler)
    records.extend(f"warning: {w.message}" for w in caught)


def _torch_pipe(name, folder):
    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    return cls.from_pretrained(folder)


def _jax_outputs(fwd, params, x, t, ctx, added, ids):
    unet = fwd["unet"]({"params": params["unet"]}, x, t, ctx, added)
    encoders = {n: fwd[n]({"params": params[n]}, jnp.asarray(ids[n], jnp.int32)) for n in ids}
    return np.asarray(unet), encoders


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_exported_lora_loads_in_diffusers(pipes, name, style, tmp_path):
    folder, pipe, fwd = pipes[name]
    encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n) is not None]
    params = {"unet": pipe.unet.params, **{n: getattr(pipe, n).params for n in encoders}}
    cfg = L.LoRAConfig(rank=4, alpha=2.0, targets=L.UNET_ATTENTION + L.TEXT_ENCODER_ATTENTION)
    lora = unflat(randomize_up(L.init(params, cfg, jax.random.PRNGKey(0)), std=0.3))
    merged = MERGE(params, lora, cfg.scale)

    path = tmp_path / "lora.safetensors"
    L.export(lora, path, cfg, style=style, sdxl=name == "sdxl")
    keys = set(read_safetensors(path))
    if style == "kohya":
        te = ("lora_te1_", "lora_te2_") if name == "sdxl" else ("lora_te_",)
        assert {k.split("text_model")[0] for k in keys if "text_model" in k} == set(te)
        alphas = [v for k, v in read_safetensors(path).items() if k.endswith(".alpha")]
        assert len(alphas) == len(L.factors(lora["unet"])) + sum(len(L.factors(lora[n])) for n in encoders)
        assert all(np.asarray(a).reshape(()) == 2.0 for a in alphas)

    rng = np.random.default_rng(4)
    cross = pipe.unet.config.cross_attention_dim
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([981, 1], np.int32)
    ctx = rng.standard_normal((2, 77, cross)).astype(np.float32)
    added = None
    if name == "sdxl":
        added = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
                 "time_ids": np.tile(np.array([[64., 64, 0, 0, 64, 64]], np.float32), (2, 1))}
    ids = {n: pipe.tokenizer(["a red panda", ""]) if n == "text_encoder" else pipe.tokenizer_2(["a red panda", ""])
           for n in encoders}
    want_unet, want_te = _jax_outputs(fwd, merged, x, t, ctx, added, ids)
    base_unet, base_te = _jax_outputs(fwd, params, x, t, ctx, added, ids)
    assert rel_err(want_unet, base_unet) > 0.05       # a LoRA that visibly changes the outputs
    for n in encoders:
        assert rel_err(want_te[n].last_hidden_state, base_te[n].last_hidden_state) > 0.05

    ref = _torch_pipe(name, folder)
    with captured_logs() as logs:
        ref.load_lora_weights(str(path))
    assert logs == []
    with torch.no_grad():
        kw = {}
        if added is not None:
            kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
        got_unet = ref.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
                            torch.from_numpy(ctx), **kw).sample.numpy().transpose(0, 2, 3, 1)
        assert rel_err(got_unet, want_unet) <= RTOL
        for n in encoders:
            out = getattr(ref, n)(torch.from_numpy(np.asarray(ids[n], np.int64)))
            assert rel_err(out.last_hidden_state, want_te[n].last_hidden_state) <= RTOL, n
            if n == "text_encoder_2":
                assert rel_err(out.text_embeds, want_te[n].text_embeds) <= RTOL


def test_kohya_alpha_is_a_scalar(tmp_path):
    lora = {"unet": {"attn1": {"to_q": {"down": np.ones((8, 2), np.float32), "up": np.ones((2, 8), np.float32)}}}}
    L.export(lora["unet"], tmp_path / "l.safetensors", L.LoRAConfig(rank=2, alpha=1.0), style="kohya")
    assert read_safetensors(tmp_path / "l.safetensors")["lora_unet_attn1_to_q.alpha"].shape == ()


def test_log_capture_sees_unexpected_keys(pipes, tmp_path):
    """The `logs == []` above can fail: a file with a key for a module no target covers is reported."""
    folder, pipe, _ = pipes["sd1"]
    cfg = L.LoRAConfig(rank=4)
    lora = L.init(pipe.unet.params, cfg, jax.random.PRNGKey(0))
    path = tmp_path / "lora.safetensors"
    L.export(lora, path, cfg, style="diffusers")
    tensors = dict(read_safetensors(path))
    tensors["unet.time_embedding.linear_1.lora_A.weight"] = np.zeros((4, 32), np.float32)
    tensors["unet.time_embedding.linear_1.lora_B.weight"] = np.zeros((128, 4), np.float32)
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    write_safetensors(path, tensors, metadata=meta)
    ref = _torch_pipe("sd1", folder)
    with captured_logs() as logs:
        ref.load_lora_weights(str(path))
    # diffusers reports the module with no target (and, benignly, that the text encoder got no LoRA).
    assert any("time_embedding.linear_1" in m for m in logs), logs


def test_adapter_fits_the_trainer_contract():
    """Trainer (jaxdiff/training/trainer.py) traces `adapter.init(params, key)` and `adapter.merge(params,
    trainable)` over {"unet", "vae", "text_encoder"} trees: only attention Dense layers of the UNet (and,
    when asked, the text encoder) get factors; the VAE's attention is left alone; merge keeps the tree."""
    from jaxdiff.components import VAE_KIND
    from jaxdiff.models.configs import VAEConfig
    params = {"unet": UNET.param_shapes(UNetConfig.tiny()), "vae": VAE_KIND.param_shapes(VAEConfig.tiny()),
              "text_encoder": CLIP.param_shapes(CLIPTextConfig.tiny())}
    key = jax.random.PRNGKey(0)
    unet_only = jax.eval_shape(L.LoRAAdapter(L.LoRAConfig()).init, params, key)
    assert set(unet_only) == {"unet"}
    both = L.LoRAAdapter(L.LoRAConfig(targets=L.UNET_ATTENTION + L.TEXT_ENCODER_ATTENTION))
    lora = jax.eval_shape(both.init, params, key)
    assert set(lora) == {"unet", "text_encoder"}
    merged = jax.eval_shape(both.merge, params, lora)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    assert {p: (s.shape, s.dtype) for p, s in flatten(merged).items()} == \
        {p: (s.shape, s.dtype) for p, s in flatten(params).items()}
