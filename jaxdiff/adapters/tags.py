"""A1111's LoRA prompt tags and file hashes: `<lora:NAME:WEIGHT>` in a prompt picks a LoRA from a folder.

    text, tags = extract_tags("a castle <lora:detail:0.8>, night")   # "a castle , night", [Tag(...)]

Syntax (A1111 extra networks, modules/extra_networks.py and extensions-builtin/Lora/extra_networks_lora.py):
`<lora:NAME>` (weight 1), `<lora:NAME:W>` (text encoders and UNet alike), `<lora:NAME:TE:UNET>` (the
text encoders at TE, the UNet at UNET). The tags are removed from the text the model sees; the PNG
keeps the prompt as written, as A1111 does, and adds "Lora hashes".
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from jaxdiff.errors import JaxdiffError

_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)
SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")


@dataclasses.dataclass(frozen=True)
class Tag:
    name: str
    te: float
    unet: float

    @property
    def weight(self):
        """A float when both parts agree, else per component (AdapterSet / set_adapters take either)."""
        if self.te == self.unet:
            return self.unet
        return {"unet": self.unet, "text_encoder": self.te, "text_encoder_2": self.te}


def extract_tags(text: str) -> tuple[str, list[Tag]]:
    """(text without its <lora:...> tags, the tags in order)."""
    tags = []
    for m in _TAG.finditer(text):
        parts = [p for p in m.group(2).split(":")[1:]]
        try:
            numbers = [float(p) for p in parts if p.strip()]
        except ValueError:
            raise JaxdiffError(f"{m.group(0)}: weights must be numbers, e.g. <lora:{m.group(1)}:0.8>") from None
        if len(numbers) > 2:
            raise JaxdiffError(f"{m.group(0)}: at most two weights (text encoder, UNet)")
        te = numbers[0] if numbers else 1.0
        tags.append(Tag(m.group(1).strip(), te, numbers[1] if len(numbers) == 2 else te))
    return _TAG.sub("", text), tags


def find_lora(folder, name: str) -> Path:
    """The file NAME.<suffix> in `folder` (searched recursively, as A1111 lists its Lora folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise JaxdiffError(f"{folder}: no such LoRA folder")
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.stem == name and path.suffix.lower() in SUFFIXES:
            return path
    raise JaxdiffError(f"<lora:{name}>: no {name}.safetensors (or .pt / .ckpt) in {folder}")


def short_hash(path) -> str:
    """A1111's LoRA hash (first 12 hex digits): for .safetensors the sha256 of the bytes after the
    header (kohya's "addnet" hash, modules/hashes.py addnet_hash_safetensors), else of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix.lower() == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
