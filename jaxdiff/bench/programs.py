"""What a benchmark case runs: `Case`, and each component benchmark as one jitted program with its
host inputs (compare_torch.py feeds the same arrays to PyTorch)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np



WHATS = ("unet", "vae_decode", "vae_encode", "text_encode", "pipeline")


DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    """One measurement's settings."""
    what: str                      # one of WHATS
    batch: int                     # rows per call (pipeline: images per call)
    height: int                    # image pixels (latents are height / the VAE factor)
    width: int
    steps: int = 20                # pipeline only
    sampler: str = "euler"         # pipeline only
    guidance_scale: float = 7.5    # pipeline only (> 1: CFG, 2 UNet rows per image)


def component_inputs(pipe, case: Case, seed: int = 0) -> dict[str, Any]:
    """Host (numpy, float32 / int32, NHWC) inputs of a component benchmark; compare_torch.py feeds the
    same arrays to PyTorch."""
    from jaxdiff.models.unet import example_inputs
    rng = np.random.default_rng(seed)
    f = pipe.vae.config.downsample_factor
    h, w, b = case.height // f, case.width // f, case.batch
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    if case.what == "unet":
        x, _, ctx, added = example_inputs(pipe.unet.config, batch=b, height=h, width=w)
        return {"x": normal(*x.shape), "t": np.full((b,), 500.0, np.float32), "context": normal(*ctx.shape),
                "added": None if added is None else {k: normal(*v.shape) for k, v in added.items()}}
    if case.what == "vae_decode":
        return {"z": normal(b, h, w, pipe.vae.config.latent_channels)}
    if case.what == "vae_encode":
        return {"images": np.clip(normal(b, case.height, case.width, pipe.vae.config.in_channels), -1, 1)}
    if case.what == "text_encode":
        cfg = (pipe.text_encoder or pipe.text_encoder_2).config
        return {"ids": rng.integers(0, cfg.vocab_size, (b, cfg.max_position_embeddings)).astype(np.int32)}
    raise ValueError(f"not a component benchmark: {case.what!r}")


def component_program(pipe, case: Case, mesh, seed: int):
    """(fn, params, inputs, n_rows) of one component benchmark, inputs placed batch-sharded on `mesh`."""
    from jaxdiff import sharding
    inputs = component_inputs(pipe, case, seed)
    if case.what == "unet":
        module, params = pipe.unet.module, pipe.unet.params
        fn = lambda p, i: module.apply({"params": p}, i["x"], i["t"], i["context"], i["added"])
    elif case.what in ("vae_decode", "vae_encode"):
        module, params = pipe.vae.module, pipe.vae.params
        method = case.what.split("_")[1]
        key = "z" if method == "decode" else "images"
        fn = lambda p, i: module.apply({"params": p}, i[key], method=method)
    else:  # text_encode: every encoder of the model on the same ids
        encs = {n: c for n in ("text_encoder", "text_encoder_2") if (c := getattr(pipe, n)) is not None}
        params = {n: c.params for n, c in encs.items()}
        modules = {n: c.module for n, c in encs.items()}
        fn = lambda p, i: {n: m.apply({"params": p[n]}, i["ids"]) for n, m in modules.items()}
    placed = sharding.to_global(inputs, sharding.batch_sharding(mesh, 1))
    return fn, params, placed, case.batch


def place_params(params, mesh):
    from jaxdiff import sharding
    if mesh.shape[sharding.FSDP_AXIS] > 1:
        return sharding.shard_params(params, sharding.fsdp_param_shardings(params, mesh))
    return sharding.shard_params(params, sharding.replicated(mesh))
