"""LoRA / LyCORIS files (diffusers / PEFT, old diffusers, kohya / A1111, SGM names) -> one adapter form.

Every format people download ends up as `LoraFile.layers`: (component, diffusers module path) ->
`LoraLayer`, where component is "unet", "text_encoder" or "text_encoder_2" and the module path is the
diffusers / transformers one (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`text_model.encoder.layers.0.self_attn.q_proj`). A layer keeps its factors in the file's torch layout
and the scale the reference implementations give it; jaxdiff.adapters turns it into a dense delta.

Key styles read (shared/reference/formats.md §3 has the facts with sources):
- diffusers / PEFT: `unet.<module>.lora_A.weight` [r, in(, k, k)], `.lora_B.weight` [out, r(, 1, 1)],
  optional `.alpha` (diffusers' converted network alphas), `.lora_magnitude_vector` (DoRA); rank and
  alpha from the `lora_adapter_metadata` JSON when present (diffusers `loaders/peft.py`,
  `utils/peft_utils.get_peft_kwargs`).
- old diffusers: `<module>.processor.to_q_lora.down.weight` (to_out_lora -> to_out.0), `<module>.lora.down`,
  text encoders `q_proj.lora_linear_layer.down` (diffusers `utils/state_dict_utils.py`).
- kohya / A1111: `lora_unet_*`, `lora_te_*`, `lora_te1_*` / `lora_te2_*` with `.lora_down.weight`,
  `.lora_up.weight`, optional `.lora_mid.weight` (Tucker), `.alpha`, `.scale`, `.dora_scale`; the name is
  the module path with every `.` turned into `_`, which is ambiguous (`to_q`, `transformer_blocks`), so
  names are matched against the model's own module list, never split. SDXL files from sd-scripts use the
  SGM UNet's names (`input_blocks_4_1_...`, `middle_block_1_...`, `output_blocks_...`, resnet
  `in_layers_2` / `out_layers_3` / `skip_connection`): the SGM name of every diffusers module is derived
  from the model's own module list (levels, resnets per level, where the resamplers and attentions are),
  which is what diffusers' `_maybe_map_sgm_blocks_to_diffusers` computes from `layers_per_block`.
- LyCORIS LoHa (`hada_w1_a/b`, `hada_w2_a/b`, optional `hada_t1/t2`) and LoKr (`lokr_w1` or
  `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b`, optional `lokr_t2`) under the same kohya names.

Scales (multiply the dense delta; the user's adapter weight comes on top):
- LoRA / LoCon: alpha / r with r = the down factor's rows (kohya `networks/lora.py` LoRAModule; A1111
  `extensions-builtin/Lora/network.py` calc_scale); a missing alpha means scale 1 (A1111, ComfyUI
  `comfy/lora.py`, and diffusers, which sets lora_alpha = r); A1111's optional per-module `scale`
  tensor overrides it. PEFT files: lora_alpha / r from the metadata (`alpha_pattern` / `rank_pattern`
  per module, `use_rslora`: alpha / sqrt(r)), r from `lora_B`'s shape as diffusers reads it.
- LoHa: alpha / r, r = `hada_w1_b` rows (LyCORIS `lycoris/modules/loha.py`, A1111 `network_hada.py`).
- LoKr: alpha / dim only when a factorised side gives a dim (`lokr_w2_b` rows, else `lokr_w1_b` rows),
  else 1 (A1111 `network_lokr.py`, ComfyUI `comfy/weight_adapter/lokr.py`; LyCORIS `lokr.py` itself
  stores alpha = dim when both sides are full).
- DoRA: `lora_magnitude_vector` (PEFT) or `dora_scale` (kohya / LyCORIS); the norm axis is read from
  the vector's shape in jaxdiff.adapters (formats.md §3.6).

A leaf module: numpy, json and convert.formats only; it never imports jaxdiff. Pickled `.pt` / `.bin`
LoRAs go through `normalise(tensors, ...)` once a restricted unpickler has read them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np

from convert.errors import CheckpointError
from convert.formats import read_safetensors

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoraFileError(CheckpointError):
    """A LoRA file that cannot be read, or whose keys / shapes do not fit the model. One line."""


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted module, in the file's torch layout.

    kind: "lora" (factors down [r, in(, k, k)], up [out, r(, 1, 1)], optional mid [r, r, k, k]),
      "loha" (w1_a, w1_b, w2_a, w2_b, optional t1, t2) or "lokr" (w1 or w1_a + w1_b, w2 or w2_a + w2_b,
      optional t2).
    scale: the factor on the dense delta the references apply (alpha / rank, see the module docstring).
    magnitude: DoRA magnitude vector (`lora_magnitude_vector` or `dora_scale`) or None.
    dora: "peft" (W' = m (W + wΔ) / ‖W + wΔ‖) or "blend" (A1111 / ComfyUI: W + w (W'' - W) with W'' at
      full strength); only meaningful with a magnitude.
    key: the file's name for the module (errors quote it).
    """
    kind: str
    factors: Mapping[str, np.ndarray]
    scale: float
    key: str
    magnitude: np.ndarray | None = None
    dora: str = "peft"


