"""CLIP tokenizer: prompts -> token ids [B, 77] int32, as diffusers' pipelines tokenize them.

A pure-Python port of what transformers 5's CLIPTokenizer runs (a `tokenizers` pipeline), so that
generating an image never imports transformers (about 3 s of CPU on a small machine). Ids come out
exactly as diffusers asks for them:

    tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)

i.e. <|startoftext|>, the prompt's tokens, <|endoftext|>, then padding up to model_max_length (77);
a prompt too long is cut so that <|endoftext|> is still the last token. The pad token is what the
checkpoint's tokenizer folder says: SD1 pads with "<|endoftext|>" (49407), SD2 and SDXL's second
tokenizer with "!" (id 0). This matters: the text encoder is causal, so the prompt's own positions do
not see the padding, but the hidden states at the padded positions differ, and the UNet attends to
all 77. One consequence of transformers' handling worth knowing: the pad token is a special token,
and special tokens are cut out of the text before BPE, so with pad "!" every "!" in a prompt becomes
id 0 on its own ("wow!!" -> "wow", "!", "!"), where OpenAI's tokenizer would merge "!!" into one token.
diffusers' SD2 / SDXL pipelines tokenize the same way, so jaxdiff keeps it.

The pipeline, step by step (transformers/models/clip/tokenization_clip.py builds the same one; the
normalizer and pre-tokenizer are the class's own, whatever a tokenizer.json says):

  1. added tokens (the special tokens, "!" too when it is the pad) are split out of the raw text;
     a token marked `normalized` (legacy SD folders mark <|startoftext|>/<|endoftext|> so) is instead
     looked for after step 2;
  2. each remaining piece is normalized: NFC, every run of Unicode white space -> " ", lower case
     (character by character, as Rust's `to_lowercase`, so no final-sigma rule);
  3. pre-tokenized by CLIP's pattern  <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
     \\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+  (white space between matches dropped); the ByteLevel step then
     applies GPT-2's pattern to each piece, which only changes the literal special-token pieces
     ("<|", "endoftext", "|>"): every other piece is a single letter run, digit, contraction or a run
     of other characters, which GPT-2's pattern leaves whole;
  4. each piece's UTF-8 bytes are mapped to printable characters (GPT-2's byte table) and BPE'd with
     the end-of-word suffix "</w>" on its last symbol, lowest merge rank first.

Checkpoints without a tokenizer folder (single-file checkpoints) use the bundled vocabulary in
jaxdiff/assets/clip_tokenizer (OpenAI's CLIP BPE, MIT; see its LICENSE).
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxdiff.errors import CheckpointError

BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
CONTEXT_LENGTH = 77  # CLIP's max_position_embeddings; every SD text encoder has 77 positions
PAD_TOKENS = ("<|endoftext|>", "!")  # SD1 style, SD2 / SDXL-encoder-2 style
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # CLIPTokenizer's defaults
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
CACHE_SIZE = 10_000  # words kept by the BPE cache (tokenizers' default capacity)

# Unicode White_Space, what `\s` matches in the Oniguruma patterns `tokenizers` runs. (Python's
# str.isspace also takes U+001C..U+001F, which CLIP's tokenizer keeps as characters.)
WHITESPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                                 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]))
_WHITESPACE_RUN = re.compile("[" + "".join(sorted(WHITESPACE)) + "]+")
# The literal alternatives of CLIP's pattern, in its order, and how GPT-2's pattern splits them.
_SPECIAL_LITERALS = {"<|startoftext|>": ["<|", "startoftext", "|>"],
                     "<|endoftext|>": ["<|", "endoftext", "|>"]}
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_SPACE, _LETTER, _NUMBER, _OTHER = range(4)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (printable bytes map to themselves)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_CHARS = [char for _, char in sorted(bytes_to_unicode().items())]  # byte value -> character
_char_kinds: dict[str, int] = {}


def _kind(c: str) -> int:
    kind = _char_kinds.get(c)
    if kind is None:
        category = unicodedata.category(c)
        kind = (_SPACE if c in WHITESPACE else _LETTER if category[0] == "L"
                else _NUMBER if category[0] == "N" else _OTHER)
        _char_kinds[c] = kind
    return kind


def normalize(text: str) -> str:
    """NFC, white-space runs -> one space, per-character lower case (transformers' CLIP normalizer)."""
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return text.lower() if text.isascii() else "".join(c.lower() for c in text)


def pre_tokenize(text: str) -> list[str]:
    """Normalized text -> the pieces BPE sees (steps 3 of the module docstring), before byte mapping."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        kind = _kind(c)
        if kind == _SPACE:
            i += 1
            continue
        if c == "<":
            literal = next((s for s in _SPECIAL_LITERALS if text.startswith(s, i)), None)
            if literal is not None:
                pieces.extend(_SPECIAL_LITERALS[literal])
                i += len(literal)
                continue
        elif c == "'":
            contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
            if contraction is not None:
                pieces.append(contraction)
                i += len(contraction)
                continue
        j = i + 1
        if kind != _NUMBER:  # digits are single pieces; letters and other characters come in runs
            while j < n and _kind(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: one space-separated pair a line under an optional '#version' header."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if bad:
        raise CheckpointError(f"{path}: line {bad[0] + 2} is not a pair of symbols")
    return merges


class _AddedToken:
    """A token matched in the text before BPE (special tokens; transformers' AddedToken flags).

    lstrip / rstrip are not needed: they only strip white space next to the token, which
    pre-tokenization drops anyway.
    """

    def __init__(self, spec, normalized: bool = False):
        if isinstance(spec, _AddedToken):
            spec = {"content": spec.content, "normalized": spec.normalized}
        if isinstance(spec, str):
            spec = {"content": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
            raise CheckpointError(f"not a token: {spec!r}")
        if spec.get("single_word"):
            # Matching only at word boundaries is not implemented; no CLIP checkpoint uses it.
            raise CheckpointError(f"added token {spec['content']!r} has single_word=true, which jaxdiff's "
                                  f"CLIP tokenizer does not implement")
        self.content = spec["content"]
        self.normalized = bool(spec.get("normalized", normalized))


class Tokenizer:
    """CLIP BPE tokenizer producing fixed-length id arrays for the text encoder.

    Build it with `Tokenizer.from_folder(checkpoint / "tokenizer")` or `Tokenizer.bundled(pad_token)`.

    Attributes:
      model_max_length: ids per prompt (77).
      pad_token_id, bos_token_id, eos_token_id: the special ids (bos 49406, eos 49407 for CLIP).
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], specials: dict,
                 *, model_max_length: int | None = None, added: Sequence = (),
                 source: str = "CLIP tokenizer"):
        """
        Args:
          vocab: BPE token -> id (49408 entries for CLIP, the two special tokens included).
          merges: BPE merges in rank order, as (left, right) symbol pairs.
          specials: {"bos_token", "eos_token", "unk_token", "pad_token"} -> a string or an added-token
            dict ({"content": ..., "normalized": ...}); missing keys take CLIPTokenizer's defaults.
          model_max_length: ids per prompt; None means CLIP's 77.
          added: extra added tokens as (id, string or dict), e.g. tokenizer.json's "added_tokens".
        """
        self.source = source
        self._vocab = dict(vocab)
        self._ranks = {(a, b): i for i, (a, b) in enumerate(merges)}
        # A folder whose config names no model_max_length gets transformers' "unlimited" sentinel
        # (about 1e30); CLIP can only ever take its 77 positions.
        length = model_max_length
        self.model_max_length = CONTEXT_LENGTH if length is None or length > 10 ** 6 else int(length)
        if self.model_max_length > CONTEXT_LENGTH or self.model_max_length < 2:
            raise CheckpointError(f"{source}: model_max_length={length} does not fit the "
                                  f"{CONTEXT_LENGTH} positions of a CLIP text encoder")
        # Added tokens: those a file lists with an id, then the special tokens (an unknown special
        # token gets the next free id, as transformers' add_tokens gives it).
        self._added: dict[str, tuple[int, _AddedToken]] = {}
        self._extra: dict[str, int] = {}  # added tokens that are not in the BPE vocabulary
        for index, spec in added:
            token = _AddedToken(spec)
            self._added[token.content] = (int(index), token)
            if token.content not in self._vocab:
                self._extra[token.content] = int(index)
        listed = {content: token for content, (_, token) in self._added.items()}
        self.specials = {}
        for key in SPECIAL_KEYS:  # in this order, so the last key naming a token sets its flags
            spec = specials.get(key) or DEFAULT_SPECIALS[key]
            # A bare name takes the flags of the token listed under that name (never those of an
            # earlier special key), else it is a plain special token: not normalized.
            token = listed[spec] if isinstance(spec, str) and spec in listed else _AddedToken(spec)
            index = self._vocab.get(token.content, self._extra.get(token.content))
            if index is None:
                index = len(self._vocab) + len(self._extra)
                self._extra[token.content] = index
            self._added[token.content] = (index, token)
            self.specials[key] = token.content
        self.bos_token_id = self._added[self.specials["bos_token"]][0]
        self.eos_token_id = self._added[self.specials["eos_token"]][0]
        self.pad_token_id = self._added[self.specials["pad_token"]][0]
        self.unk_token_id = self._added[self.specials["unk_token"]][0]
        self._raw_split = self._splitter([t for t in self._added if not self._added[t][1].normalized])
        self._normalized_split = self._splitter([t for t in self._added if self._added[t][1].normalized])
        self._cache: dict[str, list[int]] = {}

    @staticmethod
    def _splitter(tokens: list[str]):
        # Longest first, so the leftmost match is also the longest (tokenizers' leftmost-longest).
        if not tokens:
            return None
        return re.compile("(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")")

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a checkpoint's `tokenizer/` (or `tokenizer_2/`) folder.

        The folder holds vocab.json + merges.txt (what SD checkpoints ship) or tokenizer.json (what
        transformers 5 writes), with tokenizer_config.json / special_tokens_map.json naming the special
        tokens and model_max_length. As in transformers: a config with `added_tokens_decoder` defines
        the added tokens and special_tokens_map.json is not read; otherwise special_tokens_map.json
        overrides the config's special tokens and tokenizer.json's "added_tokens" are added.
        """
        path = Path(path)
        has_json = (path / "tokenizer.json").is_file()
        if not path.is_dir() or not (has_json or ((path / "vocab.json").is_file()
                                                  and (path / "merges.txt").is_file())):
            raise CheckpointError(f"{path}: not a CLIP tokenizer folder (needs vocab.json and merges.txt, "
                                  f"or tokenizer.json)")
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / 'tokenizer_config.json'}: expected a JSON object")
        if has_json:
            data = _read_json(path / "tokenizer.json")
            model = data.get("model", {}) if isinstance(data, dict) else {}
            if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
                raise CheckpointError(f"{path / 'tokenizer.json'}: not a CLIP BPE tokenizer (model type "
                                      f"{model.get('type')!r}, end_of_word_suffix "
                                      f"{model.get('end_of_word_suffix')!r})")
            vocab = model["vocab"]
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            file_added = [(t["id"], t) for t in data.get("added_tokens") or []]
        else:
            vocab = _read_json(path / "vocab.json")
            merges = _read_merges(path / "merges.txt")
            file_added = []
        specials = {k: config[k] for k in SPECIAL_KEYS if config.get(k)}
        if "added_tokens_decoder" in config:
            added = [(int(i), t) for i, t in config["added_tokens_decoder"].items()]
        else:
            added = file_added
            if (path / "special_tokens_map.json").is_file():
                mapped = _read_json(path / "special_tokens_map.json")
                specials.update({k: v for k, v in mapped.items() if k in SPECIAL_KEYS and v})
        try:
            return cls(vocab, merges, specials, model_max_length=config.get("model_max_length"),
                       added=added, source=str(path))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: cannot load the CLIP tokenizer: {e!r}") from None

    @classmethod
    def bundled(cls, pad_token: str = "<|endoftext|>") -> "Tokenizer":
        """The CLIP vocabulary shipped with jaxdiff, for checkpoints without a tokenizer folder.

        Args:
          pad_token: "<|endoftext|>" for SD1 (OpenAI CLIP-L), "!" for SD2 and SDXL's second encoder
            (OpenCLIP, which pads with zeros, and "!" is id 0).
        """
        if pad_token not in PAD_TOKENS:
            raise ValueError(f"pad_token={pad_token!r}; CLIP checkpoints pad with one of {PAD_TOKENS}")
        vocab = _read_json(BUNDLED_DIR / "vocab.json")
        merges = _read_merges(BUNDLED_DIR / "merges.txt")
        return cls(vocab, merges, {"pad_token": pad_token}, model_max_length=CONTEXT_LENGTH,
                   source=f"bundled CLIP vocabulary (pad {pad_token!r})")

    @property
    def vocab_size(self) -> int:
        """The BPE vocabulary plus added tokens outside it (transformers' len(tokenizer))."""
        return len(self._vocab) + len(self._extra)

    def _bpe(self, piece: str) -> list[int]:
        """One pre-tokenized piece -> ids, by merging the lowest-ranked adjacent pair until none merges."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        chars = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
        word = chars[:-1] + [chars[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, 1 << 62))
            if best not in ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self._vocab.get(symbol, self.unk_token_id) for symbol in word]
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    def _split(self, text: str, splitter, then) -> list[int]:
        """Cuts added tokens out of `text` (their ids) and runs `then` on the text between them."""
        if splitter is None:
            return then(text)
        ids = []
        for k, part in enumerate(splitter.split(text)):
            if k % 2:  # re.split with one group: odd items are the matched tokens
                ids.append(self._added[part][0])
            elif part:
                ids.extend(then(part))
        return ids

    def _text_ids(self, normalized: str) -> list[int]:
        return [i for piece in pre_tokenize(normalized) for i in self._bpe(piece)]

    def encode(self, text: str) -> list[int]:
        """One prompt -> its token ids, without <|startoftext|>, <|endoftext|>, truncation or padding."""
        return self._split(text, self._raw_split,
                           lambda part: self._split(normalize(part), self._normalized_split, self._text_ids))

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """prompts: one string or a list of B strings -> ids [B, model_max_length] int32."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        length = self.model_max_length
        out = np.full((len(prompts), length), self.pad_token_id, np.int32)  # [B, L]
        for row, prompt in enumerate(prompts):
            # Truncation keeps <|endoftext|> last: at most L - 2 of the prompt's own tokens.
            ids = [self.bos_token_id, *self.encode(prompt)[:length - 2], self.eos_token_id]
            out[row, :len(ids)] = ids
        return out

    def save(self, folder: str | os.PathLike) -> None:
        """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (the layout
        SD checkpoints ship, read by `from_folder` and by transformers 4 and 5 alike)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ranked = sorted(self._ranks, key=self._ranks.get)
        (folder / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in ranked)]) + "\n"
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
        decoder = {str(index): {"content": content, "lstrip": False, "normalized": token.normalized,
                                "rstrip": False, "single_word": False, "special": True}
                   for content, (index, token) in sorted(self._added.items(), key=lambda kv: kv[1][0])}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                  "added_tokens_decoder": decoder, **self.specials,
                  "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(
            json.dumps(self.specials, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source}, model_max_length={self.model_max_length}, "
                f"pad_token_id={self.pad_token_id})")
