"""Training benchmark: compile time, steady step time, images/s (per device) and peak host memory of
jaxdiff's Trainer on a full-size UNet with random weights.

    python benchmarks/train_bench.py --preset sd15 --resolution 256 --batch 1 --remat full \\
        --cached-latents --steps 3 --out benchmarks/results/cpu-2core-train-sd15-256.json

What one step is (jaxdiff.training.trainer.Trainer.step, one optimizer update): the UNet forward and
backward on B rows, global-norm clipping, the optimizer update (AdamW or Adafactor, float32 master
weights and state) and the non-finite guard; no EMA. Only the UNet is trained. The text encoder is
frozen and its output cached, as `jaxdiff train --cache-latents` does: the batch carries a random
context [B, 77, D] (SDXL also pooled text_embeds and time ids). With --cached-latents the batch holds VAE
moments [B, h, w, 8] and z_0 is sampled inside the step; without it the frozen VAE encoder runs inside
the step on pixels [B, R, R, 3].

Method: the step is lowered and compiled ahead of time (`compile_s`, XLA's memory analysis of the
compiled program kept); `warmup` untimed steps, then `steps` timed ones, each ended by
`block_until_ready`. `steady_s` is the fastest timed step (min-of-N: on a shared machine the least
disturbed one), the median and every time are kept. images/s = B / steady_s; per device divides by
the mesh size. `peak_host_rss_bytes` is the process's peak resident set (getrusage), which on CPU
includes every device buffer. Weights are random (jaxdiff.models.presets.host_init): speed does not depend on them.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

PRESETS = ("tiny", "sd15", "sd21", "sdxl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="sd15")
    p.add_argument("--resolution", type=int, default=256, help="image side (latent side: / the VAE factor)")
    p.add_argument("--batch", type=int, default=1, help="global batch per step")
    p.add_argument("--remat", choices=("full", "dots", "blocks"), default=None)
    p.add_argument("--cached-latents", action="store_true", help="VAE moments in the batch, no VAE in the step")
    p.add_argument("--optimizer", choices=("adamw", "adafactor"), default="adamw")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    from jaxdiff.models.attention import IMPLEMENTATIONS
    p.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                   help="UNet attention kernel (jaxdiff.models.attention; default auto: per backend and shape)")
    p.add_argument("--devices", type=int, default=None, help="first N devices (default: all)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--machine", default=None, help="a name for the machine, stored in the report")
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)
    if args.resolution % 8 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--resolution must be a multiple of 8; --batch, --steps >= 1; --warmup >= 0")
    return args


def rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_info() -> dict:
    """CPU model, cores, memory and load: what a CPU number means depends on all of them."""
    info = {"node": platform.node(), "cpus": os.cpu_count(), "cpu_model": None, "mem_total_bytes": None,
            "mem_available_bytes_at_start": None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        info["mem_total_bytes"] = int(mem["MemTotal"].split()[0]) * 1024
        info["mem_available_bytes_at_start"] = int(mem["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return info


def build(args):
    """(trainer, host batch, info): random full-size weights, the Trainer on the chosen mesh."""
    import jax
    import jax.numpy as jnp

    from jaxdiff import components, schedules, sharding
    from jaxdiff.models import presets
    from jaxdiff.training.optim import OptimConfig
    from jaxdiff.training.trainer import Models, TrainConfig, Trainer

    cfgs = presets.preset_configs(args.preset)
    ucfg, vcfg = cfgs["unet"], cfgs["vae"]
    dtype = jnp.dtype(args.dtype)
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    mesh = sharding.make_mesh(devices)
    if args.batch % mesh.size:
        raise SystemExit(f"--batch {args.batch} must split over {mesh.size} devices")

    # Host numpy -> device one leaf at a time, so the 3.4 GB (SD1.5) host copy never coexists whole.
    def to_device(tree):
        return jax.tree.map(lambda a: jnp.asarray(a), tree)

    params = {"unet": to_device(presets.host_init(components.UNET.param_shapes(ucfg), seed=0))}
    vae = None
    if not args.cached_latents:
        vae = components.VAE_KIND.build(vcfg, dtype)
        params["vae"] = to_device(presets.host_init(components.VAE_KIND.param_shapes(vcfg), seed=1))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["unet"]))
    unet = components.UNET.build(ucfg, dtype)
    if args.attention != "auto":
        unet = unet.clone(attention_implementation=args.attention)
    models = Models(unet=unet, params=params,
                    scheduler=schedules.SchedulerConfig(), vae=vae, scaling_factor=float(vcfg.scaling_factor))
    cfg = TrainConfig(batch_size=args.batch, compute_dtype=args.dtype, remat=args.remat,
                      optim=OptimConfig(optimizer=args.optimizer, lr=1e-5))
    trainer = Trainer(models, cfg, mesh=mesh)

    rng = np.random.default_rng(0)
    b, r = args.batch, args.resolution
    h = r // vcfg.downsample_factor
    batch = {"context": rng.standard_normal((b, 77, ucfg.cross_attention_dim), dtype=np.float32)}
    if args.cached_latents:
        c = vcfg.latent_channels
        batch["moments"] = np.concatenate([rng.standard_normal((b, h, h, c), dtype=np.float32),
                                           np.full((b, h, h, c), -4.0, np.float32)], axis=-1)
    else:
        batch["pixels"] = rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32)
    if ucfg.takes_text_time:
        pooled = ucfg.projection_class_embeddings_input_dim - 6 * ucfg.addition_time_embed_dim
        batch["text_embeds"] = rng.standard_normal((b, pooled), dtype=np.float32)
        batch["time_ids"] = np.tile(np.array([[r, r, 0, 0, r, r]], np.float32), (b, 1))
    return trainer, batch, {"unet_params": n_params, "latent": h}


def measure(trainer, host_batch, *, warmup: int, steps: int) -> dict:
    """Compile the step ahead of time, then time `steps` steps after `warmup` untimed ones."""
    import jax

    state = trainer.init_state()
    # The trainer keeps the initial params only to describe shapes from here on: drop the arrays
    # (on CPU they are host memory beside the state's copy).
    trainer.models.params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainer.models.params)
    batch = trainer.put_batch(host_batch)
    rss_after_init = rss_bytes()
    t0 = time.perf_counter()
    # Trainer exposes no lower(): `_step` is its jitted step (what Trainer.step calls).
    compiled = trainer._step.lower(state, batch, trainer.frozen, trainer.tables).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    memory = None
    if mem is not None:
        memory = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                     "temp_size_in_bytes", "alias_size_in_bytes")
                  if hasattr(mem, k)}
    times, losses, skipped = [], [], 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, trainer.frozen, trainer.tables)
        jax.block_until_ready((state, metrics))   # the whole update, not just the loss
        dt = time.perf_counter() - t0
        m = jax.device_get(metrics)
        losses.append(float(m["loss"]))
        skipped += int(m["skipped"])
        if i >= warmup:
            times.append(dt)
    return {"compile_s": compile_s, "times_s": times, "steady_s": min(times),
            "steady_median_s": statistics.median(times), "losses": losses, "skipped_steps": skipped,
            "compiled_memory": memory, "rss_after_init_bytes": rss_after_init}


def run(args, argv: list[str]) -> dict:
    import jax

    from jaxdiff import bench

    host = host_info()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    trainer, batch, info = build(args)
    setup_s = time.perf_counter() - t0
    res = measure(trainer, batch, warmup=args.warmup, steps=args.steps)
    n_dev = trainer.mesh.size
    ips = args.batch / res["steady_s"]
    report = {
        **bench.environment(trainer.mesh),
        "machine": {"name": args.machine, **host},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/train_bench.py", *argv]),
        "config": {"preset": args.preset, "resolution": args.resolution,
                   "latent": info["latent"], "batch": args.batch, "remat": args.remat,
                   "cached_latents": args.cached_latents, "optimizer": args.optimizer,
                   "compute_dtype": args.dtype, "param_dtype": "float32", "devices": n_dev,
                   "attention": args.attention,
                   "unet_params": info["unet_params"], "trained": "unet", "ema": False,
                   "warmup": args.warmup, "steps": args.steps},
        "setup_s": setup_s,
        **res,
        "images_per_s": ips,
        "images_per_s_per_device": ips / n_dev,
        "peak_host_rss_bytes": rss_bytes(),
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
        "jax_backend": jax.default_backend(),
    }
    if args.out:
        bench.write_json(report, args.out)
    return report


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    r = run(args, argv)
    gib = 2 ** 30
    print(f"{args.preset} {args.resolution}px batch {args.batch} remat={args.remat} cached={args.cached_latents} "
          f"{args.optimizer}: compile {r['compile_s']:.1f}s, step {r['steady_s']:.2f}s "
          f"(median {r['steady_median_s']:.2f}s), {r['images_per_s']:.4g} img/s, "
          f"{r['images_per_s_per_device']:.4g} img/s/device, peak RSS {r['peak_host_rss_bytes'] / gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
