"""Text conditioning: prompts -> token ids on the host, ids -> UNet context inside the compiled program.

Host side, `tokenize_prompts` turns a request's prompts into fixed-shape id and weight arrays, one row
per generated image (prompt p's images are rows p*N .. p*N+N-1, as diffusers' `num_images_per_prompt`).
Device side, `encode` is a pure function of (params, ids) traced into the generation program, so text
encoding is compiled together with sampling and decoding.

What the UNet receives follows diffusers' pipelines exactly:

* SD1 / SD2 (one encoder): context = `last_hidden_state` [B, 77, D] (final LayerNorm applied). With
  `clip_skip = k >= 1`: `final_layer_norm(hidden_states[-(k + 1)])` (diffusers' clip_skip; k = 1 is A1111's
  "clip skip 2"). jaxdiff applies clip skip to the negative prompt too (A1111 and ComfyUI do; diffusers'
  SD pipelines encode the negative prompt without it, which only matters with guidance).
* SDXL (two encoders): context = concat(enc1.hidden_states[-2], enc2.hidden_states[-2]) [B, 77, D1 + D2],
  `clip_skip = k` takes hidden_states[-(k + 2)] instead (no final LayerNorm, as diffusers), and the pooled
  conditioning is encoder 2's projected `text_embeds` [B, P]. The refiner has only encoder 2.
  An absent negative prompt gives all-zero negative context and pooled embedding when the model asks
  for it (diffusers' `force_zeros_for_empty_prompt`, on for SDXL base).

Weighted prompts (A1111 syntax, jaxdiff/prompt_parser.py): `tokenize_prompts` gives, per encoder, ids
int32 [B, 77k] and weights float32 [B, 77k], k chunks of 77 (BOS + 75 tokens + EOS / padding). The
compiled program depends on k only, never on the text. `encode(..., weights=..., extra=...)` encodes
each chunk on its own, concatenates the chunks along the sequence, multiplies by the weights and
rescales each chunk of each row so its mean is unchanged (A1111 `EmphasisOriginal`, which takes the
mean over the whole batch of a chunk; per row here, so an image never depends on its batch neighbours,
and identical for A1111's usual batch of one prompt). The SDXL pooled embedding comes from the first
chunk (A1111 `zs[0].pooled`).

Textual inversion: `TextualInversions` holds each loaded term's vectors per encoder. Its terms are
ids >= the encoders' vocabulary (49408 ...), looked up in an extra table passed to `encode` as an
argument (`extra`), so loading one never changes the compiled program while the table's capacity
(a power of two, at least 16 rows) holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convert.embeddings import ANY_ENCODER, SDXL_KEYS, Embedding
from jaxdiff import prompt_parser
from jaxdiff.errors import JaxdiffError
from jaxdiff.models.clip import LayerNorm

ENCODERS = ("text_encoder", "text_encoder_2")
CHUNK = prompt_parser.CHUNK_LENGTH + 2   # ids per chunk: BOS + 75 + EOS
MIN_TABLE_ROWS = 16                      # smallest extra-token table (a power of two)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What `encode` needs to know about a pipeline's text encoders (static, hashable).

    Attributes:
      names: the encoders present, in concatenation order (a subset of ENCODERS).
      modules: their Flax modules.
      layer_norm_eps: each encoder's final LayerNorm epsilon (SD1/SD2 clip skip re-applies it).
      sdxl: SDXL rules (penultimate layers, pooled text_embeds from the last encoder).
    """
    names: tuple[str, ...]
    modules: tuple[Any, ...]
    layer_norm_eps: tuple[float, ...]
    sdxl: bool


def encoder_spec(pipe, dtype=None) -> EncoderSpec:
    """The EncoderSpec of a Pipeline: SDXL-style when the UNet takes pooled text + time ids.
    `dtype`: re-make the modules at this compute dtype (training's mixed precision); None keeps them."""
    names = tuple(n for n in ENCODERS if getattr(pipe, n) is not None)
    comps = [getattr(pipe, n) for n in names]
    modules = tuple(c.module if dtype is None else c.module.clone(dtype=dtype) for c in comps)
    return EncoderSpec(names=names, modules=modules,
                       layer_norm_eps=tuple(float(c.config.layer_norm_eps) for c in comps),
                       sdxl=pipe.family.text_time)


