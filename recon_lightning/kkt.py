"""The KKT objective and its helpers, where they were before the objectives package: re-exported from
:mod:`recon_lightning.objectives` (new code imports from there)."""

from __future__ import annotations

import torch

from .objectives import PRIORS as _PRIOR_CLASSES
from .objectives import make_prior
from .objectives.hyperplanes import (first_layer_hyperplanes, hyperplane_penalty, hyperplane_scale,  # noqa: F401
                                     hyperplanes_near)
from .objectives.kkt import (ACTIVATIONS, DECAY_KINDS, DECAY_PARAMS, DTYPES, FORMS, LOSS_REDUCTIONS,  # noqa: F401
                             MATMUL_PRECISIONS, MULTIPLIERS, KKTObjective, ReluSigmoidGrad, activation_grad,
                             decay_coefficients, fit_multipliers, make_activation, resolve_form, training_recipe)
from .objectives.priors import resolve_prior  # noqa: F401

PRIORS = tuple(_PRIOR_CLASSES)  # the built-in priors' names


def prior_penalty(x: torch.Tensor, prior: str, mean_norm: float | None, box_low: float,
                  box_high: float) -> torch.Tensor:
    """Keeps candidates (in embedding coordinates) in the embedding space's range, per run (K,)."""
    return make_prior(prior, mean_norm, (box_low, box_high)).penalty(x)


def prior_excess(x: torch.Tensor, prior: str, mean_norm: float | None, box_low: float, box_high: float) -> torch.Tensor:
    """How far each run's farthest candidate lies outside the prior's range, in units of the range's own size (K,)."""
    return make_prior(prior, mean_norm, (box_low, box_high)).excess(x)
