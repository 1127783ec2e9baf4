"""jaxdiff.sharding: sharded == one device, padding, fsdp params, host <-> global, multi-host.

The "generation" is the toy in tests/multihost_worker.py (per-sample fold_in noise, nonlinear steps,
replicated params). Every op in it is per-row, so a row's value depends only on its sample index.

Bit-exactness: the noise is bit-identical on any layout. The matmuls are not: XLA CPU picks a
different dot kernel for a [128, 8] @ [8, 32] than for a [16, 8] @ [8, 32] (rows per device), which
sums in another order, so 1 device vs 8 devices differ by a few float32 ulps (measured 7e-7 on
values of size ~3). Those comparisons use ATOL; comparisons with the same rows per device (batch
sizes 1/3/8 padded to 8 on 8 devices, or two processes x 2 devices vs one process x 4 devices) are
exact. A wrong sample index or key changes rows by O(1), far above ATOL.
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import rng, sharding
from jaxdiff.errors import JaxdiffError
from tests import multihost_worker as toy
from tests.two_processes import run_two_processes

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # float32 rounding between dot kernels (see the module docstring); outputs are O(1)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """Skip most XLA optimizations while this module compiles: the toy's threefry noise takes ~15 s
    to compile with them on a loaded 2-core machine and ~1.5 s without. The flag is global, so it
    is restored afterwards for the other test modules."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def _generate(devices, indices, fsdp=1, **kwargs):
    mesh = sharding.make_mesh(devices, fsdp=fsdp)
    out, n = toy.sharded_generate(mesh, toy.toy_params(), np.asarray(indices), **kwargs)
    return sharding.gather(sharding.trim(out, n))


@pytest.fixture(scope="module")
def reference():
    """The toy output for samples 0..7 on one device, [8, h, w, C]."""
    return _generate(jax.devices()[:1], np.arange(8))


@pytest.fixture(scope="module")
def reference8():
    """The same on all 8 devices (one row each)."""
    return _generate(None, np.arange(8))


def test_mesh_axes_and_bad_fsdp():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh(fsdp=2)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1}
    for bad in (3, 0, 16):
        with pytest.raises(JaxdiffError, match="fsdp"):
            sharding.make_mesh(fsdp=bad)


def test_eight_devices_equal_one(reference, reference8):
    mesh = sharding.make_mesh()
    out, n = toy.sharded_generate(mesh, toy.toy_params(), np.arange(8))
    assert n == 8 and len(out.sharding.device_set) == 8
    # Each device really holds one distinct row.
    assert {s.data.shape[0] for s in out.addressable_shards} == {1}
    np.testing.assert_array_equal(sharding.gather(out), reference8)
    np.testing.assert_allclose(reference8, reference, rtol=0, atol=ATOL)
    # Rows differ from each other: the comparison above is not vacuous.
    assert np.abs(reference[0] - reference[1]).max() > 0.5


def test_batch_of_three_on_eight_devices_pads_and_trims(reference, reference8):
    mesh = sharding.make_mesh()
    out, n = toy.sharded_generate(mesh, toy.toy_params(), np.arange(3))
    assert (n, out.shape[0]) == (3, 8)
    images = sharding.gather(sharding.trim(out, n))
    assert images.shape[0] == 3
    np.testing.assert_array_equal(images, reference8[:3])
    np.testing.assert_allclose(images, reference[:3], rtol=0, atol=ATOL)
    # Padded rows repeat the last real sample, so they are finite copies of it.
    np.testing.assert_array_equal(sharding.gather(out)[3:], np.repeat(reference8[2:3], 5, axis=0))


def test_sample_rows_independent_of_batch_size(reference8):
    for indices in ([5], [0, 1, 2], [7, 2, 4]):
        np.testing.assert_array_equal(_generate(None, indices), reference8[indices])


def test_per_sample_noise_is_fold_in_per_row():
    key = jax.random.key(3)
    idx = jnp.array([4, 0, 9], jnp.int32)
    noise = rng.per_sample_noise(key, idx, (2, 3))
    assert noise.shape == (3, 2, 3) and noise.dtype == jnp.float32
    for row, i in zip(noise, [4, 0, 9]):
        np.testing.assert_array_equal(row, jax.random.normal(jax.random.fold_in(key, i), (2, 3)))
    assert not np.allclose(noise[0], noise[1])


def test_fsdp_param_shardings_equal_replicated(reference):
    mesh = sharding.make_mesh(fsdp=2)  # (4, 2)
    params = toy.toy_params()  # w [8, 32], b [32], v [32, 8]
    shardings = sharding.fsdp_param_shardings(params, mesh, min_size=64)
    spec = {k: tuple(s.spec) for k, s in shardings.items()}
    # Largest divisible dimension, ties to the later one; b (32 elements) is below min_size.
    assert spec == {"w": (None, "fsdp"), "b": (), "v": ("fsdp", None)}
    placed = sharding.shard_params(params, shardings)
    assert placed["w"].addressable_shards[0].data.shape == (8, 16)
    out = _generate(None, np.arange(8), fsdp=2, param_shardings=shardings)
    # XLA may also split the 32-wide contraction over the two fsdp devices and add partial sums.
    np.testing.assert_allclose(out, reference, rtol=0, atol=ATOL)
    # Leaves with no dimension divisible by fsdp stay replicated; fsdp=1 replicates everything.
    odd = sharding.fsdp_param_shardings({"k": jax.ShapeDtypeStruct((3, 5, 7), jnp.float32)}, mesh, min_size=1)
    assert tuple(odd["k"].spec) == ()
    one = sharding.fsdp_param_shardings(params, sharding.make_mesh(), min_size=1)
    assert all(tuple(s.spec) == () for s in one.values())


