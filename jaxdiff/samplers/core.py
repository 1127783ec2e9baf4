"""The sampler driver: Plan (host tables), the registry with its aliases, make_plan and the one-scan `sample`.

A sampler is two functions registered under a canonical name:

* `build(cfg, steps, schedule, start, options) -> Tables` runs on the host in numpy float64. It returns
  per-EVALUATION tables (one row per model call, K rows = NFE), already sliced for img2img (`start` is the
  first step, diffusers' t_start). Every builder provides the driver's columns:
    "t"         [K] the timestep the UNet sees,
    "c_in"      [K] input scale (x_in = c_in * x; 1/sqrt(sigma^2+1) in sigma space, 1 in VP space),
    "inpaint_a", "inpaint_b" [K] the known region after evaluation k is inpaint_a * image + inpaint_b * noise
                (diffusers' add_noise to the next evaluation's level; 1, 0 after the last),
  plus its own coefficient columns.
* `body(x, out, hist, tab, noise) -> (x, hist)` is traced once inside `lax.scan`: x [B, h, w, C] the
  current sample, out the raw model output at this evaluation, hist the sampler's history pytree (built
  by `init(x_T)`), tab this evaluation's row of every table (scalars), noise [B, h, w, C] (zeros for
  deterministic samplers). Bodies are branch-free: warm-up, final-step and phase rules live in the tables.

Tables are jit ARGUMENTS, so karras / normal / AYS schedules of the same length share one executable.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import prediction
from jaxdiff.errors import SamplerError
from jaxdiff.samplers.class_defaults import DIFFUSERS_DEFAULTS
from jaxdiff.schedules import SCHEDULES, SchedulerConfig


@flax.struct.dataclass
class Plan:
    """One sampling run's tables; a pytree whose leaves are float32 arrays (jit arguments).

    Attributes:
      tables: name -> float32 [K, ...] per-evaluation table; K = scan length = number of model calls.
      init_noise_sigma: float32 [] txt2img x_T = noise * init_noise_sigma.
      img2img: float32 [2] (a, b): img2img x_T = a * image_latents + b * noise (diffusers' add_noise at the
        first kept timestep).
      kind: canonical sampler name (static: selects the scan body).
      prediction_type: what the model returns: "epsilon" | "v_prediction" | "sample" (static).
    """

    tables: dict[str, jax.Array]
    init_noise_sigma: jax.Array
    img2img: jax.Array
    kind: str = flax.struct.field(pytree_node=False)
    prediction_type: str = flax.struct.field(pytree_node=False)

    @property
    def nfe(self) -> int:
        """Number of model evaluations (the scan length)."""
        return int(self.tables["t"].shape[0])


@dataclasses.dataclass(frozen=True)
class Tables:
    """What a builder returns (host, float64): per-evaluation tables and the two starting rules."""

    tables: dict[str, np.ndarray]  # name -> [K, ...]
    init_noise_sigma: float
    img2img: tuple[float, float]  # (a, b): x_T = a * image + b * noise


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler."""

    name: str
    build: Callable[..., Tables]  # (cfg, steps, schedule, start, options) -> Tables
    body: Callable  # (x, out, hist, tab, noise) -> (x, hist)
    init: Callable  # x_T -> hist pytree
    stochastic: bool  # whether the body consumes noise (deterministic ones skip drawing it)
    order: int  # diffusers' scheduler.order (img2img slices timesteps[t_start * order:])
    options: tuple[str, ...]  # accepted make_plan **options
    diffusers_class: str | None  # whose defaults fill keys the checkpoint's scheduler config lacks
    default_schedule: str | None  # schedule=None: A1111's "Automatic" (its sampler option), None = the config's


