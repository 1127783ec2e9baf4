"""A1111 prompt syntax and chunking (jaxdiff/prompt_parser.py), rule by rule.

Expected weights are the rules' own constants (1.1 per round bracket, 1/1.1 per square bracket, the
number of `(x:w)`), and expected chunk boundaries follow from how the prompts are built; token ids come
from transformers' CLIPTokenizer over the same vocabulary.
"""
import warnings

import numpy as np
import pytest

from transformers import CLIPTokenizer

from jaxdiff import prompt_parser as pp
from jaxdiff import prompts
from jaxdiff.tokenizer import BUNDLED_DIR, Tokenizer

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.bundled()


@pytest.fixture(scope="module")
def tok_bang():
    return Tokenizer.bundled("!")


@pytest.fixture(scope="module")
def ref_tok():
    return CLIPTokenizer(str(BUNDLED_DIR / "vocab.json"), str(BUNDLED_DIR / "merges.txt"))


def _close(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)


@pytest.mark.parametrize("text, want", [
    ("a cat", [("a cat", 1.0)]),
    ("(x)", [("x", 1.1)]),
    ("((x))", [("x", 1.1 * 1.1)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]]", [("x", 1 / 1.1 / 1.1)]),
    ("(x:1.5)", [("x", 1.5)]),
    ("(x: 0.25 )", [("x", 0.25)]),
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("((a) b:2)", [("a", 1.1 * 2), (" b", 2.0)]),
    ("[(x:1.2)]", [("x", 1.2 / 1.1)]),
    (r"\(x\) \[y\]", [("(x) [y]", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"(a \(b\))", [("a (b)", 1.1)]),
    ("open (a", [("open ", 1.0), ("a", 1.1)]),     # unclosed: to the end
    ("open [a", [("open ", 1.0), ("a", 1 / 1.1)]),
    ("a) b]", [("a) b]", 1.0)]),                      # unmatched closers are text
    ("a:1.5) b", [("a", 1.0), (":1.5)", 1.0), (" b", 1.0)]),
    ("time 10:30", [("time 10:30", 1.0)]),
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a BREAKb break", [("a BREAKb break", 1.0)]),   # BREAK must be a whole upper-case word
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111: no longer a break
])
def test_parse_prompt_attention(text, want):
    got = pp.parse_prompt_attention(text)
    # Adjacent runs of equal weight are merged, so compare after merging the expectation the same way.
    merged = []
    for t, w in want:
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + t, w)
        else:
            merged.append((t, w))
    _close(got, merged)


def _words(n: int, start: int = 0) -> list[str]:
    """n distinct words that are one CLIP token each (checked by the caller)."""
    pool = ["cat", "dog", "red", "blue", "tree", "house", "sky", "sun", "moon", "star", "car", "road"]
    return [pool[(start + i) % len(pool)] for i in range(n)]


def test_one_token_words(ref_tok):
    for w in _words(12):
        assert len(ref_tok(w, add_special_tokens=False).input_ids) == 1


def test_frame_pads_with_the_tokenizers_pad(tok, tok_bang, ref_tok):
    for t, pad in ((tok, EOS), (tok_bang, 0)):
        chunks = pp.prompt_chunks(t, "a (red:1.5) cat")
        ids, weights = pp.frame_chunks(chunks, bos=t.bos_token_id, eos=t.eos_token_id, pad=t.pad_token_id)
        body = ref_tok("a red cat", add_special_tokens=False).input_ids
        assert ids.shape == weights.shape == (77,) and ids.dtype == np.int32 and weights.dtype == np.float32
        np.testing.assert_array_equal(ids[:5], [BOS, *body, EOS])
        assert (ids[5:] == pad).all()
        np.testing.assert_allclose(weights[:5], [1, 1, 1.5, 1, 1])
        assert (weights[5:] == 1).all()


def test_long_prompt_breaks_after_a_near_comma(tok):
    # 68 words, a comma (token 69), 50 more words: the chunk fills at 75 tokens while the last comma
    # is 7 tokens back (<= 20), so the first chunk ends with the comma.
    text = " ".join(_words(68)) + ", " + " ".join(_words(50, 3))
    chunks = pp.prompt_chunks(tok, text)
    assert [len(t) for t, _ in chunks] == [69, 50]
    assert chunks[0][0][-1] == tok.comma_id


def test_far_comma_does_not_move_tokens(tok):
    # The comma is 40 tokens before the chunk fills: more than 20, so a plain cut at 75.
    text = " ".join(_words(35)) + ", " + " ".join(_words(60, 5))
    chunks = pp.prompt_chunks(tok, text)
    assert [len(t) for t, _ in chunks] == [75, 21]


def test_exactly_75_tokens_is_one_chunk(tok):
    assert [len(t) for t, _ in pp.prompt_chunks(tok, " ".join(_words(75)))] == [75]
    assert [len(t) for t, _ in pp.prompt_chunks(tok, " ".join(_words(76)))] == [75, 1]


def test_break_starts_a_chunk_and_weights_follow_tokens(tok):
    chunks = pp.prompt_chunks(tok, "a cat BREAK (dog:1.3) BREAK")
    assert [len(t) for t, _ in chunks] == [2, 1]  # a trailing BREAK leaves nothing to close
    assert chunks[1][1] == [pytest.approx(1.3)]
    assert [len(t) for t, _ in pp.prompt_chunks(tok, "BREAK a")] == [0, 1]


def test_embedding_is_never_split(tok):
    first = 49408
    ids = [tok.encode("cat")[0]] * 73 + [first, first + 1, first + 2, first + 3] + [tok.encode("dog")[0]]
    chunks = pp.chunk_tokens([(ids, 1.0)], comma_id=tok.comma_id, embedding_lengths={first: 4})
    assert [len(t) for t, _ in chunks] == [73, 5]
    assert chunks[1][0][:4] == [first, first + 1, first + 2, first + 3]


def test_padding_to_more_chunks_adds_empty_ones(tok):
    ids, weights = pp.frame_chunks(pp.prompt_chunks(tok, "cat"), bos=BOS, eos=EOS, pad=0, count=3)
    empty, _ = pp.frame_chunks(pp.prompt_chunks(tok, ""), bos=BOS, eos=EOS, pad=0)
    assert ids.shape == (3 * 77,) and (weights == 1).all()
    np.testing.assert_array_equal(ids[77:154], empty)
    np.testing.assert_array_equal(ids[154:], empty)


def test_weighting_none_is_diffusers_literal(tok):
    text = "a (red:1.5) cat BREAK dog"
    (chunk,) = pp.prompt_chunks(tok, text, weighting="none")
    ids, weights = pp.frame_chunks([chunk], bos=BOS, eos=EOS, pad=tok.pad_token_id)
    np.testing.assert_array_equal(ids, tok(text)[0])
    assert (weights == 1).all()
    long = " ".join(_words(90))
    with pytest.warns(UserWarning, match="90 tokens"):
        (chunk,) = pp.prompt_chunks(tok, long, weighting="none")
    np.testing.assert_array_equal(pp.frame_chunks([chunk], bos=BOS, eos=EOS, pad=EOS)[0], tok(long)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.prompt_chunks(tok, " ".join(_words(75)), weighting="none")
    with pytest.raises(ValueError, match="prompt_weighting"):
        pp.prompt_chunks(tok, "x", weighting="compel")


def test_tokenize_prompts_shapes_and_prompt_2(tok, tok_bang):
    toks = {"text_encoder": tok, "text_encoder_2": tok_bang}
    inputs = prompts.tokenize_prompts(toks, ["a cat", "a dog"], "ugly", 3, prompt_2=["x", " ".join(_words(80))])
    assert inputs.chunks == 2 and inputs.n_prompts == 2
    for side in (inputs.ids, inputs.weights, inputs.negative_ids, inputs.negative_weights):
        assert {k: v.shape for k, v in side.items()} == {"text_encoder": (6, 154), "text_encoder_2": (6, 154)}
    assert inputs.ids["text_encoder"].dtype == np.int32 and inputs.weights["text_encoder"].dtype == np.float32
    tail = tok_bang.encode(" ".join(_words(80)))[75:]
    np.testing.assert_array_equal(inputs.ids["text_encoder_2"][3, 77:], [BOS, *tail, EOS] + [0] * 70)
    np.testing.assert_array_equal(inputs.ids["text_encoder_2"][0, :77], tok_bang("x")[0])
    # A refiner (encoder 2 only) reads `prompt`, as diffusers' refiner does.
    refiner = prompts.tokenize_prompts({"text_encoder_2": tok_bang}, "a cat", prompt_2="x")
    np.testing.assert_array_equal(refiner.ids["text_encoder_2"][0], tok_bang("a cat")[0])
    empty_ids, empty_w = prompts.empty_text_inputs(toks, 2, 2)
    np.testing.assert_array_equal(empty_ids["text_encoder"][1, 77:], tok("")[0])
    assert empty_w["text_encoder_2"].shape == (2, 154) and (empty_w["text_encoder_2"] == 1).all()
