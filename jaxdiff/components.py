"""The three kinds of network a pipeline holds, as callables over (params, inputs).

Each component keeps its config, its Flax module and its params; calling it runs one jitted
`module.apply` with the params passed as an argument (never baked into the program as constants).

    unet(x, t, context, added_cond=None)   # NHWC latents [B, h, w, C] -> [B, h, w, C_out]
    vae.encode(images) -> .mean, .logvar    # images [B, H, W, 3] in [-1, 1] -> NHWC moments
    vae.decode(z) -> images                 # unscaled latents -> [B, H, W, 3] in [-1, 1]
    text_encoder(ids) -> CLIPTextOutput     # ids [B, 77] int32

`KINDS` says, for every upstream class name a checkpoint may declare, how to build the module, how to
make its param shapes without computing anything, and which weight files and buffers to expect.

Param shapes come from tracing `module.init` (about 2.5 s of CPU for the three tiny demo networks,
a quarter of a warm `jaxdiff generate`), so they are kept per (kind, config) in the process and, when
JAX's persistent compilation cache is on, in a `jaxdiff-param-shapes/` folder inside it, keyed by the
config, the jax and flax versions and the source of jaxdiff/models (any edit there is a new key).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from jaxdiff.models.clip import CLIPTextModel, canonical_torch_keys
from jaxdiff.models.configs import CLIPTextConfig, UNetConfig, VAEConfig
from jaxdiff.models.controlnet import ControlNetConfig, ControlNetModel
from jaxdiff.models.unet import UNet2DConditionModel
from jaxdiff.models.taesd import AutoencoderTiny, TinyVAEConfig
from jaxdiff.models.vae import AutoencoderKL


class Component:
    """A module, its config and its params (a nested dict without the outer {"params": ...})."""

    def __init__(self, module, params, config):
        self.module = module
        self.params = params
        self.config = config
        self._apply = jax.jit(module.apply, static_argnames=("method", "guess_mode"))

    def apply(self, *args, method=None):
        return self._apply({"params": self.params}, *args, method=method)

    def with_params(self, params) -> "Component":
        """The same module and config with other params of the same structure; shares the compiled
        `apply` (a new Component would trace and compile it again)."""
        clone = copy.copy(self)
        clone.params = params
        return clone


class UNet(Component):
    def __call__(self, x, t, context, added_cond=None, *, down_residuals=None, mid_residual=None):
        """x [B, h, w, C] NHWC, t [B] or [] timesteps, context [B, L, D] -> [B, h, w, C_out].
        `down_residuals` / `mid_residual`: ControlNet residuals (see UNet2DConditionModel)."""
        if down_residuals is None and mid_residual is None:
            return self.apply(x, jnp.asarray(t), context, added_cond)
        return self._apply({"params": self.params}, x, jnp.asarray(t), context, added_cond,
                           down_residuals=down_residuals, mid_residual=mid_residual)


class ControlNet(Component):
    def __call__(self, x, t, context, controlnet_cond, conditioning_scale=1.0, added_cond=None, *,
                 guess_mode=False):
        """x [B, h, w, C], t, context [B, L, D], controlnet_cond [B, H, W, Cc] in [0, 1] ->
        (down_residuals list, mid_residual) for `UNet(..., down_residuals=, mid_residual=)`."""
        return self._apply({"params": self.params}, x, jnp.asarray(t), context, controlnet_cond,
                           jnp.asarray(conditioning_scale, jnp.float32), added_cond, guess_mode=guess_mode)


class VAE(Component):
    def encode(self, images):
        """images [B, H, W, 3] in [-1, 1] -> diagonal Gaussian with .mean and .logvar [B, h, w, 4]."""
        return self.apply(images, method="encode")

    def decode(self, z):
        """Unscaled latents [B, h, w, 4] -> images [B, H, W, 3] in [-1, 1]."""
        return self.apply(z, method="decode")


class TinyVAE(VAE):
    """AutoencoderTiny (TAESD): the same encode / decode contract; encode's posterior has zero spread."""


