"""Image files: PNGs that carry their generation parameters, init images and masks.

    text = parameters_text("a red panda", "", steps=25, sampler="dpmpp_2m", schedule="karras",
                           guidance_scale=7.5, seed=1234, width=512, height=512, model="sd15")
    path = write_png(out_dir, image, text, seed=1234)     # out_dir/00007-1234.png, never overwrites
    read_parameters(path) == text

The text chunk is AUTOMATIC1111's: key "parameters", value
    PROMPT
    Negative prompt: NEG
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: sd15
so A1111's "PNG Info" tab, ComfyUI loaders and civitai read jaxdiff's images.

Writes are atomic: the PNG goes to a hidden temp file in the output folder, is fsynced, then linked to its
final name (os.link fails instead of overwriting), so an interrupted run leaves either a whole image
or nothing.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from jaxdiff.errors import JaxdiffError

# canonical sampler name -> the name A1111 shows ("Sampler:" in its parameters text). Names A1111 does
# not have (uni_pc_bh2, deis, ddpm, tcd) use the registered display alias, which jaxdiff resolves back.
SAMPLER_DISPLAY = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "ddpm": "DDPM", "ddim": "DDIM",
    "plms": "PLMS", "uni_pc": "UniPC", "uni_pc_bh2": "UniPC bh2", "deis": "DEIS", "lcm": "LCM",
    "tcd": "TCD", "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_3m_sde": "DPM++ 3M SDE", "heunpp2": "Heun++",
    # ComfyUI-only samplers: their ComfyUI names
    "ipndm": "ipndm", "ipndm_v": "ipndm_v", "gradient_estimation": "gradient_estimation",
    "res_multistep": "res_multistep", "res_multistep_ancestral": "res_multistep_ancestral", "er_sde": "er_sde",
}
# jaxdiff schedule -> A1111 "Schedule type". None (the checkpoint scheduler's own choice) is A1111's
# "Automatic"; "default" (the scheduler's own spacing, forced) has no A1111 name and is written as is.
SCHEDULE_DISPLAY = {
    None: "Automatic", "karras": "Karras", "exponential": "Exponential", "normal": "Normal",
    "simple": "Simple", "sgm_uniform": "SGM Uniform", "ddim_uniform": "DDIM", "beta": "Beta",
    "ays": "Align Your Steps", "default": "Default", "kl_optimal": "KL Optimal", "polyexponential": "Polyexponential",
}

_INDEX = re.compile(r"^(\d{5,})-")  # NNNNN-... : the A1111 numbering this folder continues


class ImageError(JaxdiffError):
    """An image or mask file that cannot be read or does not fit the request."""


def _value(v: Any) -> str:
    # A1111's infotext quote(): values holding its separators are JSON strings, so "Key: value, ..." parsing
    # stays unambiguous.
    s = str(v)
    return json.dumps(s, ensure_ascii=False) if ("," in s or ":" in s or "\n" in s) else s


def parameters_text(prompt: str, negative_prompt: str, *, steps: int, sampler: str, schedule: str | None,
                    guidance_scale: float, seed: int, width: int, height: int, model: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """A1111's "parameters" text for one image.

    Args:
      sampler: canonical jaxdiff name (written with its A1111 display name).
      schedule: resolved jaxdiff schedule name, or None for the checkpoint's own.
      extra: further "Key: value" pairs appended in order (e.g. {"Denoising strength": 0.75}); None values
        are skipped.
    """
    fields = {"Steps": steps, "Sampler": SAMPLER_DISPLAY.get(sampler, sampler),
              "Schedule type": SCHEDULE_DISPLAY.get(schedule, schedule), "CFG scale": f"{guidance_scale:g}",
              "Seed": seed, "Size": f"{width}x{height}", "Model": model}
    fields.update(extra or {})
    tail = ", ".join(f"{k}: {_value(v)}" for k, v in fields.items() if v is not None)
    lines = [prompt]
    if negative_prompt:  # A1111 leaves the line out when there is no negative prompt
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(tail)
    return "\n".join(lines)


def next_index(folder: Path) -> int:
    """1 + the largest NNNNN- prefix in `folder` (0 when there is none), as A1111 numbers its outputs."""
    best = -1
    if folder.is_dir():
        for p in folder.iterdir():
            m = _INDEX.match(p.name)
            if m:
                best = max(best, int(m.group(1)))
    return best + 1


def png_bytes(image: np.ndarray, parameters: str | None = None) -> bytes:
    """Encodes uint8 [H, W, 3] as PNG with the "parameters" text chunk (tEXt, or iTXt beyond latin-1)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_png(folder, image: np.ndarray, parameters: str | None, *, seed: int, index: int | None = None
              ) -> Path:
    """Writes `folder/NNNNN-SEED.png` atomically, never replacing an existing file.

    Args:
      folder: output folder (created if missing).
      image: uint8 [H, W, 3].
      parameters: A1111 parameters text (see `parameters_text`), or None for no chunk.
      seed: goes into the file name.
      index: first index to try; default `next_index(folder)`. Taken indices are skipped.
    Returns:
      The path written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImageError(f"{folder}: cannot create the output folder ({e.strerror or e})") from None
    data = png_bytes(image, parameters)
    index = next_index(folder) if index is None else index
    tmp = folder / f".jaxdiff-{os.getpid()}-{index:05d}.png.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        while True:
            final = folder / f"{index:05d}-{seed}.png"
            try:
                os.link(tmp, final)  # atomic, and refuses to replace: two runs into one folder both survive
                return final
            except FileExistsError:
                index += 1
            except OSError:  # a filesystem without hard links: check, then rename (small race, same result)
                if final.exists():
                    index += 1
                    continue
                os.replace(tmp, final)
                return final
    except OSError as e:
        raise ImageError(f"{folder}: cannot write an image ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)  # also on KeyboardInterrupt: no half-written file stays behind


def read_parameters(path) -> str | None:
    """The "parameters" text of a PNG written by jaxdiff or A1111 (None when it has none)."""
    with Image.open(path) as im:
        im.load()
        return im.info.get("parameters")


def _open(path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: {what} not found")
    try:
        im = Image.open(path)
        im.load()
        return im
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: cannot read the {what} ({e})") from None


def read_image(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An init image as uint8 [H, W, 3] (alpha dropped, palette / grey expanded to RGB).

    Args:
      size: (height, width) to resize to (Lanczos, A1111's "Just resize"); None keeps the file's size.
    """
    im = _open(path, "init image").convert("RGB")
    if size is not None and (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def read_mask(path, size: tuple[int, int]) -> np.ndarray:
    """An inpainting mask as float32 [H, W] in [0, 1]: white (1) is repainted, black (0) kept.

    The file's luminance is used (an alpha channel is ignored); it is resized to `size` = (height, width)
    with bilinear filtering so soft edges stay soft.
    """
    im = _open(path, "mask").convert("L")
    if (im.height, im.width) != tuple(size):
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


def image_size(path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header."""
    with _open(path, "init image") as im:
        return im.height, im.width
