"""Tokenizer: the bundled CLIP vocabulary and checkpoint tokenizer folders give the ids diffusers gives.

Three references: transformers' CLIPTokenizer called as diffusers calls it, a from-scratch port of
OpenAI's byte-level BPE (clip/simple_tokenizer.py) over the bundled merges, and ids known from CLIP's
own documentation.
"""
import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import regex
from transformers import CLIPTokenizer

from jaxdiff.errors import CheckpointError
from jaxdiff.tokenizer import BUNDLED_DIR, Tokenizer

BOS, EOS = 49406, 49407
PADS = {"<|endoftext|>": EOS, "!": 0}   # SD1 style, SD2 / SDXL-encoder-2 style
PROMPTS = [
    "a photo of a cat",
    "",
    "A  majestic LION, roaring!!! (oil-on-canvas; 4k, trending on artstation) -- 50% off?",
    "café naïve façade, Zürich über straße — “quoted” ‘text’ … señor",
    "日本の桜 and 한국어 and русский текст, ελληνικά",
    "emoji 🐱🐶🚀 👩‍🚀 ❤️ 🇯🇵 ok",
    "it's what they're doing, we'll see i'd I'M",
    "numbers 1234567 3.14159 and symbols @#$%^&*_+=[]{}|\\<>/~`",
    "tabs\tand\nnewlines   everywhere ",
    " ".join(f"word{i}" for i in range(120)),           # far more than 77 tokens: truncated
]


# ---- a from-scratch port of OpenAI's SimpleTokenizer (clip/simple_tokenizer.py) ---------------------

def _bytes_to_unicode():
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _openai_tables():
    vocab = json.loads((BUNDLED_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (BUNDLED_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(m.split()): i for i, m in enumerate(line for line in lines if line)}
    return vocab, ranks, _bytes_to_unicode()


_PAT = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                     r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def _bpe(token: str, ranks) -> list[str]:
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return list(word)


def _openai_ids(text: str, pad: int) -> list[int]:
    """OpenAI's encode (whitespace-collapse + lowercase; ftfy is a no-op on these prompts), then
    diffusers' padding="max_length", truncation=True to 77.

    One transformers behaviour is modelled on top: the pad token is a special token, and special
    tokens are cut out of the text before BPE. With pad "!" (SD2, SDXL tokenizer_2) every "!" in a
    prompt is therefore id 0, where OpenAI's tokenizer would merge "!!!" or "?!" into one token.
    """
    vocab, ranks, byte_encoder = _openai_tables()
    ids = []
    for segment in (regex.split("(!)", text) if pad == 0 else [text]):
        if pad == 0 and segment == "!":
            ids.append(0)
            continue
        for token in _PAT.findall(" ".join(segment.split()).lower()):
            token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(vocab[t] for t in _bpe(token, ranks))
    ids = [BOS] + ids[:75] + [EOS]
    return ids + [pad] * (77 - len(ids))


# ---- tests ------------------------------------------------------------------------------------------

def _reference_tokenizer(pad_token: str) -> CLIPTokenizer:
    """transformers' CLIPTokenizer built from the bundled files' contents (not through from_pretrained,
    the path jaxdiff.tokenizer takes)."""
    vocab, ranks, _ = _openai_tables()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(ranks), pad_token=pad_token, model_max_length=77)


@pytest.fixture(scope="module", params=sorted(PADS))
def pad_token(request):
    return request.param


@pytest.fixture(scope="module")
def bundled(pad_token):
    return Tokenizer.bundled(pad_token)


def test_known_ids(bundled, pad_token):
    ids = bundled("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    # CLIP-L's tokenizer on this prompt, as in transformers' and OpenAI's docs.
    np.testing.assert_array_equal(ids[0, :7], [BOS, 320, 1125, 539, 320, 2368, EOS])
    assert (ids[0, 7:] == PADS[pad_token]).all()
    assert bundled.pad_token_id == PADS[pad_token] and bundled.model_max_length == 77
    assert bundled.vocab_size == 49408


def test_bundled_matches_transformers(bundled, pad_token):
    ref = _reference_tokenizer(pad_token)
    expect = ref(PROMPTS, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids
    ids = bundled(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, np.asarray(expect))
    long = ids[-1]
    assert long[0] == BOS and long[-1] == EOS and PADS[pad_token] not in long[1:-1]


def test_bundled_matches_openai_bpe(bundled, pad_token):
    expect = np.array([_openai_ids(p, PADS[pad_token]) for p in PROMPTS])
    np.testing.assert_array_equal(bundled(PROMPTS), expect)


def test_folder_written_by_save_pretrained(bundled, pad_token, tmp_path):
    ref = _reference_tokenizer(pad_token)
    ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.pad_token_id == PADS[pad_token] and tok.model_max_length == 77
    np.testing.assert_array_equal(tok(PROMPTS), bundled(PROMPTS))


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def test_folder_as_sd_releases_ship_it(bundled, pad_token, tmp_path):
    """vocab.json + merges.txt + the tokenizer_config.json / special_tokens_map.json that SD 1.5 (pad
    <|endoftext|>) and SD 2.1 / SDXL tokenizer_2 (pad "!") carry, written by transformers 4.2x."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((BUNDLED_DIR / name).read_bytes())
    specials = {"bos_token": _added_token("<|startoftext|>"), "eos_token": _added_token("<|endoftext|>"),
                "unk_token": _added_token("<|endoftext|>"), "pad_token": pad_token}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {**specials, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14",
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.pad_token_id == PADS[pad_token]
    np.testing.assert_array_equal(tok(PROMPTS), bundled(PROMPTS))


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a CLIP tokenizer folder"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="pad_token"):
        Tokenizer.bundled(pad_token="<pad>")


def test_bundled_files_are_what_the_build_script_makes():
    """vocab.json is exactly the standard construction from merges.txt (scripts/build_clip_vocab.py)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_clip_vocab.py"
    spec = importlib.util.spec_from_file_location("build_clip_vocab", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    merges_txt = (BUNDLED_DIR / "merges.txt").read_text(encoding="utf-8")
    vocab, merges = module.build(merges_txt)
    assert vocab == json.loads((BUNDLED_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and len(merges) == 48894
    assert (BUNDLED_DIR / "LICENSE").read_text().count("Copyright (c) 2021 OpenAI") == 1
