"""Generative inversion: decode CLIP image embeddings with an unCLIP diffusion decoder (diffusers).

Direct inversion finds *an* image whose embedding matches; an unCLIP decoder, trained to
invert exactly this embedding space, produces a natural image with that embedding. It is only
meaningful when the backbone *is* the decoder's CLIP image encoder, so the pairing is checked:

=================================================  ==========================================  =====
decoder (``invert.unclip.model``)                  backbone (open_clip ``model`` / ``pretrained``)  dim
=================================================  ==========================================  =====
stabilityai/stable-diffusion-2-1-unclip            ViT-H-14 / laion2b_s32b_b79k (clip_vith14)   1024
stabilityai/stable-diffusion-2-1-unclip-small      ViT-L-14 / openai                             768
kakaobrain/karlo-v1-alpha-image-variations         ViT-L-14 / openai                             768
=================================================  ==========================================  =====

A local folder (a pipeline saved with ``save_pretrained``) is accepted too; then only the
embedding size is checked against the decoder's.

Running it for real (GPU, ~5 GB of weights from the Hugging Face hub, downloaded once)::

    HF_HUB_OFFLINE=0 python -m recon_lightning.fit backbone=clip_vith14 data=imagefolder data.root=... \\
        invert.method=unclip invert.unclip.model=stabilityai/stable-diffusion-2-1-unclip \\
        invert.unclip.steps=30 invert.unclip.guidance=10 invert.num_images=16

or ``backbone=clip_vith14`` with ``invert.unclip.model=/path/to/saved/pipeline`` offline. For
``...-unclip-small`` / Karlo use an open_clip ViT-L-14 backbone with ``pretrained: openai``
(e.g. ``backbone=clip_vith14 backbone.name=clip_vitl14 backbone.model=ViT-L-14 backbone.pretrained=openai``).

Embedding scale: the decoder was trained on raw (unnormalised) CLIP embeddings, while the
targets may be L2-normalised (``embed.normalize=l2``) or reconstructed at an arbitrary scale.
``invert.unclip.embed_norm`` rescales each target to a fixed L2 norm first: ``auto`` = the
mean norm of the training embeddings when they are raw, else (Stable unCLIP) the norm implied
by the decoder's own embedding statistics (``image_normalizer`` mean/std); a number = that norm;
``none`` = leave as is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from tqdm.auto import tqdm

from .backbones import Backbone
from .config import is_number, rule
from .errors import ConfigError, DataError, ModelMismatchError
from .training import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoder:
    pipeline: str  # "stable_unclip" | "karlo"
    clip_model: str  # open_clip model name of the embedding space
    pretrained: str  # open_clip pretrained tag
    dim: int


DECODERS = {
    "stabilityai/stable-diffusion-2-1-unclip": Decoder("stable_unclip", "ViT-H-14", "laion2b_s32b_b79k", 1024),
    "stabilityai/stable-diffusion-2-1-unclip-small": Decoder("stable_unclip", "ViT-L-14", "openai", 768),
    "kakaobrain/karlo-v1-alpha-image-variations": Decoder("karlo", "ViT-L-14", "openai", 768),
}
PIPELINE_CLASSES = {"StableUnCLIPImg2ImgPipeline": "stable_unclip", "UnCLIPImageVariationPipeline": "karlo"}


def _norm_name(name) -> str:
    return str(name).lower().replace("/", "-").replace("_", "-")


def check_embedding_space(backbone_cfg, model: str, embed_dim: int) -> Decoder | None:
    """Raise unless the backbone is the decoder's CLIP image encoder (known decoders only)."""
    dec = DECODERS.get(str(model))
    if dec is None:
        return None
    kind, name = backbone_cfg.get("kind"), backbone_cfg.get("model")
    tag = backbone_cfg.get("pretrained")
    want = f"backbone.kind=open_clip backbone.model={dec.clip_model} backbone.pretrained={dec.pretrained}"
    if kind != "open_clip" or _norm_name(name) != _norm_name(dec.clip_model):
        raise ConfigError(
            f"unCLIP decoder {model!r} decodes the embedding space of open_clip {dec.clip_model} "
            f"({dec.pretrained}), but the backbone is {kind} {name!r}; use {want}, or invert.method=direct"
        )
    if backbone_cfg.get("checkpoint"):
        log.warning("backbone loads a local checkpoint; assuming it holds the %s %s weights %s decodes",
                    dec.clip_model, dec.pretrained, model)
    elif str(tag) != dec.pretrained:
        raise ConfigError(
            f"unCLIP decoder {model!r} was trained on open_clip {dec.clip_model} with pretrained={dec.pretrained!r} "
            f"weights, but the backbone uses pretrained={tag!r} (another embedding space); use {want}"
        )
    if embed_dim != dec.dim:
        raise ModelMismatchError(f"unCLIP decoder {model!r} expects {dec.dim}-d embeddings, the backbone gives {embed_dim}-d")
    return dec


