"""Tokenizer: the bundled CLIP vocabulary and checkpoint tokenizer folders give the ids diffusers gives.

jaxdiff's tokenizer runs Hugging Face `tokenizers` with transformers 5's CLIPTokenizer pipeline. Three references:
transformers' CLIPTokenizer called as diffusers calls it (on a broad set of prompts, seeded random
strings, and the tokenizer-folder layouts checkpoints ship), a from-scratch port of OpenAI's byte-level
BPE (clip/simple_tokenizer.py) over the bundled merges, and ids known from CLIP's own documentation.
"""
import functools
import importlib.util
import json
import random
import subprocess
import sys
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
# Harder cases for the port, each aimed at one step of the pipeline (see jaxdiff/tokenizer.py).
HARD_PROMPTS = [
    "wow!! ?! ! !!!!!! a!b !x! (!)",                        # "!" runs: cut out one by one for pad "!"
    "<|endoftext|> x <|ENDOFTEXT|> y<|startoftext|>z (<|endoftext|>) <|EndOfText",  # raw / cased specials
    "a\u00a0b\u3000c\u200bd\u0085e\ufeff\x1cf\x1fg\u180eh\u2028i\u202fj\x0bk\x0cl",  # which are white space
    "ΟΔΟΣ Σ İstanbul ß ǅ ΣΑΣ ﬁ Ⅻ",                       # per-character lower case, no final sigma
    "हिन्दी ไทย 日本語 한국어 العربية עברית",                 # combining marks are 'other' characters
    "e\u0301 cafe\u0301 A\u030a \u1100\u1161",                    # NFC composes
    "it's they're I'M 'S 'll'd''s we've o'clock '",            # contractions, after lower case
    "１２３ ½ ² ⅷ 3.14 1,000,000 ٣٤ ௫",                       # \p{N}: one digit a piece
    "...,,,;;;--- ___ *** ~~~ ``` \"\"\" ''' ((( ))) [[[ ]]]",  # punctuation runs
    "  leading and trailing   ",
    "\t\n\r\n \t",
    "UPPER lower MiXeD CamelCaseWords",
    "a" * 300,                                               # one very long word
    "🐱" * 40,                                               # many-byte pieces, truncated
    ", ".join(["masterpiece", "best quality", "(ultra-detailed:1.2)", "8k uhd", "dslr"] * 8),
]
# Characters drawn for the random strings: ASCII, Latin-1, combining marks, CJK, emoji, odd white space.
CHAR_POOL = ("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 '\"!?.,;:-_()[]<>|/\\@#$%^&*+=~`\t\n"
             "àéîõüçñßÀÉÎÕÜÇÑ\u0301\u0308\u00a0\u3000\u200b日本語中文한국어ไทย١٢٣½²😀🐱🚀❤\ufe0f\u200d👩🇯🇵ΣσςΔ")


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


def _ids(tok, prompts) -> np.ndarray:
    """transformers' ids, called as diffusers calls the tokenizer: [B, 77]."""
    return np.asarray(tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


def _random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(CHAR_POOL) for _ in range(rng.randrange(0, 60))) for _ in range(n)]


def test_bundled_matches_transformers(bundled, pad_token):
    ids = bundled(PROMPTS + HARD_PROMPTS)
    assert ids.shape == (len(PROMPTS) + len(HARD_PROMPTS), 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, _ids(_reference_tokenizer(pad_token), PROMPTS + HARD_PROMPTS))
    long = ids[len(PROMPTS) - 1]
    assert long[0] == BOS and long[-1] == EOS and PADS[pad_token] not in long[1:-1]


def test_random_strings_match_transformers(bundled, pad_token):
    prompts = _random_prompts(300, seed=PADS[pad_token])
    np.testing.assert_array_equal(bundled(prompts), _ids(_reference_tokenizer(pad_token), prompts))


def test_pad_bang_is_split_out(bundled, pad_token):
    """The quirk the module docstring documents, stated directly."""
    ids = bundled("wow!!")[0]
    wow = bundled("wow")[0, 1]
    expect = [BOS, wow, 0, 0, EOS] if pad_token == "!" else [BOS, wow, bundled("!!")[0, 1], EOS]
    np.testing.assert_array_equal(ids[:len(expect)], expect)


def test_bundled_matches_openai_bpe(bundled, pad_token):
    expect = np.array([_openai_ids(p, PADS[pad_token]) for p in PROMPTS])
    np.testing.assert_array_equal(bundled(PROMPTS), expect)


def _added_token(content: str, normalized: bool = True) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized,
            "rstrip": False, "single_word": False}


