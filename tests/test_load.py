"""jaxdiff.load on diffusers folders written by save_pretrained: every component equals PyTorch, the
native format round-trips bitwise, and bad input fails with one line naming the file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import jaxdiff
from convert.diffusers_layout import flatten
from convert.formats import read_safetensors, write_safetensors
from jaxdiff.errors import CheckpointError, ConfigError
from tests import helpers, tiny_pipelines

# Modules in float32 agree to 1e-4 relative to the output's scale (DESIGN.md, Tests).
RTOL = 1e-4


def assert_close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
    assert err <= RTOL, f"{what}: max |jax - torch| / max |torch| = {err:.2e}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {name: (build(root / name), root / name)
            for name, build in (("sd1", tiny_pipelines.sd1), ("sd2", tiny_pipelines.sd2),
                                ("sdxl", tiny_pipelines.sdxl))}


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_every_component_matches_pytorch(folders, name):
    ref, folder = folders[name]
    pipe = jaxdiff.load(folder)
    rng = np.random.default_rng(0)

    prompts = ["a red panda, highly detailed", ""]
    for enc, tok, ref_enc, ref_tok in (
            (pipe.text_encoder, pipe.tokenizer, ref.text_encoder, ref.tokenizer),
            (pipe.text_encoder_2, pipe.tokenizer_2, getattr(ref, "text_encoder_2", None),
             getattr(ref, "tokenizer_2", None))):
        if ref_enc is None:
            assert enc is None
            continue
        ids = tok(prompts)
        want_ids = ref_tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(ids, np.asarray(want_ids))
        with torch.no_grad():
            want = ref_enc(torch.from_numpy(np.asarray(ids, np.int64)), output_hidden_states=True)
        got = enc(ids)
        assert_close(got.last_hidden_state, want.last_hidden_state, f"{name} last_hidden_state")
        assert_close(got.hidden_states[-2], want.hidden_states[-2], f"{name} penultimate")
        if hasattr(want, "text_embeds"):
            assert_close(got.text_embeds, want.text_embeds, f"{name} text_embeds")
        else:
            assert_close(got.pooled, want.pooler_output, f"{name} pooled")

    cfg = pipe.unet.config
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    t = np.array([981, 1], np.int32)
    ctx = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    added, ref_added = None, None
    if name == "sdxl":
        added = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
                 "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))}
        ref_added = {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        want = ref.unet(helpers.nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                        added_cond_kwargs=ref_added).sample
    assert_close(pipe.unet(x, t, ctx, added), helpers.nhwc(want), f"{name} unet")

    images = np.tanh(rng.standard_normal((1, 16, 16, 3))).astype(np.float32)
    with torch.no_grad():
        post = ref.vae.encode(helpers.nchw(images)).latent_dist
        z = post.mean
        decoded = ref.vae.decode(z).sample
    got = pipe.vae.encode(images)
    assert_close(got.mean, helpers.nhwc(post.mean), f"{name} vae mean")
    assert_close(got.logvar, helpers.nhwc(post.logvar), f"{name} vae logvar")
    assert_close(pipe.vae.decode(helpers.nhwc(z)), helpers.nhwc(decoded), f"{name} vae decode")
    assert pipe.vae.config.scaling_factor == ref.vae.config.scaling_factor
    assert pipe.scheduler_config["_class_name"] == type(ref.scheduler).__name__


def _params(pipe):
    return {(name,) + path: np.asarray(leaf) for name, c in pipe.components().items()
            for path, leaf in flatten(c.params).items()}


def test_save_then_load_is_bitwise(folders, tmp_path):
    _, folder = folders["sdxl"]
    pipe = jaxdiff.load(folder)
    pipe.save(tmp_path / "native")
    back = jaxdiff.load(tmp_path / "native")
    a, b = _params(pipe), _params(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    for name, c in pipe.components().items():
        assert back.components()[name].config == c.config
    np.testing.assert_array_equal(back.tokenizer_2(["a cat!"]), pipe.tokenizer_2(["a cat!"]))
    assert back.scheduler_config == pipe.scheduler_config
    # Saving again over an existing jaxdiff folder replaces it atomically.
    back.save(tmp_path / "native")
    assert jaxdiff.load(tmp_path / "native").unet.config == pipe.unet.config


def test_bfloat16_params(folders):
    _, folder = folders["sd1"]
    pipe = jaxdiff.load(folder, dtype="bfloat16")
    leaves = jax.tree_util.tree_leaves(pipe.unet.params)
    assert {str(leaf.dtype) for leaf in leaves} == {"bfloat16"}


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, edit):
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    edit(tensors)
    write_safetensors(path, tensors)


UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("case, expect", [
    ("truncated", "truncated"),
    ("wrong_shape", "mis-shaped (conv_in.bias"),
    ("missing", "1 missing (conv_in/bias)"),
    ("extra", "1 left over (conv_in.extra)"),
    ("config", "resnet_time_scale_shift"),
    ("no_weights", "no weights file"),
])
def test_bad_folder_fails_naming_file_and_problem(folders, tmp_path, case, expect):
    folder = _copy(folders["sd1"][1], tmp_path / "m")
    weights = folder / UNET_FILE
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif case == "wrong_shape":
        _edit_tensors(weights, lambda t: t.update({"conv_in.bias": np.zeros(31, np.float32)}))
    elif case == "missing":
        _edit_tensors(weights, lambda t: t.pop("conv_in.bias"))
    elif case == "extra":
        _edit_tensors(weights, lambda t: t.update({"conv_in.extra": np.zeros(3, np.float32)}))
    elif case == "config":
        cfg = json.loads((folder / "unet/config.json").read_text())
        cfg["resnet_time_scale_shift"] = "scale_shift"
        (folder / "unet/config.json").write_text(json.dumps(cfg))
    elif case == "no_weights":
        weights.unlink()
    with pytest.raises((CheckpointError, ConfigError)) as e:
        jaxdiff.load(folder)
    msg = str(e.value)
    assert expect in msg and "unet" in msg and "\n" not in msg, msg


def test_missing_and_non_model_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        jaxdiff.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json"):
        jaxdiff.load(tmp_path / "empty")


def test_cli_errors_are_one_line_exit_2(folders, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "jaxdiff", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    r = run("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "model not found" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    r = run("convert", "--dtype", "int3", "a", "b")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    r = run("convert", str(folders["sd1"][1]), str(tmp_path / "native"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "native" / "jaxdiff.json").is_file()


def test_hub_id_from_the_local_cache(tiny_pipeline, tmp_path, monkeypatch):
    """"org/name" resolves through huggingface_hub's cache layout (refs/main -> snapshots/<hash>), offline;
    an id that is not cached is one line that says how to get it."""
    import shutil

    import huggingface_hub.constants
    _, pipe, folder = tiny_pipeline("sd1")
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = jaxdiff.load("someone/tiny-sd")
    assert got.family == pipe.family
    np.testing.assert_array_equal(np.asarray(got.unet.params["conv_in"]["kernel"]),
                                  np.asarray(pipe.unet.params["conv_in"]["kernel"]))
    with pytest.raises(CheckpointError, match="someone/missing: .*local Hugging Face cache") as e:
        jaxdiff.load("someone/missing")
    assert "\n" not in str(e.value)
