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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """The session's tiny pipelines, each built once, on first use, and shared by every test module:
    `tiny_pipeline("sd1")` -> (diffusers pipeline, jaxdiff pipeline, folder). Names are the builders
    of tests/tiny_pipelines.py (sd1, sd2, sdxl, sd1_inpaint, sdxl_refiner). Tests must not change the
    weights of either; diffusers' scheduler may be another test's, so set the one a test needs."""
    import jaxdiff
    from tests import tiny_pipelines

    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(name: str):
        if name not in built:
            ref = getattr(tiny_pipelines, name)(root / name)
            for tok in ("tokenizer", "tokenizer_2"):  # the test tokenizers carry no model_max_length
                if getattr(ref, tok, None) is not None:
                    getattr(ref, tok).model_max_length = 77
            ref.set_progress_bar_config(disable=True)
            built[name] = (ref, jaxdiff.load(root / name), root / name)
        return built[name]
    return get
