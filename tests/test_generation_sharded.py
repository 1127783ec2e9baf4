"""Sharded generation equals one device; padding, sample-index independence, batches, gather modes,
and two processes joined by jax.distributed.

XLA CPU picks different dot kernels for different rows per device, which sum in another order, so
1 device vs 8 devices differ by float32 rounding (the sharding engineer measured ~1e-6): float latents
are compared with LATENT_ATOL and uint8 images within 1. Layouts with the same rows per device (a batch
of 1, 3 or 4 padded to 8 on 8 devices) must agree exactly. A wrong sample index or key changes images by
O(1), far above both tolerances. The sampler is Euler a (stochastic), so per-sample step noise is covered.
"""
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxdiff
from jaxdiff import sharding
from tests import generation_worker
from tests.two_processes import run_two_processes

REPO = Path(__file__).resolve().parents[1]
LATENT_ATOL = 1e-4  # latents are O(1); dot-kernel rounding differences stay ~1e-6 per UNet call
REQUEST = dict(generation_worker.REQUEST, num_images_per_prompt=4)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def model(tiny_pipeline):
    _, pipe, folder = tiny_pipeline("sd1")
    return pipe, folder


@pytest.fixture(scope="module")
def on8(model):
    """The 4-image request on all 8 devices (padded to 8 rows, one per device)."""
    pipe, _ = model
    out = pipe(**REQUEST)
    assert len(pipe.mesh.devices.flat) == 8
    return out


def test_eight_devices_equal_one(model, on8):
    pipe, _ = model
    one = pipe(**REQUEST, mesh=sharding.make_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(on8.latents, one.latents, rtol=0, atol=LATENT_ATOL)
    assert np.abs(on8.images.astype(int) - one.images.astype(int)).max() <= 1
    print(f"1 vs 8 devices: latents max diff {np.abs(on8.latents - one.latents).max():.1e}")
    assert np.abs(on8.latents[0] - on8.latents[1]).max() > 0.1  # images differ: not a vacuous comparison


def test_batch_of_three_pads_and_index_independence(model, on8):
    pipe, _ = model
    three = pipe(**dict(REQUEST, num_images_per_prompt=3))
    assert three.images.shape[0] == 3
    np.testing.assert_array_equal(three.latents, on8.latents[:3])
    np.testing.assert_array_equal(three.images, on8.images[:3])
    # Image 2 of the batch == the same request made for sample index 2 alone.
    alone = pipe(**dict(REQUEST, num_images_per_prompt=1), indices=[2])
    np.testing.assert_array_equal(alone.indices, [2])
    np.testing.assert_array_equal(alone.latents[0], on8.latents[2])
    np.testing.assert_array_equal(alone.images[0], on8.images[2])


def test_generate_batches_and_local_gather(model, on8):
    pipe, _ = model
    kw = {k: v for k, v in REQUEST.items() if k not in ("prompt", "negative_prompt")}
    batches = list(pipe.generate_batches(REQUEST["prompt"], negative_prompt=REQUEST["negative_prompt"],
                                         batch_size=3, **kw))
    assert [list(b.indices) for b in batches] == [[0, 1, 2], [3]]
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), on8.images)
    local = pipe(**REQUEST, gather="local")  # one process holds every row
    np.testing.assert_array_equal(local.indices, [0, 1, 2, 3])
    np.testing.assert_array_equal(local.images, on8.images)


def test_two_processes_generate_one_batch(model, tmp_path):
    """Two processes x 2 CPU devices generate 3 images (padded to 4) together: both processes gather the
    same batch, bit for bit, and it is the batch one process on 4 devices makes.

    Against the one-process run, to float32 rounding, not bit for bit: XLA:CPU sizes its thread pool
    max(cores, devices) per process (8 here, 2 in each worker), and Eigen's dot kernels (jaxdiff's CPU
    default, jaxdiff/xla_flags.py) split their sums by pool size: measured max |diff| 3.1e-5 on latents of
    magnitude ~4, images equal. Within one process the result does not depend on the mesh (the tests above).
    """
    pipe, folder = model
    single = pipe(**generation_worker.REQUEST, mesh=sharding.make_mesh(jax.devices()[:4]))
    run_two_processes(REPO / "tests" / "generation_worker.py", [str(folder), str(tmp_path)], timeout=400)
    results = [np.load(tmp_path / f"proc{pid}.npz") for pid in range(2)]
    for r in results:
        assert (bool(r["multi"]), int(r["process_count"]), int(r["device_count"])) == (True, 2, 4)
        np.testing.assert_array_equal(r["images"], results[0]["images"])
        np.testing.assert_array_equal(r["latents"], results[0]["latents"])
        np.testing.assert_allclose(r["latents"], single.latents, rtol=0, atol=1e-4)
        # uint8: a pixel at a rounding boundary may land one level apart.
        assert np.abs(r["images"].astype(int) - single.images.astype(int)).max() <= 1
        np.testing.assert_array_equal(r["indices"], [0, 1, 2])
    assert not results[0]["host0_is_none"] and results[1]["host0_is_none"]
    np.testing.assert_array_equal(results[0]["host0"], results[0]["images"])
    # Process 0's devices hold rows 0-1, process 1's row 2 (row 3 was padding).
    np.testing.assert_array_equal(results[0]["local_indices"], [0, 1])
    np.testing.assert_array_equal(results[1]["local_indices"], [2])
    np.testing.assert_array_equal(np.concatenate([r["local_images"] for r in results]), single.images)
