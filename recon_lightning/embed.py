"""Stage 1: embed the training data with the frozen backbone, once, and cache it in ``run_dir/embed``.

Writes ``embeddings.safetensors`` (train/test embeddings and labels, with the backbone,
preprocessing and normalisation in its metadata), ``samples.json`` (sample ids, and the
sentences for text) and, for images, ``images.safetensors`` (the images exactly as the
backbone saw them, uint8 at its input size: evaluation compares reconstructions to these).
The stage runner reuses the cache until the backbone, data or normalisation config changes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import backbones, data
from .backbones import Backbone, build_backbone
from .config import Section, rule
from .data import Split, load_dataset
from .errors import ConfigError, DataError
from .stages import Stage
from .storage import load_json, load_tensors, save_json, save_tensors
from .training import progress_enabled, resolve_device

log = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "l2")


@dataclass
class EmbedConfig:
    """Schema of ``embed`` (values: configs/config.yaml)."""

    batch_size: int = rule(ge=1)
    normalize: str = rule(choices=NORMALIZATIONS)  # recorded with the embeddings; the victim sees exactly these
    device: str = MISSING  # auto | cpu | cuda


@dataclass
class Embeddings:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    meta: dict
    public_x: torch.Tensor | None = None  # the public split (data.n_public_per_class), never used by the victim
    public_y: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.train_x.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])


def normalize(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "l2":
        return F.normalize(x, dim=-1)
    if how == "none":
        return x
    raise ConfigError(f"embed.normalize must be one of {NORMALIZATIONS}, got {how!r}")


@torch.no_grad()
def embed_split(backbone: Backbone, split: Split, batch_size: int, device: torch.device, desc: str, progress: bool = True):
    """Embed one split in batches (a progress bar when ``progress``); returns (embeddings float32 (N, D), images uint8
    (N, C, H, W) or None)."""
    embeddings, images = [], []
    unit = "img" if backbone.modality == "image" else "text"
    with tqdm(total=len(split.samples), desc=desc, unit=unit, disable=not split.samples or not progress) as bar:
        for start in range(0, len(split.samples), batch_size):
            batch = split.samples[start : start + batch_size]
            if backbone.modality == "image":
                pixels = backbone.to_pixels(batch)
                images.append((pixels * 255).round().to(torch.uint8))
                emb = backbone.embed_pixels(pixels.to(device))
            else:
                emb = backbone.embed(list(batch))
            embeddings.append(emb.float().cpu())
            bar.update(len(batch))
    if not embeddings:  # an empty split (data.n_test_per_class=0)
        empty = torch.zeros(0, *backbone.input_size, dtype=torch.uint8) if backbone.modality == "image" else None
        return torch.zeros(0, backbone.embed_dim), empty
    return torch.cat(embeddings), (torch.cat(images) if images else None)


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    out = run_dir / "embed"
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    backbone = build_backbone(cfg.backbone, input_size=dataset.native_size)
    if backbone.modality != dataset.modality:
        raise ConfigError(f"backbone {cfg.backbone.name!r} embeds {backbone.modality} but data {cfg.data.name!r} is {dataset.modality}")
    device = resolve_device(cfg.embed.device)
    backbone.to(device)

    results = {}
    splits = [("train", dataset.train), ("test", dataset.test)]
    if dataset.public is not None and len(dataset.public.labels):
        splits.append(("public", dataset.public))
    for name, split in splits:
        x, imgs = embed_split(backbone, split, int(cfg.embed.batch_size), device, f"embed {name}", progress_enabled(cfg))
        if x.shape[1] != backbone.embed_dim:
            raise DataError(f"backbone {backbone.name} returned {x.shape[1]}-d embeddings, declared {backbone.embed_dim}")
        if not torch.isfinite(x).all():
            raise DataError(f"backbone {backbone.name} produced NaN/inf embeddings for the {name} split")
        results[name] = (normalize(x, cfg.embed.normalize), imgs)

    train_x = results["train"][0]
    meta = {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "backbone_name": backbone.name,
        "modality": backbone.modality,
        "embed_dim": backbone.embed_dim,
        "input_size": list(backbone.input_size) if backbone.input_size else None,
        # The images' own channels (1 = grayscale, 3 = RGB) and size, before the backbone's preprocessing.
        "data_channels": dataset.native_size[0] if dataset.native_size else None,
        "data_size": list(dataset.native_size[1:]) if dataset.native_size else None,
        "preprocessing": backbone.preprocessing,
        "normalize": cfg.embed.normalize,
        "class_names": dataset.class_names,
        "mean_norm": float(train_x.norm(dim=1).mean()) if len(train_x) else 0.0,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    tensors = {
        "train_x": train_x,
        "train_y": torch.as_tensor(dataset.train.labels),
        "test_x": results["test"][0],
        "test_y": torch.as_tensor(dataset.test.labels),
    }
    if "public" in results:
        tensors.update(public_x=results["public"][0], public_y=torch.as_tensor(dataset.public.labels))
    samples = {"train_ids": dataset.train.ids, "test_ids": dataset.test.ids}
    if "public" in results:
        samples["public_ids"] = dataset.public.ids
    if dataset.modality == "text":
        samples.update(train_texts=dataset.train.samples, test_texts=dataset.test.samples)
    else:
        save_tensors(out / "images.safetensors", {"train": results["train"][1], "test": results["test"][1]})
    save_json(out / "samples.json", samples)
    save_tensors(out / "embeddings.safetensors", tensors, meta)  # written last: its presence means complete
    log.info("embedded %d train / %d test / %d public samples -> %d-d (%s)", len(train_x), len(tensors["test_x"]),
             len(tensors.get("public_x", ())), backbone.embed_dim, backbone.name)
    return {"n_train": len(train_x), "n_test": len(tensors["test_x"]), "embed_dim": backbone.embed_dim, "backbone": backbone.name}


def load_embeddings(run_dir: str | Path) -> Embeddings:
    tensors, meta = load_tensors(Path(run_dir) / "embed" / "embeddings.safetensors", what="embeddings (run stage=embed first)")
    return Embeddings(tensors["train_x"], tensors["train_y"], tensors["test_x"], tensors["test_y"], meta,
                      tensors.get("public_x"), tensors.get("public_y"))


def load_images(run_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The train/test images as the backbone saw them (uint8 (N, C, H, W)); None for text data."""
    path = Path(run_dir) / "embed" / "images.safetensors"
    if not path.is_file():
        return None
    return load_tensors(path, what="embedded images")[0]


def load_samples(run_dir: str | Path) -> dict:
    return load_json(Path(run_dir) / "embed" / "samples.json", what="sample ids (embed/samples.json)")


STAGE = Stage(
    name="embed",
    run=run_stage,
    sections=[Section("embed", EmbedConfig), backbones.SECTION, data.SECTION],
    config_keys=["backbone", "data", "embed.normalize", "seed"],
    enabled=lambda cfg: not cfg.reconstruct.victim_dir,  # auditing a victim trained elsewhere: nothing to embed
    outputs=["embed/*.safetensors", "embed/samples.json"],
)
