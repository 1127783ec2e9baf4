"""CLIP tokenizer: prompts -> token ids [B, 77] int32, as diffusers' pipelines tokenize them.

Runs Hugging Face `tokenizers` (the Rust library transformers' CLIPTokenizer is a wrapper around),
built here with the pipeline transformers builds, so generating an image never imports transformers
(seconds of CPU) and ids come out exactly as diffusers asks for them:

    tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)

i.e. <|startoftext|>, the prompt's tokens, <|endoftext|>, then padding up to model_max_length (77);
a prompt too long is cut so that <|endoftext|> is still the last token. The pad token is what the
checkpoint's tokenizer folder says: SD1 pads with "<|endoftext|>" (49407), SD2 and SDXL's second
tokenizer with "!" (id 0). The text encoder is causal, so the prompt's own positions do not see the
padding, but the hidden states at the padded positions differ, and the UNet attends to all 77.
One consequence of transformers' handling: the pad token is a special (added) token, and added tokens
are cut out of the text before BPE, so with pad "!" every "!" in a prompt becomes id 0 on its own
("wow!!" -> "wow", "!", "!"). diffusers' SD2 / SDXL pipelines tokenize the same way, so jaxdiff keeps it.

The pipeline (transformers 5 models/clip/tokenization_clip.py `CLIPTokenizer.__init__`; the normalizer
and pre-tokenizer are the class's own, whatever a tokenizer.json says):
  BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False),
  normalizer NFC -> Replace(\\s+ -> " ") -> Lowercase,
  pre-tokenizer Split(<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
  [^\\s\\p{L}\\p{N}]+, removed, inverted) -> ByteLevel(add_prefix_space=False),
  plus the added tokens (special tokens; a token marked `normalized` is matched after normalization).

Textual-inversion names (`with_embeddings`) are added tokens too (normalized, so matched case-
insensitively anywhere in the text, as transformers' `add_tokens` does for diffusers); each one expands
to the ids of its n vectors (ids >= the base vocabulary, rows of an extra embedding table).

Checkpoints without a tokenizer folder (single-file checkpoints) use the bundled vocabulary in
jaxdiff/assets/clip_tokenizer (OpenAI's CLIP BPE, MIT; see its LICENSE).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers.models import BPE

from jaxdiff.errors import CheckpointError, JaxdiffError

BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
CONTEXT_LENGTH = 77  # CLIP's max_position_embeddings; every SD text encoder has 77 positions
PAD_TOKENS = ("<|endoftext|>", "!")  # SD1 style, SD2 / SDXL-encoder-2 style
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # CLIPTokenizer's defaults
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"
# transformers 5 tokenization_clip.py: CLIP's pattern with the two special tokens as literals.
CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                r"""[^\s\p{L}\p{N}]+""")


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


def _clip_pipeline(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], unk: str) -> tokenizers.Tokenizer:
    """The `tokenizers` pipeline transformers 5's CLIPTokenizer builds (module docstring)."""
    tok = tokenizers.Tokenizer(BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
                                   continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD,
                                   fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


class Tokenizer:
    """CLIP BPE tokenizer producing fixed-length id arrays for the text encoder.

    Build it with `Tokenizer.from_folder(checkpoint / "tokenizer")` or `Tokenizer.bundled(pad_token)`.
    Instances are not changed after construction: `with_embeddings` returns a new one.

    Attributes:
      model_max_length: ids per prompt (77).
      pad_token_id, bos_token_id, eos_token_id: the special ids (bos 49406, eos 49407 for CLIP).
      embeddings: textual-inversion name -> the ids it expands to (empty unless `with_embeddings`).
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
        self._merges = [tuple(m) for m in merges]
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
        self._rust = _clip_pipeline(self._vocab, self._merges, self.specials["unk_token"])
        # `tokenizers` numbers an added token outside the vocabulary itself; `_expand` maps its ids to
        # the ones the file lists (and, with embeddings, a name's id to its vectors' ids).
        self._expand: dict[int, tuple[int, ...]] = {}
        for content, (index, token) in sorted(self._added.items(), key=lambda kv: kv[1][0]):
            self._rust.add_special_tokens([AddedToken(content, special=True, normalized=token.normalized)])
            rust_id = self._rust.token_to_id(content)
            if rust_id != index:
                self._expand[rust_id] = (index,)
        self.embeddings: dict[str, tuple[int, ...]] = {}
        self._with_cache: dict[tuple, Tokenizer] = {}

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
        except Exception as e:  # a malformed vocabulary or merges list, also as `tokenizers` says it
            if isinstance(e, JaxdiffError):
                raise
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
        """The BPE vocabulary plus added tokens outside it (transformers' len(tokenizer)), without
        textual-inversion names."""
        return len(self._vocab) + len(self._extra)

    @property
    def comma_id(self) -> int:
        """The id of a word-final "," (A1111's comma_padding_backtrack looks for it)."""
        return self._vocab["," + END_OF_WORD]

    def with_embeddings(self, names: Mapping[str, Sequence[int]]) -> "Tokenizer":
        """A copy that also knows textual-inversion names, each expanding to the given ids.

        Args:
          names: name -> ids of its vectors (ids >= the text encoder's vocabulary; rows of the extra
            embedding table). Names this tokenizer already knows are replaced.
        Raises:
          JaxdiffError: a name that is a vocabulary or special token (diffusers refuses those too).
        """
        key = tuple((name, tuple(int(i) for i in ids)) for name, ids in names.items())
        cached = self._with_cache.get(key)
        if cached is not None:
            return cached
        copy = object.__new__(Tokenizer)
        copy.__dict__.update(self.__dict__)
        copy._rust = tokenizers.Tokenizer.from_str(self._rust.to_str())
        copy._expand = dict(self._expand)
        copy.embeddings = dict(self.embeddings)
        for name, ids in names.items():
            if not name or name in self._vocab or name in self._added:
                raise JaxdiffError(f"embedding name {name!r} is already a token of the CLIP vocabulary; "
                                   f"load it under another name (token=...)")
            # Normalized: matched in lower-cased text, as transformers' add_tokens does for diffusers.
            copy._rust.add_tokens([AddedToken(name, special=False, normalized=True)])
            copy._expand[copy._rust.token_to_id(name)] = tuple(int(i) for i in ids)
            copy.embeddings[name] = tuple(int(i) for i in ids)
        copy._with_cache = {}
        if len(self._with_cache) >= 8:  # building a copy costs ~0.1 s; requests reuse the same terms
            self._with_cache.clear()
        self._with_cache[key] = copy
        return copy

    def _expanded(self, ids: list[int]) -> list[int]:
        expand = self._expand
        if not expand:
            return ids
        return [j for i in ids for j in expand.get(i, (i,))]

    def encode(self, text: str) -> list[int]:
        """One prompt -> its token ids, without <|startoftext|>, <|endoftext|>, truncation or padding."""
        return self._expanded(self._rust.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> their token ids each (as `encode`), in one call into `tokenizers`."""
        return [self._expanded(e.ids) for e in self._rust.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """prompts: one string or a list of B strings -> ids [B, model_max_length] int32."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        length = self.model_max_length
        out = np.full((len(prompts), length), self.pad_token_id, np.int32)  # [B, L]
        for row, ids in enumerate(self.encode_batch(prompts)):
            # Truncation keeps <|endoftext|> last: at most L - 2 of the prompt's own tokens.
            ids = [self.bos_token_id, *ids[:length - 2], self.eos_token_id]
            out[row, :len(ids)] = ids
        return out

    def save(self, folder: str | os.PathLike) -> None:
        """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json (the layout
        SD checkpoints ship, read by `from_folder` and by transformers 4 and 5 alike). Embedding
        names are not written: they belong to the embeddings, not to the checkpoint."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join([MERGES_HEADER, *(f"{a} {b}" for a, b in self._merges)]) + "\n"
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
