"""LoRA files people download, read by jaxdiff.adapters, against diffusers' `load_lora_weights` on tiny
SD1 and SDXL pipelines (UNet and text-encoder outputs within 1e-4 relative):

* PEFT / diffusers files made by peft and `save_lora_weights` (with and without `lora_adapter_metadata`),
  attention, 1x1 and 3x3 convs (LoCon) and resamplers, text encoders included;
* kohya files written here from the same factors (SD1: diffusers module names; SDXL: SGM names), proven
  by diffusers' own kohya reader to give what the PEFT file gives;
* old diffusers attention-processor keys;
* LoHa, LoKr and Tucker LoCon, which diffusers cannot read: a numpy merge of the published formulas
  into the torch state dict is the reference;
* two weighted adapters vs diffusers' set_adapters; unloading gives the base back bit for bit;
  re-weighting compiles nothing; bad files raise one-line errors and change nothing.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

import jaxdiff
from convert.diffusers_layout import flatten
from convert.formats import read_safetensors, write_safetensors
from jaxdiff import adapters
from jaxdiff.adapters import files as adapter_files
from jaxdiff.errors import JaxdiffError
from tests import tiny_pipelines

RTOL = 1e-4  # modules in float32 (DESIGN.md, Tests)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "conv_shortcut", "conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
PIPELINES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


@dataclasses.dataclass
class Model:
    folder: Path
    pipe: object
    fwd: dict
    params: dict
    encoders: list
    inputs: dict


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_formats")
    out = {}
    for name, build in (("sd1", tiny_pipelines.sd1), ("sdxl", tiny_pipelines.sdxl)):
        build(root / name)
        pipe = jaxdiff.load(root / name)
        encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n) is not None]
        rng = np.random.default_rng(4)
        inputs = dict(x=rng.standard_normal((2, 8, 8, 4)).astype(np.float32), t=np.array([981, 1], np.int32),
                      ctx=rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32),
                      added=None, ids={n: np.asarray(getattr(pipe, "tokenizer" if n == "text_encoder" else "tokenizer_2")(
                          ["a red panda", ""]), np.int32) for n in encoders})
        if name == "sdxl":
            inputs["added"] = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
                               "time_ids": np.tile(np.array([[64., 64, 0, 0, 64, 64]], np.float32), (2, 1))}
        fwd = {n: jax.jit(getattr(pipe, n).module.apply) for n in ["unet", *encoders]}
        params = {n: c.params for n, c in pipe.components().items()}
        out[name] = Model(root / name, pipe, fwd, params, encoders, inputs)
    return out


def jax_outputs(model: Model, params) -> dict[str, np.ndarray]:
    i = model.inputs
    out = {"unet": np.asarray(model.fwd["unet"]({"params": params["unet"]}, i["x"], i["t"], i["ctx"], i["added"]))}
    for n in model.encoders:
        o = model.fwd[n]({"params": params[n]}, jnp.asarray(i["ids"][n]))
        out[n] = np.asarray(o.last_hidden_state)
        if n == "text_encoder_2":
            out["text_embeds"] = np.asarray(o.text_embeds)
    return out


def torch_pipe(name, model: Model):
    return PIPELINES[name].from_pretrained(model.folder)


def torch_outputs(ref, model: Model) -> dict[str, np.ndarray]:
    i = model.inputs
    with torch.no_grad():
        kw = {}
        if i["added"] is not None:
            kw["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in i["added"].items()}
        unet = ref.unet(torch.from_numpy(i["x"].transpose(0, 3, 1, 2)), torch.from_numpy(i["t"]).long(),
                        torch.from_numpy(i["ctx"]), **kw).sample.numpy().transpose(0, 2, 3, 1)
        out = {"unet": unet}
        for n in model.encoders:
            o = getattr(ref, n)(torch.from_numpy(i["ids"][n].astype(np.int64)))
            out[n] = o.last_hidden_state.numpy()
            if n == "text_encoder_2":
                out["text_embeds"] = o.text_embeds.numpy()
    return out


def assert_close(got: dict, want: dict, tol=RTOL):
    assert set(got) == set(want)
    for k in want:
        assert rel_err(got[k], want[k]) <= tol, (k, rel_err(got[k], want[k]))


def assert_changed(model: Model, params, base_outputs):
    """The LoRA visibly changes every output (so a parity assertion could fail)."""
    got = jax_outputs(model, params)
    for k, v in base_outputs.items():
        assert rel_err(got[k], v) > 0.02, k
    return got


@pytest.fixture(scope="session")
def base_outputs(models):
    return {name: jax_outputs(m, m.params) for name, m in models.items()}


# --- PEFT files made by peft + diffusers ------------------------------------------------------------

def make_peft_file(name: str, model: Model, dst: Path, seed: int) -> Path:
    """A random LoRA (B non-zero) on the UNet's attention, 1x1 / 3x3 convs and resamplers and on every
    text encoder, saved by diffusers' save_lora_weights with its LoraConfig as metadata."""
    ref = torch_pipe(name, model)
    torch.manual_seed(seed)
    # Seed 1: per-module ranks and alphas (PEFT rank_pattern / alpha_pattern, saved in the metadata).
    # Seed 0 keeps one alpha: diffusers 0.42's kohya reader drops per-module alphas (its alpha_pattern
    # keys keep `.processor.to_k_lora.down.weight` and match nothing), so the kohya files are written
    # from seed 0's factors.
    patterns = dict(rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 3, "conv1": 5}) if seed == 1 else {}
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False, **patterns)
    tcfg = LoraConfig(r=2, lora_alpha=3, target_modules=TE_TARGETS, init_lora_weights=False)
    ref.unet.add_adapter(ucfg)
    layers = {"unet_lora_layers": get_peft_model_state_dict(ref.unet),
              "unet_lora_adapter_metadata": ucfg.to_dict()}
    for n in model.encoders:
        # transformers' own add_adapter wants a newer peft; inject the same LoRA layers directly.
        inject_adapter_in_model(tcfg, getattr(ref, n))
        layers[f"{n}_lora_layers"] = get_peft_model_state_dict(getattr(ref, n))
        layers[f"{n}_lora_adapter_metadata"] = tcfg.to_dict()
    PIPELINES[name].save_lora_weights(dst, weight_name="lora.safetensors", **layers)
    return dst / "lora.safetensors"


