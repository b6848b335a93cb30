"""The interfaces of the reconstruction loss's parts, and the registries that name them.

The reconstruct stage minimises, for K runs of m candidates at once, a weighted sum of :class:`Term` s: the
objective (what the victim's parameters say about its training set: :mod:`.kkt`, :mod:`.projection`), and terms
that keep the candidates plausible (a :class:`Prior`, the hyperplane pull of :mod:`.hyperplanes`). Every term
returns per-run values (K,) by name; the stage sums ``weight * values[term.key]`` and judges a finished run with
each term's :meth:`Term.failures`.

Objectives and priors are found by name in two registries. A name that is not registered yet is looked for in a
module of this package of the same name (``reconstruct.objective=foo`` imports ``recon_lightning.objectives.foo``,
which registers ``foo``), so a new objective or prior is one file here plus one YAML preset; a class elsewhere is
named with ``{_target_: package.module.Class}``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError

# A run's final state is judged diverged when its relative objective ends at or above both the trivial solution's
# (every coefficient zero explains nothing of the target: exactly 1) and its own start.
TRIVIAL_LOSS = 1.0

OBJECTIVES: dict[str, type] = {}
PRIORS: dict[str, type] = {}


def _registrar(registry: dict[str, type], name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        registry[name] = cls
        cls.name = name
        return cls
    return add


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator: ``reconstruct.objective=<name>`` builds this :class:`Objective`."""
    return _registrar(OBJECTIVES, name)


def register_prior(name: str) -> Callable[[type], type]:
    """Class decorator: ``reconstruct.prior=<name>`` builds this :class:`Prior`."""
    return _registrar(PRIORS, name)


def lookup(registry: dict[str, type], name: str, key: str) -> type:
    """The class registered as ``name``, importing ``recon_lightning.objectives.<name>`` first if it is not there yet."""
    if name not in registry and isinstance(name, str) and name.isidentifier():
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{name}":
                raise
    if name not in registry:
        raise ConfigError(f"{key} must be one of {sorted(registry)} (or a module recon_lightning/objectives/<name>.py "
                          f"that registers it), got {name!r}")
    return registry[name]


def resolve_class(spec: Any, registry: dict[str, type], key: str) -> type:
    """A registry name, or a mapping ``{_target_: package.module.Class}`` (Hydra's convention), as the class."""
    if isinstance(spec, dict) or hasattr(spec, "keys"):
        target = spec.get("_target_")
        if not isinstance(target, str) or "." not in target:
            raise ConfigError(f"{key}: a mapping must name a class as _target_: package.module.Class, got {target!r}")
        module, _, name = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{key}: cannot import {target}: {err}") from None
        return cls
    return lookup(registry, spec, key)


class Term(nn.Module):
    """One summand of the reconstruction loss, for K runs at once.

    ``forward(x, lam, runs)`` gets the candidates x (K, m, D, in the victim's input coordinates), the multipliers
    lam (K, m[, C]) and the per-run tensors ``runs`` (``y`` (K, m) labels, ``alpha`` (K,) activation sharpness,
    ``lambda_min`` (K,)), and returns named per-run values, each (K,): ``values[self.key]`` is what the loss sums
    (times the term's weight), the others are diagnostics that the run files record."""

    key: str = ""

    def forward(self, x: torch.Tensor, lam: torch.Tensor, runs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def failures(self, x: torch.Tensor, lam: torch.Tensor, values: dict[str, torch.Tensor],
                 start: dict[str, torch.Tensor]) -> dict[int, str]:
        """Runs (index: reason) whose final state this term judges diverged; ``values`` / ``start``: every term's
        values at the final and at the starting state."""
        return {}


class Objective(Term):
    """What the victim's parameters say about its training set: a residual that is small at the training set.

    ``rel_key`` / ``abs_key`` name its relative (in [0, 1] for the trivial solution's 1) and absolute residual among
    its values; ``reconstruct.kkt_loss`` picks which one the loss sums. Candidates come with one multiplier (or
    coefficient) each, ``lambda_shape(m)``: optimised (``uses_multipliers``) or solved for."""

    rel_key: str = "residual_rel"
    abs_key: str = "residual_abs"
    uses_multipliers: bool = True
    per_class_multipliers: bool = False

    @classmethod
    def from_config(cls, victim, spec: dict, rcfg: dict, form: str, dtype: torch.dtype,
                    target: dict[str, torch.Tensor] | None) -> "Objective":
        """Build from the reconstruct config; ``target``: the victim's parameter displacement by state-dict name
        (``reconstruct.target=displacement``), None for the parameters themselves."""
        raise NotImplementedError

    def lambda_shape(self, m: int) -> tuple[int, ...]:
        return (m,)

    def project_lambda(self, lam: torch.Tensor) -> None:
        """Keep optimised multipliers feasible, in place (after each step)."""

    def multiplier_sum(self, lam: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One multiplier per candidate (K, m), as candidates.safetensors stores it."""
        return lam

    def reported_multipliers(self, x: torch.Tensor, lam: torch.Tensor, runs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The multipliers written with the candidates (same shape as ``lam``): the optimised ones by default."""
        return lam

    def victim_params(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def extra_floats(self, m: int) -> float:
        """Floats one run needs beyond the KKT-shaped estimate of reconstruct.run_memory_bytes (runs_per_batch=auto)."""
        return 0.0

    def failures(self, x, lam, values, start) -> dict[int, str]:
        out = {}
        for k, (rel, rel0) in enumerate(zip(values[self.rel_key].tolist(), start[self.rel_key].tolist())):
            if rel >= max(TRIVIAL_LOSS, rel0):
                out[k] = (f"relative {self.label} loss {rel:.3g} ended at or above the trivial solution's 1 "
                          f"({self.trivial}) and its start {rel0:.3g}")
        return out

    label = "objective"  # in messages
    trivial = "all coefficients zero"  # the solution whose relative loss is 1


class Prior(nn.Module):
    """Where candidates may lie, in embedding coordinates (or the victim's input, ``reconstruct.box_on``).

    ``penalty`` (K,) is summed into the loss (``reconstruct.prior_weight``); ``excess`` (K,) is how far each run's
    farthest candidate lies outside the range in units of its size (a run beyond ``PRIOR_TOLERANCE`` has diverged);
    ``project_`` puts candidates back into the range in place (``reconstruct.project_candidates``)."""

    def __init__(self, mean_norm: float | None = None, box: Sequence[float] = (0.0, 1.0)):
        super().__init__()
        self.mean_norm, self.low, self.high = mean_norm, float(box[0]), float(box[1])

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def excess(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def project_(self, x: torch.Tensor) -> None:
        raise ConfigError(f"reconstruct.project_candidates: the {self.name} prior has no range to project onto")

    def describe(self) -> str:
        """The range, for messages."""
        return self.name