_REGISTRY: dict[str, SamplerSpec] = {}
# Plan tables that are the model function's per-evaluation keyword arguments (jaxdiff.conditioning.bind).
MODEL_TABLES = ("control_keep",)
# lower-cased alias -> (canonical, implied schedule, schedule when none is given). A1111 display names with a
# schedule suffix imply it; diffusers class names and InvokeAI's plain names run the checkpoint's own spacing
# ("default") unless a schedule is given.
_ALIASES: dict[str, tuple[str, str | None, str | None]] = {}
_DISPLAY: dict[str, list[str]] = {}  # canonical -> aliases as registered (for sampler_table)
# Names users bring from diffusers / InvokeAI / ComfyUI for samplers jaxdiff does not implement -> why, in one line.
_REFUSED = {
    "dpmsolversinglestepscheduler": "DPMSolverSinglestepScheduler (DPM-Solver++ single-step, orders 1-3) is not "
                                    "implemented; use dpmpp_2m, or dpmpp_2s_ancestral with eta=0",
    "dpmpp_2s": "InvokeAI's dpmpp_2s is DPMSolverSinglestepScheduler, which is not implemented; use dpmpp_2m",
    "dpmpp_2s_k": "InvokeAI's dpmpp_2s_k is DPMSolverSinglestepScheduler, which is not implemented; use dpmpp_2m_k",
    "dpmpp_3m": "InvokeAI's dpmpp_3m is DPMSolverMultistep with solver_order=3, which is not implemented; use "
                "dpmpp_2m",
    "dpmpp_3m_k": "InvokeAI's dpmpp_3m_k is DPMSolverMultistep with solver_order=3, which is not implemented; use "
                  "dpmpp_2m_k",
    "edmeulerscheduler": "EDMEulerScheduler (EDM preconditioning, for EDM-trained models) is not implemented",
    "edmdpmsolvermultistepscheduler": "EDMDPMSolverMultistepScheduler (for EDM-trained models) is not implemented",
    "sasolverscheduler": "SASolverScheduler (SA-Solver) is not implemented",
    "sa_solver": "sa_solver (SA-Solver) is not implemented",
    "dpm_fast": "dpm_fast (k-diffusion DPM-Solver fast) is not implemented",
    "dpm_adaptive": "dpm_adaptive (k-diffusion adaptive DPM-Solver) is not implemented",
}

# A1111 "Schedule type" and ComfyUI scheduler names -> ours. None: the sampler's / checkpoint's default.
_SCHEDULE_ALIASES = {
    "automatic": None, "uniform": "normal", "karras": "karras", "exponential": "exponential",
    "sgm uniform": "sgm_uniform", "align your steps": "ays", "align_your_steps": "ays", "simple": "simple",
    "normal": "normal", "ddim": "ddim_uniform", "beta": "beta", "default": "default",
    "kl optimal": "kl_optimal", "polyexponential": "polyexponential",
}
_SCHEDULE_SUFFIXES = (" karras", " exponential")  # A1111 legacy display names: "DPM++ 2M Karras"


def _no_history(x):
    return ()


def register(name: str, *, build, body, init=_no_history, stochastic: bool = False, order: int = 1,
             options: tuple[str, ...] = (), aliases: tuple = (), diffusers_class: str | None = None,
             default_schedule: str | None = None, invokeai: tuple[str, ...] = ()) -> None:
    """Add a sampler.

    Args:
      aliases: names or (name, implied_schedule) pairs; matching is case-insensitive. Names ending in
        "Scheduler" (diffusers classes) run the checkpoint's own spacing when no schedule is given.
      diffusers_class: the diffusers class whose __init__ defaults fill the keys a checkpoint's scheduler
        config lacks (class_defaults.DIFFUSERS_DEFAULTS).
      default_schedule: what schedule=None means for the canonical / A1111 / ComfyUI names: A1111's
        "Automatic" for this sampler (its `scheduler` option: karras for DPM++ 2M, exponential for DPM++ 2M
        SDE), None for the checkpoint's scheduler config.
      invokeai: InvokeAI scheduler names: a plain one runs the checkpoint's spacing, "<name>_k" karras.
    """
    if name in _REGISTRY:
        raise ValueError(f"sampler {name!r} registered twice")
    _REGISTRY[name] = SamplerSpec(name, build, body, init, stochastic, order, tuple(options), diffusers_class,
                                  default_schedule)
    shown = _DISPLAY.setdefault(name, [])
    for alias in (name,) + tuple(aliases):
        alias, implied = alias if isinstance(alias, tuple) else (alias, None)
        soft = "default" if alias.endswith("Scheduler") and implied is None else None
        _ALIASES[alias.lower()] = (name, implied, soft)
        shown.append(alias)
    for alias in invokeai:
        if alias.endswith("_k"):
            _ALIASES[alias] = (name, "karras", None)
        elif alias not in _ALIASES:  # InvokeAI's dpmpp_2m is ours too; ours keeps A1111's meaning
            _ALIASES[alias] = (name, None, "default")
        shown.append(alias)


