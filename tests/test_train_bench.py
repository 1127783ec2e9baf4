"""benchmarks/train_bench.py on the tiny preset (cached latents, 2 devices): the report's fields and
their internal consistency. Compiled with `jax_disable_most_optimizations` (this module only): the
numbers are not the point here, the plumbing is."""
import json

import jax
import numpy as np
import pytest

from jaxdiff import components
from jaxdiff.models.configs import UNetConfig
from tests.scripts import load_script


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _train_bench():
    return load_script("benchmarks/train_bench.py")


def test_tiny_report(tmp_path, capsys):
    out = tmp_path / "train.json"
    bench = _train_bench()
    rc = bench.main(["--preset", "tiny", "--resolution", "32", "--batch", "4", "--devices", "2", "--cached-latents",
                     "--remat", "full", "--warmup", "1", "--steps", "2", "--machine", "test box", "--out", str(out)])
    assert rc == 0 and "img/s/device" in capsys.readouterr().out
    r = json.loads(out.read_text())
    c = r["config"]
    want_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(components.UNET.param_shapes(UNetConfig.tiny())))
    assert (c["preset"], c["batch"], c["devices"], c["remat"], c["cached_latents"]) == ("tiny", 4, 2, "full", True)
    assert c["latent"] == 16 and c["unet_params"] == want_params
    assert r["device"]["count"] == 2 and r["machine"]["name"] == "test box" and r["machine"]["cpus"] >= 1
    assert len(r["times_s"]) == 2 and r["steady_s"] == min(r["times_s"]) and r["compile_s"] > 0
    assert r["images_per_s"] == pytest.approx(4 / r["steady_s"])
    assert r["images_per_s_per_device"] == pytest.approx(r["images_per_s"] / 2)
    assert len(r["losses"]) == 3 and all(np.isfinite(r["losses"])) and r["skipped_steps"] == 0
    assert r["peak_host_rss_bytes"] >= r["rss_after_init_bytes"] > 0
    assert r["compiled_memory"]["argument_size_in_bytes"] > 4 * want_params  # params + Adam state at least
    assert r["command"].startswith("python benchmarks/train_bench.py --preset tiny --resolution 32")