def _write_sd_release(folder: Path, pad_token: str) -> None:
    """vocab.json + merges.txt + the tokenizer_config.json / special_tokens_map.json that SD 1.5 (pad
    <|endoftext|>) and SD 2.1 (pad "!") carry, written by transformers 4.2x: special tokens are
    dicts marked normalized."""
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((BUNDLED_DIR / name).read_bytes())
    specials = {"bos_token": _added_token("<|startoftext|>"), "eos_token": _added_token("<|endoftext|>"),
                "unk_token": _added_token("<|endoftext|>"), "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {**specials, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
              "model_max_length": 77, "name_or_path": "openai/clip-vit-large-patch14",
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _write_sdxl_release(folder: Path, pad_token: str) -> None:
    """The transformers 4.3x layout (SDXL's tokenizer / tokenizer_2): string special tokens and an
    added_tokens_decoder with per-token flags."""
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((BUNDLED_DIR / name).read_bytes())
    decoder = {"49406": {**_added_token("<|startoftext|>"), "special": True},
               "49407": {**_added_token("<|endoftext|>"), "special": True}}
    if pad_token == "!":
        decoder["0"] = {**_added_token("!", normalized=False), "special": True}
    for token in decoder.values():
        del token["__type"]
    config = {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": "<|startoftext|>",
              "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": "<|endoftext|>",
              "errors": "replace", "model_max_length": 77, "pad_token": pad_token,
              "tokenizer_class": "CLIPTokenizer", "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))  # not read


def _write_transformers5(folder: Path, pad_token: str) -> None:
    """What transformers 5's save_pretrained writes: tokenizer.json + tokenizer_config.json."""
    _reference_tokenizer(pad_token).save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").exists()


def _write_jaxdiff(folder: Path, pad_token: str) -> None:
    Tokenizer.bundled(pad_token).save(folder)


LAYOUTS = {"sd_release": _write_sd_release, "sdxl_release": _write_sdxl_release,
           "transformers5": _write_transformers5, "jaxdiff_save": _write_jaxdiff}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_folder_matches_transformers(layout, pad_token, tmp_path):
    """Every layout, read by jaxdiff and by transformers' from_pretrained (what diffusers runs), gives
    the same ids; jaxdiff's own `save` is read back by transformers the same way."""
    LAYOUTS[layout](tmp_path, pad_token)
    tok = Tokenizer.from_folder(tmp_path)
    ref = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tok.pad_token_id == ref.pad_token_id == PADS[pad_token]
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (BOS, EOS, 77)
    assert tok.vocab_size == len(ref) == 49408
    prompts = PROMPTS + HARD_PROMPTS + _random_prompts(50, seed=1)
    np.testing.assert_array_equal(tok(prompts), _ids(ref, prompts))


def test_pad_token_outside_the_vocabulary(tmp_path):
    """A pad token the vocabulary lacks gets the next id, as transformers adds it."""
    _write_transformers5(tmp_path, "<|endoftext|>")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))
    tok = Tokenizer.from_folder(tmp_path)
    ref = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tok.pad_token_id == ref.pad_token_id == 49408 and tok.vocab_size == len(ref) == 49409
    prompts = ["a <pad> b", "x"]
    np.testing.assert_array_equal(tok(prompts), _ids(ref, prompts))


def test_no_transformers_at_run_time(tmp_path):
    """Loading and calling the tokenizer never imports transformers (it costs seconds of start-up)."""
    _write_transformers5(tmp_path, "!")
    code = ("import sys; from jaxdiff.tokenizer import Tokenizer; "
            f"Tokenizer.bundled()(['a cat']); Tokenizer.from_folder({str(tmp_path)!r})(['a dog!']); "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a CLIP tokenizer folder"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="pad_token"):
        Tokenizer.bundled(pad_token="<pad>")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(CheckpointError, match="not a CLIP BPE tokenizer"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    _write_sd_release(tmp_path, "!")
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n")
    with pytest.raises(CheckpointError, match="line 3 is not a pair"):
        Tokenizer.from_folder(tmp_path)
    _write_sdxl_release(tmp_path, "!")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["0"]["single_word"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="single_word"):
        Tokenizer.from_folder(tmp_path)


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


def test_embedding_names_match_transformers_add_tokens(bundled, pad_token):
    """Textual-inversion names are matched as transformers' add_tokens matches them for diffusers
    (after lower-casing, anywhere in the text); a multi-vector name expands to all its ids."""
    ref = _reference_tokenizer(pad_token)
    ref.add_tokens(["<toy>", "EasyNeg", "EasyNeg_1"])   # diffusers' names for a 2-vector term
    tok = bundled.with_embeddings({"<toy>": [49408], "EasyNeg": [49409, 49410]})
    texts = ["a <toy> cat", "easyneg, x <TOY>", "my<toy>s and more", "EasyNeg<toy>!"]
    want = _ids(ref, [t.replace("EasyNeg", "EasyNeg EasyNeg_1").replace("easyneg", "EasyNeg EasyNeg_1")
                      for t in texts])
    np.testing.assert_array_equal(tok(texts), want)
    assert 49408 not in bundled("a <toy> cat") and bundled.embeddings == {}   # the original is unchanged
    assert bundled.with_embeddings({"<toy>": [49408], "EasyNeg": [49409, 49410]}) is tok  # cached
