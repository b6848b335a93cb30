"""The priors: where candidates may lie (``reconstruct.prior``), one class each, and the loss term that applies one.

``auto`` picks one from the victim's embeddings (:func:`resolve_prior`). Each prior's penalty is written in the
candidates' own coordinates (embedding coordinates; the victim's centred input for ``box_on=victim_input``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import PRIORS, Prior, Term, lookup, register_prior

# A run whose farthest candidate lies more than this many times the prior's range outside it has diverged: box
# [0, 1] allows coordinates in [-1, 2]; sphere / norm allow norms up to twice the prior's.
PRIOR_TOLERANCE = 1.0


class RadiusPrior(Prior):
    """Candidates' norms near a radius: sum over candidates of (||x|| / r - 1)^2."""

    def radius(self) -> float:
        raise NotImplementedError

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        return (x.norm(dim=-1) / self.radius() - 1.0).pow(2).sum(1)

    def excess(self, x: torch.Tensor) -> torch.Tensor:
        return (x.norm(dim=-1).max(1).values / self.radius() - 1.0).clamp_min(0.0)

    def project_(self, x: torch.Tensor) -> None:
        x.mul_(self.radius() / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny))

    def describe(self) -> str:
        return f"norm {self.radius():.3g}"


@register_prior("sphere")
class SpherePrior(RadiusPrior):
    """l2-normalised embeddings live on the unit sphere."""

    def radius(self) -> float:
        return 1.0


@register_prior("norm")
class NormPrior(RadiusPrior):
    """Unnormalised embeddings: keep ||x|| near the training set's mean norm (victim.json's ``embedding.mean_norm``)."""

    def radius(self) -> float:
        return float(self.mean_norm or 1.0)


@register_prior("box")
class BoxPrior(Prior):
    """Raw pixels: every coordinate in ``reconstruct.box`` = [low, high]."""

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        return (F.relu(self.low - x).pow(2) + F.relu(x - self.high).pow(2)).flatten(1).sum(1)

    def excess(self, x: torch.Tensor) -> torch.Tensor:
        width = (self.high - self.low) or 1.0
        outside = torch.maximum(self.low - x, x - self.high).clamp_min(0.0)
        return outside.flatten(1).max(1).values / width

    def project_(self, x: torch.Tensor) -> None:
        x.clamp_(self.low, self.high)

    def describe(self) -> str:
        return f"[{self.low:g}, {self.high:g}]"


@register_prior("none")
class NoPrior(Prior):
    """No constraint."""

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def describe(self) -> str:
        return "none"


def make_prior(name: str, mean_norm: float | None = None, box=(0.0, 1.0)) -> Prior:
    return lookup(PRIORS, name, "reconstruct.prior")(mean_norm, box)


def resolve_prior(prior: str, spec: dict) -> str:
    """``auto``: sphere for l2-normalised embeddings, box for raw pixels (the identity backbone), norm when the
    embeddings' mean norm is known, else none; any other name must be a registered prior."""
    if prior != "auto":
        try:
            lookup(PRIORS, prior, "reconstruct.prior")
        except ConfigError as err:
            raise ConfigError(f"reconstruct.prior must be auto or one of {tuple(PRIORS)}, got {prior!r} ({err})") from None
        return prior
    emb = spec.get("embedding") or {}
    if emb.get("normalize") == "l2":
        return "sphere"
    if (emb.get("backbone_name") or emb.get("backbone")) == "identity":
        return "box"
    return "norm" if emb.get("mean_norm") else "none"


class PriorTerm(Term):
    """The prior's penalty on the candidates, in the coordinates it bounds: embedding coordinates (the victim's input
    plus ``input_mean``), or the victim's input itself (``on_input``: ``box_on=victim_input``, the reference)."""

    key = "prior"

    def __init__(self, prior: Prior, input_mean: torch.Tensor, on_input: bool = False, enforced: bool = True):
        super().__init__()
        self.prior, self.on_input, self.enforced = prior, bool(on_input), bool(enforced)
        self.register_buffer("input_mean", input_mean.clone(), persistent=False)

    def coords(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.on_input else x + self.input_mean

    def forward(self, x, lam, runs):
        return {"prior": self.prior.penalty(self.coords(x))}

    @torch.no_grad()
    def project_(self, x: torch.Tensor) -> None:
        """Put candidates (victim coordinates) back into the prior's range, in place."""
        if self.on_input:
            self.prior.project_(x)
        else:
            shifted = x + self.input_mean
            self.prior.project_(shifted)
            x.copy_(shifted - self.input_mean)

    def failures(self, x, lam, values, start):
        if not self.enforced:  # prior_weight 0: the prior is not in force
            return {}
        excess = self.prior.excess(self.coords(x)).tolist()
        return {k: (f"candidates left the {self.prior.name} prior's range ({self.prior.describe()}) by up to {e:.3g} "
                    f"times its size") for k, e in enumerate(excess) if e > PRIOR_TOLERANCE}

