"""Pipeline: the networks, tokenizers and scheduler config of one Stable Diffusion model, and generation.

    pipe = jaxdiff.load("path/to/sd15")          # see jaxdiff.loading
    out = pipe("a red panda", steps=25, seed=0)  # out.images uint8 [B, H, W, 3], out.latents NHWC
    pipe.text_encoder(ids).last_hidden_state     # components are pure jitted callables
    pipe.unet(x, t, context)
    pipe.vae.decode(z)
    pipe.save("out/")                            # native format, read back by jaxdiff.load

`__call__` is: build the request (jaxdiff.request checks it and makes per-image host arrays), run it
(jaxdiff.generation: text encoding + sampling + decoding as one sharded program), collect the images.
Params are arguments: `pipe.params` is a dict by component, `pipe(..., params=tree)` runs other
weights, and `pipe.with_params(tree)` is a pipeline over other weights that shares this one's compiled
programs (LoRA, EMA and fine-tuned weights never recompile). `pipe.family` (jaxdiff.family) says what
kind of model this is.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

import jax

from jaxdiff import checkpoint, generation, prompts
from jaxdiff import request as requests
from jaxdiff.components import Component
from jaxdiff.errors import CheckpointError, JaxdiffError
from jaxdiff.family import ModelFamily, family_of

REQUIRED = ("unet", "vae")  # plus at least one text encoder (the SDXL refiner has only text_encoder_2)
GATHER = ("all", "host0", "local")


@dataclasses.dataclass
class GenerationOutput:
    """What `pipe(...)` returns. Rows are the images this process holds (all of them unless
    gather="local", none on processes other than 0 with gather="host0").

    Attributes:
      images: uint8 [n, H, W, 3].
      latents: float32 [n, h, w, C] final (scaled) latents, NHWC.
      indices: int [n] each row's sample index in the request (its noise stream; see jaxdiff.generation).
      pixels: float32 [n, H, W, 3] in [0, 1], the images before rounding (only with return_float=True).
    """
    images: np.ndarray | None
    latents: np.ndarray | None
    indices: np.ndarray
    pixels: np.ndarray | None = None


class Pipeline:
    """Holds `text_encoder`, `text_encoder_2` (SDXL), `unet`, `vae`, `tokenizer`, `tokenizer_2` and
    `scheduler_config` (the checkpoint's own scheduler_config.json, a dict, or None)."""

    def __init__(self, *, unet: Component, vae: Component, text_encoder: Component | None = None,
                 tokenizer=None, text_encoder_2: Component | None = None, tokenizer_2=None,
                 scheduler_config: Mapping[str, Any] | None = None, pipeline_class: str | None = None,
                 options: Mapping[str, Any] | None = None, programs: generation.Programs | None = None,
                 controlnet: Sequence[Component] | None = None):
        """`options`: model_index.json pipeline flags jaxdiff honours: "force_zeros_for_empty_prompt"
        (default: True for SDXL base, False for refiners, as the released checkpoints set it).
        `programs`: compiled programs to share (`with_params` passes its own; None makes new ones).
        `controlnet`: ControlNet components applied to every call (see `with_controlnet`)."""
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler_config) if scheduler_config is not None else None
        self.pipeline_class = pipeline_class
        self.options = dict(options or {})
        self.family: ModelFamily = family_of(self.components(), self.scheduler_config)
        self.controlnet: tuple[Component, ...] = tuple(controlnet or ())
        for net in self.controlnet:
            check_controlnet(self, net)
        self.embeddings = prompts.TextualInversions.for_pipeline(self)  # textual-inversion terms
        self._programs = programs if programs is not None else generation.Programs(generation.models_of(self))
        self._mesh = None
        self._ti_tables = None  # (TextualInversions, its tables): rebuilt when the terms change
        self._lora = None       # jaxdiff.adapters.AdapterSet over the weights the first LoRA was loaded on
        self.vae_tiling = False  # enable_vae_tiling()

    @classmethod
    def from_parts(cls, networks: Mapping[str, Component], tokenizers: Mapping[str, Any],
                   scheduler_config, *, source: str, pipeline_class: str | None = None,
                   options: Mapping[str, Any] | None = None) -> "Pipeline":
        """Assembles a pipeline from loaded parts, checking that they fit together."""
        missing = [n for n in REQUIRED if n not in networks]
        if not any(n in networks for n in prompts.ENCODERS):
            missing.append("text_encoder (or text_encoder_2)")
        if missing:
            raise CheckpointError(f"{source}: no {', '.join(missing)} in this model folder")
        if "text_encoder" in networks and "tokenizer" not in tokenizers:
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
                   pipeline_class=pipeline_class, options=options)

    def components(self) -> dict[str, Component]:
        """The networks present, by their diffusers names."""
        return {name: c for name in ("text_encoder", "text_encoder_2", "unet", "vae")
                if (c := getattr(self, name)) is not None}

    @property
    def params(self) -> dict[str, Any]:
        """component name -> its params tree (the weights every call uses unless given others)."""
        return {name: c.params for name, c in self.components().items()}

    def with_params(self, params: Mapping[str, Any]) -> "Pipeline":
        """A pipeline over other weights of the same shapes that shares this one's compiled programs.

        Args:
          params: component name -> params tree, for some or all components (the rest are kept).
        Raises:
          JaxdiffError: an unknown component, or a tree whose structure, shapes or dtypes differ.
        """
        merged = self._checked_params(params)
        comps = {name: c.with_params(merged[name]) for name, c in self.components().items()}
        out = Pipeline(**comps, tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2,
                       scheduler_config=self.scheduler_config, pipeline_class=self.pipeline_class,
                       options=self.options, programs=self._programs, controlnet=self.controlnet)
        out.embeddings = self.embeddings
        out.vae_tiling = self.vae_tiling
        return out

    def with_controlnet(self, controlnet) -> "Pipeline":
        """This pipeline with ControlNet(s): a jaxdiff.components.ControlNet (`jaxdiff.load_controlnet`),
        a path, or a list of them (MultiControlNet: residuals summed); [] or None for none. The networks
        are shared; the programs are new (they run the ControlNets). Each ControlNet must fit the UNet
        (context width, SDXL-ness, control-image factor = VAE factor): a one-line CheckpointError."""
        from jaxdiff.loading import load_controlnet
        nets = controlnet if isinstance(controlnet, (list, tuple)) else ([] if controlnet is None else [controlnet])
        nets = [load_controlnet(n, self.unet.module.dtype) if isinstance(n, (str, Path)) else n for n in nets]
        out = Pipeline(**self.components(), tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2,
                       scheduler_config=self.scheduler_config, pipeline_class=self.pipeline_class,
                       options=self.options, controlnet=nets)
        out.embeddings = self.embeddings
        out._lora = self._lora  # loaded LoRAs stay manageable (set_adapters, unload) on the new pipeline
        return out

    def enable_vae_tiling(self) -> None:
        """Encode and decode images larger than the VAE's `sample_size` in overlapping tiles, blended as
        diffusers' `vae.enable_tiling()` (jaxdiff.vae_tiling): memory of one tile, whatever the size."""
        self.vae_tiling = True

    def disable_vae_tiling(self) -> None:
        self.vae_tiling = False

    def load_textual_inversion(self, path, *, token: str | None = None) -> str:
        """Adds a textual-inversion embedding (diffusers' name): A1111 `.safetensors` (`emb_params`),
        diffusers `learned_embeds`, SDXL files with `clip_l` / `clip_g` (both encoders at once).
        The term is used in prompts by `token` (default: the file stem, as A1111; diffusers files
        name their own token). Its vectors are program arguments: loading one compiles nothing
        until the table outgrows its power-of-two size. Returns the token. A file that does not
        fit raises a one-line JaxdiffError and leaves the pipeline unchanged."""
        from convert import embeddings as embedding_files
        embedding = embedding_files.read_embedding(path, token=token)
        self.embeddings = self.embeddings.add(embedding)
        return embedding.name

    # ------------------------------------------------------------------- LoRA (diffusers' method names)
    def load_lora_weights(self, path, *, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Loads a LoRA / LoCon / LoHa / LoKr file (PEFT / diffusers, kohya / A1111 with diffusers or SGM
        names; .safetensors or pickled .pt / .bin through the allow-list unpickler) and activates it at
        `scale` with the adapters already active. The merged weights are new params: nothing is
        recompiled. Returns the adapter's name (default `default_<n>`, as diffusers). A file that does
        not fit raises a one-line JaxdiffError and leaves the pipeline unchanged."""
        from jaxdiff.adapters import AdapterSet
        lora = self._lora if self._lora is not None else AdapterSet(self.params)
        name = lora.load(path, adapter_name=adapter_name, scale=scale)
        self._lora = lora
        self._use(lora.params)
        return name

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Activates exactly these adapters with these weights (one for all, one each, or per component
        {"unet": w, "text_encoder": w}); the others stay loaded, inactive."""
        self._loras().set_adapters(adapter_names, adapter_weights)
        self._use(self._lora.params)

    def delete_adapters(self, adapter_names) -> None:
        self._loras().delete(adapter_names)
        self._use(self._lora.params)

    def unload_lora_weights(self) -> None:
        """Drops every adapter: the weights are the base weights again, the same arrays bit for bit."""
        if self._lora is not None:
            self._lora.unload()
            self._use(self._lora.params)

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names=None) -> None:
        """Makes the active (or named) adapters part of the base weights (`unload_lora_weights` then
        keeps them; `unfuse_lora` restores the weights from before)."""
        self._loras().fuse(lora_scale, adapter_names)
        self._use(self._lora.params)

    def unfuse_lora(self) -> None:
        self._loras().unfuse()
        self._use(self._lora.params)

    def _loras(self):
        if self._lora is None:
            raise JaxdiffError("no LoRA is loaded; call load_lora_weights first")
        return self._lora

    def _use(self, params: Mapping[str, Any]) -> None:
        """Points the components at `params` (same shapes: the compiled programs stay)."""
        for name, tree in params.items():
            comp = getattr(self, name)
            if comp.params is not tree:
                setattr(self, name, comp.with_params(tree))

    def program_params(self, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What the compiled program takes as params: the components' (or `params` over them, checked)
        plus the textual-inversion table when terms are loaded."""
        out = self._checked_params(params)
        if self.embeddings.terms:
            cached = self._ti_tables
            if cached is None or cached[0] is not self.embeddings:
                cached = self._ti_tables = (self.embeddings, self.embeddings.tables())
            out[generation.TEXTUAL_INVERSION] = cached[1]
        if self.controlnet and generation.CONTROLNET not in out:
            out[generation.CONTROLNET] = tuple(c.params for c in self.controlnet)
        return out

    def _checked_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """`params` over this pipeline's own, checked to fit the compiled programs."""
        own = self.params
        if params is None:
            return own
        if generation.CONTROLNET in params and self.controlnet:  # other ControlNet weights, same shapes
            params = dict(params)
            nets = tuple(params.pop(generation.CONTROLNET))
            want = [jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), c.params) for c in self.controlnet]
            if [jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), n) for n in nets] != want:
                raise JaxdiffError("params['controlnet'] do not match the pipeline's ControlNets' shapes and dtypes")
            return {**self._checked_params(params), generation.CONTROLNET: nets}
        unknown = sorted(set(params) - set(own))
        if unknown:
            raise JaxdiffError(f"params for {unknown}: this pipeline's components are {sorted(own)}")
        for name, tree in params.items():
            want = jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), own[name])
            got = jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), tree)
            if got != want:
                raise JaxdiffError(f"params[{name!r}] do not match the {name}'s structure, shapes and dtypes; "
                                   f"cast them to the pipeline's param dtype and keep every leaf's shape")
        return {**own, **params}

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
                                    pipeline={"class": self.pipeline_class, "options": self.options})

    # ------------------------------------------------------------------------------------ generation
    @property
    def mesh(self):
        """The default mesh: every device of every process, batch split over all of them."""
        if self._mesh is None:
            from jaxdiff import sharding
            self._mesh = sharding.make_mesh()
        return self._mesh

    def runner(self, mesh=None) -> generation.Runner:
        """The compiled programs for `mesh` (shared with every `with_params` pipeline of this one)."""
        return self._programs.runner(mesh if mesh is not None else self.mesh)

    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_factor

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 gather: str = "all", mesh=None, params: Mapping[str, Any] | None = None,
                 progress: Callable[[int, int], None] | None = None, paste_back: bool = False,
                 **options) -> GenerationOutput:
        """Generate images: txt2img, img2img (`image`), inpainting (`image` + `mask`).

        Args:
          prompt: a string or a list of P strings; B = P * num_images_per_prompt images, prompt p's
            images are rows p*N .. p*N+N-1.
          negative_prompt: None, one string, or P strings. None means "" (SDXL base: zero embeddings,
            diffusers' force_zeros_for_empty_prompt).
          prompt_2, negative_prompt_2: SDXL's second text encoder's texts (diffusers: None = the same as
            prompt / negative_prompt).
          prompt_weighting: "a1111" (default: `(word:1.2)`, `[word]`, BREAK, prompts longer than 75
            tokens in chunks; jaxdiff.prompt_parser) or "none" (diffusers' literal text, truncated at 75
            tokens with a warning). Textual-inversion terms (`load_textual_inversion`) work in both.
          height, width: image size, multiples of 8 (default: the init image's size, else the UNet's
            sample_size times the VAE factor).
          steps, sampler, schedule, sampler_options: see jaxdiff.samplers.make_plan (defaults: 25 steps,
            "dpmpp_2m", schedule None = the sampler's own default: the checkpoint's scheduler config for
            the timestep samplers and Euler / Heun / LMS, A1111's "Automatic" choice for the rest, e.g.
            karras for DPM++ 2M; `jaxdiff.samplers.sampler_table()` lists them).
          guidance_scale: classifier-free guidance; <= 1 runs the UNet on the prompt alone.
          guidance_rescale: Lin et al. 2023's CFG rescale in [0, 1] (for zero-terminal-SNR models).
          clip_skip: final text-encoder layers to skip (diffusers' clip_skip; 1 = A1111's "clip skip 2").
          seed: request seed; image i's noise depends only on (seed, i) (jaxdiff.generation).
          latents: unit-variance starting noise [B, h, w, C] NHWC (replaces the seeded start noise).
          image: init image(s): uint8 or float in [0, 1], [H, W, 3] or [1 | P | B, H, W, 3].
          strength: img2img / inpaint strength in (0, 1]; default 0.75 for img2img, 1.0 for inpainting.
          mask: inpainting mask, white = repaint: [H, W], [H, W, 1|3] or with a leading
            1 | P | B axis, uint8 or float in [0, 1]; grey is a partial repaint (kept soft, as A1111).
            9-channel UNets get mask + masked-image latents (the pixels where mask < 0.5);
            4-channel UNets blend the known region back after every step.
          mask_blur: A1111's Gaussian blur of the mask, in pixels (default 0).
          paste_back: paste the original pixels over the area the mask keeps after decoding, blended
            by the (blurred) mask (A1111's behaviour; default False, as diffusers).
          indices: sample index of each of the B images (default 0..B-1): image i of a batch equals the
            same request made with indices=[i].
          original_size, crops_coords_top_left, target_size, negative_*: SDXL size conditioning
            (defaults: (height, width), (0, 0), (height, width); negatives default to the positives).
          aesthetic_score, negative_aesthetic_score: SDXL refiner conditioning.
          gather: "all" (every process gets every image), "host0" (process 0 only), "local" (each
            process its own rows; see GenerationOutput.indices).
          mesh: a jaxdiff.sharding mesh (default: all devices).
          params: component name -> params to use instead of the pipeline's own, for some or all
            components (same structure and shapes; compiles nothing new).
          return_float: also return the float images in [0, 1] (GenerationOutput.pixels).
          progress: called on the host as (model evaluations done, total) after each evaluation. The
            request then runs as three programs (prepare, one evaluation called K times, decode) instead
            of one: other compiles, the same numbers per evaluation, one host sync per step.

        Raises:
          JaxdiffError (SamplerError for sampler problems) with a one-line message.
        """
        if gather not in GATHER:
            raise JaxdiffError(f"gather={gather!r}; expected one of {', '.join(GATHER)}")
        req = requests.build(self, prompt, negative_prompt, **options)
        from jaxdiff import memory_guard  # refuses, before compiling, a request that cannot fit
        h, w = req.spec.latent_size
        if memory_guard.check(self, h * self.family.vae_factor, w * self.family.vae_factor, req.rows, req.spec.cfg,
                              req.spec.vae_tiles, self.runner(mesh).mesh.size):
            # Fits only with a tiled VAE: tile this request (diffusers' rules; jaxdiff.vae_tiling).
            req = dataclasses.replace(req, spec=dataclasses.replace(req.spec, vae_tiles=True))
        on_step = None if progress is None else lambda k: progress(k + 1, req.plan.nfe)
        out, n = self.runner(mesh)(req.spec, self.program_params(params), req.inputs, req.plan, req.seed,
                                   req.guidance, on_step=on_step)
        got = _collect(out, n, req.inputs.index, gather)  # blocks until the program is done
        if paste_back and req.inputs.mask is not None and got.images is not None:
            got = _pasted(got, req.inputs)
        return got

    def lower(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
              mesh=None, params: Mapping[str, Any] | None = None, **options) -> jax.stages.Lowered:
        """The one program `pipe(prompt, ...)` runs, lowered (JAX AOT) for these arguments: compile it
        to time compilation or read XLA's cost and memory analysis (jaxdiff.bench does)."""
        req = requests.build(self, prompt, negative_prompt, **options)
        return self.runner(mesh).lower(req.spec, self.program_params(params), req.inputs, req.plan,
                                       req.seed, req.guidance)

    def generate_batches(self, prompt: str | Sequence[str], *, num_images_per_prompt: int = 1,
                         batch_size: int | None = None, negative_prompt: str | Sequence[str] | None = None,
                         **kwargs) -> Iterator[GenerationOutput]:
        """Like `pipe(...)`, in batches of `batch_size` images: yields one GenerationOutput per batch,
        as soon as it is done (progress, writing files as they come). Image i of the whole request keeps
        sample index i, so the images equal those of one big call. `kwargs` are `__call__`'s; `image`
        and `mask` must be single images (or None) here.

        Args:
          batch_size: images per compiled call (default: all at once). The last batch may be smaller
            (it compiles once more unless it has the same padded size).
        """
        texts = prompts.as_prompt_list(prompt)
        negs = None if negative_prompt is None else prompts.as_prompt_list(negative_prompt, "negative_prompt")
        if negs is not None and len(negs) not in (1, len(texts)):
            raise JaxdiffError(f"negative_prompt has {len(negs)} entries but prompt has {len(texts)}")
        rows = [p for p in texts for _ in range(num_images_per_prompt)]
        neg_rows = None if negs is None else [negs[0] if len(negs) == 1 else negs[r // num_images_per_prompt]
                                             for r in range(len(rows))]
        batch_size = batch_size or len(rows)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise JaxdiffError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        for start in range(0, len(rows), batch_size):
            stop = min(start + batch_size, len(rows))
            yield self(rows[start:stop], None if neg_rows is None else neg_rows[start:stop],
                       indices=list(range(start, stop)), **kwargs)


def check_controlnet(pipe: "Pipeline", net: Component) -> None:
    """Refuses a ControlNet that cannot steer this pipeline's UNet, in one line."""
    from jaxdiff.components import ControlNet
    if not isinstance(net, ControlNet):
        raise CheckpointError(f"controlnet: expected a ControlNet (jaxdiff.load_controlnet), got {type(net).__name__}")
    u, c = pipe.unet.config, net.config
    problems = []
    if c.cross_attention_dims[0] != u.cross_attention_dims[0]:
        problems.append(f"its cross-attention width is {c.cross_attention_dims[0]}, the UNet's "
                        f"{u.cross_attention_dims[0]}")
    if c.takes_text_time != u.takes_text_time:
        problems.append("it is for " + ("SDXL" if c.takes_text_time else "SD 1.x / 2.x") + " and the UNet is not")
    if tuple(c.block_out_channels) != tuple(u.block_out_channels) or c.layers_per_level != u.layers_per_level:
        problems.append(f"its blocks {c.block_out_channels} x {c.layers_per_level} differ from the UNet's "
                        f"{u.block_out_channels} x {u.layers_per_level}")
    if c.image_factor != pipe.family.vae_factor:
        problems.append(f"its control encoder downsamples {c.image_factor}x, the VAE {pipe.family.vae_factor}x")
    if c.in_channels > u.in_channels:
        problems.append(f"it takes {c.in_channels} latent channels, the UNet {u.in_channels}")
    if problems:
        raise CheckpointError(f"controlnet does not fit this model ({pipe.family.name}): "
                              + "; ".join(problems))


def _pasted(got: GenerationOutput, inputs) -> GenerationOutput:
    """A1111's paste-back (jaxdiff.inpaint_masks) on the rows this process holds."""
    from jaxdiff.inpaint_masks import paste_back
    pos = np.array([int(np.flatnonzero(np.asarray(inputs.index) == i)[0]) for i in got.indices], np.int64)
    original = (np.asarray(inputs.image)[pos] + 1.0) / 2.0
    images, pixels = paste_back(got.images, got.pixels, original, np.asarray(inputs.mask)[pos])
    return dataclasses.replace(got, images=images, pixels=pixels)


def _collect(out: dict, n: int, index: np.ndarray, gather: str) -> GenerationOutput:
    """Global program outputs -> host arrays per the gather mode (trimmed to the n real rows)."""
    from jaxdiff import sharding
    if gather == "local":
        got = {k: sharding.local_rows(v, n) for k, v in out.items()}
        rows = got["latents"][1]
        return GenerationOutput(images=got["images"][0] if "images" in got else None, latents=got["latents"][0],
                                indices=index[rows],
                                pixels=got["pixels"][0] if "pixels" in got else None)
    host = sharding.gather(out, host0_only=gather == "host0")
    if host is None:
        return GenerationOutput(images=None, latents=None, indices=np.zeros(0, np.int64))
    host = sharding.trim(host, n)
    return GenerationOutput(images=host.get("images"), latents=host["latents"], indices=index[:n].astype(np.int64),
                            pixels=host.get("pixels"))
