"""Inpainting masks as A1111 users expect: soft values kept, A1111's mask blur (cv2.GaussianBlur, checked
against OpenCV), and the original pixels pasted back outside the mask after decoding."""
import jax
import numpy as np
import pytest

from jaxdiff import pixels, sharding
from jaxdiff.inpaint_masks import blur

H = W = 16


def test_soft_mask_is_kept_and_binarise_is_diffusers():
    m = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    soft = pixels.as_mask(m)
    assert soft.shape == (1, 16, 16, 1) and np.allclose(soft[0, ..., 0], m)
    assert set(np.unique(pixels.as_mask(m, soft=False))) == {0.0, 1.0}


@pytest.mark.parametrize("radius", [1, 4, 2.5])
def test_mask_blur_matches_a1111_opencv(radius):
    cv2 = pytest.importorskip("cv2")  # A1111's own blur
    m = np.zeros((24, 20), np.float32)
    m[5:15, 8:18] = 1.0
    k = 2 * int(2.5 * radius + 0.5) + 1  # A1111 modules/processing.py
    want = cv2.GaussianBlur(m, (k, k), radius)
    got = blur(m[None, ..., None], radius)[0, ..., 0]
    assert np.abs(got - want).max() <= 1e-5


def test_paste_back_keeps_the_original_outside_the_mask(tiny_pipeline):
    _, pipe, _ = tiny_pipeline("sd1")
    mesh = sharding.make_mesh(jax.devices()[:1])
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.float32)
    mask[4:12, 4:12] = 1.0
    kw = dict(image=image, mask=mask, steps=2, sampler="euler", guidance_scale=1.0, seed=1, mesh=mesh)
    plain = pipe("a cat", **kw)
    pasted = pipe("a cat", paste_back=True, mask_blur=1.0, **kw)
    blurred = blur(mask[None, ..., None], 1.0)[0]
    outside, inside = blurred[..., 0] == 0.0, blurred[..., 0] == 1.0
    np.testing.assert_array_equal(pasted.images[0][outside], image[outside])
    assert np.abs(plain.images[0][outside].astype(int) - image[outside].astype(int)).max() > 10  # it mattered
    # inside the mask: the generated pixels (the blur changes the latent mask's edge, so compare the core)
    core = np.zeros_like(inside)
    core[6:10, 6:10] = True
    assert np.abs(pasted.images[0][core].astype(int) - image[core].astype(int)).max() > 10
