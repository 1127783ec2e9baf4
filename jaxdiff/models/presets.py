"""Pipeline presets (full-size and tiny configs) and host-side random init, for benchmarks, scripts and
tests: a Pipeline of the released shapes without any checkpoint.

    pipe = build_pipeline("sd15", dtype="bfloat16")   # random weights; speed does not depend on them
    params = host_init(components.UNET.param_shapes(UNetConfig.tiny()), seed=0)

Random params are drawn on the host with numpy (no jit: compiling a random init of 860M params costs
minutes on a CPU), one leaf at a time so the float64 draw of the largest leaf is the only extra memory.
"""
from __future__ import annotations

from typing import Any

import numpy as np

PRESETS = ("tiny", "sd15", "sd21", "sdxl")


def host_init(shapes_tree, seed: int = 0, *, zero: tuple[str, ...] = (), dtype=np.float32,
              draw_dtype=np.float64) -> dict:
    """Random params for a `param_shapes` tree, on the host.

    Kernels N(0, 1 / fan_in) (Flax's lecun_normal up to truncation: activations stay O(1) through deep
    stacks), biases 0, norm scales 1, token embeddings N(0, 0.02) and position embeddings N(0, 0.01)
    (CLIP's init). Leaves under a top-level module named in `zero` start at 0 (e.g. the UNet's conv_out,
    so a model to be trained first predicts 0, not noise). `draw_dtype` float32 draws about twice as
    fast (benchmarks, whose speed does not depend on the values); float64 is what the demo recipe drew.
    """
    import jax
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [getattr(p, "key", str(p)) for p in path]
        name = keys[-1]
        if keys[0] in zero:
            value = np.zeros(leaf.shape)
        elif name == "kernel":
            value = rng.standard_normal(leaf.shape, draw_dtype) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "embedding":
            value = rng.standard_normal(leaf.shape, draw_dtype) * (0.01 if "position" in "/".join(keys) else 0.02)
        elif name == "scale":
            value = np.ones(leaf.shape)
        else:
            value = np.zeros(leaf.shape)
        return np.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes_tree)


def preset_configs(name: str) -> dict[str, Any]:
    """Component name -> config of a preset."""
    from jaxdiff.models.configs import CLIPTextConfig, UNetConfig, VAEConfig
    if name == "tiny":
        return {"text_encoder": CLIPTextConfig.tiny(), "unet": UNetConfig.tiny(), "vae": VAEConfig.tiny()}
    if name == "sd15":
        return {"text_encoder": CLIPTextConfig.clip_l(), "unet": UNetConfig.sd15(), "vae": VAEConfig.sd()}
    if name == "sd21":
        return {"text_encoder": CLIPTextConfig.openclip_h(), "unet": UNetConfig.sd21(), "vae": VAEConfig.sd()}
    if name == "sdxl":
        return {"text_encoder": CLIPTextConfig.clip_l(), "text_encoder_2": CLIPTextConfig.openclip_bigg(),
                "unet": UNetConfig.sdxl(), "vae": VAEConfig.sdxl()}
    raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")


def build_pipeline(model: str, *, dtype: str = "float32", attention: str = "auto", seed: int = 0,
                   params: dict[str, Any] | None = None):
    """A Pipeline for a preset name (random weights, or `params` given per component) or a model path.

    `attention` is set on the modules that take it (UNet, VAE); the CLIP encoders use their own causal
    kernel. Params are stored in `dtype` (param dtype = compute dtype, as `jaxdiff.load(dtype=)`).
    """
    import jax.numpy as jnp
    from jaxdiff import components
    from jaxdiff.pipeline import Pipeline
    jdtype = jnp.dtype(dtype)
    if model in PRESETS:
        kinds = {"unet": components.UNET, "vae": components.VAE_KIND,
                 "text_encoder": components.CLIP, "text_encoder_2": components.CLIP}
        nets = {}
        for i, (name, cfg) in enumerate(preset_configs(model).items()):
            kind = kinds[name]
            p = params[name] if params is not None else host_init(kind.param_shapes(cfg), seed + i,
                                                                  draw_dtype=np.float32)
            nets[name] = kind.component(cfg, components.cast_params(p, jdtype), jdtype)
        pipe = Pipeline.from_parts(nets, {}, None, source=f"preset {model}")
    else:
        from jaxdiff.loading import load
        pipe = load(model, dtype=dtype)
    swaps = {}
    for name in ("unet", "vae"):
        c = getattr(pipe, name)
        if getattr(c.module, "attention_implementation", attention) != attention:
            swaps[name] = type(c)(c.module.clone(attention_implementation=attention), c.params, c.config)
    if not swaps:
        return pipe
    parts = {**pipe.components(), **swaps}
    return Pipeline.from_parts(parts, {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2},
                               pipe.scheduler_config, source=f"{model} ({attention} attention)",
                               pipeline_class=pipe.pipeline_class, options=pipe.options)
