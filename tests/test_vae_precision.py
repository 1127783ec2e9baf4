"""VAE precision: force_upcast, the float32 redo of a non-finite image, and the error on NaN weights.

The reference fact is diffusers': a tiny AutoencoderKL whose post_quant_conv / decoder conv_in are
scaled up decodes to inf / NaN in float16 and to a finite image in float32 (checked in torch below).
jaxdiff, loaded in float16 over that VAE, must give the image its float32 VAE gives for the same
latents (within 2/255): from the start when the config says force_upcast, by a redo with a warning
when it does not. NaN weights give one line (CLI: exit 1, no PNG).
"""
import json
import shutil

import numpy as np
import pytest
import torch

import jaxdiff
from jaxdiff import cli
from jaxdiff.errors import NonFiniteImageError
from tests import tiny_pipelines

KW = dict(steps=2, seed=0, guidance_scale=1.0)


def _overflowing_vae():
    """tiny_pipelines.vae() with decoder activations near 3e5 (float16 stops at 65504); GroupNorm brings
    them back, so float32 gives an ordinary image."""
    torch.manual_seed(3)
    vae = tiny_pipelines.vae()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(300.0)
        vae.decoder.conv_in.weight.mul_(1000.0)
    return vae


@pytest.fixture(scope="module")
def folders(tiny_pipeline, tmp_path_factory):
    """sd1 copies with the overflowing VAE: force_upcast true / false, and one with a NaN weight."""
    _, _, base = tiny_pipeline("sd1")
    root = tmp_path_factory.mktemp("precision")
    vae = _overflowing_vae()
    out = {}
    for name, upcast, nan in (("upcast", True, False), ("no_upcast", False, False), ("nan", True, True)):
        folder = root / name
        shutil.copytree(base, folder)
        shutil.rmtree(folder / "vae")
        if nan:
            with torch.no_grad():
                vae.decoder.conv_out.bias[0] = float("nan")
        vae.save_pretrained(folder / "vae", safe_serialization=True)
        config = json.loads((folder / "vae" / "config.json").read_text())
        (folder / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": upcast}))
        out[name] = folder
    return out


def test_diffusers_float16_decode_of_this_vae_overflows():
    vae = _overflowing_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5  # x0 / 0.18215 scale
    with torch.no_grad():
        full = vae.decode(z).sample
        half = vae.half().decode(z.half()).sample
    assert torch.isfinite(full).all() and float(full.std()) > 0.05
    assert not torch.isfinite(half).all()


def _float32_image(folder, latents):
    """The image the float32 VAE gives for `latents` (scaled, NHWC), as uint8."""
    pipe32 = jaxdiff.load(folder, dtype="float32")
    z = np.asarray(latents, np.float32) / pipe32.vae.config.scaling_factor
    decoded = np.asarray(pipe32.vae.decode(z), np.float32)
    return np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def _max_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_force_upcast_decodes_float16_pipeline_in_float32(folders, recwarn):
    folder = folders["upcast"]
    out = jaxdiff.load(folder, dtype="float16")("a cat", **KW)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # no redo was needed
    want = _float32_image(folder, out.latents)
    assert want.std() > 5  # not a flat (black) image
    assert _max_diff(out.images, want) <= 2


def test_non_finite_float16_image_is_decoded_again_in_float32(folders):
    folder = folders["no_upcast"]
    pipe = jaxdiff.load(folder, dtype="float16")
    with pytest.warns(RuntimeWarning, match="decoding again in float32"):
        out = pipe("a cat", **KW)
    assert _max_diff(out.images, _float32_image(folder, out.latents)) <= 2


def test_nan_weights_raise_one_line(folders):
    with pytest.raises(NonFiniteImageError) as err:
        jaxdiff.load(folders["nan"], dtype="float32")("a cat", **KW)
    assert "\n" not in str(err.value) and "NaN" in str(err.value)


def test_cli_nan_weights_exit_1_and_write_nothing(folders, tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc = cli.main(["generate", "a cat", "--model", str(folders["nan"]), "--out", str(out_dir), "--steps", "2",
                   "--no-compile-cache", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1 and "NaN" in err
    assert not out_dir.exists() or not any(out_dir.iterdir())