@pytest.fixture(scope="session")
def peft_files(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {(name, seed): make_peft_file(name, m, root / f"{name}_{seed}", seed)
            for name, m in models.items() for seed in (0, 1) if name == "sd1" or seed == 0}


_REFERENCES = {}


def diffusers_reference(name, model, *files, weights=None):
    """diffusers' outputs with the files loaded (memoised: several tests compare against one file)."""
    key = (name, tuple(map(str, files)), None if weights is None else tuple(weights))
    if key not in _REFERENCES:
        _REFERENCES[key] = _diffusers_reference(name, model, *files, weights=weights)
    return _REFERENCES[key]


def _diffusers_reference(name, model, *files, weights=None):
    ref = torch_pipe(name, model)
    for i, f in enumerate(files):
        ref.load_lora_weights(str(f), adapter_name=f"a{i}")
    if weights is not None:
        ref.set_adapters([f"a{i}" for i in range(len(files))], adapter_weights=weights)
    return torch_outputs(ref, model)


def jaxdiff_params(model, *files, weights=None):
    loaded = [adapters.read_lora_file(f, model.params) for f in files]
    return adapters.apply(model.params, list(zip(loaded, weights or [1.0] * len(files))))


@pytest.mark.parametrize("name, seed", [("sd1", 0), ("sd1", 1), ("sdxl", 0)])
def test_peft_file(models, base_outputs, peft_files, name, seed):
    model = models[name]
    path = peft_files[(name, seed)]
    tensors = read_safetensors(path)
    assert any(v.ndim == 4 and v.shape[2] == 3 for v in tensors.values())  # 3x3 convs (LoCon)
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight") and k.startswith("unet.")}
    assert ranks == ({2, 4} if seed == 1 else {4})
    got = assert_changed(model, jaxdiff_params(model, path), base_outputs[name])
    assert_close(got, diffusers_reference(name, model, path))


def test_peft_file_without_metadata_has_scale_one(models, base_outputs, peft_files, tmp_path):
    """No alpha anywhere: diffusers uses lora_alpha = r (scale 1), not the metadata's 8 / 4."""
    model = models["sd1"]
    plain = tmp_path / "plain.safetensors"
    write_safetensors(plain, dict(read_safetensors(peft_files[("sd1", 0)])))
    got = jax_outputs(model, jaxdiff_params(model, plain))
    assert rel_err(got["unet"], jax_outputs(model, jaxdiff_params(model, peft_files[("sd1", 0)]))["unet"]) > 0.02
    assert_close(got, diffusers_reference("sd1", model, plain))


def test_old_diffusers_processor_keys(models, peft_files, tmp_path):
    """`unet....attn1.processor.to_q_lora.down.weight` files (diffusers < 0.21) read as the PEFT names
    (with no alpha, scale 1, as diffusers reads them)."""
    model = models["sd1"]
    peft = dict(read_safetensors(peft_files[("sd1", 0)]))
    old = {}
    for k, v in peft.items():
        m = re.fullmatch(r"unet\.(.*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight", k)
        if m:
            proj = m.group(2).replace(".0", "")
            old[f"unet.{m.group(1)}.processor.{proj}_lora.{'down' if m.group(3) == 'A' else 'up'}.weight"] = v
    path = tmp_path / "old.safetensors"
    write_safetensors(path, old)
    new = tmp_path / "new.safetensors"
    write_safetensors(new, {k: v for k, v in peft.items() if ".attn" in k and k.startswith("unet.")})
    got, want = jaxdiff_params(model, path), jaxdiff_params(model, new)
    for p, leaf in flatten(want["unet"]).items():
        np.testing.assert_array_equal(np.asarray(flatten(got["unet"])[p]), np.asarray(leaf))
    assert_close(jax_outputs(model, got), diffusers_reference("sd1", model, path))


def test_peft_dora_file(models, base_outputs, tmp_path):
    """DoRA (PEFT `use_dora`, `lora_magnitude_vector` per output channel) on attention and 3x3 convs,
    with magnitudes moved off their initial ‖W + ΔW‖ so the renormalisation matters."""
    model = models["sd1"]
    ref = torch_pipe("sd1", model)
    torch.manual_seed(3)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False,
                     use_dora=True)
    ref.unet.add_adapter(cfg)
    layers = get_peft_model_state_dict(ref.unet)
    g = torch.Generator().manual_seed(4)
    for k in layers:
        if "lora_magnitude_vector" in k:
            layers[k] = layers[k] * (1 + 0.5 * torch.rand(layers[k].shape, generator=g))
    StableDiffusionPipeline.save_lora_weights(tmp_path, weight_name="dora.safetensors", unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=cfg.to_dict())
    path = tmp_path / "dora.safetensors"
    assert any("lora_magnitude_vector" in k for k in read_safetensors(path))
    got = assert_changed(model, jaxdiff_params(model, path), {"unet": base_outputs["sd1"]["unet"]})
    want = diffusers_reference("sd1", model, path)
    assert rel_err(got["unet"], want["unet"]) <= RTOL


