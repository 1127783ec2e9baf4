"""Weighted, chunked prompts at the embedding level: jaxdiff's tokenize_prompts + encode against a
reference written here from A1111's rules (modules/sd_hijack_clip.py `tokenize_line` / `forward`,
modules/sd_emphasis.py `EmphasisOriginal`) running transformers' CLIPTextModel on the same weights.

The reference is given each prompt's parse by hand (the (text, weight) runs the A1111 syntax means),
tokenizes each run with transformers' CLIPTokenizer, chunks and pads as A1111 does, encodes each chunk,
multiplies by the weights and restores each chunk's mean. `prompt_weighting="none"` is compared with
diffusers' own `encode_prompt`.
"""
import jax
import numpy as np
import pytest
import torch

import jaxdiff
from jaxdiff import prompts, sharding
from tests import tiny_pipelines
from tests.helpers import one_torch_thread  # noqa: F401 (fixture)

BOS, EOS = 49406, 49407
RTOL = 1e-5
WORDS = ["cat", "dog", "red", "blue", "tree", "house", "sky", "sun", "moon", "star", "car", "road"]


def words(n, start=0):
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (diffusers pipeline, jaxdiff pipeline, jaxdiff encoder params).

    The final LayerNorm's bias is set to random values in both (the tiny models' zero init makes the
    mean of last_hidden_state about 0, so A1111's rescaling ratio would be noise; real CLIP biases
    are not zero)."""
    root = tmp_path_factory.mktemp("weighting")
    rng = np.random.default_rng(0)
    out = {}
    for name, build in (("sd1", tiny_pipelines.sd1), ("sd2", tiny_pipelines.sd2), ("sdxl", tiny_pipelines.sdxl)):
        ref = build(root / name)
        for tok in ("tokenizer", "tokenizer_2"):
            if getattr(ref, tok, None) is not None:
                getattr(ref, tok).model_max_length = 77
        pipe = jaxdiff.load(root / name)
        params = {}
        for enc in prompts.ENCODERS:
            if getattr(pipe, enc) is None:
                continue
            bias = rng.normal(0.0, 0.5, getattr(ref, enc).config.hidden_size).astype(np.float32)
            pipe_params = getattr(pipe, enc).params
            assert np.shape(pipe_params["text_model"]["final_layer_norm"]["bias"]) == bias.shape
            params[enc] = _replace(pipe_params, ("text_model", "final_layer_norm", "bias"), bias)
            with torch.no_grad():
                _final_norm(getattr(ref, enc)).bias.copy_(torch.from_numpy(bias))
        out[name] = (ref, pipe, params)
    return out


def _final_norm(model):
    """transformers 5 keeps final_layer_norm under text_model or at the top, by class."""
    inner = getattr(model, "text_model", model)
    return inner.final_layer_norm


def _replace(tree, path, value):
    head, *rest = path
    tree = dict(tree)
    tree[head] = _replace(tree[head], rest, value) if rest else value
    return tree


# ---- the reference ------------------------------------------------------------------------------

def ref_chunks(tokenizer, runs, comma_backtrack=20):
    """A1111 tokenize_line over hand-parsed runs [(text, weight)] ("BREAK" alone = a break):
    -> list of (tokens [77], multipliers [77]) with BOS / EOS / padding."""
    comma = tokenizer.get_vocab()[",</w>"]
    pad = tokenizer.pad_token_id
    chunks, tokens, mults, last_comma = [], [], [], -1

    def close():
        nonlocal tokens, mults, last_comma
        body = [BOS] + tokens + [EOS] + [pad] * (75 - len(tokens))
        chunks.append((body, [1.0] + mults + [1.0] * (76 - len(mults))))
        tokens, mults, last_comma = [], [], -1

    for text, weight in runs:
        if text == "BREAK":
            close()
            continue
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == 75 and last_comma != -1 and len(tokens) - last_comma <= comma_backtrack:
                keep = last_comma + 1
                moved = (tokens[keep:], mults[keep:])
                tokens, mults = tokens[:keep], mults[:keep]
                close()
                tokens, mults = list(moved[0]), list(moved[1])
            if len(tokens) == 75:
                close()
            tokens.append(token)
            mults.append(weight)
    if tokens or not chunks:
        close()
    return chunks


def ref_encode(model, chunks, count, *, layer=-2, final_norm=False):
    """Encodes each chunk alone (last_hidden_state with final_norm, else hidden_states[layer]), applies A1111 emphasis per chunk, pads with empty chunks to `count`
    (the encoding of "" with weight 1); returns (context [77 * count, D], pooled of chunk 0 or None)."""
    pad = chunks[0][0][-1] if chunks[0][0][-1] != EOS else EOS
    empty = ([BOS, EOS] + [pad] * 75, [1.0] * 77)
    zs, pooled = [], None
    with torch.no_grad():
        for i, (ids, mults) in enumerate(list(chunks) + [empty] * (count - len(chunks))):
            out = model(torch.tensor([ids]), output_hidden_states=True)
            z = out.last_hidden_state if final_norm else out.hidden_states[layer]
            original = z.mean()
            z = z * torch.tensor(mults)[None, :, None]
            z = z * (original / z.mean())
            zs.append(z[0])
            if i == 0 and hasattr(out, "text_embeds"):
                pooled = out.text_embeds[0].numpy()
    return torch.cat(zs).numpy(), pooled


def jax_encode(model, prompt, negative=None, **kw):
    _, pipe, params = model
    toks = prompts.pipeline_tokenizers(pipe)
    inputs = prompts.tokenize_prompts(toks, prompt, negative, **kw)
    spec = prompts.encoder_spec(pipe)
    run = jax.jit(lambda p, i, w: prompts.encode(spec, p, i, None, w))
    pos = run(params, inputs.ids, inputs.weights)
    neg = run(params, inputs.negative_ids, inputs.negative_weights) if negative is not None else None
    return inputs, pos, neg


def close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    assert err < RTOL, f"{what}: max error {err:.2e} of scale {scale:.3g}"


# ---- cases --------------------------------------------------------------------------------------

LONG_120 = words(68) + ", " + words(50, 3)   # 119 tokens, a comma 7 tokens before the chunk fills

SD1_CASES = {
    "weighted": ("a (red:1.5) cat, ((fluffy)) [blurry] photo",
                 [("a ", 1.0), ("red", 1.5), (" cat, ", 1.0), ("fluffy", 1.21), (" ", 1.0),
                  ("blurry", 1 / 1.1), (" photo", 1.0)]),
    "escaped": (r"a \(literal\) (bracket:0.8) \[x\]",
                [("a (literal) ", 1.0), ("bracket", 0.8), (" [x]", 1.0)]),
    "comma_boundary": (LONG_120, [(LONG_120, 1.0)]),
    "break": ("a cat BREAK a (dog:1.3)", [("a cat", 1.0), ("BREAK", -1), ("a ", 1.0), ("dog", 1.3)]),
}


@pytest.mark.parametrize("case", sorted(SD1_CASES))
def test_sd1(models, case):
    ref, pipe, _ = model = models["sd1"]
    text, runs = SD1_CASES[case]
    chunks = ref_chunks(ref.tokenizer, runs)
    want, _ = ref_encode(ref.text_encoder, chunks, len(chunks), final_norm=True)
    inputs, (context, pooled), _ = jax_encode(model, text)
    assert inputs.chunks == len(chunks) and pooled is None
    np.testing.assert_array_equal(inputs.ids["text_encoder"][0], np.concatenate([c[0] for c in chunks]))
    close(context[0], want, case)


def test_sd1_negative_padded_to_the_prompts_chunks(models):
    ref, pipe, _ = model = models["sd1"]
    chunks = ref_chunks(ref.tokenizer, [(LONG_120, 1.0)])
    neg_chunks = ref_chunks(ref.tokenizer, [("ugly", 1.0), ("blurry", 1.1)])
    want_neg, _ = ref_encode(ref.text_encoder, neg_chunks, len(chunks), final_norm=True)
    inputs, _, (neg, _) = jax_encode(model, [LONG_120], "ugly (blurry)", num_images_per_prompt=2)
    assert inputs.chunks == 2 and neg.shape[:2] == (2, 154)
    close(neg[1], want_neg, "negative")


def test_sd2_long_weighted_bang_padding(models):
    ref, pipe, _ = model = models["sd2"]
    text = "(" + words(60) + ":1.2), [" + words(30, 4) + "]"
    runs = [(words(60), 1.2), (", ", 1.0), (words(30, 4), 1 / 1.1)]
    chunks = ref_chunks(ref.tokenizer, runs)
    assert len(chunks) == 2 and chunks[1][0][-1] == 0   # OpenCLIP-style padding with "!"
    want, _ = ref_encode(ref.text_encoder, chunks, 2, final_norm=True)
    inputs, (context, _), _ = jax_encode(model, text)
    np.testing.assert_array_equal(inputs.ids["text_encoder"][0], np.concatenate([c[0] for c in chunks]))
    close(context[0], want, "sd2")


def _sdxl_reference(ref, runs_1, runs_2):
    c1 = ref_chunks(ref.tokenizer, runs_1)
    c2 = ref_chunks(ref.tokenizer_2, runs_2)
    count = max(len(c1), len(c2))
    z1, _ = ref_encode(ref.text_encoder, c1, count, layer=-2)
    z2, pooled = ref_encode(ref.text_encoder_2, c2, count, layer=-2)
    return np.concatenate([z1, z2], axis=-1), pooled, count


def test_sdxl_long_weighted(models):
    ref, pipe, _ = model = models["sdxl"]
    text = "a (" + words(40) + ":0.9), " + words(50, 2) + " ((glow))"
    runs = [("a ", 1.0), (words(40), 0.9), (", " + words(50, 2) + " ", 1.0), ("glow", 1.21)]
    want, want_pooled, count = _sdxl_reference(ref, runs, runs)
    inputs, (context, pooled), _ = jax_encode(model, text)
    assert inputs.chunks == count == 2
    close(context[0], want, "sdxl context")
    close(pooled[0], want_pooled, "sdxl pooled")


def test_sdxl_prompt_2(models):
    ref, pipe, _ = model = models["sdxl"]
    runs_1 = [("a cat", 1.0)]
    runs_2 = [("oil painting, ", 1.0), ("dramatic", 1.4), (" " + words(80), 1.0)]
    want, want_pooled, count = _sdxl_reference(ref, runs_1, runs_2)
    inputs, (context, pooled), _ = jax_encode(model, "a cat",
                                              prompt_2="oil painting, (dramatic:1.4) " + words(80))
    assert inputs.chunks == count == 2
    close(context[0], want, "sdxl prompt_2 context")
    close(pooled[0], want_pooled, "sdxl prompt_2 pooled")


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_weighting_none_equals_diffusers(models, name):
    ref, pipe, _ = model = models[name]
    text = "a (red:1.5) cat BREAK " + words(90)
    with pytest.warns(UserWarning, match="tokens"):
        inputs, (context, pooled), _ = jax_encode(model, text, prompt_weighting="none")
    assert inputs.chunks == 1
    with torch.no_grad():
        if name == "sdxl":
            want, _, want_pooled, _ = ref.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)
            close(pooled[0], want_pooled[0].numpy(), "pooled")
        else:
            want, _ = ref.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
    close(context[0], want[0].numpy(), name)


# ---- through the whole pipeline: jaxdiff's images vs diffusers given the reference embeddings ----

def _image_parity(model, text, runs, negative, neg_runs, *, sdxl=False, prompt_2=None, runs_2=None):
    """jaxdiff generates from the prompt text; diffusers from `prompt_embeds` computed by the reference
    rules above (transformers encoders on the same weights) with the same start noise."""
    import torch
    from jaxdiff import rng as jrng
    from tests import helpers
    ref, pipe, params = model
    size, steps = 16, 3
    noise = jrng.request_noise(4, np.arange(1), (size // 2, size // 2, 4))["start"]
    out = pipe.with_params(params)(text, negative, prompt_2=prompt_2, height=size, width=size, steps=steps,
                                   sampler="euler", schedule=None, guidance_scale=6.0, seed=4,
                                   mesh=sharding.make_mesh(jax.devices()[:1]), return_float=True)
    from diffusers import EulerDiscreteScheduler
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, use_karras_sigmas=False)
    ref.set_progress_bar_config(disable=True)
    if sdxl:
        want_pos, pooled_pos, k = _sdxl_reference(ref, runs, runs_2 or runs)
        z1, _ = ref_encode(ref.text_encoder, ref_chunks(ref.tokenizer, neg_runs), k, layer=-2)
        z2, pooled_neg = ref_encode(ref.text_encoder_2, ref_chunks(ref.tokenizer_2, neg_runs), k, layer=-2)
        want_neg = np.concatenate([z1, z2], axis=-1)
        extra = dict(pooled_prompt_embeds=torch.from_numpy(pooled_pos[None]),
                     negative_pooled_prompt_embeds=torch.from_numpy(pooled_neg[None]))
    else:
        chunks = ref_chunks(ref.tokenizer, runs)
        want_pos, _ = ref_encode(ref.text_encoder, chunks, len(chunks), final_norm=True)
        want_neg, _ = ref_encode(ref.text_encoder, ref_chunks(ref.tokenizer, neg_runs), len(chunks),
                                 final_norm=True)
        extra = {}
    want = ref(prompt_embeds=torch.from_numpy(want_pos[None]), negative_prompt_embeds=torch.from_numpy(want_neg[None]),
               latents=helpers.nchw(noise), height=size, width=size, num_inference_steps=steps,
               guidance_scale=6.0, output_type="np", **extra).images
    assert np.abs(out.images.astype(np.int16) - np.round(want * 255).astype(np.int16)).max() <= 1
    assert float(np.abs(out.pixels - want).max()) < 1e-4


def test_sd1_weighted_long_prompt_image_matches_diffusers(models):
    text = "a (red:1.5) cat, ((fluffy)) [blurry] " + LONG_120
    runs = [("a ", 1.0), ("red", 1.5), (" cat, ", 1.0), ("fluffy", 1.21), (" ", 1.0), ("blurry", 1 / 1.1),
            (" " + LONG_120, 1.0)]
    _image_parity(models["sd1"], text, runs, "ugly (blurry)", [("ugly ", 1.0), ("blurry", 1.1)])


def test_sdxl_prompt_2_weighted_image_matches_diffusers(models):
    runs_2 = [("oil painting, ", 1.0), ("dramatic", 1.4), (" " + words(80), 1.0)]
    _image_parity(models["sdxl"], "a cat", [("a cat", 1.0)], "blurry", [("blurry", 1.0)], sdxl=True,
                  prompt_2="oil painting, (dramatic:1.4) " + words(80), runs_2=runs_2)
