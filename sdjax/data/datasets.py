"""Captioned image datasets for fine-tuning, and a resumable, deterministic batch loader.

Datasets are indexable: `ds[i] -> (image float32 HWC RGB in [-1, 1] at
resolution x resolution, caption str)`, `len(ds)`, `ds.name(i)` (the file, for
messages). Three sources share that interface:

* `ImageCaptionFolder(folder)`: `x.png` (jpg, jpeg, webp, bmp) next to `x.txt`;
* `JsonlCaptions(file.jsonl)`: lines {"image": path relative to the JSONL's folder,
  "caption": text}; other keys are ignored;
* `SyntheticCaptions(length, seed, split)`: sdjax's procedural shapes, drawn
  directly at the requested resolution.

`open_dataset(spec, resolution)` picks one from a string (what `TrainConfig.data` holds).

`CaptionLoader` turns a dataset into an endless stream of batches: the examples are
laid out epoch after epoch, each epoch a permutation drawn from (seed, epoch); batch
`step` holds stream positions [step * B, (step + 1) * B) (a batch may straddle two
epochs) and each example's original size and crop ("crops": (B, 4) original height, width,
crop top, left: SDXL's time ids); a caption is dropped (replaced by "") when a uniform drawn from
(seed, epoch, index) is below `caption_dropout`. So batch `step` is a pure function of
(dataset, seed, B, caption_dropout, step), and resuming at any step (`batches(step)`
or `load_state_dict`) continues exactly where training stopped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sdjax.data.synthetic import DEFAULT_CONFIG, SPLITS, SyntheticConfig, sample
from sdjax.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_DROPOUT_STREAM = 7_919  # separates the dropout draws from the permutation draws


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB (EXIF rotation applied, transparency over white)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()  # decode now, so truncated files fail here, naming the file
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, im)
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def preprocess(image: Image.Image | np.ndarray, resolution: int, *, return_crop: bool = False):
    """Resize the shorter side to `resolution` (bicubic), center-crop to a square.

    image: PIL RGB image or uint8 HWC array. Returns float32 HWC RGB in [-1, 1]; with
    `return_crop`, also (original height, original width, crop top, crop left), the crop in the
    resized image's pixels: SDXL's size and crop conditioning, as diffusers' SDXL training
    script computes it.
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    w, h = image.size
    left = top = 0
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return (pixels, (h, w, top, left)) if return_crop else pixels


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read caption file {path}: {e}") from e


