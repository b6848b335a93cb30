"""The reconstruction loss as plug-ins: objectives (``kkt``, ``projection``), priors, and terms (see
:mod:`.base` and docs/architecture.md, "Objectives and priors")."""

from .base import (OBJECTIVES, PRIORS, TRIVIAL_LOSS, Objective, Prior, Term, lookup, register_objective,
                   register_prior, resolve_class)
from .hyperplanes import (HyperplaneTerm, first_layer_hyperplanes, hyperplane_penalty, hyperplane_scale,
                          hyperplanes_near)
from .kkt import (ACTIVATIONS, DTYPES, FORMS, MATMUL_PRECISIONS, MULTIPLIERS, KKTObjective, LambdaPenalty,
                  ReluSigmoidGrad, decay_coefficients, fit_multipliers, make_activation, resolve_form,
                  training_recipe)
from .priors import PRIOR_TOLERANCE, PriorTerm, make_prior, resolve_prior
from . import projection  # noqa: F401  (registers the projection objective)
from .target import TARGETS, load_target

__all__ = [
    "ACTIVATIONS", "DTYPES", "FORMS", "MATMUL_PRECISIONS", "MULTIPLIERS", "OBJECTIVES", "PRIORS", "PRIOR_TOLERANCE",
    "TARGETS", "TRIVIAL_LOSS", "HyperplaneTerm", "KKTObjective", "LambdaPenalty", "Objective", "Prior", "PriorTerm",
    "ReluSigmoidGrad", "Term", "build_objective", "decay_coefficients", "first_layer_hyperplanes", "fit_multipliers",
    "hyperplane_penalty", "hyperplane_scale", "hyperplanes_near", "load_target", "lookup", "make_activation",
    "make_prior", "register_objective", "register_prior", "resolve_class", "resolve_form", "resolve_prior",
    "training_recipe",
]


def build_objective(victim, spec: dict, rcfg: dict, form: str, dtype, target=None) -> Objective:
    """``reconstruct.objective`` (a registry name, or ``{_target_: package.module.Class}``) built from the config."""
    cls = resolve_class(rcfg.get("objective", "kkt"), OBJECTIVES, "reconstruct.objective")
    return cls.from_config(victim, spec, rcfg, form, dtype, target)
