"""Textual inversion: convert/embeddings.py reads each file format, and prompts.TextualInversions gives
the embeddings diffusers' `load_textual_inversion` gives (same tiny weights, `encode_prompt`), also
inside an A1111-weighted prompt; bad files fail with one line and change nothing."""
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import jaxdiff
from tests import tiny_pipelines
from tests.helpers import one_torch_thread  # noqa: F401 (fixture)
from convert.embeddings import ANY_ENCODER, EmbeddingFileError, read_embedding, read_embeddings_dir
from jaxdiff import prompts
from jaxdiff.errors import JaxdiffError

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (diffusers pipeline, jaxdiff pipeline); the diffusers ones get embeddings loaded.

    SD1's final LayerNorm bias is set to random values before jaxdiff loads the folder (the tiny
    model's zero bias makes the mean A1111 rescales by about 0)."""
    root = tmp_path_factory.mktemp("ti")
    out = {}
    for name, build in (("sd1", tiny_pipelines.sd1), ("sdxl", tiny_pipelines.sdxl)):
        ref = build(root / name)
        for tok in ("tokenizer", "tokenizer_2"):
            if getattr(ref, tok, None) is not None:
                getattr(ref, tok).model_max_length = 77
        if name == "sd1":
            encoder = ref.text_encoder
            norm = getattr(encoder, "text_model", encoder).final_layer_norm
            with torch.no_grad():
                norm.bias.copy_(torch.from_numpy(_vectors(1, norm.bias.shape[0], 7)[0]))
            encoder.save_pretrained(root / name / "text_encoder")
        out[name] = (ref, jaxdiff.load(root / name))
    return out


def _vectors(n, width, seed):
    return np.random.default_rng(seed).normal(0, 0.5, (n, width)).astype(np.float32)


def _encode(pipe, ti, prompt, **kw):
    toks = prompts.pipeline_tokenizers(pipe, ti)
    inputs = prompts.tokenize_prompts(toks, prompt, embeddings=ti, **kw)
    spec = prompts.encoder_spec(pipe)
    params = {n: getattr(pipe, n).params for n in spec.names}
    run = jax.jit(lambda p, i, w, e: prompts.encode(spec, p, i, None, w, e))
    return inputs, run(params, inputs.ids, inputs.weights, ti.tables())


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < RTOL, f"{what}: max error {err:.2e}"


# ---- readers ------------------------------------------------------------------------------------

def test_formats(tmp_path):
    vec = _vectors(3, 32, 0)
    save_file({"emb_params": vec}, str(tmp_path / "EasyNeg.safetensors"))
    emb = read_embedding(tmp_path / "EasyNeg.safetensors")
    assert emb.name == "EasyNeg" and emb.num_vectors == 3 and len(emb.shorthash) == 12
    np.testing.assert_array_equal(emb.vectors[ANY_ENCODER], vec)
    assert read_embedding(tmp_path / "EasyNeg.safetensors", token="neg").name == "neg"

    save_file({"<cat-toy>": vec[0]}, str(tmp_path / "learned_embeds.safetensors"))  # diffusers, 1-D
    emb = read_embedding(tmp_path / "learned_embeds.safetensors")
    assert emb.name == "<cat-toy>" and emb.vectors[ANY_ENCODER].shape == (1, 32)

    save_file({"clip_l": vec[:2], "clip_g": _vectors(2, 48, 1)}, str(tmp_path / "xl.safetensors"))
    emb = read_embedding(tmp_path / "xl.safetensors")
    assert emb.name == "xl" and set(emb.vectors) == {"clip_l", "clip_g"} and emb.num_vectors == 2

    (tmp_path / "style.bin").write_bytes((tmp_path / "EasyNeg.safetensors").read_bytes())  # safetensors in .bin
    assert read_embedding(tmp_path / "style.bin").name == "style"


