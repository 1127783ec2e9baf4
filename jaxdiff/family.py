"""ModelFamily: what kind of Stable Diffusion pipeline a set of networks is, decided once at load.

Every "is this SDXL / a refiner / an inpainting model" question is answered here and nowhere else:
`Pipeline.family` (computed when the pipeline is built) is read by the request builder, prompt
encoding, training, export and the benchmarks.

    SD1       CLIP-L, 4-channel UNet with conv proj_in / proj_out, epsilon
    SD2       OpenCLIP-H, linear proj_in / proj_out; "sd2-v" when its scheduler predicts v (768 models)
    SDXL      CLIP-L + OpenCLIP-bigG, pooled text + 6 time ids (sizes and crop)
    refiner   OpenCLIP-bigG only, pooled text + 5 time ids (sizes and aesthetic score)
    inpaint   any of the above whose UNet also takes mask + masked-image latents (9 channels for SD)

Stock scheduler config and VAE scaling factors: ../shared/reference/numbers.md ("Stock scheduler
configs"); SDXL's scheduler is Euler with "leading" spacing, SD1.5's PNDM, SD2.1-768's DDIM (v).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxdiff.errors import JaxdiffError

ENCODERS = ("text_encoder", "text_encoder_2")
NAMES = ("sd1", "sd2", "sd2-v", "sdxl", "refiner")
STOCK_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                       beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                       set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading")
_SCHEDULER_CLASS = {"sd1": "PNDMScheduler", "sd2": "PNDMScheduler", "sd2-v": "DDIMScheduler",
                    "sdxl": "EulerDiscreteScheduler", "refiner": "EulerDiscreteScheduler"}
SCALING_FACTOR = {"sd1": 0.18215, "sd2": 0.18215, "sd2-v": 0.18215, "sdxl": 0.13025, "refiner": 0.13025}


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Static facts about a pipeline (hashable: programs may close over it).

    Attributes:
      name: one of NAMES.
      encoders: the text encoders present, in context-concatenation order.
      time_ids: SDXL micro-conditioning ids per image: 6 (base), 5 (refiner) or 0.
      pooled_dim: width of the pooled text embedding the UNet takes (0 without text_time).
      latent_channels: C of the VAE latents.
      unet_in_channels: the UNet's input channels.
      vae_factor: pixels per latent along each side.
      default_size: (height, width) in pixels when a request gives none.
      prediction_type: what the UNet predicts, per the scheduler config.
      guidance_embedding_dim: LCM-distilled UNets (time_cond_proj_dim): the width of the guidance-scale
        embedding each row takes as `timestep_cond`; such models run without CFG. None otherwise.
    """
    name: str
    encoders: tuple[str, ...]
    time_ids: int
    pooled_dim: int
    latent_channels: int
    unet_in_channels: int
    vae_factor: int
    default_size: tuple[int, int]
    prediction_type: str = "epsilon"
    guidance_embedding_dim: int | None = None

    @property
    def text_time(self) -> bool:
        """SDXL-style added conditioning: pooled text embedding + time ids."""
        return self.time_ids > 0

    @property
    def is_sdxl(self) -> bool:
        return self.name in ("sdxl", "refiner")

    @property
    def is_refiner(self) -> bool:
        return self.name == "refiner"

    @property
    def concat_channels(self) -> int:
        """Channels concatenated to the latents before the UNet (mask + masked-image latents)."""
        return self.unet_in_channels - self.latent_channels

    @property
    def inpaint(self) -> bool:
        """A dedicated inpainting UNet (latents + 1 mask channel + masked-image latents)."""
        return self.concat_channels == self.latent_channels + 1

    @property
    def label(self) -> str:
        return self.name + ("-inpaint" if self.inpaint else "")

    @property
    def sampler_family(self) -> str:
        """What the samplers call this model ("sd1" | "sd2" | "sdxl"): it picks the "Align Your Steps"
        table (SD1 and SD2 share one, SDXL and its refiner have their own)."""
        return "sdxl" if self.is_sdxl else "sd2" if self.name.startswith("sd2") else "sd1"

    @property
    def zero_negative_default(self) -> bool:
        """diffusers' force_zeros_for_empty_prompt as the released checkpoints set it: on for SDXL base."""
        return self.name == "sdxl"

    def default_scheduler_config(self) -> dict[str, Any]:
        """The stock diffusers scheduler config of this family, for checkpoints that carry none."""
        prediction = "v_prediction" if self.name == "sd2-v" else self.prediction_type
        return {"_class_name": _SCHEDULER_CLASS[self.name], **STOCK_SCHEDULER, "prediction_type": prediction}


def family_of(networks: Mapping[str, Any], scheduler_config: Mapping[str, Any] | None = None) -> ModelFamily:
    """The family of a pipeline's networks.

    Args:
      networks: component name -> object with `.config` ("unet", "vae", and the text encoders present).
      scheduler_config: the checkpoint's scheduler config (decides SD2 vs SD2-v), or None.
    """
    unet, vae = networks["unet"].config, networks["vae"].config
    encoders = tuple(n for n in ENCODERS if networks.get(n) is not None)
    prediction = (scheduler_config or {}).get("prediction_type") or "epsilon"
    time_ids = pooled = 0
    if unet.takes_text_time:
        if "text_encoder_2" not in encoders:
            raise JaxdiffError("an SDXL-style UNet (pooled text + time ids) needs a projected second text "
                               "encoder (text_encoder_2)")
        pooled = networks["text_encoder_2"].config.projection_dim
        time_ids = unet.time_id_count(pooled)
        if time_ids not in (5, 6):
            raise JaxdiffError(f"this UNet expects {time_ids} SDXL time ids; jaxdiff knows 6 (base) and 5 "
                               f"(refiner)")
        name = "refiner" if time_ids == 5 else "sdxl"
    elif unet.use_linear_projection:
        name = "sd2-v" if prediction == "v_prediction" else "sd2"
    else:
        name = "sd1"
    f = vae.downsample_factor
    sample = unet.sample_size or 64
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return ModelFamily(name=name, encoders=encoders, time_ids=time_ids, pooled_dim=pooled,
                       latent_channels=vae.latent_channels, unet_in_channels=unet.in_channels,
                       vae_factor=f, default_size=(h * f, w * f), prediction_type=prediction,
                       guidance_embedding_dim=unet.time_cond_proj_dim)