def test_pad_batch_and_trim():
    tree = {"a": np.arange(6).reshape(3, 2), "b": jnp.array([1.0, 2.0, 3.0])}
    padded, n = sharding.pad_batch(tree, 4)
    assert n == 3
    np.testing.assert_array_equal(padded["a"], [[0, 1], [2, 3], [4, 5], [4, 5]])
    np.testing.assert_array_equal(padded["b"], [1.0, 2.0, 3.0, 3.0])
    assert isinstance(padded["a"], np.ndarray)
    same, n = sharding.pad_batch(tree, 3)
    assert same is tree and n == 3
    np.testing.assert_array_equal(sharding.trim(padded, n)["a"], tree["a"])
    with pytest.raises(JaxdiffError, match="disagree"):
        sharding.pad_batch({"a": np.zeros(2), "b": np.zeros(3)}, 4)
    with pytest.raises(JaxdiffError, match="empty"):
        sharding.pad_batch(np.zeros((0, 2)), 4)


def test_global_arrays_local_rows_and_gather():
    mesh = sharding.make_mesh(fsdp=2)
    host = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    x = sharding.to_global(host, sharding.batch_sharding(mesh, 2))
    assert x.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(sharding.gather(x), host)
    y = sharding.to_global_from_local(host, mesh)
    assert y.sharding == x.sharding
    np.testing.assert_array_equal(sharding.gather(y), host)
    rows, idx = sharding.local_rows(x, n=5)
    np.testing.assert_array_equal(idx, np.arange(5))
    np.testing.assert_array_equal(rows, host[:5])
    # Replicated arrays: each row once, not once per device.
    rows, idx = sharding.local_rows(sharding.to_global(host, sharding.replicated(mesh)))
    np.testing.assert_array_equal(rows, host)
    # Trees and host0_only (process 0 here, so it gets the arrays).
    out = sharding.gather({"x": x, "y": y}, host0_only=True)
    np.testing.assert_array_equal(out["y"], host)


def test_initialize_distributed_from_env(monkeypatch):
    for name in ("JAXDIFF_COORDINATOR", "JAXDIFF_NUM_PROCESSES", "JAXDIFF_PROCESS_ID",
                 "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False  # nothing set: single process
    monkeypatch.setenv("JAXDIFF_COORDINATOR", "localhost:1234")
    with pytest.raises(JaxdiffError, match="missing JAXDIFF_NUM_PROCESSES, JAXDIFF_PROCESS_ID"):
        sharding.initialize_distributed()
    monkeypatch.setenv("JAXDIFF_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXDIFF_PROCESS_ID", "2")
    with pytest.raises(JaxdiffError, match=r"must be in \[0"):
        sharding.initialize_distributed()
    monkeypatch.setenv("JAXDIFF_PROCESS_ID", "zero")
    with pytest.raises(JaxdiffError, match="integers"):
        sharding.initialize_distributed()
    monkeypatch.setenv("JAXDIFF_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAXDIFF_PROCESS_ID", "0")
    assert sharding.initialize_distributed() is False  # one process: nothing to set up
    # Fully set after the backend started: a clear error, not JAX's traceback.
    monkeypatch.setenv("JAXDIFF_NUM_PROCESSES", "2")
    with pytest.raises(JaxdiffError, match="before any other JAX work"):
        sharding.initialize_distributed()
    # JAX's own variable alone is detected (and refused here for the same reason).
    for name in ("JAXDIFF_COORDINATOR", "JAXDIFF_NUM_PROCESSES", "JAXDIFF_PROCESS_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(JaxdiffError, match="could not start"):
        sharding.initialize_distributed()


def test_two_processes_generate_one_batch(tmp_path, reference):
    """Two local processes x 2 CPU devices, joined by jax.distributed, generate a batch of 5 (padded
    to 8 over 4 devices); each gathers it and writes its own rows."""
    # One process on 4 devices has the same rows per device (2), so it must match bit for bit.
    single = _generate(jax.devices()[:4], np.arange(5))
    np.testing.assert_allclose(single, reference[:5], rtol=0, atol=ATOL)
    run_two_processes(REPO / "tests" / "multihost_worker.py", [str(tmp_path), "5"], timeout=90)  # ~25 s loaded

    results = [np.load(tmp_path / f"proc{pid}.npz") for pid in range(2)]
    for r in results:
        assert (bool(r["multi"]), int(r["process_count"]), int(r["device_count"])) == (True, 2, 4)
        np.testing.assert_array_equal(r["full"], single)
    np.testing.assert_array_equal(results[0]["host0"], single)
    assert not results[0]["host0_is_none"] and results[1]["host0_is_none"]
    # Each host holds its own devices' rows: 0-3 on process 0, 4 (5-7 were padding) on process 1.
    np.testing.assert_array_equal(results[0]["idx"], [0, 1, 2, 3])
    np.testing.assert_array_equal(results[1]["idx"], [4])
    rows = np.concatenate([results[0]["rows"], results[1]["rows"]])
    np.testing.assert_array_equal(rows, single)
    # Per-process rows stack in process order into one global batch.
    table = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    for pid, r in enumerate(results):
        np.testing.assert_array_equal(r["from_local"], table)
        np.testing.assert_array_equal(r["from_local_idx"], np.arange(4 * pid, 4 * pid + 4))
