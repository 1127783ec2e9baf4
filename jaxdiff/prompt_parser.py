"""A1111 prompt syntax: attention weights, BREAK, and 75-token chunks (host side, pure Python).

The rules are AUTOMATIC1111/stable-diffusion-webui's (`modules/prompt_parser.py`
`parse_prompt_attention`, `modules/sd_hijack_clip.py` `tokenize_line`, `modules/sd_emphasis.py`
`EmphasisOriginal`), rewritten here:

* `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.5)` multiplies it by 1.5;
  brackets nest (`((x))` = 1.21); an unclosed bracket applies to the end of the prompt; an unmatched
  closing bracket or a `(x:w)` weight outside any round bracket is literal text.
* `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters; a lone backslash is dropped.
* `BREAK` (upper case, a whole word) ends the current chunk. A1111 marks it with weight -1 and only
  honours a marker whose weight is still exactly -1, so a BREAK inside brackets is read as the word
  "break" with a negative weight; jaxdiff keeps that, as A1111 gives it.
* Text runs of equal weight are merged, and each run is tokenized on its own.
* Tokens go into chunks of 75. When a chunk is full and the next token is not a comma, and the last
  comma of the chunk is at most 20 tokens back (`comma_padding_backtrack`, 20 by default), the tokens
  after that comma move to the next chunk. A textual-inversion embedding is never split across chunks.
* Each chunk is BOS + its tokens + EOS, padded to 77 with the tokenizer's pad id (CLIP-L pads with
  EOS; OpenCLIP tokenizers with "!" = id 0, as A1111 replaces everything after the first EOS with
  `id_pad` 0). BOS, EOS and padding have weight 1.

The weights are applied to the encoder output by `jaxdiff.prompts.encode` (multiply, then rescale so
the chunk's mean is unchanged).
"""
from __future__ import annotations

import re
import warnings
from typing import Mapping, Sequence

import numpy as np

CHUNK_LENGTH = 75           # tokens per chunk between BOS and EOS
COMMA_BACKTRACK = 20        # A1111 opts.comma_padding_backtrack default
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_WEIGHT = -1.0         # A1111's marker for BREAK in the parsed list
WEIGHTINGS = ("a1111", "none")

# The token kinds, in A1111's order: escapes, a lone backslash, opening brackets, a weight closing a
# round bracket, closing brackets, plain text, a lone colon.
_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111 prompt text -> [(text, weight)] runs; a BREAK is ("BREAK", -1.0).

    >>> parse_prompt_attention("a (b:1.5) [c] \\\\(d\\\\)")
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 0.9090909090909091), (' (d)', 1.0)]
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for item in res[start:]:
            item[1] *= multiplier

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "(x:1.2.3)": A1111 raises here; a literal is kinder and unambiguous
                res.append([piece, 1.0])
                continue
            multiply_from(round_open.pop(), factor)
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    res.append(["BREAK", BREAK_WEIGHT])
                res.append([part, 1.0])
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, float(w)) for t, w in merged]


def _is_break(text: str, weight: float) -> bool:
    return text == "BREAK" and weight == BREAK_WEIGHT


def chunk_tokens(runs: Sequence[tuple[Sequence[int], float] | None], *, comma_id: int,
                 embedding_lengths: Mapping[int, int] = {},
                 backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """Tokenized weighted runs -> chunks of at most 75 (tokens, weights), A1111's `tokenize_line`.

    Args:
      runs: each run's token ids and weight, or None for a BREAK.
      comma_id: the id of a word-final ",".
      embedding_lengths: first id of a textual-inversion embedding -> its number of vectors (ids
        first .. first + n - 1 follow it in the run), so an embedding is never split across chunks.
      backtrack: how far back a comma may be to move the chunk's tail to the next chunk (0: never).

    Returns:
      One (tokens, weights) pair per chunk, without BOS / EOS / padding; at least one chunk.
    """
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk(carry_tokens=(), carry_weights=()):
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = list(carry_tokens), list(carry_weights), -1

    for run in runs:
        if run is None:
            next_chunk()
            continue
        ids, weight = run
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_id:
                last_comma = len(tokens)
            elif (backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(tokens) - last_comma <= backtrack):
                cut = last_comma + 1
                tail_tokens, tail_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk(tail_tokens, tail_weights)
            if len(tokens) == CHUNK_LENGTH:
                next_chunk()
            n = embedding_lengths.get(token, 1)
            if n > 1 and len(tokens) + n > CHUNK_LENGTH:
                next_chunk()
            tokens += list(ids[position:position + n])
            weights += [weight] * len(ids[position:position + n])
            position += n
    if tokens or not chunks:
        next_chunk()
    return chunks


def frame_chunks(chunks: Sequence[tuple[Sequence[int], Sequence[float]]], *, bos: int, eos: int,
                 pad: int, count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Chunks -> ids int32 [count * 77] and weights float32 [count * 77]: BOS + tokens + EOS + pad.

    Args:
      count: total chunks; missing ones are empty chunks (the encoding of "", weight 1), which is
        how A1111 pads a batch's shorter prompts and the negative prompt. None: len(chunks).
    """
    count = len(chunks) if count is None else count
    if count < len(chunks):
        raise ValueError(f"{len(chunks)} chunks do not fit in {count}")
    width = CHUNK_LENGTH + 2
    ids = np.full((count, width), pad, np.int32)
    weights = np.ones((count, width), np.float32)
    ids[:, 0] = bos
    for k in range(count):
        tokens, w = chunks[k] if k < len(chunks) else ((), ())
        ids[k, 1:1 + len(tokens)] = tokens
        ids[k, 1 + len(tokens)] = eos
        weights[k, 1:1 + len(tokens)] = w
    return ids.reshape(-1), weights.reshape(-1)


def prompt_chunks(tokenizer, text: str, *, weighting: str = "a1111",
                  embedding_lengths: Mapping[int, int] = {}) -> list[tuple[list[int], list[float]]]:
    """One prompt -> its chunks of (tokens, weights), ready for `frame_chunks`.

    Args:
      tokenizer: a jaxdiff Tokenizer (`encode_batch`, `comma_id`, `model_max_length`).
      weighting: "a1111" (the rules of the module docstring) or "none" (diffusers: the text as is,
        one chunk, tokens past model_max_length - 2 dropped with a warning).
    """
    if weighting == "none":
        ids = tokenizer.encode(text)
        room = tokenizer.model_max_length - 2
        if len(ids) > room:
            warnings.warn(f"the prompt has {len(ids)} tokens; CLIP takes {room}, the rest is dropped "
                          f"(prompt_weighting='a1111' splits long prompts into chunks)", stacklevel=3)
        return [(ids[:room], [1.0] * len(ids[:room]))]
    if weighting != "a1111":
        raise ValueError(f"prompt_weighting={weighting!r}; expected one of {WEIGHTINGS}")
    parsed = parse_prompt_attention(text)
    texts = [t for t, w in parsed if not _is_break(t, w)]
    encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    runs = [None if _is_break(t, w) else (next(encoded), w) for t, w in parsed]
    return chunk_tokens(runs, comma_id=tokenizer.comma_id, embedding_lengths=embedding_lengths)
