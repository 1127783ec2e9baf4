"""One guided model evaluation (a sampler step's network work) with and without a ControlNet.

    python benchmarks/controlnet_step.py --preset sd15 --size 512 --batch 1 --dtype bfloat16   # a GPU / TPU
    python benchmarks/controlnet_step.py --preset tiny --size 64                               # CPU smoke

The step is jaxdiff.conditioning's model function exactly as the generation program builds it:
cfg(concat(control(unet_fn))) over [2B] interleaved rows, or cfg(concat(unet_fn)) without ControlNet.
Random weights (presets.host_init; speed does not depend on them). Compile seconds are reported apart
from warm steady-state seconds (block_until_ready, median of --repeats). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import components
from jaxdiff.conditioning import Cond, ControlCond, bind, cfg, concat, control, pair, unet_fn
from jaxdiff.models.controlnet import ControlNetConfig
from jaxdiff.models.presets import host_init, preset_configs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=("tiny", "sd15", "sd21", "sdxl"))
    ap.add_argument("--size", type=int, default=None, help="image pixels per side (default: the preset's)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    ucfg = preset_configs(args.preset)["unet"]
    factor = 2 if args.preset == "tiny" else 8  # the preset's VAE factor
    ccfg = ControlNetConfig.from_unet(ucfg, conditioning_embedding_out_channels=(16, 32) if factor == 2
                                      else (16, 32, 96, 256))
    size = args.size or (ucfg.sample_size * factor)
    h = size // factor
    unet = components.UNET.build(ucfg, dtype)
    net = components.CONTROLNET.build(ccfg, dtype)
    cast = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)  # noqa: E731
    unet_params = cast(host_init(components.UNET.param_shapes(ucfg), 0, draw_dtype=np.float32))
    net_params = cast(host_init(components.CONTROLNET.param_shapes(ccfg), 1, draw_dtype=np.float32))

    b, rng = args.batch, np.random.default_rng(0)
    ctx_dim = ucfg.cross_attention_dims[0]
    context = pair(*(jnp.asarray(rng.standard_normal((b, 77, ctx_dim)), jnp.float32) for _ in range(2)))
    added = None
    if ucfg.takes_text_time:
        pooled = ucfg.projection_class_embeddings_input_dim - 6 * ucfg.addition_time_embed_dim
        added = {"text_embeds": jnp.zeros((2 * b, pooled)), "time_ids": jnp.zeros((2 * b, 6))}
    x = jnp.asarray(rng.standard_normal((b, h, h, ucfg.in_channels)), jnp.float32)
    image = jnp.asarray(rng.uniform(0, 1, (b, size, size, 3)), jnp.float32)
    guidance = jnp.array([7.5, 0.0], jnp.float32)
    t = jnp.float32(500.0)

    def plain(up, x, t):
        return bind(cfg(concat(unet_fn(unet, up)), guidance, rescale=False), Cond(context=context, added=added))(x, t)

    def with_control(up, cp, x, t):
        cc = ControlCond(images=(image,), scale=jnp.ones((b, 1), jnp.float32), keep=jnp.ones((1,), jnp.float32))
        fn = cfg(concat(control(unet_fn(unet, up), (net,), (cp,), guess_mode=False)), guidance, rescale=False)
        return bind(fn, Cond(context=context, added=added, control=cc))(x, t)

    def timed(fn, *a):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(*a).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(*a))
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*a))
            runs.append(time.perf_counter() - t0)
        return compile_s, statistics.median(runs)

    c_plain, s_plain = timed(plain, unet_params, x, t)
    c_ctrl, s_ctrl = timed(with_control, unet_params, net_params, x, t)
    print(json.dumps({
        "benchmark": "controlnet_step", "preset": args.preset, "size": size, "batch": args.batch,
        "rows": 2 * args.batch, "dtype": args.dtype, "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(), "jax": jax.__version__,
        "plain_step_s": round(s_plain, 5), "controlnet_step_s": round(s_ctrl, 5),
        "ratio": round(s_ctrl / s_plain, 3), "plain_compile_s": round(c_plain, 2),
        "controlnet_compile_s": round(c_ctrl, 2)}))


if __name__ == "__main__":
    main()
