"""`jaxdiff generate` / `convert` as a user runs them: `python -m jaxdiff ...` in a subprocess on a tiny
random SD1 folder. PNGs carry A1111's parameters chunk, errors are one line with exit 2, Ctrl-C leaves
no partial file, outputs are never overwritten. Argument errors that need no model run in-process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from jaxdiff import cli, images
from jaxdiff.samplers import resolve, sampler_names

ROOT = Path(__file__).resolve().parents[1]


# Ctrl-C as from a terminal. A shell starts background jobs with SIGINT ignored, and an ignored signal stays
# ignored across exec; Python then installs no KeyboardInterrupt handler. So a test suite launched with `&`
# (nohup, some CI runners) would see the CLI ignore SIGINT, which is right for a background job; these
# tests give the CLI processes (and, for the in-process test, pytest itself) a terminal's handling.
def _terminal_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint_handler():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def run_cli(*argv, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxdiff", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc_or_pair, *fragments):
    rc, err = proc_or_pair if isinstance(proc_or_pair, tuple) else (proc_or_pair.returncode, proc_or_pair.stderr)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("jaxdiff: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def main_in_process(capsys, *argv):
    """cli.main in this process (no model load happens on these paths); returns (exit code, stderr)."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    return rc, capsys.readouterr().err


# -- images.py ------------------------------------------------------------------------------------------

def test_parameters_text_is_a1111_format():
    text = images.parameters_text("a red panda", "blurry", steps=25, sampler="dpmpp_2m", schedule="karras",
                                  guidance_scale=7.5, seed=1234, width=512, height=768, model="sd15",
                                  extra={"Denoising strength": 0.75, "Clip skip": None})
    assert text == ("a red panda\nNegative prompt: blurry\nSteps: 25, Sampler: DPM++ 2M, Schedule type: Karras, "
                    "CFG scale: 7.5, Seed: 1234, Size: 512x768, Model: sd15, Denoising strength: 0.75")
    # No negative prompt: A1111 leaves the line out; values holding separators are quoted.
    text = images.parameters_text("p", "", steps=2, sampler="euler_ancestral", schedule=None, guidance_scale=5,
                                  seed=0, width=8, height=8, model="a, b")
    assert text == ('p\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 0, Size: 8x8, '
                    'Model: "a, b"')


def test_every_sampler_and_schedule_display_name_resolves_back():
    assert set(images.SAMPLER_DISPLAY) == set(sampler_names())
    for name, display in images.SAMPLER_DISPLAY.items():
        assert resolve(display)[0] == name, display
    for schedule, display in images.SCHEDULE_DISPLAY.items():
        assert resolve("euler", display)[1] == schedule, display


