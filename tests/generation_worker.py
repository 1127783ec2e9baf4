"""Worker process for the multi-host generation test (tests/test_generation_sharded.py).

Run once per process as `python tests/generation_worker.py MODEL_DIR OUT_DIR`, with
JAXDIFF_COORDINATOR / JAXDIFF_NUM_PROCESSES / JAXDIFF_PROCESS_ID, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=N set by the test. Every process makes the same
request (REQUEST); the batch is split over all processes' devices. Each writes OUT_DIR/proc{i}.npz with
the gathered images ("all"), process 0's copy ("host0") and its own rows ("local").
"""
import sys

import jax

from jaxdiff import sharding

REQUEST = dict(prompt="a red panda", negative_prompt="blurry", num_images_per_prompt=3, height=16, width=16,
               steps=3, sampler="euler_ancestral", schedule=None, guidance_scale=7.5, seed=11)


def main(model_dir: str, out_dir: str) -> None:
    multi = sharding.initialize_distributed()  # before any other JAX work
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    import jaxdiff
    pipe = jaxdiff.load(model_dir)
    full = pipe(**REQUEST)
    host0 = pipe(**REQUEST, gather="host0")
    local = pipe(**REQUEST, gather="local")
    np.savez(f"{out_dir}/proc{jax.process_index()}.npz", multi=multi, process_count=jax.process_count(),
             device_count=jax.device_count(), images=full.images, latents=full.latents, indices=full.indices,
             host0_is_none=host0.images is None, host0=full.images if host0.images is None else host0.images,
             local_images=local.images, local_indices=local.indices)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
