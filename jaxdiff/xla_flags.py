"""XLA flags jaxdiff adds to `XLA_FLAGS` before JAX starts its backends (done on `import jaxdiff`).

XLA reads `XLA_FLAGS` once, when the first backend is created, so these only take effect if jaxdiff is
imported before anything runs on a device; afterwards `apply_defaults` changes nothing.

CPU: XLA:CPU hands single convolutions and single dots to YNNPACK by default. On the 2-core x86 dev VM
(jax 0.10.2, float32, measured with benchmarks/cpu_kernels_jax.py and `jaxdiff bench --model sd15 --what
unet --batch 2`), Eigen's kernels are faster for SD's shapes: a 3x3 conv at 1280 channels, 16x16 latents,
takes 0.18 s through YNNPACK and 0.09-0.12 s without; the SD1.5 UNet at 512^2 batch 2 goes from 18.5 s to
12.3-14.0 s (two runs). The other YNN fusions (element-wise, reductions, dot fusions) stay on: turning every YNN fusion off
makes the chunked attention's exp / sum blocks 1.7x slower.

Nothing is added when:
  * the user's `XLA_FLAGS` already names the flag (theirs wins);
  * `JAXDIFF_XLA_DEFAULTS=0`;
  * the installed jaxlib is not one the flag was measured on (an unknown flag in `XLA_FLAGS` makes XLA
    abort at start-up, so a renamed flag in a later jaxlib must not reach it);
  * JAX's backends are already initialised (too late to matter).
"""
from __future__ import annotations

import os
from typing import MutableMapping

# flag name -> value. Item syntax: "-type" removes a fusion type from XLA's default list.
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution,-individual_dot"}
# jaxlib (major, minor) versions these flags exist in and were measured on.
TESTED_JAXLIB = ((0, 10),)
OPT_OUT = "JAXDIFF_XLA_DEFAULTS"


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        # jaxlib.version, not importlib.metadata (22 ms on every `import jaxdiff`): jax imports jaxlib anyway.
        from jaxlib.version import __version__
        major, minor = __version__.split(".")[:2]
        return int(major), int(minor)
    except Exception:  # not installed, or an odd version string: add nothing
        return None


def flags_to_add(environ: MutableMapping[str, str], jaxlib_version: tuple[int, int] | None) -> list[str]:
    """The `--name=value` items of CPU_FLAGS that `apply_defaults` would append to environ["XLA_FLAGS"]."""
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    if jaxlib_version not in TESTED_JAXLIB:
        return []
    current = environ.get("XLA_FLAGS", "")
    return [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in current]


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Appends jaxdiff's default XLA flags to environ["XLA_FLAGS"] (see the module docstring).

    Returns the flags it added ([] when it added none).
    """
    import sys
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge
            if xla_bridge.backends_are_initialized():
                return []
        except Exception:  # a JAX without this private helper: XLA_FLAGS may still be read later
            pass
    added = flags_to_add(environ, _jaxlib_version())
    if added:
        environ["XLA_FLAGS"] = " ".join([environ.get("XLA_FLAGS", "").strip(), *added]).strip()
    return added
