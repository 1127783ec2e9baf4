"""Meshes, shardings, padding, host <-> global arrays and multi-host setup.

This is the only module that touches `jax.sharding`. Everything else stays mesh-free: models and
samplers are pure functions of arrays, and the pipeline / trainer wrap them in `jax.jit` with
inputs placed here. The rules:

* One mesh over every device of every host, axes ("data", "fsdp"). A batch is split over both axes
  (every device holds different rows); params are replicated, or split over "fsdp" for models too
  big to replicate (training). `jax.pmap` is never used.
* Randomness never depends on the layout: sample i draws from `fold_in(key, i)` (`jaxdiff.rng.per_sample_noise`),
  so the same request gives the same images on 1 or 64 devices, with any batch padding.
* A batch that does not divide the device count is padded by repeating its last row (real values,
  so no NaN paths) and trimmed after; padded rows carry a repeated real sample index and never
  touch real rows because every op in a sampling program is per-row.

Typical generation flow (every host runs the same code on the same full host arrays)::

    initialize_distributed()                  # before any other JAX call; no-op single-process
    mesh = make_mesh()
    (ids, idx), n = pad_batch((ids, np.arange(B, dtype=np.int32)), mesh.size)
    ids, idx = to_global((ids, idx), batch_sharding(mesh, 1))  # rank-1 spec: later axes whole
    params = shard_params(params, replicated(mesh))
    images = generate(params, ids, idx)       # jax.jit; per_sample_noise(key, idx, ...) inside
    rows, which = local_rows(images, n)       # each host writes its own images, or
    all_images = gather(images)[:n]           # everything on every host (host0_only=True: host 0)
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxdiff.errors import JaxdiffError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# A batch's leading axis is split over both mesh axes, so every device holds distinct rows even when
# params are fsdp-sharded (fsdp devices share params, not data: ZeRO-3 style).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

_ENV_COORDINATOR = "JAXDIFF_COORDINATOR"
_ENV_NUM_PROCESSES = "JAXDIFF_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAXDIFF_PROCESS_ID"

# ----------------------------------------------------------------------------------------- meshes


def make_mesh(devices=None, *, fsdp: int = 1) -> Mesh:
    """A ("data", "fsdp") mesh of shape [n // fsdp, fsdp] over `devices` (default: every device of
    every host).

    Axes are `AxisType.Auto`: shardings are annotations on jit inputs and outputs, and XLA places
    everything in between, so model code never names a mesh axis.

    Raises:
        JaxdiffError: fsdp is not a positive divisor of the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise JaxdiffError("make_mesh: no devices given")
    if not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
        raise JaxdiffError(
            f"fsdp={fsdp!r} must be a positive divisor of the device count {n}; "
            f"pick one of {[d for d in range(1, n + 1) if n % d == 0]}"
        )
    # jax.make_mesh orders devices by physical topology on TPU; on CPU and GPU it keeps process
    # order, so each process's devices hold one contiguous block of batch rows (what
    # `to_global_from_local` and per-host writing via `local_rows` assume).
    return jax.make_mesh(
        (n // fsdp, fsdp), (DATA_AXIS, FSDP_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto), devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (params, sampler tables, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis split over every device (("data", "fsdp") together); other axes whole.

    Args:
        ndim: rank of the arrays it will place, e.g. 4 for latents [B, h, w, C], 1 for indices [B].
            A spec shorter than an array's rank leaves the trailing axes whole, so
            `batch_sharding(mesh, 1)` also places any batch-leading array (jit `out_shardings`
            wants the exact rank only for readability).
    """
    if ndim < 1:
        raise JaxdiffError(f"batch_sharding needs an array with a batch axis, got ndim={ndim}")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def fsdp_param_shardings(params: Any, mesh: Mesh, *, min_size: int = 1 << 18) -> Any:
    """Per-leaf shardings: large params split over "fsdp", everything else replicated.

    A leaf with at least `min_size` elements is split along its largest dimension that the fsdp
    size divides (ties go to the later dimension: for conv kernels [kh, kw, in, out] and Dense
    kernels [in, out] that is the output features). Smaller leaves (biases, norms) and leaves with
    no divisible dimension are replicated: splitting them saves little memory and costs a gather.

    Args:
        params: pytree of arrays or `jax.ShapeDtypeStruct`s (shapes are all that is read).
        mesh: from `make_mesh`.
        min_size: element count below which a leaf stays replicated (default 256K elements, 1 MiB
            in float32).

    Returns:
        A pytree of `NamedSharding` with the structure of `params`.
    """
    size = mesh.shape[FSDP_AXIS]

    def rule(leaf):
        shape = tuple(np.shape(leaf))
        if size == 1 or math.prod(shape) < min_size:
            return replicated(mesh)
        dims = [d for d in range(len(shape)) if shape[d] % size == 0]
        if not dims:
            return replicated(mesh)
        best = max(dims, key=lambda d: (shape[d], d))
        spec = [None] * len(shape)
        spec[best] = FSDP_AXIS
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(rule, params)


def shard_params(params: Any, shardings: Any) -> Any:
    """Place a params pytree (numpy or jax arrays) on the mesh.

    Args:
        params: pytree of arrays; every process passes the same values.
        shardings: one `NamedSharding` for every leaf (e.g. `replicated(mesh)`), or a pytree of them
            matching `params` (e.g. from `fsdp_param_shardings`).
    """
    return to_global(params, shardings)


# ---------------------------------------------------------------------------------------- padding


def pad_batch(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pad every leaf's leading axis up to a multiple of `multiple` by repeating its last row.

    Repeating a real row (rather than zeros) keeps padded rows on the same numeric path as real
    ones: no 0/0, no log(0), no NaN that a later reduction could pick up. Pass the sample indices
    through here too (e.g. `np.arange(B)`), so padded rows reuse the last real index.

    Returns:
        (padded tree, n_real): n_real is the original batch size, for `trim`.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise JaxdiffError("pad_batch: empty tree")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise JaxdiffError(f"pad_batch: leaves disagree on (or lack) a batch axis: {sorted(map(str, sizes))}")
    n = sizes.pop()
    if n == 0:
        raise JaxdiffError("pad_batch: empty batch")
    if multiple < 1:
        raise JaxdiffError(f"pad_batch: multiple must be >= 1, got {multiple}")
    extra = -n % multiple
    if extra == 0:
        return tree, n

    def pad(x):
        xp = np if isinstance(x, np.ndarray) else jnp
        return xp.concatenate([x, xp.repeat(x[-1:], extra, axis=0)], axis=0)

    return jax.tree.map(pad, tree), n


def trim(tree: Any, n: int) -> Any:
    """Drop padded rows: keep the first `n` rows of every leaf."""
    return jax.tree.map(lambda x: x[:n], tree)


# ---------------------------------------------------------------------- host data <-> global arrays


def _per_leaf(shardings: Any, tree: Any) -> Any:
    """Broadcast a single sharding to every leaf of `tree`, or check a matching tree of them."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, tree)
    return shardings


def to_global(tree: Any, shardings: Any) -> Any:
    """Host arrays -> global `jax.Array`s, when every process holds the same full host arrays.

    Works unchanged single- and multi-process: each process fills only its own devices' shards
    from its copy (`jax.make_array_from_callback`), so no cross-host transfer happens. Leaves that
    already are jax Arrays are resharded with `jax.device_put` when that needs no host data
    (single process, or an already-global array); otherwise they go through host memory.

    Args:
        tree: pytree of numpy arrays / scalars / jax Arrays.
        shardings: a `jax.sharding.Sharding` for every leaf, or a pytree of them matching `tree`.
    """
    single = jax.process_count() == 1

    def place(x, sharding):
        if isinstance(x, jax.Array) and (single or not x.is_fully_addressable):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    # The one place host data becomes device data on purpose: allowed even under a "disallow" transfer
    # guard (the test suite runs generation under one to catch implicit transfers elsewhere).
    with jax.transfer_guard_host_to_device("allow"):
        return jax.tree.map(place, tree, _per_leaf(shardings, tree))


def to_global_from_local(local_rows: Any, mesh: Mesh) -> Any:
    """Each process's own rows -> one global batch-sharded array (training data loaders).

    Process p passes only its rows (a disjoint shard of the data set); the global batch is the
    processes' rows stacked in process order, split over the mesh by `batch_sharding`.

    Args:
        local_rows: pytree of numpy arrays [B_local, ...]; B_local must be the same on every
            process and divisible by the local device count.
    """
    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(place, local_rows)


# ---------------------------------------------------------------------------------------- outputs


def gather(tree: Any, *, host0_only: bool = False) -> Any:
    """Global arrays -> full numpy arrays on the host.

    Every process must call this (it is a collective when the array spans hosts).

    Args:
        tree: a jax Array or a pytree of them.
        host0_only: return the arrays on process 0 only; other processes get None (they still take
            part in the gather).

    Returns:
        np.ndarray (or the pytree of them), or None on processes other than 0 when host0_only.
    """
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    out = jax.tree.map(one, tree)
    if host0_only and jax.process_index() != 0:
        return None
    return out


def local_rows(x: jax.Array, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a batch-sharded array that live on this process, for per-host writing.

    No cross-host traffic: reads only this process's shards. Rows held by several local devices
    (replication) are returned once.

    Args:
        x: [B, ...] global array whose non-leading axes are not split.
        n: the real batch size from `pad_batch`; rows at index >= n are dropped.

    Returns:
        (rows [k, ...], indices [k] int64): this process's rows sorted by their global row index,
        and those indices. Over all processes the indices cover range(n) exactly once.
    """
    total = x.shape[0]
    n = total if n is None else n
    pieces: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        start, stop, step = shard.index[0].indices(total)
        if step != 1 or any(s != slice(None) and s.indices(d) != (0, d, 1)
                            for s, d in zip(shard.index[1:], x.shape[1:])):
            raise JaxdiffError(f"local_rows needs an array split on its leading axis only, got {x.sharding}")
        if start not in pieces:
            pieces[start] = np.asarray(shard.data)
    rows = [pieces[s] for s in sorted(pieces)]
    indices = np.concatenate([np.arange(s, s + len(pieces[s])) for s in sorted(pieces)])
    keep = indices < n
    return np.concatenate(rows, axis=0)[keep], indices[keep]


# ------------------------------------------------------------------------------------- multi-host


def initialize_distributed() -> bool:
    """Set up `jax.distributed` from the environment; call before any other JAX work.

    Sources, in order:
      1. JAXDIFF_COORDINATOR (host:port of process 0), JAXDIFF_NUM_PROCESSES, JAXDIFF_PROCESS_ID:
         all three or none. JAXDIFF_NUM_PROCESSES=1 means single process (no-op).
      2. JAX's own JAX_COORDINATOR_ADDRESS, or a multi-process cluster launcher JAX detects itself
         (Slurm with several tasks, Open MPI, multi-host Cloud TPU): `jax.distributed.initialize()`
         with no arguments.
      3. Nothing set: single process, nothing to do.

    Idempotent: a second call (or a call after the user's own `jax.distributed.initialize`) does
    nothing.

    Returns:
        True when running as one of several processes.

    Raises:
        JaxdiffError: the JAXDIFF_* variables are half set or malformed, or JAX's backend was
            already started (distributed setup must come first).
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    names = (_ENV_COORDINATOR, _ENV_NUM_PROCESSES, _ENV_PROCESS_ID)
    values = {k: os.environ.get(k, "").strip() for k in names}
    given = [k for k in names if values[k]]
    kwargs: dict[str, Any] = {}
    if given:
        if len(given) != len(names):
            missing = ", ".join(k for k in names if not values[k])
            raise JaxdiffError(f"multi-host setup needs {', '.join(names)} together; missing {missing}")
        try:
            num, pid = int(values[_ENV_NUM_PROCESSES]), int(values[_ENV_PROCESS_ID])
        except ValueError:
            raise JaxdiffError(
                f"{_ENV_NUM_PROCESSES}={values[_ENV_NUM_PROCESSES]!r} and "
                f"{_ENV_PROCESS_ID}={values[_ENV_PROCESS_ID]!r} must be integers") from None
        if not 0 <= pid < num:
            raise JaxdiffError(f"{_ENV_PROCESS_ID}={pid} must be in [0, {_ENV_NUM_PROCESSES}={num})")
        if num == 1:
            return False
        # Everything is given explicitly: skip JAX's cluster probes (the Cloud TPU one may query a
        # metadata server and wait for it).
        kwargs = dict(coordinator_address=values[_ENV_COORDINATOR], num_processes=num,
                      process_id=pid, cluster_detection_method="deactivate")
    elif not _cluster_env_present():
        return False
    # Cross-process collectives on CPU (process_allgather, a jit spanning hosts) need a CPU
    # collectives backend. JAX 0.10.2 defaults to gloo (checked: the two-process test passes
    # without touching it); older releases defaulted to none and failed at the first collective,
    # so set gloo only where nothing is set. The flag is read by the CPU backend alone, so this is
    # harmless on GPU/TPU hosts.
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:  # the backend already started (or JAX was initialized elsewhere)
        raise JaxdiffError(f"jax.distributed could not start ({_first_line(e)}); call "
                           "initialize_distributed() before any other JAX work") from None
    except ValueError as e:  # JAX's own env / cluster detection gave an incomplete setup
        raise JaxdiffError(f"jax.distributed could not start ({_first_line(e)}); set "
                           f"{', '.join(names)} or complete JAX's own variables") from None
    return jax.process_count() > 1


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _cluster_env_present() -> bool:
    """Whether the environment describes a multi-process job JAX can set itself up from."""
    env = os.environ

    def count(name: str) -> int:
        value = env.get(name, "").strip()
        return int(value) if value.isdigit() else 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if count("SLURM_NTASKS") > 1 and "SLURM_JOB_ID" in env:
        return True
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in hosts