class TextEncoder(Component):
    def __call__(self, ids):
        """ids [B, L] int32 -> CLIPTextOutput (last_hidden_state, hidden_states, pooled, text_embeds)."""
        return self.apply(jnp.asarray(ids, jnp.int32))


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one kind of network is built, initialised abstractly and read from / written to upstream
    files: the one place that knows a kind (loading, export and the benchmarks read it)."""
    wrapper: type[Component]
    config_cls: type
    build: Callable[[Any, Any], Any]                   # (config, dtype) -> flax module
    init_args: Callable[[Any], tuple]                  # config -> (args, method) for module.init
    weight_stem: str                                   # upstream file stem in a diffusers folder
    upstream: tuple[str, ...]                          # class names a checkpoint may declare
    export_class: Callable[[Any], str]                 # config -> the class name it is written as
    ignore: tuple[str, ...] = ()                       # upstream buffers that are not params
    canonical_keys: Callable[[dict], dict] = dict      # puts upstream key variants in one form

    @property
    def native(self) -> str:
        """The kind's name in jaxdiff's native folders (its wrapper class)."""
        return self.wrapper.__name__

    def param_shapes(self, config) -> dict:
        """The param tree as jax.ShapeDtypeStruct leaves, computed without allocating anything.

        Tracing `module.init` costs about a second of CPU for even a tiny UNet, and loading, tests and
        training scripts ask for the same config again and again, so the tree is kept per (kind,
        config); each call returns fresh dicts over the shared, immutable leaves.
        """
        key = (self, config)
        try:
            tree = _SHAPES_CACHE.get(key)
        except TypeError:  # a config with an unhashable field is traced every time
            return self._trace_param_shapes(config)
        if tree is None:
            file = _shapes_file(self, config)
            tree = _read_shapes(file) if file is not None else None
            if tree is None:
                tree = self._trace_param_shapes(config)
                if file is not None:
                    _write_shapes(file, tree)
            _SHAPES_CACHE[key] = tree
        return jax.tree_util.tree_map(lambda leaf: leaf, tree)

    def _trace_param_shapes(self, config) -> dict:
        module = self.build(config, jnp.float32)
        args, method = self.init_args(config)
        # The example inputs and the PRNG key are made inside the trace: built eagerly, each would
        # compile a tiny XLA program of its own (a zeros per shape, the key's seeding).
        init = lambda: module.init(jax.random.PRNGKey(0), *(make() for make in args), method=method)
        return jax.eval_shape(init)["params"]

    def component(self, config, params, dtype) -> Component:
        return self.wrapper(self.build(config, dtype), params, config)


@functools.lru_cache(maxsize=1)
def _models_source_digest() -> str:
    """sha256 over the code that decides param trees: jaxdiff/models/*.py and this file."""
    here = Path(__file__).resolve()
    digest = hashlib.sha256()
    for path in sorted((here.parent / "models").glob("*.py")) + [here]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _shapes_file(kind: Kind, config) -> Path | None:
    """Where the on-disk param-shape cache keeps this (kind, config), or None when it is off."""
    root = jax.config.jax_compilation_cache_dir
    # Only a local folder: JAX also takes URLs (gs://...), which pathlib would make a local "gs:" folder.
    if not root or "://" in str(root) or not jax.config.jax_enable_compilation_cache:
        return None
    digest = hashlib.sha256()
    for part in (jax.__version__, flax.__version__, _models_source_digest(), kind.wrapper.__name__,
                 type(config).__qualname__, repr(config)):
        digest.update(str(part).encode() + b"\0")
    return Path(root) / "jaxdiff-param-shapes" / f"{digest.hexdigest()[:40]}.json"


def _read_shapes(file: Path) -> dict | None:
    """The tree `_write_shapes` wrote, or None (missing or unreadable: the caller traces instead)."""
    try:
        flat = json.loads(file.read_text())
        tree: dict = {}
        for path, (shape, dtype) in flat.items():
            *parents, leaf = path.split("/")
            node = tree
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
        return tree or None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _write_shapes(file: Path, tree: dict) -> None:
    """Best effort: written atomically (another process may read it), skipped when the cache folder is
    not writable."""
    flat = {"/".join(str(k.key) for k in path): [list(leaf.shape), jnp.dtype(leaf.dtype).name]
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(flat, f)
        os.replace(tmp, file)
    except OSError:
        pass


# init_args: config -> (example inputs for module.init as zero-argument makers, method). The makers
# run inside Kind.param_shapes's trace.

def _zeros(shape, dtype=jnp.float32):
    return lambda: jnp.zeros(shape, dtype)


def _unet_init(cfg: UNetConfig):
    added = lambda: None
    if cfg.takes_text_time:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = lambda: {"text_embeds": jnp.zeros((1, pooled)), "time_ids": jnp.zeros((1, 6))}
    if cfg.time_cond_proj_dim is not None:  # LCM-distilled: the guidance embedding (time_embedding.cond_proj)
        base = added
        added = lambda: {**(base() or {}), "timestep_cond": jnp.zeros((1, cfg.time_cond_proj_dim))}
    args = (_zeros((1, 8, 8, cfg.in_channels)), _zeros((1,)), _zeros((1, 4, cfg.cross_attention_dim)), added)
    return args, None


def _controlnet_init(cfg: ControlNetConfig):
    (unet_args, _), f = _unet_init(cfg), cfg.image_factor
    sample, t, context, added = unet_args
    return (sample, t, context, _zeros((1, 8 * f, 8 * f, cfg.conditioning_channels)), _zeros(()), added), None


def _vae_init(cfg: VAEConfig):
    return (_zeros((1, 8, 8, cfg.in_channels)),), None


def _tiny_vae_init(cfg: TinyVAEConfig):
    side = 2 * cfg.downsample_factor
    return (_zeros((1, side, side, cfg.in_channels)),), None


def _clip_init(cfg: CLIPTextConfig):
    return (_zeros((1, cfg.max_position_embeddings), jnp.int32),), None


UNET = Kind(UNet, UNetConfig, lambda c, d: UNet2DConditionModel(config=c, dtype=d), _unet_init,
            "diffusion_pytorch_model", upstream=("UNet2DConditionModel",),
            export_class=lambda c: "UNet2DConditionModel")
VAE_KIND = Kind(VAE, VAEConfig, lambda c, d: AutoencoderKL(config=c, dtype=d), _vae_init,
                "diffusion_pytorch_model", upstream=("AutoencoderKL",), export_class=lambda c: "AutoencoderKL")
CLIP = Kind(TextEncoder, CLIPTextConfig, lambda c, d: CLIPTextModel(config=c, dtype=d), _clip_init,
            "model", upstream=("CLIPTextModel", "CLIPTextModelWithProjection"),
            export_class=lambda c: "CLIPTextModelWithProjection" if c.with_projection else "CLIPTextModel",
            ignore=("*.position_ids",), canonical_keys=canonical_torch_keys)
CONTROLNET = Kind(ControlNet, ControlNetConfig, lambda c, d: ControlNetModel(config=c, dtype=d), _controlnet_init,
                  "diffusion_pytorch_model", upstream=("ControlNetModel",),
                  export_class=lambda c: "ControlNetModel")
TAESD_KIND = Kind(TinyVAE, TinyVAEConfig, lambda c, d: AutoencoderTiny(config=c, dtype=d), _tiny_vae_init,
                  "diffusion_pytorch_model", upstream=("AutoencoderTiny",), export_class=lambda c: "AutoencoderTiny")
# TAESD before VAE_KIND: kind_of() takes the first wrapper a component is an instance of (TinyVAE is a VAE).
ALL_KINDS = (UNET, TAESD_KIND, VAE_KIND, CLIP, CONTROLNET)

_SHAPES_CACHE: dict = {}  # (Kind, config) -> param tree of jax.ShapeDtypeStruct (see Kind.param_shapes)

# Upstream class names (model_index.json / config.json "_class_name" or "architectures") -> kind.
KINDS = {name: kind for kind in ALL_KINDS for name in kind.upstream}
# Native folders name kinds by wrapper.
NATIVE_KINDS = {kind.native: kind for kind in ALL_KINDS}


def kind_of(component: Component) -> Kind:
    """The Kind a component was built from."""
    for kind in ALL_KINDS:
        if isinstance(component, kind.wrapper):
            return kind
    raise TypeError(f"{type(component).__name__} is not a network kind jaxdiff knows")


def cast_params(params, dtype):
    """Casts float leaves to `dtype` on the host (numpy) and moves them to the default device.

    jax.device_put, not jnp.asarray: in jax >= 0.9 jnp.asarray of a numpy array runs the `stage`
    primitive, which compiles one small XLA program per distinct leaf shape (about 50 for a tiny model).
    """
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a), params)
