"""Training data: image folders with captions, cached latents / text embeddings, synthetic batches,
and a deterministic, checkpointable, host-sharded loader.

Folder layouts (Hugging Face `imagefolder` style), searched in this order:
  * `metadata.jsonl`: one object per line with "file_name" and a caption column ("text" by default);
  * `metadata.csv`: the same columns as a CSV header;
  * otherwise every image (.png .jpg .jpeg .webp .bmp) in the folder tree, captioned by the `.txt` file
    beside it (same stem), or "" when there is none.

Order and randomness are functions of (seed, epoch, sample index) only: epoch e visits
`permutation(seed, e)`, global batch j is rows [j*G, (j+1)*G) of it, and process p of P takes the p-th
slice of G/P rows, so hosts read disjoint samples and every sample appears once per epoch (a last
partial batch is dropped). Crop offsets, flips and caption dropout draw from `rng(seed, epoch, index)`,
so a restart from `Loader.state()` replays exactly the same batches.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxdiff.errors import ConfigError, JaxdiffError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(JaxdiffError):
    """A training data folder is missing, empty or malformed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Image transforms and caption handling (diffusers train_text_to_image.py's flags).

    resolution: square side the images are resized (short side) and cropped to.
    center_crop: center crop after resizing; False = random crop.
    random_flip: horizontal flip with probability 0.5.
    caption_dropout: probability of replacing a caption by "" (unconditional training for CFG).
    caption_column / image_column: metadata columns.
    """
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.0
    caption_column: str = "text"
    image_column: str = "file_name"

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.resolution < 8:
            raise ConfigError(f"resolution must be >= 8, got {self.resolution}")


def scan_folder(root: str | os.PathLike, cfg: DataConfig = DataConfig()) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of an image folder, sorted by path (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    records: list[tuple[Path, str]] = []
    if (root / "metadata.jsonl").is_file():
        for n, line in enumerate((root / "metadata.jsonl").read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{root / 'metadata.jsonl'}:{n}: not JSON ({e})") from None
                records.append(_record(root, row, cfg, f"metadata.jsonl:{n}"))
    elif (root / "metadata.csv").is_file():
        with open(root / "metadata.csv", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                records.append(_record(root, row, cfg, f"metadata.csv:{n}"))
    else:
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = path.with_suffix(".txt")
            records.append((path, txt.read_text().strip() if txt.is_file() else ""))
    if not records:
        raise DataError(f"{root}: no images found (expected metadata.jsonl, metadata.csv or image files)")
    missing = [str(p) for p, _ in records if not p.is_file()]
    if missing:
        raise DataError(f"{root}: {len(missing)} listed images are missing, e.g. {missing[0]}")
    return sorted(records, key=lambda r: str(r[0]))


def _record(root: Path, row: Mapping[str, Any], cfg: DataConfig, where: str) -> tuple[Path, str]:
    if cfg.image_column not in row:
        raise DataError(f"{root / where}: no {cfg.image_column!r} column")
    caption = row.get(cfg.caption_column, "")
    if isinstance(caption, list):  # imagefolder allows several captions; train on the first
        caption = caption[0] if caption else ""
    return root / str(row[cfg.image_column]), str(caption or "")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The per-sample generator of crop / flip / caption dropout."""
    return np.random.default_rng([seed, epoch, index, 0x5EED])


def load_image(path: Path, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Resize the short side to `resolution` (bicubic, as diffusers), crop, maybe flip.

    Returns float32 [R, R, 3] in [-1, 1].
    """
    return load_image_and_time_ids(path, cfg, rng)[0]


def load_image_and_time_ids(path: Path, cfg: DataConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`load_image` plus SDXL's size conditioning for it.

    Returns (pixels float32 [R, R, 3] in [-1, 1], time_ids float32 [6]) with time_ids =
    (original height, original width, crop top, crop left, R, R) as diffusers'
    train_text_to_image_sdxl.py builds them: the size before resizing, and the crop's corner in the
    resized image as the model sees it (mirrored when the image is flipped).
    """
    from PIL import Image

    r = cfg.resolution
    with Image.open(path) as im:
        im = im.convert("RGB")
        w0, h0 = im.size
        scale = r / min(w0, h0)
        im = im.resize((max(r, round(w0 * scale)), max(r, round(h0 * scale))), Image.BICUBIC)
        w, h = im.size
        if cfg.center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top, left = int(rng.integers(0, h - r + 1)), int(rng.integers(0, w - r + 1))
        arr = np.asarray(im.crop((left, top, left + r, top + r)), dtype=np.float32)
    if cfg.random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
        left = w - r - left  # diffusers flips the resized image, then crops: the corner is mirrored
    time_ids = np.array([h0, w0, top, left, r, r], np.float32)
    return np.ascontiguousarray(arr / 127.5 - 1.0), time_ids


class ImageFolder:
    """Samples {"pixels": [R, R, 3], "caption": str} from an image folder, plus "time_ids" [6] (SDXL
    size conditioning, see `load_image_and_time_ids`) when `time_ids` is set."""

    def __init__(self, root: str | os.PathLike, cfg: DataConfig = DataConfig(), *, time_ids: bool = False):
        self.cfg = cfg
        self.time_ids = time_ids
        self.records = scan_folder(root, cfg)

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        path, caption = self.records[index]
        pixels, time_ids = load_image_and_time_ids(path, self.cfg, rng)
        if self.cfg.caption_dropout and rng.random() < self.cfg.caption_dropout:
            caption = ""
        sample = {"pixels": pixels, "caption": caption}
        if self.time_ids:
            sample["time_ids"] = time_ids
        return sample


class Cached:
    """Samples from precomputed arrays: {"moments": [h, w, 2C], "context": [L, D]} per index, plus
    "text_embeds" [P] and "time_ids" [6] for SDXL caches.

    Build with `cache_dataset`; caption dropout swaps in the cached empty-prompt context (and pooled
    embedding), as dropping the caption before encoding does.
    """

    def __init__(self, folder: str | os.PathLike, caption_dropout: float = 0.0):
        folder = Path(folder)
        try:
            self.moments = np.load(folder / "moments.npy", mmap_mode="r")
            self.context = np.load(folder / "context.npy", mmap_mode="r")
            self.empty = np.load(folder / "empty_context.npy")
        except FileNotFoundError as e:
            raise DataError(f"{folder}: not a latent cache ({e.filename} missing)") from None
        # SDXL caches only: all three files or none.
        sdxl = [folder / f"{n}.npy" for n in ("text_embeds", "empty_text_embeds", "time_ids")]
        present = [p.is_file() for p in sdxl]
        if any(present) and not all(present):
            raise DataError(f"{folder}: incomplete SDXL cache ({sdxl[present.index(False)].name} missing)")
        self.text_embeds = np.load(sdxl[0], mmap_mode="r") if all(present) else None
        self.empty_text_embeds = np.load(sdxl[1]) if all(present) else None
        self.time_ids = np.load(sdxl[2], mmap_mode="r") if all(present) else None
        self.caption_dropout = caption_dropout

    def __len__(self) -> int:
        return len(self.moments)

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        drop = bool(self.caption_dropout and rng.random() < self.caption_dropout)
        sample = {"moments": np.asarray(self.moments[index]),
                  "context": np.asarray(self.empty if drop else self.context[index])}
        if self.text_embeds is not None:
            sample["text_embeds"] = np.asarray(self.empty_text_embeds if drop else self.text_embeds[index])
            sample["time_ids"] = np.asarray(self.time_ids[index])
        return sample


def cache_dataset(folder: ImageFolder, out: str | os.PathLike, *, encode_images: Callable, encode_text: Callable,
                  batch_size: int = 8) -> Path:
    """Run the VAE and text encoder(s) once over a folder (center crop, no flip) and store the results.

    Args:
      encode_images: pixels [b, R, R, 3] -> VAE moments [b, h, w, 2C] (mean ++ logvar).
      encode_text: list of b captions -> context [b, L, D], or (SDXL) a mapping with "context" [b, L, D]
        and "text_embeds" [b, P] (the pooled projection); SDXL caches also store each image's time ids.
    Returns:
      `out`, holding moments.npy, context.npy, empty_context.npy (the "" prompt) and for SDXL
      text_embeds.npy, empty_text_embeds.npy, time_ids.npy.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frozen = dataclasses.replace(folder.cfg, center_crop=True, random_flip=False)
    arrays: dict[str, list[np.ndarray]] = {"moments": [], "context": [], "text_embeds": [], "time_ids": []}
    for start in range(0, len(folder), batch_size):
        idx = range(start, min(start + batch_size, len(folder)))
        loaded = [load_image_and_time_ids(folder.records[i][0], frozen, sample_rng(0, 0, i)) for i in idx]
        arrays["moments"].append(np.asarray(encode_images(np.stack([px for px, _ in loaded])), np.float32))
        text = _text_arrays(encode_text([folder.records[i][1] for i in idx]))
        arrays["context"].append(text["context"])
        if "text_embeds" in text:
            arrays["text_embeds"].append(text["text_embeds"])
            arrays["time_ids"].append(np.stack([t for _, t in loaded]))
    for name, parts in arrays.items():
        if parts:
            np.save(out / f"{name}.npy", np.concatenate(parts))
    empty = _text_arrays(encode_text([""]))
    np.save(out / "empty_context.npy", empty["context"][0])
    if "text_embeds" in empty:
        np.save(out / "empty_text_embeds.npy", empty["text_embeds"][0])
    return out


def _text_arrays(encoded) -> dict[str, np.ndarray]:
    """encode_text's result -> {"context": float32 [b, L, D], "text_embeds"?: float32 [b, P]}."""
    if isinstance(encoded, Mapping):
        return {k: np.asarray(v, np.float32) for k, v in encoded.items() if k in ("context", "text_embeds")}
    return {"context": np.asarray(encoded, np.float32)}


class Synthetic:
    """Random latents and contexts, a pure function of the index (benchmarks, tests).

    pooled_dim: also give SDXL's "text_embeds" [pooled_dim] (random) and "time_ids" [6] (an uncropped
    square image of the latent size times `vae_factor`).
    """

    def __init__(self, size: int, latent_shape: Sequence[int], context_shape: Sequence[int], *,
                 pooled_dim: int | None = None, vae_factor: int = 8):
        self.size, self.latent_shape, self.context_shape = size, tuple(latent_shape), tuple(context_shape)
        self.pooled_dim, self.vae_factor = pooled_dim, vae_factor

    def __len__(self) -> int:
        return self.size

    def get(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        g = np.random.default_rng([index, 0xDA7A])
        sample = {"latents": g.standard_normal(self.latent_shape, dtype=np.float32),
                  "context": g.standard_normal(self.context_shape, dtype=np.float32)}
        if self.pooled_dim:
            h, w = (self.vae_factor * n for n in self.latent_shape[:2])
            sample["text_embeds"] = g.standard_normal((self.pooled_dim,), dtype=np.float32)
            sample["time_ids"] = np.array([h, w, 0, 0, h, w], np.float32)
        return sample


class Loader:
    """Global batches of a dataset, this process's rows only; checkpointable through `state()`.

    Args:
      dataset: anything with `__len__` and `get(index, rng) -> dict` (ImageFolder, Cached, Synthetic).
      global_batch: rows per step over all processes.
      seed: shuffling and augmentation seed.
      tokenize: captions -> {"input_ids": [b, 77] int32, ...}; required when samples carry captions.
      process_index, process_count: this host's slot (default: jax.process_index / process_count).
    """

    def __init__(self, dataset, *, global_batch: int, seed: int = 0, shuffle: bool = True,
                 tokenize: Callable[[list[str]], Mapping[str, np.ndarray]] | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        if process_index is None or process_count is None:
            import jax
            process_index, process_count = jax.process_index(), jax.process_count()
        if global_batch % process_count:
            raise ConfigError(f"global batch {global_batch} must split evenly over {process_count} processes")
        if len(dataset) < global_batch:
            raise DataError(f"the data set has {len(dataset)} samples, fewer than one batch of {global_batch}")
        self.dataset, self.global_batch, self.seed, self.shuffle = dataset, global_batch, seed, shuffle
        self.tokenize = tokenize
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.position = 0, 0  # position: global batches already served in this epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """[N] the visiting order of `epoch`."""
        n = len(self.dataset)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: Mapping[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ConfigError(f"the checkpoint's data seed {state['seed']} differs from --seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def local_indices(self) -> np.ndarray:
        """Dataset indices of this process's rows of the next global batch (no state change)."""
        rows = self.order(self.epoch)[self.position * self.global_batch:(self.position + 1) * self.global_batch]
        per = self.global_batch // self.process_count
        return rows[self.process_index * per:(self.process_index + 1) * per]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = self.local_indices()
        samples = [self.dataset.get(int(i), sample_rng(self.seed, self.epoch, int(i))) for i in idx]
        self.position += 1
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        batch = {k: np.stack([s[k] for s in samples]) for k in samples[0] if k != "caption"}
        if "caption" in samples[0]:
            if self.tokenize is None:
                raise ConfigError("this data set has captions: the loader needs a tokenize function")
            batch.update(self.tokenize([s["caption"] for s in samples]))
        return batch
