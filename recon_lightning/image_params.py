"""Image parameterisations and differentiable augmentations for direct embedding inversion.

A parameterisation holds a batch of ``n`` images as trainable parameters and renders them
into [0, 1] at a requested working resolution (the coarse-to-fine schedule starts low):

* ``pixels``: raw pixels through a sigmoid (optionally in a decorrelated colour space).
  At a coarse resolution the pixels are average-pooled before use, so updates are
  block-constant: low frequencies are fitted first.
* ``fourier``: lucid-style feature-visualisation parameterisation: a 2-D real FFT spectrum
  scaled by 1/frequency^decay, decorrelated colour, sigmoid (Olah et al., 2017,
  "Feature Visualization", distill.pub). Coarse stages mask frequencies above the
  working resolution's Nyquist limit.
* ``dip``: Deep Image Prior (Ulyanov et al., 2018): a U-Net with skip connections, one per
  image (run as grouped convolutions, so a batch of images is one network call), maps a
  fixed noise input plus fresh noise each step to the image, as in "Splicing ViT Features
  for Semantic Appearance Transfer" (Tumanyan et al., 2022).

:class:`Augment` applies random, per-sample, differentiable augmentations (random resized
crop, translation jitter, flip, small rotation via one affine warp; per-channel colour
gain/offset; pixel noise) so the optimised image does not overfit the network's exact
pixel grid (adversarial patterns) but to features that survive natural transformations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from .config import rule
from .errors import ConfigError

# lucid's square root of ImageNet's colour correlation matrix (RGB), column-normalised.
_COLOR_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = _COLOR_SVD_SQRT / _COLOR_SVD_SQRT.norm(dim=0).max()

PARAMETERISATIONS = ("dip", "fourier", "pixels")


def decorrelate_colors(t: torch.Tensor) -> torch.Tensor:
    """Map a (B, 3, H, W) tensor from the decorrelated colour basis to RGB (identity for C != 3)."""
    if t.shape[1] != 3:
        return t
    return torch.einsum("ij,bjhw->bihw", _COLOR.to(t), t)


def _fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _randn(n: int, shape: Sequence[int], seeds: Sequence[int] | None) -> torch.Tensor:
    """(n, *shape) standard normal; with ``seeds``, image i is drawn from its own generator, so an
    image's start does not depend on which batch (or DDP rank) it is optimised in."""
    if seeds is None:
        return torch.randn(n, *shape)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class PixelParam(nn.Module):
    """Sigmoid-parameterised pixels at full resolution."""

    def __init__(self, n: int, size: Sequence[int], decorrelate: bool = True, init_std: float = 0.1,
                 seeds: Sequence[int] | None = None):
        super().__init__()
        c, h, w = size
        self.decorrelate = decorrelate and c == 3
        self.logits = nn.Parameter(_randn(n, (c, h, w), seeds) * init_std)

    def forward(self, res: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        t = self.logits  # deterministic: ``generator`` (the step's random draws) is not used
        if tuple(res) != tuple(t.shape[-2:]):
            # Block-average: the gradient (and Adam's update) is constant over each block.
            t = F.adaptive_avg_pool2d(t, res)
        if self.decorrelate:
            t = decorrelate_colors(t)
        return torch.sigmoid(t)


class FourierParam(nn.Module):
    """lucid's ``fft_image`` + ``to_valid_rgb``: scaled spectrum -> irfft -> decorrelated colour -> sigmoid."""

    def __init__(self, n: int, size: Sequence[int], decay: float = 1.0, init_std: float = 0.01, decorrelate: bool = True,
                 seeds: Sequence[int] | None = None):
        super().__init__()
        c, h, w = size
        self.h, self.w = h, w
        self.decorrelate = decorrelate and c == 3
        fy = torch.fft.fftfreq(h)[:, None]
        fx = torch.fft.rfftfreq(w)[None, :]
        freqs = torch.sqrt(fy**2 + fx**2)
        # 1/f^decay makes every frequency band contribute similarly (natural-image spectrum).
        self.register_buffer("scale", 1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay, persistent=False)
        self.register_buffer("fy", fy.abs().expand_as(freqs).clone(), persistent=False)
        self.register_buffer("fx", fx.abs().expand_as(freqs).clone(), persistent=False)
        self.spectrum = nn.Parameter(_randn(n, (c, h, w // 2 + 1, 2), seeds) * init_std)

    def forward(self, res: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum) * self.scale  # deterministic: ``generator`` is not used
        if tuple(res) != (self.h, self.w):
            # Coarse stage: only frequencies a res-sized image could represent.
            keep = (self.fy <= 0.5 * res[0] / self.h) & (self.fx <= 0.5 * res[1] / self.w)
            spec = spec * keep
        t = torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho") / 4.0  # lucid's "magic" 4
        if self.decorrelate:
            t = decorrelate_colors(t)
        return torch.sigmoid(t)


# --- Deep Image Prior: a U-Net per image, as grouped convolutions over a (1, G*C, H, W) tensor ---


def _gconv(cin: int, cout: int, g: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(g * cin, g * cout, k, stride=stride, padding=k // 2, groups=g, padding_mode="replicate")


def _gcat(a: torch.Tensor, b: torch.Tensor, g: int) -> torch.Tensor:
    """Concatenate channels image by image (keeps each image's channels contiguous for its group)."""
    _, ca, h, w = a.shape
    cb = b.shape[1]
    return torch.cat([a.view(g, ca // g, h, w), b.view(g, cb // g, h, w)], 1).view(1, (ca + cb), h, w)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, g: int, k: int = 3, stride: int = 1):
        # GroupNorm with one group per image = per-image layer norm (fine even at 1x1 maps).
        super().__init__(_gconv(cin, cout, g, k, stride), nn.GroupNorm(g, g * cout), nn.LeakyReLU(0.2))


class DIPParam(nn.Module):
    """Deep Image Prior U-Net (Ulyanov et al.'s hourglass with skips), ``n`` independent networks."""

    def __init__(
        self,
        n: int,
        size: Sequence[int],
        channels: Sequence[int] = (32, 64, 128),
        skip: int = 4,
        input_channels: int = 32,
        input_noise: float = 0.05,
        seed: int = 0,
    ):
        super().__init__()
        c, h, w = size
        self.n, self.c, self.size = n, c, (h, w)
        self.input_channels, self.input_noise = input_channels, float(input_noise)
        self.depth = len(channels)
        g = n
        gen = torch.Generator().manual_seed(seed)
        # Fixed input code z (uniform * 0.1 as in DIP); each step adds fresh noise to it.
        self.register_buffer("z", torch.rand(1, g * input_channels, h, w, generator=gen) * 0.1)
        self.down, self.skips, self.up = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cin = input_channels
        for ch in channels:
            self.down.append(nn.Sequential(_Block(cin, ch, g, 3, stride=2), _Block(ch, ch, g)))
            self.skips.append(_Block(cin, skip, g, k=1) if skip else nn.Identity())
            cin = ch
        self.skip_ch = skip
        for i in reversed(range(self.depth)):
            deeper = channels[i]
            out = channels[i - 1] if i > 0 else channels[0]
            self.up.append(nn.Sequential(_Block(deeper + skip, out, g), _Block(out, out, g, k=1)))
        self.head = _gconv(channels[0], c, g, k=1)

    def forward(self, res: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        """The images at resolution ``res``; in training, the input noise is drawn from ``generator`` (the step's)."""
        g = self.n
        z = self.z
        if self.training and self.input_noise > 0:
            z = z + torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype) * self.input_noise
        # Work at a size the hourglass can halve ``depth`` times, then resize to ``res``.
        m = 2**self.depth
        work = (max(m, math.ceil(res[0] / m) * m), max(m, math.ceil(res[1] / m) * m))
        x = F.interpolate(z, size=work, mode="area") if tuple(work) != self.size else z
        feats = []
        for down, skip in zip(self.down, self.skips):
            feats.append(skip(x))
            x = down(x)
        for up, s in zip(self.up, reversed(feats)):
            x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = up(_gcat(x, s, g) if self.skip_ch else x)
        x = torch.sigmoid(self.head(x)).view(g, self.c, *work)
        return _fit(x, tuple(res))


@dataclass
class FourierConfig:
    """Schema of ``invert.fourier``."""

    decay: float = MISSING  # spectrum scale 1/f^decay


@dataclass
class DipConfig:
    """Schema of ``invert.dip``."""

    channels: List[int] = rule(ge=1, test=lambda v: len(v) > 0, what="a non-empty list of widths")
    skip: int = rule(ge=0)
    input_channels: int = rule(ge=1)
    input_noise: float = rule(ge=0)


@dataclass
class AugmentConfig:
    """Schema of ``invert.augment`` (see :class:`Augment`)."""

    copies: int = rule(ge=1)
    crop_scale: List[float] = rule(gt=0, le=1, test=lambda v: len(v) == 2 and v[0] <= v[1],
                                   what="[min, max] with 0 < min <= max <= 1")
    jitter: float = rule(ge=0)
    flip: bool = MISSING
    rotate: float = rule(ge=0)
    color: float = rule(ge=0)
    noise: float = rule(ge=0)


def build_param(kind: str, n: int, size: Sequence[int], cfg, seeds: Sequence[int] | None = None) -> nn.Module:
    """The parameterisation ``kind`` (``cfg`` = the ``invert`` config section) for ``n`` images;
    ``seeds`` (one per image) fix each pixel / Fourier image's initialisation on its own."""
    decorrelate = bool(cfg.get("decorrelate", True))
    if kind == "pixels":
        return PixelParam(n, size, decorrelate=decorrelate, seeds=seeds)
    if kind == "fourier":
        return FourierParam(n, size, decay=float(cfg.fourier.decay), decorrelate=decorrelate, seeds=seeds)
    if kind == "dip":
        d = cfg.dip
        return DIPParam(
            n, size, channels=list(d.channels), skip=int(d.skip), input_channels=int(d.input_channels),
            input_noise=float(d.input_noise), seed=int(cfg.get("seed", 0)),
        )
    raise ConfigError(f"unknown invert.param {kind!r}; choose from {list(PARAMETERISATIONS)}")


class Augment(nn.Module):
    """Random per-sample differentiable augmentations; each is switched off by a zero / false value.

    ``crop_scale`` = (min, max) fraction of the image area kept by the random resized crop,
    ``jitter`` = extra translation as a fraction of the image side, ``flip`` = random horizontal
    flip, ``rotate`` = max rotation in degrees, ``color`` = max per-channel gain/offset change,
    ``noise`` = std of added Gaussian pixel noise.
    """

    def __init__(self, crop_scale=(1.0, 1.0), jitter=0.0, flip=False, rotate=0.0, color=0.0, noise=0.0):
        super().__init__()
        lo, hi = (float(v) for v in crop_scale)  # 0 < lo <= hi <= 1 (AugmentConfig's rule)
        self.crop_scale, self.jitter, self.flip = (lo, hi), float(jitter), bool(flip)
        self.rotate, self.color, self.noise = float(rotate), float(color), float(noise)

    @classmethod
    def from_config(cls, cfg) -> "Augment":
        return cls(cfg.crop_scale, cfg.jitter, cfg.flip, cfg.rotate, cfg.color, cfg.noise)

    @property
    def geometric(self) -> bool:
        return self.crop_scale != (1.0, 1.0) or self.jitter > 0 or self.flip or self.rotate > 0

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented ``x``, every random draw from ``generator`` (on x's device; None: torch's global one)."""
        b, c = x.shape[:2]
        dev, dt = x.device, x.dtype

        def u(lo, hi, *shape):
            return torch.rand(b, *shape, generator=generator, device=dev, dtype=dt) * (hi - lo) + lo

        if self.geometric:
            # Side fraction of the crop; a crop of side s can sit anywhere within the image.
            side = u(*self.crop_scale).sqrt()
            tx = u(-1, 1) * (1 - side) + u(-1, 1) * 2 * self.jitter
            ty = u(-1, 1) * (1 - side) + u(-1, 1) * 2 * self.jitter
            ang = u(-1, 1) * math.radians(self.rotate)
            sx = side * (torch.where(torch.rand(b, generator=generator, device=dev) < 0.5, -1.0, 1.0).to(dt) if self.flip else 1.0)
            cos, sin = torch.cos(ang), torch.sin(ang)
            theta = torch.stack(
                [torch.stack([sx * cos, -side * sin, tx], 1), torch.stack([sx * sin, side * cos, ty], 1)], 1
            )
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.color > 0:
            x = x * u(1 - self.color, 1 + self.color, c, 1, 1) + u(-self.color, self.color, c, 1, 1)
        if self.noise > 0:
            x = x + torch.randn(x.shape, generator=generator, device=dev, dtype=dt) * self.noise
        return x


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, per image: (B,)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)
    dw = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1).mean(1)
    return dh + dw


def to_unit_range(imgs: torch.Tensor, scaling: str) -> torch.Tensor:
    """Map image-shaped values into [0, 1]: ``clip`` keeps pixel values, ``minmax`` stretches each
    image (for vectors known only up to scale, such as reconstructions or L2-normalised pixels)."""
    if scaling == "clip":
        return imgs.clamp(0, 1)
    if scaling == "minmax":
        lo = imgs.flatten(1).min(1).values.view(-1, *([1] * (imgs.dim() - 1)))
        hi = imgs.flatten(1).max(1).values.view(-1, *([1] * (imgs.dim() - 1)))
        return (imgs - lo) / (hi - lo).clamp_min(1e-8)
    raise ValueError(f"unknown scaling {scaling!r}")
