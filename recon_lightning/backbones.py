"""Frozen embedding models ("backbones") behind one small interface.

Every backbone knows its input preprocessing and embedding size:

* image backbones: ``to_pixels(images)`` turns raw images (uint8 HxWxC or HxW numpy arrays)
  into a float batch in [0, 1] at the model's native resolution, shape (B, C, H, W);
  ``embed_pixels(x)`` maps such a batch to embeddings (B, D) *differentiably* (the inversion
  stage optimises x through it). ``embed(samples)`` = ``embed_pixels(to_pixels(samples))``.
* text backbones: ``embed(list_of_str)`` -> (B, D).

Embedding normalisation (none / L2) is applied by the embed stage, not here, so that
``embed_pixels`` returns exactly what the model outputs.

Kinds: identity (raw pixels), timm, open_clip, sentence_transformers, efficientnet_lite.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


class Backbone(nn.Module):
    """Base class. Subclasses set ``name``, ``modality`` ('image' or 'text'), ``embed_dim``
    and, for images, ``input_size`` = (C, H, W)."""

    name: str = "backbone"
    modality: str = "image"
    embed_dim: int = 0
    input_size: tuple[int, int, int] | None = None
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
        out = []
        for img in images:
            t = torch.as_tensor(np.asarray(img))
            if t.ndim == 2:
                t = t[:, :, None]
            t = t.permute(2, 0, 1).float()
            if t.max() > 1.0:
                t = t / 255.0
            if t.shape[0] != c:
                t = t[:1].expand(c, -1, -1) if c == 3 else t.mean(0, keepdim=True)
            if tuple(t.shape[1:]) != (h, w):
                scale = max(h / t.shape[1], w / t.shape[2])
                size = (max(h, round(t.shape[1] * scale)), max(w, round(t.shape[2] * scale)))
                t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
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


def build_backbone(cfg, input_size: tuple[int, int, int] | None = None) -> Backbone:
    """Build the frozen backbone described by ``cfg`` (the ``backbone`` config section).

    ``input_size`` is the data's native (C, H, W); only the identity backbone uses it.
    """
    kind = cfg.get("kind")
    if kind == "identity":
        if input_size is None:
            raise ConfigError("the identity backbone needs image data (it embeds raw pixels)")
        backbone = IdentityBackbone(input_size)
    else:
        raise ConfigError(f"unknown backbone kind {kind!r}; known: {sorted(KINDS)}")
    backbone.eval().requires_grad_(False)
    return backbone


KINDS = {"identity"}