def sampler_table() -> str:
    """The printable table of samplers: canonical name, what schedule=None runs, options, every alias.

    `jaxdiff generate --list-samplers` prints this.
    """
    rows = [("sampler", "no schedule given", "options", "aliases")]
    for spec in _REGISTRY.values():
        aliases = [a for a in _DISPLAY[spec.name] if a != spec.name]
        rows.append((spec.name, spec.default_schedule or "checkpoint config", ", ".join(spec.options) or "-",
                     ", ".join(aliases)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
    lines.append("")
    lines.append("schedules: " + ", ".join(SCHEDULES) + " (A1111 and ComfyUI spellings too). No schedule or "
                 "'automatic': the sampler's own (column 2); 'default': what the checkpoint's scheduler config asks "
                 "for, as its diffusers class runs it; "
                 "ays: Align Your Steps, the published 3-decimal table of the model family (sd1/sd2: SD1, sdxl); "
                 "ays_comfy: ComfyUI's 10-digit tables.")
    lines.append("A1111 display names take a schedule suffix ('DPM++ 2M Karras'); diffusers class names and "
                 "InvokeAI names (euler_a, dpmpp_2m_k, ...) are accepted.")
    return "\n".join(lines)


def sampler_names() -> tuple[str, ...]:
    """Canonical names in registration order."""
    return tuple(_REGISTRY)


def resolve(name: str, schedule: str | None = None, options: Mapping[str, Any] | None = None
            ) -> tuple[str, str | None]:
    """Map any accepted sampler name (+ schedule) to (canonical name, schedule name or None).

    Accepts canonical / ComfyUI `sampler_name`s, A1111 display names ("DPM++ 2M Karras", "Euler a"),
    diffusers class names ("EulerDiscreteScheduler"; DPMSolverMultistepScheduler picks dpmpp_2m or
    dpmpp_2m_sde from options["algorithm_type"], UniPCMultistepScheduler uni_pc (bh1) or uni_pc_bh2 from
    options["solver_type"]) and schedule names in A1111 or ComfyUI spelling.

    Raises:
      SamplerError: unknown name or schedule (the message lists the valid ones), or a display name that
        implies one schedule while `schedule` asks for another.
    """
    if not isinstance(name, str):
        raise SamplerError(f"sampler name must be a string, got {name!r}")
    key = name.strip().lower()
    implied = None
    if key not in _ALIASES:
        for suffix in _SCHEDULE_SUFFIXES:
            if key.endswith(suffix) and key[: -len(suffix)] in _ALIASES:
                key, implied = key[: -len(suffix)], suffix.strip()
                break
    if key not in _ALIASES and key in _REFUSED:
        raise SamplerError(_REFUSED[key])
    if key not in _ALIASES:
        raise SamplerError(f"unknown sampler {name!r}; valid samplers: {', '.join(sampler_names())} "
                           f"(A1111 display names, ComfyUI names, InvokeAI names and diffusers class names also "
                           f"work; jaxdiff.samplers.sampler_table() lists them)")
    canonical, alias_schedule, soft = _ALIASES[key]
    if key == "dpmsolvermultistepscheduler" and (options or {}).get("algorithm_type") == "sde-dpmsolver++":
        canonical = "dpmpp_2m_sde"
    if key == "unipcmultistepscheduler" and (options or {}).get("solver_type") == "bh1":
        canonical = "uni_pc"  # the class runs the file's solver_type
    implied = implied or alias_schedule
    if schedule is not None:
        skey = schedule.strip().lower()
        if skey in _SCHEDULE_ALIASES:
            schedule = _SCHEDULE_ALIASES[skey]
        elif skey not in SCHEDULES:
            raise SamplerError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
        else:
            schedule = skey
    if implied is not None and schedule is not None and schedule != implied:
        raise SamplerError(f"sampler {name!r} implies schedule {implied!r}, but schedule={schedule!r} was given")
    if schedule is None:
        schedule = implied or soft
    return canonical, schedule


def img2img_start(steps: int, strength: float) -> int:
    """diffusers' img2img get_timesteps: the first step kept (t_start) for `strength`."""
    if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise SamplerError(f"strength must be in (0, 1], got {strength!r}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep < 1:
        raise SamplerError(f"strength={strength} with steps={steps} leaves no denoising step "
                           f"(int(steps * strength) = 0); raise steps or strength")
    return max(steps - init_timestep, 0)


# diffusers scheduler options jaxdiff does not implement -> what they are
_REFUSED_OPTIONS = {"thresholding": "dynamic thresholding of x0, for pixel-space models",
                    "use_lu_lambdas": "DPM-Solver's uniform-logSNR step schedule"}
MODEL_FAMILIES = ("sd1", "sd2", "sdxl")
# Align Your Steps tables by model family: SD2 has none published; A1111 and ComfyUI use the SD1 one for it.
_AYS_TABLE = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl"}


def _family_schedule(schedule: str | None, model_family: str) -> str | None:
    """"ays" / "ays_comfy" -> the model family's table ("ays_sd1", "ays_comfy_sdxl", ...)."""
    family = str(model_family).strip().lower()
    if family in ("sdxl_refiner", "refiner", "xl"):
        family = "sdxl"
    if family not in MODEL_FAMILIES:
        raise SamplerError(f"model_family must be one of {', '.join(MODEL_FAMILIES)}, got {model_family!r}")
    if schedule in ("ays", "ays_comfy"):
        return f"{schedule}_{_AYS_TABLE[family]}"
    return schedule


def build_tables(sampler: str, steps: int, config: SchedulerConfig | None = None, *, schedule: str | None = None,
                 strength: float = 1.0, model_family: str = "sd1", **options) -> tuple[str, Tables]:
    """(canonical name, float64 host Tables) for one run: `make_plan` before the float32 cast (arguments as
    there). Useful to inspect a schedule or to replay it in float64."""
    config = config or SchedulerConfig()
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise SamplerError(f"steps must be an integer >= 1, got {steps!r}")
    # the checkpoint's algorithm_type picks dpmpp_2m vs dpmpp_2m_sde for the class name, like diffusers
    name, schedule = resolve(sampler, schedule, {"algorithm_type": config.default("algorithm_type"),
                                                 "solver_type": config.default("solver_type"), **options})
    spec = _REGISTRY[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise SamplerError(f"sampler {name!r} does not take option(s) {', '.join(unknown)} "
                           f"(it takes: {', '.join(spec.options) or 'none'})")
    # keys the checkpoint's file lacks take this sampler's diffusers class defaults, as from_config does
    config = config.for_class(DIFFUSERS_DEFAULTS.get(spec.diffusers_class))
    for key, what in _REFUSED_OPTIONS.items():  # only where the class takes the key: others ignore it, as diffusers
        if config.default(key, False):
            raise SamplerError(f"sampler {name!r}: {key}=True (from the scheduler config) is not implemented ({what}); "
                               f"set it false in scheduler_config.json or pick a sampler whose diffusers class "
                               f"ignores it (euler, heun, lms, ...)")
    if schedule is None and spec.default_schedule is not None and not any(
            config.default(k, False) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        schedule = spec.default_schedule  # A1111's "Automatic"; a config that picks a sigma kind keeps it
    schedule = _family_schedule(schedule, model_family)
    start = img2img_start(int(steps), strength) if strength != 1.0 else 0
    built = spec.build(config, int(steps), schedule, start, dict(options))
    for col in ("t", "c_in", "inpaint_a", "inpaint_b"):
        if col not in built.tables:
            raise AssertionError(f"builder of {name!r} did not provide table {col!r}")
    return name, built


def make_plan(sampler: str, steps: int, config: SchedulerConfig | None = None, *, schedule: str | None = None,
              strength: float = 1.0, model_family: str = "sd1", **options) -> Plan:
    """Build the host tables for one run.

    Args:
      sampler: any registered name or alias (see `resolve`, `sampler_table`).
      steps: number of sampler steps (>= 1); the number of model calls is `plan.nfe`.
      config: the model's scheduler config (default: stock SD). When it came from a file
        (`SchedulerConfig.from_dict`), keys the file lacks take the defaults of the sampler's diffusers class,
        as diffusers' `from_config` does.
      schedule: None / "automatic": the sampler's own default -- the checkpoint's scheduler config for the
        timestep samplers and Euler / Heun / LMS, A1111's choice for the rest (karras for DPM++ 2M, DPM++ SDE,
        DPM++ 2S a, DPM2 (a); exponential for DPM++ 2M SDE); a config with use_karras_sigmas & co. keeps its
        choice. "default": what the checkpoint's scheduler config asks for (use_karras_sigmas & co., else its
        timestep spacing), as the sampler's diffusers class runs it. Else one of jaxdiff.schedules.SCHEDULES
        (A1111 and ComfyUI spellings accepted).
      strength: img2img strength in (0, 1]; < 1 starts part-way exactly as diffusers' img2img pipelines.
      model_family: "sd1" | "sd2" | "sdxl": picks the Align Your Steps table for schedule "ays" / "ays_comfy".
      **options: sampler knobs (eta, s_noise, solver_order, ...); each sampler lists what it accepts.

    Raises:
      SamplerError: bad steps / strength / name / schedule / option, or a checkpoint scheduler setting that
        changes numerics and is not implemented (e.g. DPMSolverMultistep solver_order=3).
    """
    config = config or SchedulerConfig()
    name, built = build_tables(sampler, steps, config, schedule=schedule, strength=strength,
                               model_family=model_family, **options)
    # Host (numpy float32) arrays: the caller places them with the rest of a request's arguments (an
    # eager jnp.asarray here would be an implicit transfer to the default device, and a second copy).
    tables = {k: np.asarray(np.asarray(v, dtype=np.float64), dtype=np.float32) for k, v in built.tables.items()}
    return Plan(tables=tables, init_noise_sigma=np.asarray(built.init_noise_sigma, np.float32),
                img2img=np.asarray(built.img2img, np.float32), kind=name,
                prediction_type=config.prediction_type)


def initial_latents(plan: Plan, noise: jax.Array, image_latents: jax.Array | None = None) -> jax.Array:
    """x_T: txt2img noise * init_noise_sigma; img2img add_noise(image_latents, noise, first timestep).

    Args:
      noise: [B, h, w, C] unit Gaussian noise.
      image_latents: [B, h, w, C] scaled VAE latents of the init image (img2img / inpaint), or None.
    """
    if image_latents is None:
        return noise * plan.init_noise_sigma
    return plan.img2img[0] * image_latents + plan.img2img[1] * noise


def step_noise(key: jax.Array, sample_index: jax.Array, k: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[B, *shape] standard normal noise for evaluation k: row i uses fold_in(fold_in(key, i), k), so a
    sample's noise depends on its index in the request, never on the batch size or sharding."""
    def row(i):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), k), shape, jnp.float32)
    return jax.vmap(row)(sample_index)


def sample(model_fn: Callable, x_T: jax.Array, plan: Plan, key: jax.Array | None = None, *,
           noises: jax.Array | None = None, inpaint: tuple | None = None, sample_index: jax.Array | None = None
           ) -> jax.Array:
    """Run the sampler: one `lax.scan` over the plan's K model evaluations.

    Args:
      model_fn: (x_in [B, h, w, C] f32, t f32 []) -> raw model output of plan.prediction_type, CFG
        already applied. x_in is scaled as diffusers' scale_model_input scales it; t is the diffusers value.
      x_T: [B, h, w, C] float32 starting latents (see `initial_latents`).
      plan: from `make_plan`.
      key: per-request PRNG key (needed by stochastic samplers unless `noises` is given).
      noises: [K, B, h, w, C] noise to use at each evaluation instead of drawing it (tests).
      inpaint: (image_latents [B, h, w, C], mask [B, h, w, 1] with 1 = repaint, noise [B, h, w, C]) for
        4-channel inpainting: after every evaluation the known region is reset to the image noised to the
        next evaluation's level (diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet).
      sample_index: [B] int32 index of each row in the request (default arange(B)).

    Returns:
      [B, h, w, C] float32 final latents.
    """
    carry = sampler_state(plan, x_T)
    x, _ = sample_steps(model_fn, carry, plan, None, key, noises=noises, inpaint=inpaint,
                        sample_index=sample_index)
    return x


def sampler_state(plan: Plan, x_T: jax.Array) -> tuple[jax.Array, Any]:
    """The scan carry before evaluation 0: (x_T as float32 [B, h, w, C], the sampler's history pytree)."""
    x_T = jnp.asarray(x_T, jnp.float32)
    return x_T, _REGISTRY[plan.kind].init(x_T)


def sample_steps(model_fn: Callable, carry: tuple[jax.Array, Any], plan: Plan, ks: jax.Array | None,
                 key: jax.Array | None = None, *, noises: jax.Array | None = None, inpaint: tuple | None = None,
                 sample_index: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Run model evaluations `ks` (int32 [n], consecutive; None = all K) from `carry` = (x, history).

    `sample` is `sampler_state` then all K evaluations; a caller that must report progress between
    evaluations (the CLI's bar) runs them a few at a time instead, with the same per-evaluation numbers.
    Arguments are `sample`'s; `noises` is [K, ...] (all evaluations) and is indexed by `ks`.
    Returns the carry after the last evaluation in `ks`.
    """
    spec = _REGISTRY[plan.kind]
    x, hist = carry
    # churn (s_churn > 0): noise added to x before the evaluation, x += pre_noise * noise (Karras et al. Alg. 2)
    churn = "pre_noise" in plan.tables
    stochastic = spec.stochastic or churn
    if stochastic and noises is None and key is None:
        raise SamplerError(f"sampler {plan.kind!r} is stochastic: pass a PRNG key or noises=")
    if sample_index is None:
        sample_index = jnp.arange(x.shape[0], dtype=jnp.int32)
    if ks is None:
        xs = {"tab": plan.tables, "k": jnp.arange(plan.nfe, dtype=jnp.int32)}
        if noises is not None:
            xs["noise"] = jnp.asarray(noises, jnp.float32)[: plan.nfe]
    else:
        xs = {"tab": jax.tree.map(lambda a: jnp.take(a, ks, axis=0), plan.tables), "k": ks}
        if noises is not None:
            xs["noise"] = jnp.take(jnp.asarray(noises, jnp.float32), ks, axis=0)

    def step(carry, xs_k):
        x, hist = carry
        tab = xs_k["tab"]
        if "noise" in xs_k:
            noise = xs_k["noise"]
        elif stochastic:
            noise = step_noise(key, sample_index, xs_k["k"], x.shape[1:])
        else:
            noise = jnp.zeros_like(x)
        if churn:
            x = x + tab["pre_noise"] * noise
        # Per-evaluation model tables (ControlNet's guidance window) go to the model, not the body.
        extra = {name: tab[name] for name in MODEL_TABLES if name in tab}
        out = model_fn(x * tab["c_in"], tab["t"], **extra)
        x, hist = spec.body(x, out.astype(jnp.float32), hist, tab, noise)
        if inpaint is not None:
            image, mask, inp_noise = inpaint
            known = tab["inpaint_a"] * image + tab["inpaint_b"] * inp_noise
            x = (1.0 - mask) * known + mask * x
        return (x, hist), None

    carry, _ = jax.lax.scan(step, (x, hist), xs)
    return carry


def to_x0(x: jax.Array, out: jax.Array, tab: Mapping[str, jax.Array]) -> jax.Array:
    """The x0 prediction from a model output: x0 = x0_x * x + x0_out * out, coefficients per evaluation
    (the builder folds the prediction type and the space, VE or VP, into them)."""
    return tab["x0_x"] * x + tab["x0_out"] * out


def x0_coefficients(prediction_type: str, sigma: np.ndarray, space: str) -> tuple[np.ndarray, np.ndarray]:
    """Host (x0_x, x0_out) for `to_x0` at VE noise levels `sigma` [K].

    space "ve": x = x0 + sigma * eps (Euler family); "vp": x = alpha x0 + sigma_vp eps with alpha =
    1/sqrt(sigma^2+1), sigma_vp = sigma * alpha (DPM-Solver family). The formulas are diffusers'.
    """
    sigma = np.asarray(sigma, np.float64)
    alpha = 1.0 / np.sqrt(sigma ** 2 + 1)
    a, b = prediction.x0_coefficients(prediction_type, alpha, sigma * alpha)  # VP: x = alpha x0 + sigma_vp eps
    if space == "ve":  # x_ve = x_vp / alpha, so x0 = (a alpha) x_ve + b out
        a = np.ones_like(sigma) if prediction_type == "epsilon" else a * alpha  # eps: x0 = x - sigma eps, exactly
        b = -sigma if prediction_type == "epsilon" else b
    return np.broadcast_to(a, sigma.shape).astype(np.float64), np.broadcast_to(b, sigma.shape).astype(np.float64)