def test_embeddings_dir(tmp_path):
    save_file({"emb_params": _vectors(2, 32, 0)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": _vectors(1, 32, 1)}, str(tmp_path / "sub" / "b.safetensors"))
    (tmp_path / "c.pt").write_bytes(b"\x80\x02}q\x00.")  # a pickle, but no torch checkpoint
    (tmp_path / "a.preview.png").write_bytes(b"png")
    # An A1111 .pt as torch.save writes it, read through the allow-list unpickler (no code runs).
    torch.save({"string_to_param": {"*": torch.from_numpy(_vectors(3, 32, 2))}, "name": "d",
                "step": 100, "sd_checkpoint": "abc"}, tmp_path / "d.pt")
    loaded, skipped = read_embeddings_dir(tmp_path)
    assert [e.name for e in loaded] == ["a", "d", "b"]
    np.testing.assert_array_equal(loaded[1].vectors["*"], _vectors(3, 32, 2))
    assert len(skipped) == 1 and skipped[0][0].endswith("c.pt") and "c.pt" in skipped[0][1]


def test_bad_files(tmp_path):
    save_file({"emb_params": _vectors(4, 32, 0)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(JaxdiffError, match="cut.safetensors.*truncated"):
        read_embedding(tmp_path / "cut.safetensors")
    (tmp_path / "old.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(JaxdiffError, match="old.pt") as e:
        read_embedding(tmp_path / "old.pt")
    assert "\n" not in str(e.value)
    save_file({"a": _vectors(1, 32, 0), "b": _vectors(1, 32, 0)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(EmbeddingFileError, match="two.safetensors.*not a textual-inversion"):
        read_embedding(tmp_path / "two.safetensors")
    save_file({"emb_params": np.zeros((2, 3, 4), np.float32)}, str(tmp_path / "cube.safetensors"))
    with pytest.raises(EmbeddingFileError, match="vectors, width"):
        read_embedding(tmp_path / "cube.safetensors")
    with pytest.raises(EmbeddingFileError, match="no such file"):
        read_embedding(tmp_path / "missing.safetensors")


def test_width_and_encoder_mismatch(models, tmp_path):
    _, sd1 = models["sd1"]
    _, sdxl = models["sdxl"]
    save_file({"emb_params": _vectors(2, 64, 0)}, str(tmp_path / "wide.safetensors"))
    ti = prompts.TextualInversions.for_pipeline(sd1)
    with pytest.raises(JaxdiffError, match="wide.safetensors.*64 wide but text_encoder is 32"):
        ti.add(read_embedding(tmp_path / "wide.safetensors"))
    assert not ti.terms   # unchanged
    save_file({"emb_params": _vectors(2, 32, 0)}, str(tmp_path / "sd1only.safetensors"))
    with pytest.raises(JaxdiffError, match="clip_l and clip_g"):
        prompts.TextualInversions.for_pipeline(sdxl).add(read_embedding(tmp_path / "sd1only.safetensors"))
    with pytest.raises(JaxdiffError, match="already a token"):
        prompts.pipeline_tokenizers(sd1, ti.add(read_embedding(tmp_path / "sd1only.safetensors", token="cat")))


# ---- parity with diffusers' load_textual_inversion ----------------------------------------------

def test_sd1_matches_diffusers(models, tmp_path):
    ref, pipe = models["sd1"]
    single, multi = _vectors(1, 32, 2), _vectors(3, 32, 3)
    save_file({"<toy>": single[0]}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"emb_params": multi}, str(tmp_path / "badhands.safetensors"))
    ref.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"))
    ref.load_textual_inversion(str(tmp_path / "badhands.safetensors"), token="badhands")
    ti = prompts.TextualInversions.for_pipeline(pipe)
    ti = ti.add(read_embedding(tmp_path / "learned_embeds.safetensors"))
    ti = ti.add(read_embedding(tmp_path / "badhands.safetensors"))
    text = "a <toy> on a table, badhands, photo"
    with torch.no_grad():
        want, _ = ref.encode_prompt(text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    inputs, (context, _) = _encode(pipe, ti, text, prompt_weighting="none")
    ref_ids = ref.tokenizer(ref.maybe_convert_prompt(text, ref.tokenizer), padding="max_length",
                            max_length=77, truncation=True).input_ids
    np.testing.assert_array_equal(inputs.ids["text_encoder"][0], ref_ids)  # same numbering as diffusers here
    _close(context[0], want[0].numpy(), "sd1 textual inversion")
    # The same terms inside an A1111-weighted prompt: a weight on a multi-vector term weights all n.
    _, (weighted, _) = _encode(pipe, ti, "a <toy> on a table, (badhands:1.3), photo")
    toks = prompts.pipeline_tokenizers(pipe, ti)
    w = prompts.tokenize_prompts(toks, "a <toy>, (badhands:1.3)", embeddings=ti).weights["text_encoder"][0]
    np.testing.assert_allclose(w[:8], [1, 1, 1, 1, 1.3, 1.3, 1.3, 1], rtol=1e-6)
    with torch.no_grad():
        out = ref.text_encoder(torch.from_numpy(inputs.ids["text_encoder"][:1].astype(np.int64)))
    z = out.last_hidden_state[0].numpy()
    mult = np.ones(77, np.float32)
    pos = list(inputs.ids["text_encoder"][0]).index(toks["text_encoder"].embeddings["badhands"][0])
    mult[pos:pos + 3] = 1.3
    zw = z * mult[:, None]
    _close(weighted[0], zw * (z.mean() / zw.mean()), "sd1 weighted multi-vector term")

    # Through the whole pipeline: pipe.load_textual_inversion (token = the file stem, as A1111) and an
    # image within 1/255 of diffusers' with the same start noise.
    from diffusers import EulerDiscreteScheduler
    from jaxdiff import rng, sharding
    from tests import helpers
    assert pipe.load_textual_inversion(tmp_path / "learned_embeds.safetensors") == "<toy>"
    assert pipe.load_textual_inversion(tmp_path / "badhands.safetensors") == "badhands"
    noise = rng.request_noise(2, np.arange(1), (8, 8, 4))["start"]
    out = pipe(text, "badhands", prompt_weighting="none", height=16, width=16, steps=3, sampler="euler",
               schedule=None, guidance_scale=5.0, seed=2, mesh=sharding.make_mesh(jax.devices()[:1]))
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=False)
    ref.set_progress_bar_config(disable=True)
    want = ref(text, negative_prompt="badhands", latents=helpers.nchw(noise), height=16, width=16,
               num_inference_steps=3, guidance_scale=5.0, output_type="np").images
    assert np.abs(out.images.astype(np.int16) - np.round(want * 255).astype(np.int16)).max() <= 1


def test_sdxl_matches_diffusers_in_both_encoders(models, tmp_path):
    ref, pipe = models["sdxl"]
    widths = (ref.text_encoder.config.hidden_size, ref.text_encoder_2.config.hidden_size)
    clip_l, clip_g = _vectors(2, widths[0], 4), _vectors(2, widths[1], 5)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xlstyle.safetensors"))
    ref.load_textual_inversion({"xlstyle": torch.from_numpy(clip_l)}, token="xlstyle",
                               text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion({"xlstyle": torch.from_numpy(clip_g)}, token="xlstyle",
                               text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    ti = prompts.TextualInversions.for_pipeline(pipe).add(read_embedding(tmp_path / "xlstyle.safetensors"))
    text = "a house in xlstyle at dusk"
    with torch.no_grad():
        want, _, want_pooled, _ = ref.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
    _, (context, pooled) = _encode(pipe, ti, text, prompt_weighting="none")
    _close(context[0], want[0].numpy(), "sdxl context")
    _close(pooled[0], want_pooled[0].numpy(), "sdxl pooled")


def test_tables_keep_their_shape(models, tmp_path):
    """Adding a term keeps the extra table's shape (no recompilation) until 16 rows are used."""
    _, pipe = models["sd1"]
    ti = prompts.TextualInversions.for_pipeline(pipe)
    assert ti.tables()["text_encoder"].shape == (16, 32)
    for i in range(4):
        save_file({"emb_params": _vectors(4, 32, i)}, str(tmp_path / f"t{i}.safetensors"))
        ti = ti.add(read_embedding(tmp_path / f"t{i}.safetensors"))
        assert ti.tables()["text_encoder"].shape == (16, 32)
    save_file({"emb_params": _vectors(1, 32, 9)}, str(tmp_path / "t4.safetensors"))
    assert ti.add(read_embedding(tmp_path / "t4.safetensors")).tables()["text_encoder"].shape == (32, 32)
    assert ti.hashes().startswith("t0: ") and ti.hashes().count(",") == 3