def pipeline_kind(model: str) -> str:
    if model in DECODERS:
        return DECODERS[model].pipeline
    index = Path(model).expanduser() / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"invert.unclip.model {model!r} is neither a known unCLIP decoder ({sorted(DECODERS)}) "
            f"nor a local diffusers pipeline folder (no model_index.json)"
        )
    cls = json.loads(index.read_text()).get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise ConfigError(f"{index}: pipeline class {cls!r} is not an unCLIP image decoder; expected one of {sorted(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[cls]


def load_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """The decoder pipeline. Its CLIP image encoder is loaded too (diffusers' Stable unCLIP reads
    the working dtype from it even when given embeddings), but never run."""
    kind = pipeline_kind(model)
    if kind == "stable_unclip":
        from diffusers import StableUnCLIPImg2ImgPipeline as cls
    else:
        from diffusers import UnCLIPImageVariationPipeline as cls
    try:
        pipe = cls.from_pretrained(str(Path(model).expanduser()) if model not in DECODERS else model,
                                   dtype=dtype)
    except OSError as err:  # hub unreachable / files missing
        raise DataError(
            f"cannot load unCLIP decoder {model!r}: {err}. Real decoders come from the Hugging Face hub "
            f"(set HF_HUB_OFFLINE=0 with network access once), or give a local folder saved with save_pretrained"
        ) from None
    return pipe.to(device), kind


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class UnclipConfig:
    """Schema of ``invert.unclip`` (values and meaning: configs/invert/*.yaml)."""

    model: str = MISSING
    steps: int = rule(ge=1)
    guidance: float = rule(ge=0)
    noise_level: int = rule(ge=0)
    prompt: str = MISSING
    height: Optional[int] = rule(ge=1)
    width: Optional[int] = rule(ge=1)
    # auto | null (no rescaling) | a norm: typed Any (OmegaConf has no Union of str and float)
    embed_norm: Any = rule(test=lambda v: v == "auto" or (is_number(v) and v > 0), what="auto, null or a number > 0")
    dtype: str = rule(choices=("auto", *DTYPES))
    seed: int = MISSING


def decoder_dim(pipe, kind: str) -> int:
    if kind == "stable_unclip":
        return int(pipe.image_normalizer.mean.shape[-1])
    return int(pipe.text_proj.embedding_proj.in_features)


def target_norm(cfg_norm, pipe, kind: str, meta: dict) -> float | None:
    if cfg_norm is None:
        return None
    if cfg_norm != "auto":
        return float(cfg_norm)
    if meta.get("normalize", "none") == "none" and meta.get("mean_norm"):
        return float(meta["mean_norm"])  # the training embeddings are raw CLIP embeddings
    if kind == "stable_unclip":
        # E||e||^2 = sum(mean^2 + std^2) under the decoder's per-dimension statistics.
        n = pipe.image_normalizer
        return float((n.mean.detach().float() ** 2 + n.std.detach().float() ** 2).sum().sqrt())
    raise ConfigError(
        "the embeddings are L2-normalised and the Karlo decoder has no embedding statistics: set "
        "invert.unclip.embed_norm to the typical L2 norm of the raw CLIP image embeddings"
    )


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@torch.no_grad()
def decode(pipe, kind: str, embeds: torch.Tensor, ucfg, generator: torch.Generator) -> np.ndarray:
    """Decode (B, D) embeddings into float images (B, H, W, 3) in [0, 1]."""
    if kind == "stable_unclip":
        out = pipe(
            prompt=[str(ucfg.prompt)] * len(embeds), image_embeds=embeds, num_inference_steps=int(ucfg.steps),
            guidance_scale=float(ucfg.guidance), noise_level=int(ucfg.noise_level), height=ucfg.height,
            width=ucfg.width, generator=generator, output_type="np",
        )
    else:
        out = pipe(
            image_embeddings=embeds, decoder_num_inference_steps=int(ucfg.steps),
            decoder_guidance_scale=float(ucfg.guidance), generator=generator, output_type="np",
        )
    return np.asarray(out.images, dtype=np.float32)


def load_decoder(cfg: DictConfig, backbone: Backbone, device: torch.device):
    """The configured unCLIP pipeline on ``device`` (checked against the backbone's embedding space)."""
    model = str(cfg.invert.unclip.model)
    check_embedding_space(cfg.backbone, model, backbone.embed_dim)
    return load_pipeline(model, device, _dtype(str(cfg.invert.unclip.dtype), device))[0]


def invert_unclip(backbone: Backbone, targets: torch.Tensor, cfg: DictConfig, meta: dict, pipe=None,
                  device: torch.device | None = None) -> torch.Tensor:
    """Decode ``targets`` (B, D) with the configured unCLIP decoder (``pipe``, loaded if None) on
    ``device`` (default ``invert.device``); images (B, C, H, W) in [0, 1] at the backbone's input
    size (resized / centre-cropped like any input image)."""
    icfg = cfg.invert
    ucfg = icfg.unclip
    model = str(ucfg.model)
    check_embedding_space(cfg.backbone, model, backbone.embed_dim)
    device = device or resolve_device(icfg.device)
    dtype = _dtype(str(ucfg.dtype), device)
    kind = pipeline_kind(model)
    if pipe is None:
        pipe, kind = load_pipeline(model, device, dtype)
    dim = decoder_dim(pipe, kind)
    if targets.shape[1] != dim:
        raise ModelMismatchError(f"unCLIP decoder {model!r} takes {dim}-d embeddings but the targets are {targets.shape[1]}-d")
    norm = target_norm(ucfg.embed_norm, pipe, kind, meta)
    emb = targets.float()
    if norm is not None:
        emb = F.normalize(emb, dim=1) * norm
    generator = torch.Generator(device="cpu").manual_seed(int(ucfg.seed))
    images = []
    bs = max(1, int(icfg.batch_size))
    for start in tqdm(range(0, len(emb), bs), desc="unCLIP decode", leave=False):
        batch = emb[start : start + bs].to(device=device, dtype=dtype)
        arr = decode(pipe, kind, batch, ucfg, generator)
        u8 = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        images.append(backbone.to_pixels(list(u8)))
    return torch.cat(images)
