"""`jaxdiff bench` and benchmarks/compare_torch.py on the tiny preset: JSON fields, the numbers' internal
consistency, the persistent-cache compile, the PyTorch side on the same weights, and flag errors."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxdiff import bench, cli
from jaxdiff.models import presets
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
RECORD_FIELDS = ("what", "model", "batch", "height", "width", "dtype", "attention", "mesh", "devices",
                 "compile_s", "compile_cached_s", "steady_s", "steady_median_s", "times_s", "it_per_s",
                 "images_per_s", "images_per_s_per_device", "flops_per_call", "tflops", "mfu", "peak_memory",
                 "load_avg_1min")


def _compare_torch():
    return load_script("benchmarks/compare_torch.py")


def test_cli_pipeline_on_two_devices_writes_every_field(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", "tiny", "--what", "pipeline", "--batch", "2", "--steps", "2",
                   "--devices", "2", "--warmup", "0", "--repeats", "2", "--no-cached-compile", "--quiet",
                   "--json", str(out)])
    assert rc == 0
    assert "pipeline" in capsys.readouterr().out  # the table
    report = json.loads(out.read_text())
    assert report["device"]["platform"] == "cpu" and report["device"]["count"] == 2
    assert report["device"]["peak_tflops_bf16"] is None
    assert {"jax", "jaxlib", "flax", "numpy", "python"} <= set(report["versions"])
    assert "--xla_force_host_platform_device_count=8" in report["xla_flags"]   # conftest's, as XLA saw them
    (r,) = report["results"]
    assert set(RECORD_FIELDS) <= set(r)
    assert r["mesh"] == {"data": 2, "fsdp": 1} and r["nfe"] == 2 and len(r["times_s"]) == 2
    assert r["steady_s"] == min(r["times_s"]) > 0
    assert r["compile_s"] > 0 and r["compile_cached_s"] is None
    # it/s counts sampler steps, images/s whole images, per device over the 2 devices.
    assert r["it_per_s"] == pytest.approx(2 / r["steady_s"])
    assert r["images_per_s_per_device"] == pytest.approx(r["images_per_s"] / 2) == pytest.approx(1 / r["steady_s"])
    assert r["mfu"] is None  # no known peak for a CPU
    # Pipeline FLOPs from its parts exceed the whole program's count, where XLA counts the scan body once.
    assert r["flops_per_call"]["xla"] > r["flops_xla_program"] > 0
    assert r["tflops"] == pytest.approx(r["flops_per_call"]["xla"] / r["steady_s"] / 1e12)
    assert r["flops_per_call"]["rate_from"] == "xla"  # tiny has no published count
    assert r["peak_memory"]["bytes"] > 0 and "memory_analysis" in r["peak_memory"]["source"]


def test_second_compile_is_served_by_the_persistent_cache(tmp_path):
    case = bench.Case(what="text_encode", batch=8, height=32, width=32)
    report = bench.run("tiny", [case], warmup=0, repeats=1, compile_cache=str(tmp_path / "cache"))
    (r,) = report["results"]
    assert r["devices"] == 8 and r["images_per_s_per_device"] == pytest.approx(r["images_per_s"] / 8)
    assert r["compile_cold_hit"] is False and r["compile_cached_hit"] is True
    assert any((tmp_path / "cache").iterdir())
    assert r["flops_per_call"]["xla"] > 0 and r["flops_per_call"]["reference"] is None  # tiny: no published count


def test_compare_torch_on_tiny_reports_the_ratio(tmp_path):
    out = tmp_path / "compare.json"
    rc = _compare_torch().main(["--model", "tiny", "--what", "text_encode", "--batch", "1", "--devices", "1",
                                "--warmup", "0", "--repeats", "2", "--no-cached-compile", "--quiet",
                                "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"torch", "diffusers", "transformers"} <= set(report["versions"])
    (r,) = report["results"]
    assert r["what"] == "text_encode" and r["torch"]["steady_s"] > 0 and r["torch"]["attention"] == "sdpa"
    assert r["ratio"]["speedup"] == pytest.approx(r["torch"]["steady_s"] / r["steady_s"])
    assert len(r["torch"]["times_s"]) == len(r["times_s"]) == 2
    pairs = [t / j for t, j in zip(r["torch"]["times_s"], r["times_s"])]
    assert r["ratio"]["speedup_pairs"] == pytest.approx(pairs)
    assert r["ratio"]["speedup_pairs_median"] == pytest.approx(np.median(pairs))
    assert "companion_times_s" not in r


def test_timed_calls_alternate_with_the_companion():
    order = []
    times, other = bench.time_calls(lambda: order.append("jax"), 1, 3, lambda: order.append("torch"))
    assert order == ["jax", "torch"] * 4  # one warm-up pair, then three timed pairs
    assert len(times) == len(other) == 3
    times, other = bench.time_calls(lambda: order.append("alone"), 0, 2)
    assert len(times) == 2 and other is None


def test_compare_torch_runs_the_same_weights_on_both_sides():
    import torch
    ct = _compare_torch()
    nets = ct.torch_models("tiny", "float32")
    pipe = presets.build_pipeline("tiny", params=ct.convert_params(nets, presets.preset_configs("tiny")))
    case = bench.Case(what="text_encode", batch=2, height=32, width=32)
    inputs = bench.component_inputs(pipe, case)
    with torch.inference_mode():
        (ref,) = ct.torch_call(nets, case, inputs)()
    ref = ref.last_hidden_state.numpy()
    got = np.asarray(pipe.text_encoder(inputs["ids"]).last_hidden_state)
    assert got.shape == ref.shape == (2, 77, 32)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()  # the project's float32 parity tolerance


def test_reference_flops_scale_with_pixels_and_batch():
    pipe = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(downsample_factor=8)))
    unet = bench.Case(what="unet", batch=2, height=512, width=512)
    assert bench.reference_flops("sd15", unet, pipe) == pytest.approx(2 * 0.677e12)
    big = bench.Case(what="unet", batch=1, height=1024, width=1024)
    assert bench.reference_flops("sd15", big, pipe) == pytest.approx(4 * 0.677e12)
    full = bench.Case(what="pipeline", batch=1, height=512, width=512, steps=20, guidance_scale=7.5)
    assert bench.reference_flops("sd15", full, pipe) == pytest.approx(20 * 2 * 0.677e12 + 2.48e12 + 2 * 0.013e12)
    assert bench.reference_flops("tiny", unet, pipe) is None


def test_rates_use_the_published_flops_where_there_are_some():
    assert bench.rate_flops(1.35e12, 1.2e12) == (1.35e12, "reference")  # XLA: loop bodies counted once
    assert bench.rate_flops(None, 1.2e12) == (1.2e12, "xla")
    assert bench.rate_flops(None, None) == (None, None)


def test_peak_table_by_device_kind():
    dev = lambda platform, kind: SimpleNamespace(platform=platform, device_kind=kind)
    assert bench.peak_tflops(dev("gpu", "NVIDIA H100 80GB HBM3")) == 989.0
    assert bench.peak_tflops(dev("gpu", "NVIDIA A100-SXM4-40GB")) == 312.0
    assert bench.peak_tflops(dev("tpu", "TPU v5 lite")) == 197.0
    assert bench.peak_tflops(dev("tpu", "TPU v5p")) == 459.0
    assert bench.peak_tflops(dev("cpu", "cpu")) is None


@pytest.mark.parametrize("argv, says", [
    (["--batch", "0"], "--batch"),
    (["--what", "unet,warp"], "warp"),
    (["--size", "512x"], "--size"),
    (["--model", "no/such/folder"], "no/such/folder"),
    (["--attention", "no_such_kernel"], "no_such_kernel"),
])
def test_bad_flag_is_one_line_and_exit_2(argv, says, capsys):
    try:
        rc = cli.main(["bench", *argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxdiff: error:") and says in lines[0]


def test_bad_flag_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "jaxdiff", "bench", "--repeats", "0"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--repeats" in proc.stderr
