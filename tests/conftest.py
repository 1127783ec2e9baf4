"""Test-wide JAX setup: 8 virtual CPU devices and strict promotion, set before jax is imported."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
# Parity tests compare float32 against PyTorch: keep matmuls in full float32 precision.
jax.config.update("jax_default_matmul_precision", "highest")
# XLA compiles of the tiny test models are most of the suite's time on a 2-core machine; with most
# optimisation passes off they compile several times faster and still run in milliseconds. Numerics stay
# within every stated tolerance (each parity test compares against PyTorch, not against an optimised
# jaxdiff); the benchmark and the CLI run the library's default, fully optimised configuration.
jax.config.update("jax_disable_most_optimizations", True)