class _FileDataset:
    """Shared part of the file-backed datasets: (image path, caption) pairs."""

    def __init__(self, items: list[tuple[Path, str]], resolution: int):
        if resolution <= 0:
            raise DatasetError(f"resolution={resolution}: must be positive")
        self.items, self.resolution = items, int(resolution)

    def __len__(self) -> int:
        return len(self.items)

    def name(self, index: int) -> str:
        return str(self.items[index][0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        path, caption = self.items[index]
        return preprocess(load_image(path), self.resolution), caption

    def item_with_crop(self, index: int) -> tuple[np.ndarray, str, tuple[int, int, int, int]]:
        """`self[index]` plus (original height, original width, crop top, crop left) (`preprocess`)."""
        path, caption = self.items[index]
        pixels, crop = preprocess(load_image(path), self.resolution, return_crop=True)
        return pixels, caption, crop


class ImageCaptionFolder(_FileDataset):
    """Images in `folder` (not recursive, sorted by name), each with a same-name .txt caption."""

    def __init__(self, folder: str | Path, resolution: int):
        folder = Path(folder)
        if not folder.is_dir():
            raise DatasetError(f"dataset folder {folder} does not exist (or is not a folder)")
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"dataset folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [p for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"image {missing[0]} has no caption file {missing[0].with_suffix('.txt').name}"
                               f"{more}; write one .txt per image")
        super().__init__([(p, _read_caption(p.with_suffix(".txt"))) for p in images], resolution)


class JsonlCaptions(_FileDataset):
    """A JSONL file of {"image": path relative to the file's folder, "caption": text}."""

    def __init__(self, path: str | Path, resolution: int):
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"dataset file {path} does not exist")
        items = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image, caption = record["image"], record["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(f"{path}:{lineno}: expected {{\"image\": ..., \"caption\": ...}}: {e}") from e
            if not isinstance(image, str) or not isinstance(caption, str):
                raise DatasetError(f"{path}:{lineno}: \"image\" and \"caption\" must be strings")
            image_path = path.parent / image
            if not image_path.is_file():
                raise DatasetError(f"{path}:{lineno}: image {image_path} does not exist")
            items.append((image_path, caption.strip()))
        if not items:
            raise DatasetError(f"dataset file {path} has no records")
        super().__init__(items, resolution)


class SyntheticCaptions:
    """`length` synthetic shape images of (seed, split), drawn at `resolution`."""

    def __init__(self, length: int, seed: int = 0, split: str = "train", resolution: int = 64,
                 config: SyntheticConfig = DEFAULT_CONFIG):
        if split not in SPLITS:
            raise DatasetError(f"synthetic split={split!r}: use one of {SPLITS}")
        if length <= 0:
            raise DatasetError(f"synthetic length={length}: must be positive")
        self.config = dataclasses.replace(config, resolution=int(resolution))
        self.length, self.seed, self.split, self.resolution = int(length), seed, split, int(resolution)

    def __len__(self) -> int:
        return self.length

    def name(self, index: int) -> str:
        return f"synthetic:{self.seed}:{self.split}[{index}]"

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic images")
        image, caption, _ = sample(self.seed, index, self.split, self.config)
        return np.asarray(image, dtype=np.float32) / 127.5 - 1.0, caption

    def attributes(self, index: int) -> dict:
        return sample(self.seed, index, self.split, self.config)[2]


SYNTHETIC_LENGTH = 65_536


def open_dataset(spec: str | Path, resolution: int, *, synthetic_config: SyntheticConfig = DEFAULT_CONFIG):
    """A dataset from a string: a folder, a .jsonl file, or "synthetic[:seed[:length[:split]]]".

    Synthetic defaults: seed 0, length 65536, split "train".
    """
    text = str(spec)
    if text == "synthetic" or text.startswith("synthetic:"):
        parts = text.split(":")[1:]
        try:
            seed = int(parts[0]) if len(parts) > 0 and parts[0] else 0
            length = int(parts[1]) if len(parts) > 1 and parts[1] else SYNTHETIC_LENGTH
        except ValueError as e:
            raise DatasetError(f"dataset {text!r}: use synthetic[:seed[:length[:split]]] with integers") from e
        split = parts[2] if len(parts) > 2 else "train"
        if len(parts) > 3:
            raise DatasetError(f"dataset {text!r}: use synthetic[:seed[:length[:split]]]")
        return SyntheticCaptions(length, seed, split, resolution, synthetic_config)
    path = Path(spec)
    if path.suffix.lower() == ".jsonl":
        return JsonlCaptions(path, resolution)
    return ImageCaptionFolder(path, resolution)


class CaptionLoader:
    """Deterministic, resumable batches of a dataset (see the module docstring).

    Each batch: {"images": float32 (B, H, W, 3) in [-1, 1], "captions": list[str]
    (dropped ones are ""), "indices": int64 (B,) dataset indices, "epochs": int64 (B,),
    "step": int}. `num_workers` threads decode images; the result does not depend on it.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, caption_dropout: float = 0.0,
                 num_workers: int = 0):
        if batch_size <= 0:
            raise DatasetError(f"batch_size={batch_size}: must be positive")
        if not 0.0 <= caption_dropout <= 1.0:
            raise DatasetError(f"caption_dropout={caption_dropout}: must be in [0, 1]")
        if len(dataset) == 0:
            raise DatasetError("the dataset is empty")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.caption_dropout, self.num_workers = float(caption_dropout), int(num_workers)
        self.step = 0  # the next batch `__next__` returns
        self._perm_cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The dataset order of `epoch` (int64 indices), from (seed, epoch) only."""
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm_cache[epoch] = rng.permutation(len(self.dataset))
        return self._perm_cache[epoch]

    def dropped(self, epoch: int, index: int) -> bool:
        """Whether example `index` trains with an empty caption in `epoch`."""
        if self.caption_dropout <= 0:
            return False
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([self.seed, _DROPOUT_STREAM, epoch, index])))
        return bool(rng.random() < self.caption_dropout)

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices, epochs) of batch `step`, each int64 (B,)."""
        if step < 0:
            raise DatasetError(f"step={step}: must be >= 0")
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, len(self.dataset))
        indices = np.array([self.permutation(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)
        return indices, epochs

    def batch(self, step: int) -> dict:
        """Batch `step` (does not move the loader's position)."""
        indices, epochs = self.indices(step)
        # Datasets drawn at their size (synthetic) were neither resized nor cropped.
        full = getattr(self.dataset, "item_with_crop", None) or (
            lambda i: (lambda im, c: (im, c, (np.shape(im)[0], np.shape(im)[1], 0, 0)))(*self.dataset[i]))
        if self.num_workers > 0:
            with ThreadPoolExecutor(self.num_workers) as pool:
                items = list(pool.map(lambda i: full(int(i)), indices))
        else:
            items = [full(int(i)) for i in indices]
        captions = ["" if self.dropped(int(e), int(i)) else c for (_, c, _), e, i in zip(items, epochs, indices)]
        return {"images": np.stack([np.asarray(im, np.float32) for im, _, _ in items]), "captions": captions,
                "crops": np.asarray([crop for _, _, crop in items], np.int64).reshape(len(items), 4),
                "indices": indices, "epochs": epochs, "step": int(step)}

    def batches(self, start_step: int | None = None) -> Iterator[dict]:
        """Endless batches from `start_step` (default: the current position), advancing it."""
        if start_step is not None:
            self.step = int(start_step)
        while True:
            out = self.batch(self.step)
            self.step += 1
            yield out

    def __iter__(self) -> Iterator[dict]:
        return self.batches()

    def steps_per_epoch(self) -> float:
        return len(self.dataset) / self.batch_size

    def state_dict(self) -> dict:
        """What to save with a checkpoint: the next step and what the order depends on."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.dataset), "caption_dropout": self.caption_dropout}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["step"]`; refuses a state from a different order."""
        for key in ("seed", "batch_size", "num_examples", "caption_dropout"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise DatasetError(f"loader state has {key}={state[key]!r} but this loader has {mine!r}: "
                                   "resuming would not continue the same data order")
        self.step = int(state["step"])


def write_synthetic_folder(out_dir: str | Path, n: int, seed: int = 0, split: str = "train",
                           config: SyntheticConfig = DEFAULT_CONFIG) -> Path:
    """Write `n` synthetic images as 00000.png + 00000.txt pairs, plus metadata.jsonl.

    metadata.jsonl lines: {"image", "caption", "attributes", "split"}; it is itself a
    valid `JsonlCaptions` file. Returns the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    lines = []
    for i in range(n):
        image, caption, attributes = sample(seed, i, split, config)
        stem = f"{i:0{width}d}"
        image.save(out / f"{stem}.png")
        (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        lines.append(json.dumps({"image": f"{stem}.png", "caption": caption, "attributes": attributes,
                                 "split": split}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
