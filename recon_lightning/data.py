"""Training data sources: built-in offline sets and your own images or text.

Every source returns a :class:`Dataset` with a class-balanced train/test split drawn with the
run's seed, the class names and a stable id per sample (a file path or ``<source>:<index>``),
so later stages can map reconstructions back to the samples they came from.

Kinds (``data.kind``): ``digits`` (scikit-learn's 8x8 digits), ``skimage`` (crops of
scikit-image's bundled photos), ``imagefolder`` (root/<class>/<image>), ``text`` (TSV).

Sizing: ``data.n_per_class=auto`` takes as many training samples per class as the smallest class
allows after its ``n_test_per_class`` held-out samples (at most ``AUTO_MAX_PER_CLASS``), and logs
the number; an explicit number larger than a class allows is an error. ``n_test_per_class=0``
(no held-out split) is allowed: the report then has no held-out baseline.

Images keep their own channels (``data.channels=auto``: grayscale when every image used is
grayscale, else RGB; or force ``1`` / ``3``). 16-bit images are scaled from 0..65535 to 0..255.
Image folders with mixed image sizes are resized (shorter side, centre crop) to ``data.image_size``,
or, when that is null, to the most common size among the images used (logged). Transparent images are
composited onto ``data.background`` (white by default). ``data.test_root`` names a separate held-out folder
(the same class sub-folders as ``data.root``, e.g. train/ and test/).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np
from omegaconf import MISSING, OmegaConf

from .config import Section, auto_or_int, is_int, rule
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

KINDS = ("digits", "skimage", "imagefolder", "text")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
AUTO_MAX_PER_CLASS = 250  # n_per_class=auto never takes more (the paper's victims train on small sets)
CHANNELS = ("auto", 1, 3)


def _image_size_ok(v: Any) -> bool:
    return v is None or (is_int(v) and v >= 1) or (isinstance(v, list) and len(v) == 2 and all(is_int(x) and x >= 1 for x in v))


@dataclass
class DataConfig:
    """Schema of ``data`` (values: configs/data/*.yaml); each kind's options name their schema (below, each adding
    keys) first in their defaults list."""

    name: str = MISSING
    kind: str = rule(choices=KINDS)
    classes: Any = MISSING  # null = all | a list of names | digits: odd_even, all or digits (checked by its loader)
    n_per_class: Any = auto_or_int(ge=1)  # typed Any: auto or an integer (OmegaConf has no Union of str and int)
    n_test_per_class: int = rule(ge=0)
    # the auditor's public samples of the same distribution (shadow victims): auto = every sample neither split uses
    n_public_per_class: Any = auto_or_int(ge=0)


@dataclass
class ImageDataConfig(DataConfig):
    channels: Any = rule(choices=CHANNELS)  # auto | 1 | 3


@dataclass
class SkimageDataConfig(ImageDataConfig):
    crop_fraction: List[float] = rule(gt=0, le=1, test=lambda v: len(v) == 2 and v[0] <= v[1],
                                      what="[low, high] with 0 < low <= high <= 1")
    image_size: int = rule(ge=1)


@dataclass
class ImageFolderDataConfig(ImageDataConfig):
    root: str = MISSING
    test_root: Optional[str] = MISSING  # null: the held-out samples are drawn from root
    image_size: Any = rule(test=_image_size_ok, what="null, a size >= 1 or [H, W]")  # typed Any: null, int or a list
    background: List[int] = rule(ge=0, le=255, test=lambda v: len(v) == 3, what="[R, G, B], each 0..255")


@dataclass
class TextDataConfig(DataConfig):
    path: Optional[str] = MISSING


SECTION = Section("data", DataConfig, {"schema_image": ImageDataConfig, "schema_skimage": SkimageDataConfig,
                                       "schema_imagefolder": ImageFolderDataConfig, "schema_text": TextDataConfig})


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
    public: Split | None = None  # samples in neither split, for shadow victims (data.n_public_per_class)


def load_dataset(cfg, seed: int = 0) -> Dataset:
    """Build the dataset described by the ``data`` config section (its values checked by the schema)."""
    loaders = {"digits": _digits, "skimage": _skimage, "imagefolder": _imagefolder, "text": _text}
    return loaders[cfg.kind](cfg, np.random.default_rng(seed))


def per_class_sizes(counts: list[int], names: list[str], cfg) -> tuple[int, int]:
    """(n_train, n_test) per class for classes of ``counts`` samples: resolves ``n_per_class=auto``
    and refuses classes too small for the split asked for."""
    n_test = int(cfg.get("n_test_per_class", 0))
    small = int(np.argmin(counts))
    if cfg.get("n_per_class", "auto") == "auto":
        if counts[small] <= n_test:
            raise DataError(
                f"class {names[small]!r} has {counts[small]} samples: not enough for data.n_test_per_class={n_test} "
                f"plus at least 1 training sample; set data.n_test_per_class={max(0, counts[small] - 1)} or lower")
        n_train = min(counts[small] - n_test, AUTO_MAX_PER_CLASS)
        log.info("data.n_per_class=auto: using %d training + %d test samples per class (smallest class %r has %d)",
                 n_train, n_test, names[small], counts[small])
        return n_train, n_test
    n_train = int(cfg.n_per_class)
    if counts[small] < n_train + n_test:
        raise DataError(
            f"class {names[small]!r} has {counts[small]} samples, fewer than data.n_per_class + data.n_test_per_class "
            f"= {n_train} + {n_test}; lower them (e.g. data.n_per_class={max(1, counts[small] - n_test)}) "
            f"or set data.n_per_class=auto")
    return n_train, n_test


def _split(per_class: list[list[Any]], ids: list[list[str]], cfg, rng, names: list[str],
           load=lambda s: s) -> tuple[Split, Split, Split]:
    """Draw class-balanced train / test / public splits that share no sample; ``load`` turns a chosen item into a
    sample (so image folders only decode the files that are used). The train and test draws do not depend on
    ``data.n_public_per_class``: the public split takes samples after them."""
    n_train, n_test = per_class_sizes([len(items) for items in per_class], names, cfg)
    n_public = public_per_class([len(items) for items in per_class], names, cfg, n_train + n_test)
    parts = {"train": ([], [], []), "test": ([], [], []), "public": ([], [], [])}
    for label, (items, item_ids) in enumerate(zip(per_class, ids)):
        order = rng.permutation(len(items))
        end = n_train + n_test + (len(items) if n_public is None else n_public)
        chosen_by_split = (("train", order[:n_train]), ("test", order[n_train : n_train + n_test]),
                           ("public", order[n_train + n_test : end]))
        for name, chosen in chosen_by_split:
            samples, labels, sids = parts[name]
            for i in chosen:
                samples.append(load(items[i]))
                labels.append(label)
                sids.append(item_ids[i])
    return tuple(Split(s, np.asarray(l, dtype=np.int64), i) for s, l, i in parts.values())


def public_per_class(counts: list[int], names: list[str], cfg, used: int) -> int | None:
    """Public samples per class: None = every sample the train and test splits leave (``auto``), else the number
    asked for, refused when a class has fewer left."""
    wanted = cfg.get("n_public_per_class", 0)
    if wanted == "auto":
        return None
    small = int(np.argmin(counts))
    if counts[small] - used < int(wanted):
        raise DataError(f"class {names[small]!r} has {counts[small] - used} samples left after the train and test "
                        f"splits, fewer than data.n_public_per_class={wanted}; lower it or set it to auto")
    return int(wanted)


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
    train, test, public = _split(per_class, ids, cfg, rng, names)
    if cfg.get("channels", "auto") == 3:
        train, test, public = (_with_channels(s, 3) for s in (train, test, public))
    return Dataset(train, test, names, "image", (_channels_of([*train.samples, *test.samples], cfg), 8, 8), public)


SKIMAGE_ALIASES = {"cat": "chelsea"}


def _skimage(cfg, rng) -> Dataset:
    import skimage.data
    from skimage.transform import resize

    size = int(cfg.get("image_size", 224))
    lo, hi = cfg.crop_fraction
    per_class, ids = [], []
    if cfg.n_per_class == "auto":
        raise ConfigError("data=skimage draws as many random crops as asked: set data.n_per_class to a number")
    n_public = cfg.get("n_public_per_class", 0)
    if n_public == "auto":
        raise ConfigError("data=skimage draws as many random crops as asked: set data.n_public_per_class to a number")
    n_total = int(cfg.n_per_class) + int(cfg.n_test_per_class) + int(n_public)
    for name in cfg.classes:
        fn = getattr(skimage.data, SKIMAGE_ALIASES.get(name, name), None)
        if fn is None:
            raise ConfigError(f"scikit-image has no bundled photo {name!r} (data.classes)")
        photo = fn()
        if photo.ndim == 3:
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
    train, test, public = _split(per_class, ids, cfg, rng, list(cfg.classes))
    c = _channels_of([*train.samples, *test.samples], cfg)
    train, test, public = (_with_channels(s, c) for s in (train, test, public))
    return Dataset(train, test, list(cfg.classes), "image", (c, size, size), public)


def _channels_of(images: list[np.ndarray], cfg) -> int:
    """``data.channels``, or with ``auto``: 1 when every image is grayscale (H, W), else 3."""
    wanted = cfg.get("channels", "auto")
    if wanted != "auto":
        return int(wanted)
    return 1 if all(img.ndim == 2 for img in images) else 3


def _with_channels(split: Split, c: int) -> Split:
    """The split's images as (H, W) grayscale (``c`` = 1, ITU-R 601 luma) or (H, W, 3) RGB."""
    def convert(img: np.ndarray) -> np.ndarray:
        if c == 1 and img.ndim == 3:
            return (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
        if c == 3 and img.ndim == 2:
            return np.repeat(img[..., None], 3, axis=2)
        return img

    return Split([convert(img) for img in split.samples], split.labels, split.ids)


GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
WHITE = (255, 255, 255)


def _read_image(path: Path, background: Sequence[int] = WHITE) -> np.ndarray:
    """An image file as uint8 (H, W) when grayscale, else (H, W, 3) RGB. An image with transparency (an alpha channel
    or a transparent palette colour) is composited onto the colour ``background`` (``data.background``: what a
    viewer shows behind it; dropping the alpha would turn transparent areas into whatever colour they happen to
    hold, usually black). 16-bit and 32-bit grayscale (PIL modes I;16 and I) are scaled from 0..65535 to 0..255,
    float images (F) from 0..1; a palette image whose colours are all grays is grayscale."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                wide = np.asarray(img, dtype=np.float64)
                top = 1.0 if img.mode == "F" else 65535.0
                return (np.clip(wide / top, 0, 1) * 255).round().astype(np.uint8)
            if img.mode in ALPHA_MODES or "transparency" in img.info:
                rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
                alpha = rgba[..., 3:] / 255.0
                rgb = (rgba[..., :3] * alpha + np.asarray(background, np.float64) * (1 - alpha)).round().astype(np.uint8)
            elif img.mode in GRAY_MODES:
                return np.array(img.convert("L"))
            else:
                rgb = np.array(img.convert("RGB"))  # a copy: writable, so torch does not warn
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"corrupt or unreadable image: {path} ({err})") from None
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].copy()
    return rgb


def _image_size(cfg, images: list[np.ndarray]) -> tuple[int, int]:
    """(H, W) the images are used at: ``data.image_size`` (an int or [H, W]), else their own size;
    mixed sizes without ``data.image_size`` use the most common size (logged)."""
    declared = cfg.get("image_size")
    if declared is not None:
        return (int(declared), int(declared)) if isinstance(declared, int) else (int(declared[0]), int(declared[1]))
    sizes = [img.shape[:2] for img in images]
    distinct = sorted(set(sizes), key=lambda hw: (-sizes.count(hw), hw))
    if len(distinct) > 1:
        log.warning("the images have %d different sizes (%s); all are resized (shorter side, centre crop) to "
                    "the most common one, %dx%d; set data.image_size=[H,W] to choose", len(distinct),
                    ", ".join(f"{h}x{w}" for h, w in distinct[:5]) + (", ..." if len(distinct) > 5 else ""), *distinct[0])
    return distinct[0]


def _class_files(root: Path, classes: list[str]) -> list[list[Path]]:
    """The image files of each class folder ``root/<class>/`` (searched recursively)."""
    per_class = []
    for name in classes:
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"class folder not found: {folder}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class {name!r} has no images in {folder} (looked for {sorted(IMAGE_SUFFIXES)})")
        per_class.append(files)
    return per_class


def _imagefolder(cfg, rng) -> Dataset:
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = list(cfg.classes) if cfg.get("classes") else sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{root} needs at least 2 class sub-folders, found {classes}")
    per_class = _class_files(root, classes)
    load = partial(_read_image, background=tuple(int(v) for v in cfg.get("background", WHITE)))
    if cfg.get("test_root"):
        train, test, public = _separate_test_folder(cfg, rng, classes, per_class, load)
    else:
        train, test, public = _split(per_class, [[str(p) for p in files] for files in per_class], cfg, rng, classes,
                                     load=load)
    used = [*train.samples, *test.samples]
    c = _channels_of(used, cfg)
    h, w = _image_size(cfg, used)
    log.info("images: %s, used at %dx%d (data.channels=%s)", "grayscale" if c == 1 else "RGB", h, w, cfg.get("channels", "auto"))
    return Dataset(*(_with_channels(s, c) for s in (train, test)), classes, "image", (c, h, w), _with_channels(public, c))


def _separate_test_folder(cfg, rng, classes: list[str], per_class: list[list[Path]], load) -> tuple[Split, Split, Split]:
    """Training (and public) samples from ``data.root``, held-out samples from ``data.test_root`` (the same class
    sub-folders): ``n_per_class`` (``n_public_per_class``) and ``n_test_per_class`` are drawn from each folder's own
    images, so no image is in two splits unless the same file is in both folders (an error)."""
    test_root = Path(cfg.test_root).expanduser()
    if not test_root.is_dir():
        raise DataError(f"held-out image folder not found: {test_root} (data.test_root)")
    test_files = _class_files(test_root, classes)
    both = {p.resolve() for files in per_class for p in files} & {p.resolve() for files in test_files for p in files}
    if both:
        raise DataError(f"{len(both)} image(s) are both in data.root and data.test_root, e.g. {sorted(both)[0]}: the "
                        f"held-out folder must hold other images")
    n_test = int(cfg.n_test_per_class)
    small = min(range(len(classes)), key=lambda c: len(test_files[c]))
    if len(test_files[small]) < n_test:
        raise DataError(f"class {classes[small]!r} has {len(test_files[small])} images in data.test_root={test_root}, "
                        f"fewer than data.n_test_per_class={n_test}; lower it (e.g. data.n_test_per_class="
                        f"{len(test_files[small])})")
    train_cfg = OmegaConf.create({"n_per_class": cfg.n_per_class, "n_test_per_class": 0,
                                  "n_public_per_class": cfg.get("n_public_per_class", 0)})
    train, _, public = _split(per_class, [[str(p) for p in files] for files in per_class], train_cfg, rng, classes,
                              load=load)
    if n_test == 0:
        return train, Split([], np.zeros(0, dtype=np.int64), []), public
    test_cfg = OmegaConf.create({"n_per_class": n_test, "n_test_per_class": 0, "n_public_per_class": 0})
    test, _, _ = _split(test_files, [[str(p) for p in files] for files in test_files], test_cfg, rng, classes, load=load)
    log.info("held-out samples: %d per class from %s (data.test_root)", n_test, test_root)
    return train, test, public


def _text(cfg, rng) -> Dataset:
    path = cfg.get("path")
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(f"text data file not found: {path}")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                            f"save the file as UTF-8") from None
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
    train, test, public = _split(per_class, ids, cfg, rng, labels)
    return Dataset(train, test, labels, "text", None, public)
