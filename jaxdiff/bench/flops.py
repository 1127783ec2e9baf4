"""FLOPs and peaks: the published counts of shared/reference/numbers.md, XLA's cost analysis, and the
devices' dense bf16 peaks MFU is measured against (see the package docstring for which is used when)."""
from __future__ import annotations

import dataclasses

from jaxdiff.bench.programs import Case, component_program


# Dense bf16 TFLOP/s per device (shared/reference/numbers.md), matched against `device.device_kind` by
# substring, first match wins (so "H100" before "A100" does not matter, but "v5p" must precede "v5").
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v4", 275.0),
)


# Published FLOPs per sample per call (numbers.md: torch.utils.flop_counter on the diffusers modules)
# and the pixel count (latent for the UNet, image for the VAE) they were counted at.
REFERENCE_FLOPS = {
    ("sd15", "unet"): (0.677e12, 64 * 64),
    ("sd21", "unet"): (2.149e12, 96 * 96),
    ("sdxl", "unet"): (6.761e12, 128 * 128),
    ("sd15", "vae_decode"): (2.480e12, 512 * 512),
    ("sd21", "vae_decode"): (2.480e12, 512 * 512),
    ("sdxl", "vae_decode"): (10.470e12, 1024 * 1024),
    ("sd15", "text_encode"): (0.013e12, None),   # per prompt, size-independent
}


def peak_tflops(device) -> float | None:
    """Dense bf16 peak of one device, or None when unknown (CPUs, unlisted accelerators)."""
    if device.platform == "cpu":
        return None
    kind = str(device.device_kind)
    return next((peak for name, peak in PEAK_TFLOPS if name.lower() in kind.lower()), None)


def xla_flops(compiled_or_lowered, n_devices: int) -> float | None:
    """XLA's FLOP count of a program, summed over devices (SPMD programs report one device's share)."""
    try:
        cost = compiled_or_lowered.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) * n_devices if flops and flops > 0 else None


def pipeline_flops(pipe, case: Case, nfe: int) -> float | None:
    """NFE x UNet(rows) + VAE decode + text encode, each from XLA's cost of the lowered (not compiled)
    component: tracing only, seconds even at full size."""
    import jax
    rows = case.batch * (2 if case.guidance_scale > 1.0 else 1)
    total = 0.0
    for what, n, b in (("unet", nfe, rows), ("vae_decode", 1, case.batch), ("text_encode", 1, rows)):
        part = dataclasses.replace(case, what=what, batch=b)
        fn, params, inputs, _ = component_program(pipe, part, one_device_mesh(), 0)
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, inputs))
        flops = xla_flops(jax.jit(fn).lower(*abstract), 1)
        if flops is None:
            return None
        total += n * flops
    return total


def one_device_mesh():
    import jax
    from jaxdiff import sharding
    return sharding.make_mesh(jax.devices()[:1])


def reference_flops(model: str, case: Case, pipe) -> float | None:
    """numbers.md FLOPs per call for the stock presets, scaled by pixel count (see the module docstring)."""
    if case.what == "pipeline":
        unet, dec, text = (reference_flops(model, dataclasses.replace(case, what=w), pipe)
                           for w in ("unet", "vae_decode", "text_encode"))
        if None in (unet, dec):
            return None
        rows = 2 if case.guidance_scale > 1.0 else 1
        # NFE = steps for first-order samplers (euler, dpmpp_2m, ddim...); heun-like ones evaluate twice.
        return case.steps * rows * unet + dec + rows * (text or 0.0)
    ref = REFERENCE_FLOPS.get((model, case.what))
    if ref is None:
        return None
    flops, pixels = ref
    if pixels is not None:
        f = pipe.vae.config.downsample_factor if case.what == "unet" else 1
        flops *= (case.height // f) * (case.width // f) / pixels
    return flops * case.batch


def rate_flops(reference: float | None, xla: float | None) -> tuple[float | None, str | None]:
    """(FLOPs per call that TFLOP/s and MFU are computed from, "reference" / "xla" / None).

    The published count where there is one, XLA's otherwise: XLA's undercounts whatever runs in a loop
    (counted once: the CPU attention and feed-forward blocks) or in a custom call (cuDNN / splash
    attention count zero), so it stays a cross-check."""
    if reference is not None:
        return reference, "reference"
    return (xla, "xla") if xla is not None else (None, None)