# --- kohya files ------------------------------------------------------------------------------------

_RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_name(module: str, layers_per_block: int, up_attention: set[int]) -> str:
    """diffusers -> SGM UNet names by the arithmetic of formats.md §1.3 (written here independently of
    convert/lora.py; diffusers' reader checks it)."""
    n = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", module):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        head = f"input_blocks.{1 + b * n + j}.{0 if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", module):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        head = f"output_blocks.{b * n + j}.{0 if kind == 'resnets' else 1}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        b = int(m[1])
        return f"output_blocks.{b * n + layers_per_block}.{2 if b in up_attention else 1}.conv"
    elif m := re.fullmatch(r"mid_block\.(resnets\.0|attentions\.0|resnets\.1)\.(.*)", module):
        kind, rest = m[1], m[2]
        head = "middle_block." + {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[kind]
    else:
        return module
    if ".resnets." in module or module.startswith("mid_block.resnets"):
        rest = _RESNET_SGM.get(rest, rest)
    return f"{head}.{rest}"


def write_kohya(peft_path: Path, dst: Path, *, sdxl: bool, sgm=None) -> Path:
    """The PEFT file's factors under kohya names (`lora_unet_...`, `lora_te_` / `lora_te1_` / `lora_te2_`,
    `.lora_down.weight`, `.lora_up.weight`, scalar `.alpha`), alpha from the PEFT metadata (its
    alpha_pattern matched as PEFT matches it: a dotted suffix of the module name)."""
    from safetensors import safe_open
    with safe_open(str(peft_path), "np") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    out = {}
    for k, v in read_safetensors(peft_path).items():
        component, rest = k.split(".", 1)
        module, _, part = rest.partition(".lora_")
        original = module
        if component == "unet" and sgm is not None:
            module = sgm(module)
        if component != "unet" and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 drops it from CLIPTextModel; kohya has it
        name = f"{prefixes[component]}_{module.replace('.', '_')}"
        out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = np.asarray(v)
        patterns = meta[f"{component}.alpha_pattern"]
        alpha = next((a for p, a in patterns.items() if re.match(rf"(.*\.)?({p})$", original)),
                     meta[f"{component}.lora_alpha"])
        out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    write_safetensors(dst, out, metadata={"ss_network_dim": "4"})
    return dst


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_kohya_file_locon(models, base_outputs, peft_files, tmp_path, name):
    """kohya names (SD1: diffusers module paths; SDXL: SGM block names), LoCon convs included: diffusers'
    kohya reader gives what it gives for the PEFT file, and jaxdiff gives the same."""
    model = models[name]
    peft = peft_files[(name, 0)]
    sgm = None
    if name == "sdxl":
        up_attention = {int(m[1]) for k in read_safetensors(peft) if (m := re.search(r"up_blocks\.(\d+)\.attentions", k))}
        sgm = lambda m: sgm_name(m, model.pipe.unet.config.layers_per_block, up_attention)  # noqa: E731
    path = write_kohya(peft, tmp_path / "kohya.safetensors", sdxl=name == "sdxl", sgm=sgm)
    keys = set(read_safetensors(path))
    if name == "sdxl":
        assert any("input_blocks" in k for k in keys) and any("output_blocks" in k for k in keys)
        assert any("_in_layers_2." in k for k in keys) and any("_op." in k for k in keys)
    else:
        assert any("lora_unet_down_blocks_0_resnets_0_conv1." in k for k in keys)
    want = diffusers_reference(name, model, path)
    assert_close(want, diffusers_reference(name, model, peft), tol=1e-5)  # the file is right
    got = assert_changed(model, jaxdiff_params(model, path), base_outputs[name])
    assert_close(got, want)


# --- LyCORIS: LoHa, LoKr, Tucker LoCon against a numpy merge ----------------------------------------

def lycoris_layers(rng):
    """module -> (kohya suffix tensors, numpy ΔW in torch layout incl. the scale), on SD1's attention
    (Dense 32x32), a 3x3 resnet conv and a text-encoder projection."""
    def r(*s):
        return (0.3 * rng.standard_normal(s)).astype(np.float32)

    out = {}
    # LoHa, Dense, alpha 2 / rank 4.
    w1a, w1b, w2a, w2b = r(32, 4), r(4, 32), r(32, 4), r(4, 32)
    out["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] = (
        {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": np.float32(2)},
        0.5 * (w1a @ w1b) * (w2a @ w2b))
    # LoHa, 3x3 conv, Tucker: each factor is Σ t[p, q] ⊗ a[p, :] ⊗ b[q, :].
    t1, t2, a1, b1, a2, b2 = r(3, 3, 3, 3), r(3, 3, 3, 3), r(3, 32), r(3, 32), r(3, 32), r(3, 32)

    def tucker(t, a, b):
        return sum(t[p, q][None, None] * a[p][:, None, None, None] * b[q][None, :, None, None]
                   for p in range(t.shape[0]) for q in range(t.shape[1]))

    out["lora_unet_down_blocks_0_resnets_0_conv1"] = (
        {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2, "hada_t1": t1, "hada_t2": t2},
        tucker(t1, a1, b1) * tucker(t2, a2, b2))  # no alpha: scale 1
    # LoKr, Dense, w1 factorised (rank 2) and w2 factorised (rank 2): scale = alpha / w2_b rows = 1.5 / 2.
    k1a, k1b, k2a, k2b = r(4, 2), r(2, 4), r(8, 2), r(2, 8)
    out["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"] = (
        {"lokr_w1_a": k1a, "lokr_w1_b": k1b, "lokr_w2_a": k2a, "lokr_w2_b": k2b, "alpha": np.float32(1.5)},
        0.75 * np.kron(k1a @ k1b, k2a @ k2b))
    # LoKr, 3x3 conv, both sides full: scale 1 whatever alpha says (A1111 / ComfyUI).
    w1, w2 = r(4, 4), r(8, 8, 3, 3)
    kron = np.zeros((32, 32, 3, 3), np.float32)
    for i in range(4):
        for j in range(4):
            kron[8 * i:8 * i + 8, 8 * j:8 * j + 8] = w1[i, j] * w2
    out["lora_unet_down_blocks_0_resnets_0_conv2"] = ({"lokr_w1": w1, "lokr_w2": w2, "alpha": np.float32(7)}, kron)
    # LoKr, 3x3 conv, w1 full, w2 Tucker (t2 with w2_a [r, out2], w2_b [r, in2]), alpha 3 / rank 3;
    # A1111's per-module `scale` tensor is not set here, so alpha / rank applies.
    w1, t2, a2, b2 = r(8, 8), r(3, 3, 3, 3), r(3, 8), r(3, 8)
    w2 = tucker(t2, a2, b2)                                                  # [8, 8, 3, 3]
    kron = np.zeros((64, 64, 3, 3), np.float32)
    for i in range(8):
        for j in range(8):
            kron[8 * i:8 * i + 8, 8 * j:8 * j + 8] = w1[i, j] * w2
    out["lora_unet_mid_block_resnets_0_conv1"] = (
        {"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": a2, "lokr_w2_b": b2, "alpha": np.float32(3)}, kron)
    # A1111's optional `scale` tensor overrides alpha / rank (network.py calc_scale).
    down, up = r(2, 64), r(64, 2)
    out["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v"] = (
        {"lora_down.weight": down, "lora_up.weight": up, "alpha": np.float32(1), "scale": np.float32(0.3)},
        0.3 * up @ down)
    # Tucker LoCon (lora_mid) on a 3x3 up-block conv: ΔW[o, i] = Σ up[o, n] mid[n, m] down[m, i], alpha 1 / 2.
    up, mid, down = r(32, 2, 1, 1), r(2, 2, 3, 3), r(2, 96, 1, 1)  # conv1 [32, 64 + 32, 3, 3]
    delta = np.einsum("on,nmhw,mi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    out["lora_unet_up_blocks_1_resnets_0_conv1"] = (
        {"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "alpha": np.float32(1)}, 0.5 * delta)
    # LoHa on the text encoder's q_proj.
    w1a, w1b, w2a, w2b = r(32, 2), r(2, 32), r(32, 2), r(2, 32)
    out["lora_te_text_model_encoder_layers_1_self_attn_q_proj"] = (
        {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": np.float32(4)},
        2.0 * (w1a @ w1b) * (w2a @ w2b))
    return out


def test_loha_lokr_tucker_against_numpy_merge(models, base_outputs, tmp_path):
    model = models["sd1"]
    layers = lycoris_layers(np.random.default_rng(7))
    path = tmp_path / "lycoris.safetensors"
    write_safetensors(path, {f"{name}.{k}": np.asarray(v) for name, (ts, _) in layers.items() for k, v in ts.items()})
    ref = torch_pipe("sd1", model)
    modules = {"unet": dict(ref.unet.named_modules()), "te": dict(ref.text_encoder.named_modules())}
    with torch.no_grad():
        for name, (_, delta) in layers.items():
            component, module = ("te", name[len("lora_te_"):]) if name.startswith("lora_te_") else \
                ("unet", name[len("lora_unet_"):])
            # transformers 5's CLIPTextModel has no `text_model.` level; kohya names keep it.
            [target] = [m for n, m in modules[component].items()
                        if n.replace(".", "_") in (module, module.removeprefix("text_model_"))]
            target.weight += torch.from_numpy(np.ascontiguousarray(delta.reshape(target.weight.shape)))
    got = assert_changed(model, jaxdiff_params(model, path), base_outputs["sd1"])
    assert_close(got, torch_outputs(ref, model))


# --- several adapters, unload, compile counts -------------------------------------------------------

@pytest.fixture
def compiles():
    """Names of the XLA compilations that happen while the test runs."""
    seen, on = [], [True]

    def listen(name, secs, **_):
        if on[0] and name == "/jax/core/compile/backend_compile_duration":
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    on[0] = False
    jax.monitoring.unregister_event_duration_listener(listen)


def test_two_weighted_adapters_and_unload(models, base_outputs, peft_files, compiles):
    """diffusers' set_adapters with two weighted adapters; loading, re-weighting, fusing and unloading
    compile nothing (the network programs take the new params as arguments); unload gives back the
    base tree's own objects."""
    model = models["sd1"]
    files = [peft_files[("sd1", 0)], peft_files[("sd1", 1)]]
    jax_outputs(model, model.params)   # the network programs exist before the count starts
    compiles.clear()
    state = adapters.AdapterSet(model.params)
    assert state.load(files[0], adapter_name="a", scale=1.0) == "a"
    state.load(files[1], adapter_name="b")
    state.set_adapters(["a", "b"], [0.7, -0.4])
    got = jax_outputs(model, state.params)
    state.set_adapters(["a", "b"], [0.2, 0.5])
    reweighted = jax_outputs(model, state.params)
    state.fuse()
    state.unload()
    fused = jax_outputs(model, state.params)
    state.unfuse()
    unloaded = jax_outputs(model, state.params)
    assert compiles == []

    for k, v in base_outputs["sd1"].items():
        assert rel_err(got[k], v) > 0.02, k
    assert_close(got, diffusers_reference("sd1", model, *files, weights=[0.7, -0.4]))
    assert rel_err(reweighted["unet"], got["unet"]) > 0.02
    # fuse then unload keeps the fused weights; unfuse gives the base objects back.
    for k in reweighted:
        np.testing.assert_array_equal(fused[k], reweighted[k])
    assert state.names == [] and state.params is state.base
    assert all(state.params[c] is model.params[c] for c in model.params)
    for k, v in unloaded.items():
        np.testing.assert_array_equal(v, base_outputs["sd1"][k])


def test_device_merge_equals_host_merge_and_reweighting_reuses_it(models, peft_files):
    model = models["sd1"]
    pairs = [(adapters.read_lora_file(peft_files[("sd1", s)], model.params), w) for s, w in ((0, 0.7), (1, -0.4))]
    host = adapters.apply(model.params, pairs)
    device = adapters.apply(model.params, pairs, on_device=True)
    for c in ("unet", "text_encoder"):
        for p, leaf in flatten(host[c]).items():
            np.testing.assert_allclose(np.asarray(flatten(device[c])[p]), np.asarray(leaf), rtol=1e-5, atol=1e-6)
    n = adapter_files._merge_kernel._cache_size()
    adapters.apply(model.params, [(a, 2 * w) for a, w in pairs], on_device=True)
    assert adapter_files._merge_kernel._cache_size() == n


# --- errors -----------------------------------------------------------------------------------------

def test_bad_files_raise_one_line_and_change_nothing(models, peft_files, tmp_path):
    model = models["sd1"]
    state = adapters.AdapterSet(model.params)
    state.load(peft_files[("sd1", 0)], adapter_name="good")
    before = state.params

    def refused(path, match):
        with pytest.raises(JaxdiffError, match=match) as e:
            state.load(path, adapter_name="bad")
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        assert state.names == ["good"] and state.params is before

    refused(peft_files[("sdxl", 0)], "match no module")                       # another family's LoRA
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(peft_files[("sd1", 0)].read_bytes()[:-100])
    refused(truncated, "truncated")
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    mismatch = tmp_path / "rank.safetensors"
    write_safetensors(mismatch, {f"{name}.lora_down.weight": np.zeros((4, 32), np.float32),
                                 f"{name}.lora_up.weight": np.zeros((32, 3), np.float32)})
    refused(mismatch, "rank mismatch")
    misfit = tmp_path / "shape.safetensors"
    write_safetensors(misfit, {f"{name}.lora_down.weight": np.zeros((4, 48), np.float32),
                               f"{name}.lora_up.weight": np.zeros((32, 4), np.float32)})
    refused(misfit, "does not fit")
    unknown = tmp_path / "unknown.safetensors"
    write_safetensors(unknown, {"lora_unet_no_such_block.lora_down.weight": np.zeros((4, 32), np.float32),
                                "lora_unet_no_such_block.lora_up.weight": np.zeros((32, 4), np.float32)})
    refused(unknown, "match no module")


# --- the unmerged path on convs ---------------------------------------------------------------------

class ConvStack(nn.Module):
    """A 3x3 conv, a strided 3x3 conv (the downsampler's padding), a 1x1 conv and a Dense, as the UNet
    uses them (jaxdiff.models.layers.conv)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)
        x = nn.Conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="down")(nn.silu(x))
        x = nn.Conv(6, (1, 1), padding=((0, 0), (0, 0)), name="proj_in")(x)
        return nn.Dense(5, name="to_q")(x)


def test_unmerged_equals_merged_on_convs():
    """Interception adds the LoCon branch (down conv with the module's stride and padding, then 1x1 up)
    to 3x3, strided and 1x1 convs exactly as merging does."""
    module = ConvStack()
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), x)["params"]
    found = adapters.target_modules(params, (r"conv1", r"down", r"proj_in", r"to_q"))
    assert sorted(len(s) for s in found.values()) == [2, 4, 4, 4]
    rng = np.random.default_rng(3)
    lora = {m[0]: {"down": (0.3 * rng.standard_normal((*s[:-1], 2))).astype(np.float32),
                   "up": (0.3 * rng.standard_normal((2, s[-1]))).astype(np.float32)} for m, s in found.items()}

    @jax.jit
    def both(p, lo):
        merged = module.apply({"params": adapters.merge(p, lo, 1.5)}, x)
        return module.apply({"params": p}, x), merged, adapters.apply_unmerged(module, p, lo, 1.5, x)

    base, merged, unmerged = both(params, lora)
    assert rel_err(merged, base) > 0.05
    assert rel_err(unmerged, merged) <= 1e-5


@pytest.mark.parametrize("preset", ["sd15", "sdxl", "sdxl_refiner"])
def test_sgm_names_of_full_size_unets_match_diffusers_single_file_converter(preset):
    """convert.lora.sgm_names (how SDXL kohya files name UNet modules) on full-size configs, shapes only:
    a checkpoint keyed by those SGM names goes through diffusers' `convert_ldm_unet_checkpoint` back to
    exactly the UNet's diffusers keys (every block, resampler and resnet layer)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from convert.export import torch_key, upstream_config
    from convert.lora import sgm_names
    from jaxdiff.components import UNET
    from jaxdiff.models.configs import UNetConfig

    cfg = getattr(UNetConfig, preset)()
    keys = [torch_key(p, kind="unet") for p in flatten(UNET.param_shapes(cfg))]
    sgm = sgm_names({k.rsplit(".", 1)[0] for k in keys})
    ldm = {}
    for k in keys:
        module, leaf = k.rsplit(".", 1)
        ldm[f"model.diffusion_model.{sgm[module]}.{leaf}"] = torch.zeros(1)
    assert sgm["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    back = convert_ldm_unet_checkpoint(ldm, upstream_config("UNet2DConditionModel", dataclasses.asdict(cfg)))
    assert sorted(back) == sorted(keys)


def test_pipeline_lora_images_match_diffusers_and_compile_nothing(models, peft_files, compiles):
    """pipe.load_lora_weights / set_adapters / unload_lora_weights (diffusers' names) through the whole
    pipeline: two weighted adapters give diffusers' image within 1/255 (same start noise), loading and
    re-weighting compile nothing, unloading gives the base image back bit for bit."""
    from diffusers import EulerDiscreteScheduler
    from jaxdiff import rng, sharding
    from tests import helpers
    model = models["sd1"]
    pipe = jaxdiff.load(model.folder)  # its own pipeline: the LoRA state is the pipeline's
    files = [peft_files[("sd1", 0)], peft_files[("sd1", 1)]]
    kw = dict(height=16, width=16, steps=3, sampler="euler", schedule=None, guidance_scale=5.0, seed=3,
              mesh=sharding.make_mesh(jax.devices()[:1]), return_float=True)
    base = pipe("a red panda", **kw)
    compiles.clear()
    assert pipe.load_lora_weights(files[0], adapter_name="a0") == "a0"
    pipe.load_lora_weights(files[1], adapter_name="a1")
    pipe.set_adapters(["a0", "a1"], [0.7, -0.4])
    out = pipe("a red panda", **kw)
    pipe.unload_lora_weights()
    again = pipe("a red panda", **kw)
    assert compiles == []
    np.testing.assert_array_equal(again.images, base.images)
    assert np.abs(out.images.astype(int) - base.images.astype(int)).max() > 1

    ref = torch_pipe("sd1", model)
    for i, f in enumerate(files):
        ref.load_lora_weights(str(f), adapter_name=f"a{i}")
    ref.set_adapters(["a0", "a1"], adapter_weights=[0.7, -0.4])
    ref.tokenizer.model_max_length = 77  # the test tokenizer carries none
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    noise = rng.request_noise(3, np.arange(1), (8, 8, 4))["start"]
    want = ref("a red panda", latents=helpers.nchw(noise), height=16, width=16, num_inference_steps=3,
               guidance_scale=5.0, output_type="np").images
    assert np.abs(out.images.astype(np.int16) - np.round(want * 255).astype(np.int16)).max() <= 1


def test_pickled_lora_equals_its_safetensors_twin(models, peft_files, tmp_path):
    """A LoRA saved by torch.save (.bin, as old trainers wrote them) reads through the allow-list
    unpickler to the same merged params as the same tensors in .safetensors (both without the PEFT
    metadata a pickle cannot carry, so both at scale 1)."""
    model = models["sd1"]
    tensors = read_safetensors(peft_files[("sd1", 0)])
    write_safetensors(tmp_path / "lora.safetensors", tensors)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, tmp_path / "lora.bin")
    want = jaxdiff_params(model, tmp_path / "lora.safetensors")
    got = adapters.apply(model.params, [(adapters.read_lora_file(tmp_path / "lora.bin", model.params), 1.0)])
    for k, v in flatten(want).items():
        np.testing.assert_array_equal(np.asarray(flatten(got)[k]), np.asarray(v), err_msg="/".join(k))
