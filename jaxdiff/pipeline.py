"""Pipeline: the networks, tokenizers and scheduler config of one Stable Diffusion model.

    pipe = jaxdiff.load("path/to/sd15")          # see jaxdiff.loading
    pipe.text_encoder(ids).last_hidden_state     # components are pure jitted callables
    pipe.unet(x, t, context)
    pipe.vae.decode(z)
    pipe.save("out/")                            # native format, read back by jaxdiff.load

Generation (`pipe(prompt, ...)`) is built on top of these parts in the generation layer.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

from jaxdiff import checkpoint
from jaxdiff.components import Component
from jaxdiff.errors import CheckpointError

REQUIRED = ("unet", "vae", "text_encoder")


class Pipeline:
    """Holds `text_encoder`, `text_encoder_2` (SDXL), `unet`, `vae`, `tokenizer`, `tokenizer_2` and
    `scheduler_config` (the checkpoint's own scheduler_config.json, a dict, or None)."""

    def __init__(self, *, unet: Component, vae: Component, text_encoder: Component,
                 tokenizer, text_encoder_2: Component | None = None, tokenizer_2=None,
                 scheduler_config: Mapping[str, Any] | None = None, pipeline_class: str | None = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.pipeline_class = pipeline_class

    @classmethod
    def from_parts(cls, networks: Mapping[str, Component], tokenizers: Mapping[str, Any],
                   scheduler_config, *, source: str, pipeline_class: str | None = None) -> "Pipeline":
        """Assembles a pipeline from loaded parts, checking that they fit together."""
        missing = [n for n in REQUIRED if n not in networks]
        if missing:
            raise CheckpointError(f"{source}: no {', '.join(missing)} in this model folder")
        if "tokenizer" not in tokenizers:
            from jaxdiff.tokenizer import Tokenizer  # bundled CLIP vocabulary, SD1 padding
            tokenizers = {**tokenizers, "tokenizer": Tokenizer.bundled()}
        if "text_encoder_2" in networks and "tokenizer_2" not in tokenizers:
            from jaxdiff.tokenizer import Tokenizer
            tokenizers = {**tokenizers, "tokenizer_2": Tokenizer.bundled(pad_token="!")}
        context = sum(networks[n].config.hidden_size for n in ("text_encoder", "text_encoder_2")
                      if n in networks)
        if networks["unet"].config.cross_attention_dim != context:
            raise CheckpointError(f"{source}: the unet expects context width "
                                  f"{networks['unet'].config.cross_attention_dim} but the text encoders give "
                                  f"{context}; the components do not belong together")
        return cls(**networks, **tokenizers, scheduler_config=scheduler_config,
                   pipeline_class=pipeline_class)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def components(self) -> dict[str, Component]:
        """The networks present, by their diffusers names."""
        return {name: c for name in ("text_encoder", "text_encoder_2", "unet", "vae")
                if (c := getattr(self, name)) is not None}

    def save(self, dst) -> None:
        """Writes the native format (jaxdiff.checkpoint) atomically; `jaxdiff.load(dst)` reads it back."""
        parts = {name: (type(c).__name__, c.config, c.params) for name, c in self.components().items()}
        with tempfile.TemporaryDirectory() as tmp:
            tok_dirs = {}
            for name in ("tokenizer", "tokenizer_2"):
                tok = getattr(self, name)
                if tok is not None:
                    tok.save(Path(tmp) / name)
                    tok_dirs[name] = Path(tmp) / name
            extra_json = {}
            if self.scheduler_config is not None:
                extra_json["scheduler/scheduler_config.json"] = self.scheduler_config
            checkpoint.write_folder(dst, parts, extra_dirs=tok_dirs, extra_json=extra_json,
                                    pipeline={"class": self.pipeline_class})
