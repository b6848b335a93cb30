"""Training data sources: built-in offline sets and your own images or text.

Every source returns a :class:`Dataset` with a class-balanced train/test split drawn with the
run's seed, the class names and a stable id per sample (a file path or ``<source>:<index>``),
so later stages can map reconstructions back to the samples they came from.

Kinds (``data.kind``): ``digits`` (scikit-learn's 8x8 digits), ``skimage`` (crops of
scikit-image's bundled photos), ``imagefolder`` (root/<class>/<image>), ``text`` (TSV).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("digits", "skimage", "imagefolder", "text")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    samples: list[Any]  # uint8 numpy images (H, W[, C]) or strings
    labels: np.ndarray  # int64 class indices
    ids: list[str]


@dataclass
class Dataset:
    train: Split
    test: Split
    class_names: list[str]
    modality: str  # "image" | "text"
    native_size: tuple[int, int, int] | None  # (C, H, W) of the images, for the identity backbone


def load_dataset(cfg, seed: int = 0) -> Dataset:
    """Build the dataset described by the ``data`` config section."""
    kind = cfg.get("kind")
    loaders = {"digits": _digits, "skimage": _skimage, "imagefolder": _imagefolder, "text": _text}
    if kind not in loaders:
        raise ConfigError(f"unknown data.kind {kind!r}; choose from {sorted(KINDS)}")
    for key in ("n_per_class", "n_test_per_class"):
        if int(cfg.get(key, 0)) < (1 if key == "n_per_class" else 0):
            raise ConfigError(f"data.{key} must be >= {1 if key == 'n_per_class' else 0}, got {cfg.get(key)}")
    return loaders[kind](cfg, np.random.default_rng(seed))


def _split(per_class: list[list[Any]], ids: list[list[str]], cfg, rng, load=lambda s: s) -> tuple[Split, Split]:
    """Draw a class-balanced train/test split; ``load`` turns a chosen item into a sample
    (so image folders only decode the files that are used)."""
    n_train, n_test = int(cfg.n_per_class), int(cfg.n_test_per_class)
    parts = {"train": ([], [], []), "test": ([], [], [])}
    for label, (items, item_ids) in enumerate(zip(per_class, ids)):
        order = rng.permutation(len(items))
        if len(items) < n_train + n_test:
            log.warning("class %d has %d samples, fewer than n_per_class + n_test_per_class = %d",
                        label, len(items), n_train + n_test)
        for name, chosen in (("train", order[:n_train]), ("test", order[n_train : n_train + n_test])):
            samples, labels, sids = parts[name]
            for i in chosen:
                samples.append(load(items[i]))
                labels.append(label)
                sids.append(item_ids[i])
    return tuple(Split(s, np.asarray(l, dtype=np.int64), i) for s, l, i in parts.values())


def _digits(cfg, rng) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 8x8, values 0..16
    target = digits.target
    choice = cfg.classes
    if choice == "odd_even":
        groups, names = [target % 2 == 0, target % 2 == 1], ["even", "odd"]
    elif choice == "all":
        groups, names = [target == d for d in range(10)], [str(d) for d in range(10)]
    else:
        wanted = [int(d) for d in choice]
        if len(wanted) < 2 or any(d not in range(10) for d in wanted):
            raise ConfigError(f"data.classes must be odd_even, all, or >= 2 digits in 0..9, got {choice}")
        groups, names = [target == d for d in wanted], [str(d) for d in wanted]
    per_class = [list(images[g]) for g in groups]
    ids = [[f"digits:{i}" for i in np.flatnonzero(g)] for g in groups]
    train, test = _split(per_class, ids, cfg, rng)
    return Dataset(train, test, names, "image", (1, 8, 8))


SKIMAGE_ALIASES = {"cat": "chelsea"}


def _skimage(cfg, rng) -> Dataset:
    import skimage.data
    from skimage.transform import resize

    size = int(cfg.get("image_size", 224))
    lo, hi = cfg.crop_fraction
    per_class, ids = [], []
    n_total = int(cfg.n_per_class) + int(cfg.n_test_per_class)
    for name in cfg.classes:
        fn = getattr(skimage.data, SKIMAGE_ALIASES.get(name, name), None)
        if fn is None:
            raise ConfigError(f"scikit-image has no bundled photo {name!r} (data.classes)")
        photo = fn()
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, -1)
        photo = photo[..., :3]
        h, w = photo.shape[:2]
        crops, crop_ids = [], []
        for k in range(n_total):
            side = int(min(h, w) * rng.uniform(lo, hi))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = resize(photo[top : top + side, left : left + side], (size, size), anti_aliasing=True)
            crops.append((crop * 255).round().astype(np.uint8))
            crop_ids.append(f"skimage:{name}:{top},{left},{side}")
        per_class.append(crops)
        ids.append(crop_ids)
    train, test = _split(per_class, ids, cfg, rng)
    return Dataset(train, test, list(cfg.classes), "image", (3, size, size))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt or unreadable image: {path} ({err})") from None


def _imagefolder(cfg, rng) -> Dataset:
    root = cfg.get("root")
    if not root or root == "???":
        raise ConfigError("data.root is required for data=imagefolder (a folder with one sub-folder per class)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = list(cfg.classes) if cfg.get("classes") else sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root} needs at least 2 class sub-folders, found {classes}")
    per_class = []
    for name in classes:
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"class folder not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class {name!r} has no images in {folder} (looked for {sorted(IMAGE_SUFFIXES)})")
        per_class.append(files)
    ids = [[str(p) for p in files] for files in per_class]
    train, test = _split(per_class, ids, cfg, rng, load=_read_image)
    h, w = train.samples[0].shape[:2]
    return Dataset(train, test, classes, "image", (3, h, w))


def _text(cfg, rng) -> Dataset:
    path = cfg.get("path")
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"text data file not found: {path}")
        text = path.read_text(encoding="utf-8")
        source = str(path)
    else:
        text = resources.files("recon_lightning").joinpath("assets/text_topics.tsv").read_text(encoding="utf-8")
        source = "text_topics"
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{source}:{n}: expected 'label<TAB>text', got {line[:60]!r}")
        label, sentence = line.split("\t", 1)
        rows.append((label.strip(), sentence.strip(), f"{source}:{n}"))
    labels = list(cfg.classes) if cfg.get("classes") else sorted({r[0] for r in rows})
    per_class = [[r[1] for r in rows if r[0] == lab] for lab in labels]
    ids = [[r[2] for r in rows if r[0] == lab] for lab in labels]
    for lab, items in zip(labels, per_class):
        if not items:
            raise DataError(f"text class {lab!r} has no sentences in {source}")
    train, test = _split(per_class, ids, cfg, rng)
    return Dataset(train, test, labels, "text", None)