def as_prompt_list(prompt: str | Sequence[str], what: str = "prompt") -> list[str]:
    """A string or a list of strings -> a non-empty list of strings."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise JaxdiffError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _extra_token_rows(vocab_size: int, table: jax.Array):
    """A flax interceptor: ids >= vocab_size read row (id - vocab_size) of `table` [R, D] instead of
    the token embedding (textual-inversion vectors, passed as an argument, never baked in)."""
    def interceptor(next_fun, args, kwargs, context):
        if (context.method_name != "__call__" or not isinstance(context.module, nn.Embed)
                or context.module.name != "token_embedding"):
            return next_fun(*args, **kwargs)
        (ids,) = args
        extra = ids >= vocab_size
        base = next_fun(jnp.where(extra, 0, ids), **kwargs)
        rows = jnp.take(table, jnp.clip(ids - vocab_size, 0, table.shape[0] - 1), axis=0)
        return jnp.where(extra[..., None], rows.astype(base.dtype), base)
    return interceptor


def emphasize(z: jax.Array, weights: jax.Array) -> jax.Array:
    """A1111 `EmphasisOriginal` per chunk and row: z [B, k, 77, D] * weights [B, k, 77], then each
    [77, D] chunk rescaled so its mean equals the unweighted mean.

    A chunk whose weights are all 1 is returned exactly as is (A1111's ratio is 1 up to rounding
    there, and a mean near 0 would make the rounding large), so an unweighted prompt gives exactly
    the unweighted encoding."""
    original = z.mean(axis=(2, 3), keepdims=True)
    weighted = z * weights[..., None]
    rescaled = weighted * (original / weighted.mean(axis=(2, 3), keepdims=True))
    plain = jnp.all(weights == 1, axis=2)[..., None, None]  # [B, k, 1, 1]
    return jnp.where(plain, z, rescaled)


def encode(spec: EncoderSpec, params: Mapping[str, Any], ids: Mapping[str, jax.Array],
           clip_skip: int | None, weights: Mapping[str, jax.Array] | None = None,
           extra: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Pure: ids -> (context [B, 77k, D] float32, pooled [B, P] float32 or None). Traced inside jit.

    Args:
      spec: from `encoder_spec`.
      params: encoder name -> its params.
      ids: encoder name -> int32 [B, 77k], k >= 1 chunks of 77 (`tokenize_prompts`; [B, 77] from
        `tokenize_request` is k = 1).
      clip_skip: None, or the number of final layers to skip (see the module docstring).
      weights: None (no weighting), or encoder name -> float32 [B, 77k] per-token weights.
      extra: None, or encoder name -> float32 [R, D] rows for ids >= the encoder's vocab_size
        (`TextualInversions.tables`).
    """
    contexts, pooled = [], None
    for name, module, eps in zip(spec.names, spec.modules, spec.layer_norm_eps):
        x = ids[name]
        rows, length = x.shape
        if length % CHUNK and length != module.config.max_position_embeddings:
            raise ValueError(f"{name} ids have {length} positions; expected a multiple of {CHUNK}")
        chunks = max(length // CHUNK, 1)
        flat = x.reshape(rows * chunks, length // chunks)  # each chunk encoded on its own
        if extra is not None and name in extra:
            with nn.intercept_methods(_extra_token_rows(module.config.vocab_size, extra[name])):
                out = module.apply({"params": params[name]}, flat)
        else:
            out = module.apply({"params": params[name]}, flat)
        if spec.sdxl:
            h = out.hidden_states[-(clip_skip + 2)] if clip_skip else out.hidden_states[-2]
            # The last encoder's projected pooled output (diffusers keeps that one), first chunk (A1111).
            if out.text_embeds is not None:
                pooled = out.text_embeds.reshape(rows, chunks, -1)[:, 0]
        elif clip_skip:
            ln = params[name]["text_model"]["final_layer_norm"]
            h = LayerNorm(epsilon=eps, dtype=jnp.float32).apply({"params": ln}, out.hidden_states[-(clip_skip + 1)])
        else:
            h = out.last_hidden_state
        h = h.astype(jnp.float32).reshape(rows, chunks, length // chunks, -1)
        if weights is not None:
            h = emphasize(h, weights[name].astype(jnp.float32).reshape(rows, chunks, length // chunks))
        contexts.append(h.reshape(rows, length, -1))
    context = contexts[0] if len(contexts) == 1 else jnp.concatenate(contexts, axis=-1)
    if spec.sdxl:
        if pooled is None:
            raise JaxdiffError("an SDXL-style UNet needs a projected text encoder (text_encoder_2)")
        pooled = pooled.astype(jnp.float32)
    return context, pooled


def check_clip_skip(pipe, clip_skip: int | None) -> int | None:
    """Validate clip_skip against the shallowest encoder; 0 and None both mean "no skip"."""
    if clip_skip is None or clip_skip == 0:
        return None
    layers = min(getattr(pipe, n).config.num_hidden_layers for n in ENCODERS if getattr(pipe, n) is not None)
    extra = 1 if pipe.family.text_time else 0
    if not isinstance(clip_skip, int) or not 0 < clip_skip + extra < layers:
        raise JaxdiffError(f"clip_skip={clip_skip!r} must be an integer in [0, {layers - 1 - extra}] "
                           f"for this model's {layers}-layer text encoder")
    return clip_skip


# ---- host side: weighted prompts and textual inversion ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class TextualInversions:
    """Loaded textual-inversion terms: token -> vectors per encoder. Immutable; `add` returns a new one.

    Term t's vectors are ids `vocab_size + first .. + n - 1` in every encoder (one numbering, so SDXL's
    two tokenizers agree), looked up in `tables()` rather than the token embedding.

    Attributes:
      widths: encoder name -> its hidden width (what an embedding's vectors must have).
      vocab_size: the encoders' token-embedding rows (49408); term ids start there.
      terms: name -> Embedding, in load order.
    """
    widths: Mapping[str, int]
    vocab_size: int
    terms: Mapping[str, Embedding] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_pipeline(cls, pipe) -> "TextualInversions":
        """An empty set sized for a Pipeline's text encoders."""
        comps = {n: getattr(pipe, n) for n in ENCODERS if getattr(pipe, n) is not None}
        sizes = {c.config.vocab_size for c in comps.values()}
        if len(sizes) != 1:
            raise JaxdiffError(f"the text encoders have different vocabularies {sorted(sizes)}; textual "
                               f"inversion needs one numbering")
        return cls(widths={n: int(c.config.hidden_size) for n, c in comps.items()}, vocab_size=sizes.pop())

    def vectors_for(self, embedding: Embedding) -> dict[str, np.ndarray]:
        """encoder name -> float32 [n, D] of one embedding, or a one-line JaxdiffError if it does not fit."""
        names = list(self.widths)
        if ANY_ENCODER in embedding.vectors:
            vec = embedding.vectors[ANY_ENCODER]
            if len(names) != 1:
                raise JaxdiffError(f"{embedding.path}: one set of {vec.shape[1]}-wide vectors, but this model "
                                   f"has {len(names)} text encoders; an SDXL embedding has clip_l and clip_g")
            fitted = {names[0]: vec}
        else:
            fitted = {}
            for key, name in zip(SDXL_KEYS, ENCODERS):
                if name in self.widths:
                    fitted[name] = embedding.vectors[key]
        for name, vec in fitted.items():
            if vec.shape[1] != self.widths[name]:
                raise JaxdiffError(f"{embedding.path}: vectors are {vec.shape[1]} wide but {name} is "
                                   f"{self.widths[name]} wide; the embedding was trained for another model")
        return fitted

    def add(self, embedding: Embedding) -> "TextualInversions":
        """A new set with `embedding` added (replacing a term of the same name, as A1111 does)."""
        self.vectors_for(embedding)  # fit check first: a failed load leaves the set unchanged
        terms = {k: v for k, v in self.terms.items() if k != embedding.name}
        terms[embedding.name] = embedding
        return dataclasses.replace(self, terms=terms)

    def ids(self) -> dict[str, tuple[int, ...]]:
        """name -> the ids of its vectors (consecutive, from vocab_size)."""
        out, first = {}, self.vocab_size
        for name, emb in self.terms.items():
            out[name] = tuple(range(first, first + emb.num_vectors))
            first += emb.num_vectors
        return out

    @property
    def rows(self) -> int:
        return sum(e.num_vectors for e in self.terms.values())

    def embedding_lengths(self) -> dict[int, int]:
        """first id -> number of vectors, so the chunker never splits a term across chunks."""
        return {ids[0]: len(ids) for ids in self.ids().values()}

    def tokenizer(self, tokenizer):
        """`tokenizer` taught every term's name (a copy; the argument is unchanged)."""
        return tokenizer.with_embeddings(self.ids()) if self.terms else tokenizer

    def tables(self, capacity: int | None = None) -> dict[str, np.ndarray]:
        """encoder name -> float32 [capacity, D] (zeros past the loaded rows): `encode`'s `extra`.

        capacity: rows; None picks the smallest power of two >= max(rows, 16), so adding a term
        changes the table's shape (and recompiles) only when the count crosses a power of two.
        """
        capacity = capacity or max(MIN_TABLE_ROWS, 1 << max(self.rows - 1, 0).bit_length())
        if capacity < self.rows:
            raise ValueError(f"capacity {capacity} < {self.rows} loaded vectors")
        out = {}
        for name, width in self.widths.items():
            table = np.zeros((capacity, width), np.float32)
            row = 0
            for emb in self.terms.values():
                vec = self.vectors_for(emb)[name]
                table[row:row + len(vec)] = vec
                row += len(vec)
            out[name] = table
        return out

    def hashes(self) -> str:
        """A1111's "TI hashes" infotext value: "name: shorthash, ..." (terms loaded from files)."""
        return ", ".join(f"{n.replace(':', '').replace(',', '')}: {e.shorthash}"
                         for n, e in self.terms.items() if e.sha256)


@dataclasses.dataclass(frozen=True)
class TextInputs:
    """Host arrays of one request's text conditioning (`tokenize_prompts`).

    Attributes:
      ids, weights: encoder name -> int32 / float32 [P * N, 77k]; row r is prompt r // N.
      negative_ids, negative_weights: the same for the negative prompt, or None when none was given
        (the caller chooses "" (`empty_text_inputs`) or zeros, as today).
      chunks: k, the same for every encoder, prompt and negative prompt.
      n_prompts: P.
    """
    ids: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    negative_ids: dict[str, np.ndarray] | None
    negative_weights: dict[str, np.ndarray] | None
    chunks: int
    n_prompts: int


def pipeline_tokenizers(pipe, embeddings: TextualInversions | None = None) -> dict[str, Any]:
    """encoder name -> its tokenizer (taught the textual-inversion terms, if any)."""
    out = {}
    for name in ENCODERS:
        if getattr(pipe, name) is not None:
            tok = pipe.tokenizer if name == "text_encoder" else pipe.tokenizer_2
            out[name] = embeddings.tokenizer(tok) if embeddings is not None else tok
    return out


def _per_prompt(value, n_prompts: int, what: str) -> list[str]:
    texts = as_prompt_list(value, what)
    if len(texts) == 1:
        texts = texts * n_prompts
    if len(texts) != n_prompts:
        raise JaxdiffError(f"{what} has {len(texts)} entries but prompt has {n_prompts}; "
                           f"pass one or one per prompt")
    return texts


def tokenize_prompts(tokenizers: Mapping[str, Any], prompt, negative_prompt=None,
                     num_images_per_prompt: int = 1, *, prompt_2=None, negative_prompt_2=None,
                     prompt_weighting: str = "a1111",
                     embeddings: TextualInversions | None = None) -> TextInputs:
    """Prompts -> weighted chunked ids for every encoder and generated image.

    Args:
      tokenizers: from `pipeline_tokenizers(pipe, embeddings)` (encoder name -> Tokenizer).
      prompt: a string or a list of P strings; negative_prompt: None, one string or P strings.
      prompt_2, negative_prompt_2: SDXL's second encoder's texts (diffusers: None means the same as
        prompt / negative_prompt); ignored unless both encoders are present (diffusers' refiner too).
        A negative_prompt_2 without negative_prompt makes negative ids ("" for encoder 1); diffusers
        then still uses zeros when force_zeros_for_empty_prompt, so the caller decides.
      prompt_weighting: "a1111" (jaxdiff/prompt_parser.py) or "none" (diffusers: text as is, one
        chunk, truncated at 75 tokens with a warning).
      embeddings: the loaded textual-inversion terms, so a term is never split across chunks.
    """
    if prompt_weighting not in prompt_parser.WEIGHTINGS:
        raise JaxdiffError(f"prompt_weighting={prompt_weighting!r}; expected one of {prompt_parser.WEIGHTINGS}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise JaxdiffError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
    prompts = as_prompt_list(prompt)
    n = len(prompts)
    # diffusers zips [prompt, prompt_2] with the tokenizers present, so a refiner (text_encoder_2
    # only) reads `prompt` and ignores prompt_2.
    two = len(tokenizers) == 2
    texts = {name: prompts for name in tokenizers}
    if two and prompt_2 is not None:
        texts["text_encoder_2"] = _per_prompt(prompt_2, n, "prompt_2")
    negatives = None
    if negative_prompt is not None or (two and negative_prompt_2 is not None):
        first = _per_prompt(negative_prompt if negative_prompt is not None else "", n, "negative_prompt")
        negatives = {name: first for name in tokenizers}
        if two and negative_prompt_2 is not None:
            negatives["text_encoder_2"] = _per_prompt(negative_prompt_2, n, "negative_prompt_2")
    lengths = embeddings.embedding_lengths() if embeddings is not None else {}

    def chunked(groups):
        return {name: [prompt_parser.prompt_chunks(tokenizers[name], t, weighting=prompt_weighting,
                                                   embedding_lengths=lengths) for t in group]
                for name, group in groups.items()}

    pos = chunked(texts)
    neg = chunked(negatives) if negatives is not None else {}
    k = max(len(c) for side in (pos, neg) for rows in side.values() for c in rows)

    def framed(side):
        ids, weights = {}, {}
        for name, rows in side.items():
            tok = tokenizers[name]
            framed_rows = [prompt_parser.frame_chunks(c, bos=tok.bos_token_id, eos=tok.eos_token_id,
                                                      pad=tok.pad_token_id, count=k) for c in rows]
            ids[name] = np.repeat(np.stack([i for i, _ in framed_rows]), num_images_per_prompt, axis=0)
            weights[name] = np.repeat(np.stack([w for _, w in framed_rows]), num_images_per_prompt, axis=0)
        return ids, weights

    ids, weights = framed(pos)
    neg_ids, neg_weights = framed(neg) if negatives is not None else (None, None)
    return TextInputs(ids=ids, weights=weights, negative_ids=neg_ids, negative_weights=neg_weights,
                      chunks=k, n_prompts=n)


def empty_text_inputs(tokenizers: Mapping[str, Any], rows: int, chunks: int) -> tuple[dict, dict]:
    """(ids, weights) of the empty prompt "" as `chunks` empty chunks for `rows` images: the default
    negative prompt of a k-chunk request (A1111 pads with the same empty chunks)."""
    ids, weights = {}, {}
    for name, tok in tokenizers.items():
        i, w = prompt_parser.frame_chunks([], bos=tok.bos_token_id, eos=tok.eos_token_id,
                                          pad=tok.pad_token_id, count=chunks)
        ids[name], weights[name] = np.tile(i, (rows, 1)), np.tile(w, (rows, 1))
    return ids, weights