def test_write_png_atomic_numbering_and_chunk(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    (tmp_path / "00041-7.png").write_bytes(b"someone else's file")
    a = images.write_png(tmp_path, img, "p\nSteps: 1", seed=7)
    b = images.write_png(tmp_path, img, "q\nSteps: 1", seed=7, index=41)  # taken index is skipped
    assert (a.name, b.name) == ("00042-7.png", "00043-7.png")
    assert (tmp_path / "00041-7.png").read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00041-7.png", "00042-7.png", "00043-7.png"]
    with Image.open(a) as im:
        np.testing.assert_array_equal(np.asarray(im), img)
        assert im.text["parameters"] == "p\nSteps: 1"
    # Non-latin-1 prompts go to an iTXt chunk and read back the same.
    c = images.write_png(tmp_path, img, "パンダ\nSteps: 1", seed=7)
    assert images.read_parameters(c) == "パンダ\nSteps: 1"


def test_read_image_and_mask(tmp_path):
    rgba = np.zeros((20, 12, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    Image.fromarray(rgba, "RGBA").save(tmp_path / "i.png")
    img = images.read_image(tmp_path / "i.png")
    assert img.shape == (20, 12, 3) and img.dtype == np.uint8 and img[0, 0].tolist() == [200, 0, 0]
    assert images.read_image(tmp_path / "i.png", (16, 8)).shape == (16, 8, 3)
    mask = np.zeros((20, 12), np.uint8)
    mask[:, 6:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    m = images.read_mask(tmp_path / "m.png", (20, 12))
    assert m.dtype == np.float32 and m[:, :6].max() == 0.0 and m[:, 6:].min() == 1.0
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(images.ImageError, match="bad.png: cannot read the init image"):
        images.read_image(tmp_path / "bad.png")


# -- errors that need no model ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragments", [
    (["generate", "p", "--height", "30"], ["--height", "multiple of 8", "try 24"]),
    (["generate", "p", "--steps", "0"], ["--steps", ">= 1"]),
    (["generate", "p", "--strength", "1.5"], ["--strength", "(0, 1]"]),
    (["generate", "p", "--strength", "0"], ["--strength", "(0, 1]"]),
    (["generate", "p", "--seed", "x"], ["--seed", "integer"]),
    (["generate", "p", "--dtype", "int8"], ["--dtype", "invalid choice"]),
    (["generate", "p", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["frobnicate"], ["invalid choice"]),
    (["generate", "--model", "{tmp}"], ["no prompt"]),
    (["generate", "p", "--model", "{tmp}/nope"], ["nope: model not found"]),
    (["generate", "p", "--model", "{tmp}", "--prompts-file", "{tmp}/none.txt"], ["prompts file not found"]),
    (["generate", "p", "--model", "{tmp}", "--init-image", "{tmp}/none.png"], ["--init-image file not found"]),
    (["generate", "p", "--model", "{tmp}", "--init-image", "{tmp}", "--mask", "{tmp}/m.png"],
     ["--init-image file not found"]),
    (["generate", "p", "--model", "{tmp}", "--mask", "{tmp}/m.png"], ["--mask needs --init-image"]),
    (["generate", "p", "--model", "{tmp}", "--height", "32"], ["both --height and --width"]),
    (["generate", "p", "--model", "{tmp}", "--sampler", "nonsense"], ["unknown sampler", "dpmpp_2m", "euler"]),
    (["generate", "p", "--model", "{tmp}", "--schedule", "wobbly"], ["unknown schedule", "karras"]),
    (["generate", "p", "--model", "{tmp}", "--sampler", "DPM++ 2M Karras", "--schedule", "exponential"],
     ["implies schedule"]),
    (["convert", "{tmp}/nope", "{tmp}/out"], ["nope: model not found"]),
    (["convert", "{tmp}", "{tmp}/out"], ["not a model folder"]),
])
def test_bad_command_lines_give_one_line_and_exit_2(tmp_path, capsys, argv, fragments):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert_one_line_error(main_in_process(capsys, *argv), *fragments)


def test_install_without_the_demo_model_asks_for_model(tmp_path, capsys, monkeypatch):
    """An install whose package lacks the bundled weights (e.g. stripped package data) says what to do."""
    monkeypatch.setattr(cli, "DEMO_MODEL", tmp_path / "missing")
    assert_one_line_error(main_in_process(capsys, "generate", "p"), "no bundled demo model", "pass --model")


class _FakePipeline:
    """Records what the CLI asks of the library; returns gray images of the requested size."""

    def __init__(self):
        self.kwargs = None
        self.text_encoder, self.text_encoder_2 = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2)), None
        self.family = SimpleNamespace(text_time=False)

    def generate_batches(self, prompt, **kwargs):
        from jaxdiff.pipeline import GenerationOutput
        self.prompt, self.kwargs = prompt, kwargs
        n = len(prompt) * kwargs["num_images_per_prompt"]
        h, w = kwargs["image"].shape[:2] if kwargs["image"] is not None else (kwargs["height"], kwargs["width"])
        for start in range(0, n, kwargs["batch_size"]):
            idx = np.arange(start, min(n, start + kwargs["batch_size"]))
            yield GenerationOutput(images=np.full((len(idx), h, w, 3), 128, np.uint8), latents=None, indices=idx)


def test_inpaint_flags_reach_the_library(tmp_path, capsys, monkeypatch):
    """The wiring of img2img / inpainting flags, with the pipeline replaced (no compile): the init image is
    resized to --height/--width, the mask is read as [H, W] in [0, 1], strength defaults to the library's
    1.0 for inpainting, A1111's clip skip 2 is diffusers' 1, and the PNG says so."""
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((50, 70), np.uint8)
    mask[:, 35:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "model").mkdir()
    fake = _FakePipeline()
    monkeypatch.setattr(cli, "_load", lambda path, dtype: fake)
    rc, err = main_in_process(capsys, "generate", "a door", "--model", tmp_path / "model",
                              "--out", tmp_path / "out", "--init-image", tmp_path / "init.png",
                              "--mask", tmp_path / "mask.png", "--height", 24, "--width", 40, "--clip-skip", 2,
                              "--sampler", "DPM++ 2M SDE", "--schedule", "exponential", "--no-compile-cache",
                              "--quiet", "--images-per-prompt", 3,
                              "--batch", 2, "--gather", "local", "--dtype", "bfloat16")
    assert rc == 0, err
    kw = fake.kwargs
    assert fake.prompt == ["a door"] and kw["num_images_per_prompt"] == 3 and kw["batch_size"] == 2
    assert kw["image"].shape == (24, 40, 3) and kw["image"].dtype == np.uint8 and kw["height"] is None
    assert kw["mask"].shape == (24, 40) and kw["mask"][:, :18].max() == 0 and kw["mask"][:, 22:].min() == 1
    assert (kw["strength"], kw["clip_skip"], kw["negative_prompt"], kw["gather"]) == (1.0, 1, None, "local")
    assert (kw["sampler"], kw["schedule"]) == ("dpmpp_2m_sde", "exponential")
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["00000-0.png", "00001-0.png", "00002-0.png"]
    assert images.read_parameters(files[2]) == (
        "a door\nSteps: 25, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 7.5, Seed: 0, "
        "Size: 40x24, Model: model, Denoising strength: 1.0, Clip skip: 2, Mask blur: 4, Seed index: 2")


def test_clip_skip_beyond_the_encoder_names_the_flag(tmp_path, capsys, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(cli, "_load", lambda path, dtype: _FakePipeline())
    assert_one_line_error(main_in_process(capsys, "generate", "p", "--model", tmp_path / "model", "--clip-skip", 3,
                                          "--no-compile-cache", "--out", tmp_path / "out"),
                          "--clip-skip 3 is too deep", "2-layer")
    assert not (tmp_path / "out").exists()


# -- end to end on a tiny model ----------------------------------------------------------------------------
# Every run uses 32x32 images, 2 steps and batches of 2, so they share one compiled program through the
# compilation cache that the first run fills (the runs are subprocesses).

GEN = ["--height", 32, "--width", 32, "--steps", 2, "--batch", 2, "--sampler", "Euler a", "--seed", 7,
       "--negative", "blurry", "--guidance", 5, "--quiet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pipeline):
    """(model folder, subprocess env): the session's tiny SD1, one CPU device, a shared cache."""
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXDIFF_CACHE=str(root / "xla"))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    return tiny_pipeline("sd1")[2], env


@pytest.fixture(scope="module")
def first_run(tiny, tmp_path_factory):
    """Two prompts (one from the command line, one from a file), two images each, in two batches."""
    model, env = tiny
    out = tmp_path_factory.mktemp("out")
    prompts = out.parent / "prompts.txt"
    prompts.write_text("\n  \na cat, sitting\n")  # blank lines are skipped
    proc = run_cli("generate", "a red panda", "--prompts-file", prompts, "--model", model, "--out", out,
                   "--images-per-prompt", 2, *GEN, env=env)
    assert proc.returncode == 0, proc.stderr
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


def test_generate_writes_pngs_with_a1111_parameters(first_run):
    out, files = first_run
    assert sorted(files) == ["00000-7.png", "00001-7.png", "00002-7.png", "00003-7.png"]
    pixels = []
    for i, name in enumerate(sorted(files)):
        with Image.open(out / name) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
            pixels.append(np.asarray(im))
            prompt = "a red panda" if i < 2 else "a cat, sitting"
            assert im.text["parameters"] == (
                f"{prompt}\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, "
                f"CFG scale: 5, Seed: 7, Size: 32x32, Model: sd1, Seed index: {i}")
    # Each image has its own noise stream (seed 7, index i): no two are the same.
    assert all(not np.array_equal(pixels[i], pixels[j]) for i in range(4) for j in range(i))


def test_rerun_never_overwrites_and_ctrl_c_leaves_only_whole_files(first_run, tiny):
    """A second run into the same folder continues the numbering, the first run's files untouched; Ctrl-C
    mid-run exits 130 with one line and leaves only whole PNGs. Image i of a request depends on (seed, i)
    alone: this run's first two images (one prompt, 60 images, other batches) equal the first run's."""
    out, before = first_run
    model, env = tiny
    proc = subprocess.Popen([sys.executable, "-m", "jaxdiff", "generate", "a red panda", "--model", str(model),
                             "--out", str(out), "--images-per-prompt", "60", *map(str, GEN)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_terminal_sigint)
    deadline = time.monotonic() + 240
    while not (out / "00005-7.png").exists():  # first batch written: the run is mid-way
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no image within 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["jaxdiff: interrupted"]

    names = sorted(p.name for p in out.iterdir())
    assert all(n.endswith(".png") and not n.startswith(".") for n in names), names  # no temp files
    new = names[4:]
    assert names[:4] == sorted(before) and 2 <= len(new) < 60, names  # interrupted before the end
    assert new == [f"{4 + i:05d}-7.png" for i in range(len(new))]
    for name, data in before.items():
        assert (out / name).read_bytes() == data
    for name in new:  # every file present is a whole PNG with its parameters
        with Image.open(out / name) as im:
            im.load()
            assert "Seed index:" in im.text["parameters"]
    for old, new_ in (("00000-7.png", "00004-7.png"), ("00001-7.png", "00005-7.png")):
        with Image.open(out / old) as a, Image.open(out / new_) as b:  # same prompt, seed and index
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


COUNT_COMPILES = """
import json, sys
import jax.monitoring
from jax._src import dispatch
from jaxdiff import cli
counts = {"programs": 0, "cache_hits": 0}
def on_duration(event, duration, **kw):
    if event == dispatch.BACKEND_COMPILE_EVENT:  # every executable built: compiled or read from the cache
        counts["programs"] += 1
def on_event(event, **kw):
    if event == "/jax/compilation_cache/cache_hits":
        counts["cache_hits"] += 1
jax.monitoring.register_event_duration_secs_listener(on_duration)
jax.monitoring.register_event_listener(on_event)
rc = cli.main(sys.argv[1:])
print(json.dumps(counts))
sys.exit(rc)
"""


def test_second_run_with_progress_bar_compiles_nothing(tiny, tmp_path):
    """With the progress bar on (no --quiet) a second run gets every program from the persistent cache.
    A host callback inside a program (the bar's first design) keeps it out of JAX's cache, and the CLI
    then recompiled the whole generation program on every run."""
    model, env = tiny
    env = dict(env, JAXDIFF_CACHE=str(tmp_path / "xla"))   # a cache of this test's own
    argv = ["generate", "a red panda", "--model", str(model), "--out", str(tmp_path / "out"),
            *[str(a) for a in GEN if a != "--quiet"]]
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", COUNT_COMPILES, *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "step" in proc.stderr                                     # the bar was drawn
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["programs"] > 0 and first["cache_hits"] < first["programs"]
    assert second["programs"] > 0 and second["cache_hits"] == second["programs"], runs


def test_signals_wait_for_a_file_write_to_finish(python_sigint_handler):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with cli._deferred_signals():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler would have run by now without the deferral
            done.append(True)
    assert done == [True]


SLOW_FAKE = """
import os, signal, sys, time, numpy as np
from jaxdiff import cli
from jaxdiff.pipeline import GenerationOutput

class Slow:  # one quick batch, then a batch as long as a big XLA call, deaf to signals as C++ code is
    def generate_batches(self, prompt, **kw):
        yield GenerationOutput(images=np.zeros((1, 8, 8, 3), np.uint8), latents=None, indices=np.arange(1))
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        time.sleep(120)
        yield GenerationOutput(images=np.zeros((1, 8, 8, 3), np.uint8), latents=None, indices=np.arange(1, 2))

cli._load = lambda path, dtype: Slow()
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                              (signal.SIGINT, 130, "interrupted")])
def test_signal_during_a_long_batch_exits_at_once(tmp_path, sig, code, word):
    """SIGTERM / Ctrl-C while the main thread waits on a long batch: exits within seconds with one line,
    the finished image kept, nothing half-written (a stand-in pipeline sleeps like a long XLA call)."""
    (tmp_path / "model").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FAKE, "generate", "p", "--model", str(tmp_path / "model"),
                             "--out", str(tmp_path / "out"), "--images-per-prompt", "2", "--no-compile-cache",
                             "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), preexec_fn=_terminal_sigint)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "00000-0.png").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "the signal waited for the batch"
    assert proc.returncode == code and err.strip() == f"jaxdiff: {word}", err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000-0.png"]


def test_embedding_matches_the_library(tiny, tmp_path):
    """--embedding FILE, used in the prompt by its stem: the PNG equals the library's image for the same
    settings and records the embedding's "TI hashes" as A1111 does. (Weighted prompts are compared
    with diffusers in test_prompt_weighting.py: this tiny model's final LayerNorm has a zero bias, so
    A1111's mean-restoring rescale would divide by a mean of about 0 here.)"""
    import hashlib

    import jax
    from safetensors.numpy import save_file

    import jaxdiff
    from jaxdiff import sharding
    model, env = tiny
    file = tmp_path / "shiny.safetensors"
    save_file({"emb_params": np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)}, str(file))
    prompt = "a shiny red panda"
    out = tmp_path / "out"
    proc = run_cli("generate", prompt, "--model", model, "--out", out, "--embedding", file, *GEN, env=env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "00000-7.png") as im:  # image 0 of the 2 (--batch 2 = 2 images per prompt)
        got, text = np.asarray(im), im.text["parameters"]
    assert f"TI hashes: \"shiny: {hashlib.sha256(file.read_bytes()).hexdigest()[:12]}\"" in text
    assert text.startswith(prompt + "\n")
    pipe = jaxdiff.load(model)
    kw = dict(height=32, width=32, steps=2, sampler="euler_ancestral", schedule=None, guidance_scale=5.0,
              seed=7, mesh=sharding.make_mesh(jax.devices()[:1]))
    plain = pipe(prompt, "blurry", **kw).images[0]  # "shiny" as an ordinary word
    assert pipe.load_textual_inversion(file) == "shiny"
    want = pipe(prompt, "blurry", **kw).images[0]
    # Not bit-equal: the CLI runs XLA fully optimised on one device, this process with the suite's
    # reduced optimisation on 8 virtual devices (other float32 summation orders); same image to 1/255.
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1
    assert np.abs(plain.astype(np.int16) - want.astype(np.int16)).max() > 1  # the embedding did something


def test_lora_flag_and_prompt_tag(tiny, tmp_path):
    """--lora FILE:W and a <lora:NAME:W> prompt tag found in --lora-dir: the tag leaves the text the
    model sees, stays in the PNG's prompt (as A1111), and "Lora hashes" names both files; the image
    equals the library's with the same LoRAs."""
    import jax
    from safetensors.numpy import save_file

    import jaxdiff
    from jaxdiff import sharding
    from jaxdiff.adapters import tags
    model, env = tiny
    rng = np.random.default_rng(0)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    (tmp_path / "loras").mkdir()
    a = tmp_path / "a.safetensors"
    b = tmp_path / "loras" / "detail.safetensors"
    save_file({f"{q}.lora_A.weight": rng.standard_normal((2, 32)).astype(np.float32),
               f"{q}.lora_B.weight": rng.standard_normal((32, 2)).astype(np.float32)}, str(a))
    save_file({f"{k}.lora_A.weight": rng.standard_normal((2, 32)).astype(np.float32),
               f"{k}.lora_B.weight": rng.standard_normal((32, 2)).astype(np.float32)}, str(b))
    prompt = "a red panda <lora:detail:0.5>"
    out = tmp_path / "out"
    proc = run_cli("generate", prompt, "--model", model, "--out", out, "--lora", f"{a}:0.8",
                   "--lora-dir", tmp_path / "loras", *GEN, env=env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "00000-7.png") as im:
        got, text = np.asarray(im), im.text["parameters"]
    assert text.startswith(prompt + "\n")
    assert f'Lora hashes: "a: {tags.short_hash(a)}, detail: {tags.short_hash(b)}"' in text
    pipe = jaxdiff.load(model)
    kw = dict(height=32, width=32, steps=2, sampler="euler_ancestral", guidance_scale=5.0, seed=7,
              mesh=sharding.make_mesh(jax.devices()[:1]))
    plain = pipe("a red panda ", "blurry", **kw).images[0]
    pipe.load_lora_weights(a, scale=0.8)
    pipe.load_lora_weights(b, scale=0.5)
    want = pipe("a red panda ", "blurry", **kw).images[0]
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1  # float32 order, see above
    assert np.abs(plain.astype(np.int16) - want.astype(np.int16)).max() > 1
    bad = run_cli("generate", "x <lora:missing:1>", "--model", model, "--out", out, "--lora-dir",
                  tmp_path / "loras", *GEN, env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "missing" in bad.stderr