@dataclasses.dataclass(frozen=True)
class LoraFile:
    """A normalised LoRA file: (component, diffusers module path) -> layer."""
    source: str
    layers: Mapping[tuple[str, str], LoraLayer]
    metadata: Mapping[str, str]


# --- reading ------------------------------------------------------------------------------------------

def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` dict of a .safetensors header ({} when absent). Sizes are checked by
    convert.formats.read_safetensors, which the caller runs first."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoraFileError(f"{path}: corrupt safetensors header ({e})") from None
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


PICKLED = (".pt", ".pth", ".bin", ".ckpt")


def read_lora(path: str | os.PathLike, modules: Mapping[str, Collection[str]]) -> LoraFile:
    """Reads a .safetensors LoRA / LyCORIS file and normalises it against the model's modules.

    Args:
      path: the file: .safetensors, or pickled `.pt` / `.pth` / `.bin` / `.ckpt` read through the
        allow-list unpickler (convert/pickle_reader.py: no code from the file runs).
      modules: component -> the diffusers module paths of that component that carry a weight (e.g.
        {"unet": {"conv_in", "down_blocks.0.resnets.0.conv1", ...}, "text_encoder": {...}}).
    Raises:
      LoraFileError (one line, naming the file) for a missing / truncated file, keys that match no
      module, factors whose ranks disagree.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLED:
        from convert.pickle_reader import read_pickle_checkpoint
        tensors, _ = read_pickle_checkpoint(path)
        return normalise(tensors, modules, source=str(path))
    tensors = read_safetensors(path)
    return normalise(tensors, modules, metadata=read_metadata(path), source=str(path))


def normalise(tensors: Mapping[str, np.ndarray], modules: Mapping[str, Collection[str]], *,
              metadata: Mapping[str, str] | None = None, source: str = "LoRA") -> LoraFile:
    """A LoRA state dict (any supported key style) -> LoraFile; arguments as in `read_lora`."""
    metadata = dict(metadata or {})
    if not tensors:
        raise LoraFileError(f"{source}: no tensors in this LoRA file")
    lookup = _NameLookup(modules)
    peft_meta = _peft_metadata(metadata, source)
    groups: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, part = split
        groups.setdefault(name, {})[part] = np.asarray(value)
    layers: dict[tuple[str, str], LoraLayer] = {}
    for name, parts in groups.items():
        target = lookup.resolve(name)
        if target is None:
            unknown.append(name)
            continue
        if target in layers:
            raise LoraFileError(f"{source}: {name} and {layers[target].key} adapt the same module {target[1]}")
        layers[target] = _layer(name, parts, target, peft_meta, source)
    if unknown:
        raise LoraFileError(f"{source}: {len(unknown)} keys match no module of this model (e.g. "
                            f"{', '.join(sorted(unknown)[:3])}); is it a LoRA for another model family?")
    return LoraFile(source=source, layers=layers, metadata=metadata)


# --- key styles ---------------------------------------------------------------------------------------

# Key suffix -> the normalised part name. Longest first, so `.lora_A.weight` wins over `.weight`.
_PARTS = {
    # PEFT / diffusers
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude", ".lora_B.bias": "B_bias",
    # old diffusers
    "_lora.down.weight": "old_down", "_lora.up.weight": "old_up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    # kohya / LyCORIS
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".alpha": "alpha", ".scale": "scale", ".dora_scale": "dora_scale",
    ".hada_w1_a": "w1_a", ".hada_w1_b": "w1_b", ".hada_w2_a": "w2_a", ".hada_w2_b": "w2_b",
    ".hada_t1": "t1", ".hada_t2": "t2",
    ".lokr_w1": "k_w1", ".lokr_w1_a": "k_w1_a", ".lokr_w1_b": "k_w1_b",
    ".lokr_w2": "k_w2", ".lokr_w2_a": "k_w2_a", ".lokr_w2_b": "k_w2_b", ".lokr_t2": "k_t2",
}
_SUFFIXES = sorted(_PARTS, key=len, reverse=True)
# Attention-processor LoRA names (diffusers `UNET_TO_DIFFUSERS`): `to_out_lora` -> `to_out.0`.
_OLD_PROCESSOR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_CLIP_PROCESSOR = re.compile(r"\.to_(q|k|v|out)(?:\.0)?$")
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))


def _split_key(key: str) -> tuple[str, str] | None:
    """'unet.x.to_q.lora_A.weight' -> ('unet.x.to_q', 'A'); old processor keys keep the projection name."""
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            name, part = key[: -len(suffix)], _PARTS[suffix]
            if part in ("old_down", "old_up"):  # '....processor.to_q_lora.down.weight'
                head, _, proj = name.rpartition(".")
                if proj not in _OLD_PROCESSOR:
                    return None
                name = f"{head.removesuffix('.processor')}.{_OLD_PROCESSOR[proj]}"
                part = part.removeprefix("old_")
            return name.replace(".processor.", "."), part
    return None


class _NameLookup:
    """File module names -> (component, diffusers module path), from the model's own module list."""

    def __init__(self, modules: Mapping[str, Collection[str]]):
        self.dotted: dict[str, dict[str, str]] = {}
        self.kohya: dict[str, dict[str, str]] = {}
        for component, names in modules.items():
            dotted, kohya = {}, {}
            for m in names:
                dotted[m] = m
                kohya[m.replace(".", "_")] = m
                if m.startswith("text_model."):  # transformers >= 5 plain CLIPTextModel names
                    dotted.setdefault(m.removeprefix("text_model."), m)
                    kohya.setdefault(m.removeprefix("text_model.").replace(".", "_"), m)
            if component == "unet":
                for m, sgm in sgm_names(names).items():
                    kohya.setdefault(sgm.replace(".", "_"), m)
            self.dotted[component], self.kohya[component] = dotted, kohya

    def resolve(self, name: str) -> tuple[str, str] | None:
        for prefix, component in _KOHYA_PREFIXES:
            if name.startswith(prefix):
                m = self.kohya.get(component, {}).get(name[len(prefix):])
                return (component, m) if m else None
        component, _, rest = name.partition(".")
        if component not in COMPONENTS:  # very old attention-processor files: bare UNet module paths
            component, rest = "unet", name
        names = self.dotted.get(component, {})
        m = names.get(rest)
        if m is None and component != "unet":  # old attention-processor names on CLIP: to_q -> q_proj
            m = names.get(_CLIP_PROCESSOR.sub(lambda h: f".{h.group(1)}_proj", rest))
        return (component, m) if m else None


def sgm_names(modules: Collection[str]) -> dict[str, str]:
    """diffusers UNet module path -> the SGM (original SD / SDXL) module path, for every module given.

    Block indices follow the model's own structure (formats.md §1.3): input block i counts conv_in,
    then each level's resnets and its downsampler; output blocks count each up level's resnets, the
    upsampler sits in the level's last output block at `.1` (no attention) or `.2` (attention).
    """
    down = _block_layout(modules, "down_blocks")
    up = _block_layout(modules, "up_blocks")
    blocks = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
              "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
    i = 0
    for b, (n_resnets, has_sampler, _) in enumerate(down):
        for j in range(n_resnets):
            i += 1
            blocks[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            blocks[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
        if has_sampler:
            i += 1
            blocks[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
    i = 0
    for b, (n_resnets, has_sampler, has_attention) in enumerate(up):
        for j in range(n_resnets):
            blocks[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            blocks[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            i += 1
        if has_sampler:
            blocks[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i - 1}.{2 if has_attention else 1}.conv"
    out = {}
    for m in modules:
        head = next((p for p in sorted(blocks, key=len, reverse=True) if m == p or m.startswith(p + ".")), None)
        if head is None:
            continue
        tail = m[len(head):]
        if ".resnets." in head or head.startswith("mid_block.resnets"):
            tail = _RESNET_SGM.get(tail, tail)
        out[m] = blocks[head] + tail
    return out


_RESNET_SGM = {".norm1": ".in_layers.0", ".conv1": ".in_layers.2", ".time_emb_proj": ".emb_layers.1",
               ".norm2": ".out_layers.0", ".conv2": ".out_layers.3", ".conv_shortcut": ".skip_connection"}


def _block_layout(modules: Collection[str], blocks: str) -> list[tuple[int, bool, bool]]:
    """[(resnets, has a resampler, has attention)] per level of `down_blocks` / `up_blocks`."""
    pat = re.compile(rf"^{blocks}\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
    levels: dict[int, dict[str, set[int]]] = {}
    for m in modules:
        hit = pat.match(m + ".")
        if hit:
            levels.setdefault(int(hit.group(1)), {}).setdefault(hit.group(2), set()).add(int(hit.group(3)))
    return [(len(levels[b].get("resnets", ())),
             bool(levels[b].get("downsamplers") or levels[b].get("upsamplers")),
             bool(levels[b].get("attentions")))
            for b in range(max(levels, default=-1) + 1) if b in levels]


# --- one layer ----------------------------------------------------------------------------------------

def _layer(name: str, parts: Mapping[str, np.ndarray], target: tuple[str, str],
           peft_meta: Mapping[str, Mapping[str, Any]], source: str) -> LoraLayer:
    def fail(what):
        return LoraFileError(f"{source}: {name}: {what}")

    parts = dict(parts)
    alpha = _scalar(parts.pop("alpha", None), name, source)
    override = _scalar(parts.pop("scale", None), name, source)
    if "B_bias" in parts:
        raise fail("lora_B.bias (PEFT lora_bias) is not supported")
    magnitude, dora = parts.pop("magnitude", None), "peft"
    if "dora_scale" in parts:
        magnitude, dora = parts.pop("dora_scale"), "blend"
    keys = set(parts)
    if keys & {"A", "B"}:
        if keys != {"A", "B"}:
            raise fail(f"needs lora_A and lora_B, has {sorted(keys)}")
        factors = {"down": parts["A"], "up": parts["B"]}
        kind = "lora"
    elif keys & {"down", "up", "mid"}:
        if not {"down", "up"} <= keys or keys - {"down", "up", "mid"}:
            raise fail(f"needs lora_down and lora_up, has {sorted(keys)}")
        factors, kind = parts, "lora"
    elif keys & {"w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"}:
        if not {"w1_a", "w1_b", "w2_a", "w2_b"} <= keys or keys - {"w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"}:
            raise fail(f"LoHa needs hada_w1_a/b and hada_w2_a/b, has {sorted(keys)}")
        factors, kind = parts, "loha"
    elif keys and all(k.startswith("k_") for k in keys):
        factors = {k[2:]: v for k, v in parts.items()}
        kind = "lokr"
        if ("w1" in factors) == ({"w1_a", "w1_b"} <= set(factors)) or \
                ("w2" in factors) == ({"w2_a", "w2_b"} <= set(factors)):
            raise fail(f"LoKr needs lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b; has {sorted(keys)}")
    else:
        raise fail(f"no adapter factors (has {sorted(keys) or 'only alpha'})")
    _check_ranks(kind, factors, fail)
    if kind == "lora" and "A" in keys:
        scale = _peft_scale(target, int(factors["up"].shape[1]), alpha, peft_meta)
    elif kind == "lokr":
        dim = factors["w2_b"].shape[0] if "w2_b" in factors else \
            factors["w1_b"].shape[0] if "w1_b" in factors else None
        scale = alpha / dim if alpha is not None and dim else 1.0
    else:
        rank = factors["down"].shape[0] if kind == "lora" else factors["w1_b"].shape[0]
        scale = alpha / rank if alpha else 1.0  # a 0 / missing alpha means alpha = rank (kohya, LyCORIS)
    if override is not None:
        scale = override
    return LoraLayer(kind=kind, factors=factors, scale=float(scale), key=name, magnitude=magnitude, dora=dora)


def _check_ranks(kind: str, f: Mapping[str, np.ndarray], fail) -> None:
    """The factors' inner dimensions agree (a rank mismatch is a broken or mixed-up file)."""
    pairs = []
    if kind == "lora":
        pairs.append(("lora_down rows", f["down"].shape[0], "lora_up columns", f["up"].shape[1]))
        if "mid" in f:
            pairs.append(("lora_mid", f["mid"].shape[0], "lora_up columns", f["up"].shape[1]))
            pairs.append(("lora_mid", f["mid"].shape[1], "lora_down rows", f["down"].shape[0]))
    elif kind == "loha":
        for i in "12":
            a, b = f[f"w{i}_a"], f[f"w{i}_b"]
            # Tucker: a [r, out], b [r, in]; plain: a [out, r], b [r, in*k*k].
            pairs.append((f"hada_w{i}_a", a.shape[0] if f"t{i}" in f else a.shape[1], f"hada_w{i}_b rows",
                          b.shape[0]))
    else:
        for side in ("w1", "w2"):
            if f"{side}_a" in f:
                a, b = f[f"{side}_a"], f[f"{side}_b"]
                t = side == "w2" and "t2" in f
                pairs.append((f"lokr_{side}_a", a.shape[0] if t else a.shape[1], f"lokr_{side}_b rows", b.shape[0]))
    if any(v.ndim < 1 for v in f.values()):
        raise fail("a factor is a scalar")
    for what, x, other, y in pairs:
        if x != y:
            raise fail(f"rank mismatch: {what} {x} vs {other} {y}")


def _scalar(a, name: str, source: str) -> float | None:
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise LoraFileError(f"{source}: {name}: alpha / scale of shape {a.shape}; expected a scalar")
    return float(a.reshape(()))


def _peft_metadata(metadata: Mapping[str, str], source: str) -> dict[str, dict[str, Any]]:
    """`lora_adapter_metadata` -> component -> LoraConfig fields (diffusers prefixes them `unet.` ...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFileError(f"{source}: lora_adapter_metadata is not valid JSON") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, field = key.partition(".")
        if component in COMPONENTS and field:
            out.setdefault(component, {})[field] = value
    return out


def _pattern_value(patterns: Mapping[str, Any], module: str):
    """PEFT's rank / alpha pattern lookup: a key matches a module name it ends with (as a regex)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _peft_scale(target: tuple[str, str], rank: int, alpha: float | None,
                peft_meta: Mapping[str, Mapping[str, Any]]) -> float:
    """PEFT's `scaling = lora_alpha / r` (or / sqrt(r) with use_rslora), as diffusers configures it."""
    component, module = target
    meta = peft_meta.get(component)
    rslora = False
    if alpha is None and meta:
        short = module.removeprefix("text_model.")
        alpha = _pattern_value(meta.get("alpha_pattern"), module) or \
            _pattern_value(meta.get("alpha_pattern"), short) or meta.get("lora_alpha")
        rslora = bool(meta.get("use_rslora"))
    if alpha is None:
        return 1.0  # diffusers: no alpha anywhere -> lora_alpha = r
    return float(alpha) / (math.sqrt(rank) if rslora else rank)
