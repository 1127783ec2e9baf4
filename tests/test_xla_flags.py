"""jaxdiff's default XLA flags: added on import before JAX starts, never over the user's own."""
import os
import subprocess
import sys

from jaxdiff import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
TESTED = xla_flags.TESTED_JAXLIB[0]


def test_flags_added_unless_user_set_opted_out_or_untested_jaxlib():
    assert xla_flags.flags_to_add({}, TESTED) == [f"{FLAG}=-individual_convolution,-individual_dot"]
    assert xla_flags.flags_to_add({"XLA_FLAGS": f"{FLAG}=eltwise"}, TESTED) == []
    assert xla_flags.flags_to_add({"JAXDIFF_XLA_DEFAULTS": "0"}, TESTED) == []
    assert xla_flags.flags_to_add({}, (TESTED[0], TESTED[1] + 1)) == []   # a flag XLA may not know
    assert xla_flags.flags_to_add({}, None) == []


def _flags_after_import(env: dict) -> tuple[bool, str]:
    # Compiles one SD-sized conv and reports whether XLA handed it to YNNPACK (a kCustom "ynn_fusion").
    code = ("import os, jaxdiff, jax, jax.numpy as jnp\n"
            "x, w = jnp.ones((2, 16, 16, 320)), jnp.ones((3, 3, 320, 320))\n"
            "conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
            "dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
            "print('ynn' in jax.jit(conv).lower(x, w).compile().as_text())\n"
            "print(os.environ.get('XLA_FLAGS', ''))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ynn_conv, flags = (out.stdout.strip().splitlines() + [""])[:2]
    return ynn_conv == "True", flags


def test_import_appends_to_xla_flags_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXDIFF_XLA_DEFAULTS")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    expected = xla_flags.flags_to_add({}, xla_flags._jaxlib_version())
    ynn_conv, flags = _flags_after_import(env)
    assert flags.split() == ["--xla_force_host_platform_device_count=2", *expected]
    env["JAXDIFF_XLA_DEFAULTS"] = "0"
    ynn_conv_default, flags = _flags_after_import(env)
    assert flags == "--xla_force_host_platform_device_count=2"
    if expected:   # the flag reached XLA: the conv left YNNPACK for Eigen
        assert ynn_conv_default and not ynn_conv
