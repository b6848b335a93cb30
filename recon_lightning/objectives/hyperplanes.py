"""The victim's first-layer ReLU hyperplanes: geometry, and the term that pulls candidates onto them."""

from __future__ import annotations

import torch

from .base import Term


def first_layer_hyperplanes(weight: torch.Tensor, bias: torch.Tensor | None, next_weight: torch.Tensor | None,
                            min_importance: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """The hyperplanes ``n_j . x + c_j = 0`` where a victim's first-layer ReLUs switch, in its input coordinates:
    unit normals (H, D) and offsets (H,) of the units that matter (importance ``||w_j|| * ||column j of the next
    layer||`` above ``min_importance`` times the largest; units weight decay switched off are left out). Empty
    for a victim without a hidden layer (``next_weight`` None).

    Why: at a weight-decay stationary point of a ReLU MLP the training samples lie *on* these hyperplanes. Measured
    on the default victim: each of its 351 live units passes within 1e-6 of a training digit; a training digit lies
    within 1e-3 pixels of 15 of them (median), a held-out digit of none (docs/results.md, "The victim's kinks")."""
    if next_weight is None:
        return weight.new_zeros((0, weight.shape[1])), weight.new_zeros((0,))
    b = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    importance = weight.norm(dim=1) * next_weight.norm(dim=0)
    live = importance > importance.max() * min_importance
    norms = weight[live].norm(dim=1)
    return weight[live] / norms[:, None], b[live] / norms


def hyperplane_scale(offsets: torch.Tensor) -> float:
    """The hyperplanes' median distance from the input origin: a length scale of the data read off the weights
    (1 when they all pass through the origin, a first layer without bias: then distances are absolute)."""
    scale = float(offsets.detach().abs().median()) if len(offsets) else 0.0
    return scale if scale > 0 else 1.0


def hyperplanes_near(x: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor, radius: float,
                     chunk: int = 4096) -> torch.Tensor:
    """How many of the hyperplanes pass within ``radius`` of each row of x (N, D): (N,) integers (rows in chunks, so
    the N x H distances never exist at once)."""
    return torch.cat([((part @ normals.T + offsets).abs() < radius).sum(1) for part in x.split(chunk)]) if len(x) \
        else torch.zeros(0, dtype=torch.long)


def hyperplane_penalty(x: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor, tau: float) -> torch.Tensor:
    """Pulls candidates x (K, m, D) onto the victim's ReLU hyperplanes, per run (K,): the mean over candidates and
    hyperplanes of ``log(1 + (distance / tau)^2)``. Robust: a hyperplane far away costs little gradient, so a
    candidate settles on the few that pass near it, as the training samples do."""
    if normals.shape[0] == 0:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    dist = torch.matmul(x, normals.transpose(0, 1)) + offsets
    return torch.log1p((dist / tau).pow(2)).mean((1, 2))


class HyperplaneTerm(Term):
    """:func:`hyperplane_penalty` as a loss term (``reconstruct.hyperplane_weight``): the objective's first-layer
    hyperplanes, tau relative to their median distance from the input origin (``reconstruct.hyperplane_tau``), a
    scale of the data read off the weights."""

    key = "hyperplanes"

    def __init__(self, objective, tau: float, dtype: torch.dtype):
        super().__init__()
        normals, offsets = first_layer_hyperplanes(*objective.first_layer())
        self.register_buffer("normals", normals.to(dtype), persistent=False)
        self.register_buffer("offsets", offsets.to(dtype), persistent=False)
        self.tau = float(tau) * hyperplane_scale(offsets)

    def forward(self, x, lam, runs):
        return {"hyperplanes": hyperplane_penalty(x, self.normals, self.offsets, self.tau)}
