"""CLIP tokenizer: prompts -> token ids [B, 77] int32, as diffusers' pipelines tokenize them.

A thin wrapper over transformers' CLIPTokenizer (the one transformers import jaxdiff allows; in
transformers 5 it is the `tokenizers`-backed byte-level BPE, there is no separate slow class). Ids come
out exactly as diffusers asks for them:

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

Checkpoints without a tokenizer folder (single-file checkpoints) use the bundled vocabulary in
jaxdiff/assets/clip_tokenizer (OpenAI's CLIP BPE, MIT; see its LICENSE).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxdiff.errors import CheckpointError

BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
CONTEXT_LENGTH = 77  # CLIP's max_position_embeddings; every SD text encoder has 77 positions
PAD_TOKENS = ("<|endoftext|>", "!")  # SD1 style, SD2 / SDXL-encoder-2 style


def _clip_tokenizer_class():
    # Imported lazily: transformers takes seconds to import and only the tokenizer needs it.
    from transformers import CLIPTokenizer
    return CLIPTokenizer


class Tokenizer:
    """CLIP BPE tokenizer producing fixed-length id arrays for the text encoder.

    Build it with `Tokenizer.from_folder(checkpoint / "tokenizer")` or `Tokenizer.bundled(pad_token)`.

    Attributes:
      model_max_length: ids per prompt (77).
      pad_token_id, bos_token_id, eos_token_id: the special ids (bos 49406, eos 49407 for CLIP).
    """

    def __init__(self, hf_tokenizer, source: str):
        self._tok = hf_tokenizer
        self.source = source
        length = hf_tokenizer.model_max_length
        # A folder whose config names no model_max_length gets transformers' "unlimited" sentinel
        # (about 1e30); CLIP can only ever take its 77 positions.
        self.model_max_length = CONTEXT_LENGTH if length is None or length > 10 ** 6 else int(length)
        if self.model_max_length > CONTEXT_LENGTH:
            raise CheckpointError(f"{source}: model_max_length={length} is longer than the "
                                  f"{CONTEXT_LENGTH} positions of a CLIP text encoder")
        self.pad_token_id = int(hf_tokenizer.pad_token_id)
        self.bos_token_id = int(hf_tokenizer.bos_token_id)
        self.eos_token_id = int(hf_tokenizer.eos_token_id)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a checkpoint's `tokenizer/` (or `tokenizer_2/`) folder.

        The folder holds vocab.json + merges.txt (what SD checkpoints ship) or tokenizer.json (what
        transformers 5 writes), with tokenizer_config.json / special_tokens_map.json naming the pad
        token and model_max_length. Nothing is downloaded.
        """
        path = Path(path)
        has_files = (path / "tokenizer.json").is_file() or (
            (path / "vocab.json").is_file() and (path / "merges.txt").is_file())
        if not path.is_dir() or not has_files:
            raise CheckpointError(f"{path}: not a CLIP tokenizer folder (needs vocab.json and merges.txt, "
                                  f"or tokenizer.json)")
        try:
            tok = _clip_tokenizer_class().from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot load the CLIP tokenizer: {e}") from None
        return cls(tok, str(path))

    @classmethod
    def bundled(cls, pad_token: str = "<|endoftext|>") -> "Tokenizer":
        """The CLIP vocabulary shipped with jaxdiff, for checkpoints without a tokenizer folder.

        Args:
          pad_token: "<|endoftext|>" for SD1 (OpenAI CLIP-L), "!" for SD2 and SDXL's second encoder
            (OpenCLIP, which pads with zeros, and "!" is id 0).
        """
        if pad_token not in PAD_TOKENS:
            raise ValueError(f"pad_token={pad_token!r}; CLIP checkpoints pad with one of {PAD_TOKENS}")
        tok = _clip_tokenizer_class().from_pretrained(
            str(BUNDLED_DIR), local_files_only=True, pad_token=pad_token, model_max_length=CONTEXT_LENGTH)
        return cls(tok, f"bundled CLIP vocabulary (pad {pad_token!r})")

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """prompts: one string or a list of B strings -> ids [B, model_max_length] int32."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        if not prompts:
            return np.zeros((0, self.model_max_length), np.int32)
        ids = self._tok(prompts, padding="max_length", max_length=self.model_max_length, truncation=True,
                        return_tensors="np").input_ids
        return np.asarray(ids, dtype=np.int32)

    def save(self, folder: str | os.PathLike) -> None:
        """Writes the tokenizer files (vocab, merges, config with the pad token) for `from_folder`."""
        self._tok.save_pretrained(str(folder))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source}, model_max_length={self.model_max_length}, "
                f"pad_token_id={self.pad_token_id})")
