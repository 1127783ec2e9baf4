"""A toy sharded "generation", and the worker process for the multi-host test.

Imported by tests/test_sharding.py for `toy_params` / `toy_generate` / `sharded_generate`, and run
as a script by its multi-host test: `python tests/multihost_worker.py OUT_DIR BATCH`, once per
process, with JAXDIFF_COORDINATOR / JAXDIFF_NUM_PROCESSES / JAXDIFF_PROCESS_ID, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=N set by the test. Each process writes
OUT_DIR/proc{i}.npz with the gathered batch, the host-0-only gather, its own local rows, and a
batch assembled from per-process rows (`to_global_from_local`).

The toy mimics a sampler's structure: per-sample start noise from fold_in, a few nonlinear "steps"
with replicated (or fsdp-sharded) params, fresh per-sample noise each step, and a per-row reduction.
Nothing mixes rows, as in a real sampling program.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import rng, sharding

SHAPE = (4, 4, 8)  # per-sample (h, w, C)
STEPS = 3


def toy_params(channels: int = SHAPE[-1], hidden: int = 32) -> dict[str, np.ndarray]:
    """Deterministic float32 params: w [C, H], b [H], v [H, C]."""
    rng = np.random.default_rng(0)
    return {
        "w": (rng.standard_normal((channels, hidden)) / np.sqrt(channels)).astype(np.float32),
        "b": rng.standard_normal((hidden,)).astype(np.float32),
        "v": (rng.standard_normal((hidden, channels)) / np.sqrt(hidden)).astype(np.float32),
    }


def toy_generate(params: dict, indices: jax.Array, seed: int = 0) -> jax.Array:
    """indices [B] int32 -> "images" [B, h, w, C]; row b depends only on (seed, indices[b], params)."""
    key = jax.random.key(seed)
    x = rng.per_sample_noise(key, indices, SHAPE)  # [B, h, w, C]
    for step in range(STEPS):
        h = jnp.tanh(jnp.einsum("bhwc,cd->bhwd", x, params["w"]) + params["b"][None, None, None, :])
        x = x + 0.5 * jnp.einsum("bhwd,dc->bhwc", h, params["v"])
        # Step noise: a key per step, then the same per-sample fold_in rule.
        x = x + 0.1 * rng.per_sample_noise(jax.random.fold_in(key, 1000 + step), indices, SHAPE)
    # A per-row reduction, like a VAE's mid-block attention over the whole image.
    return x - jnp.mean(x, axis=(1, 2), keepdims=True)


def sharded_generate(mesh, params: dict, indices: np.ndarray, param_shardings=None):
    """Run `toy_generate` on `mesh` for host sample indices [B]; B need not divide the mesh.

    Returns:
        (out, n): the padded global output array [B_padded, h, w, C] and the real batch size.
    """
    (idx,), n = sharding.pad_batch((np.asarray(indices, np.int32),), mesh.size)
    idx = sharding.to_global(idx, sharding.batch_sharding(mesh, 1))
    params = sharding.shard_params(params, param_shardings or sharding.replicated(mesh))
    run = jax.jit(toy_generate, out_shardings=sharding.batch_sharding(mesh, 1 + len(SHAPE)))
    return run(params, idx), n


def main(out_dir: str, batch: int) -> None:
    multi = sharding.initialize_distributed()
    sharding.initialize_distributed()  # idempotent: a second call is a no-op
    mesh = sharding.make_mesh()
    out, n = sharded_generate(mesh, toy_params(), np.arange(batch))
    full = sharding.gather(out)
    host0 = sharding.gather(out, host0_only=True)
    rows, idx = sharding.local_rows(out, n)
    # Training-style input: each process holds only its own 4 rows of an [8, 3] batch.
    pid = jax.process_index()
    table = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    from_local = sharding.to_global_from_local(table[4 * pid:4 * pid + 4], mesh)
    np.savez(
        f"{out_dir}/proc{jax.process_index()}.npz",
        multi=multi, process_count=jax.process_count(), device_count=jax.device_count(),
        full=sharding.trim(full, n), host0=np.zeros(0) if host0 is None else sharding.trim(host0, n),
        host0_is_none=host0 is None, rows=rows, idx=idx,
        from_local=sharding.gather(from_local), from_local_idx=sharding.local_rows(from_local)[1],
    )


if __name__ == "__main__":
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    main(sys.argv[1], int(sys.argv[2]))
