"""Stage 3: reconstruct training-set candidates from the victim's parameters alone.

We optimise candidate inputs x^ and multipliers lambda until the KKT (or, for weight-decay
victims, stationarity) condition of :mod:`recon_lightning.kkt` reproduces the victim's fixed
parameters. This module holds the Lightning side: the candidates as parameters, the per-run
optimisers, run files, merging and scoring.

Many independent runs (different seeds and hyperparameters) are optimised at once as one
(K, m, D) tensor program. Each run has its own optimiser parameter group (own learning rate) and
is masked out if its loss turns NaN/inf (one that ends finite but diverged is failed at the end). Finished runs
are written to ``reconstruct/runs/run_XXXXX.safetensors`` before the next batch starts, and the running batch
keeps a Lightning checkpoint (``reconstruct/checkpoints/runs_*/last.ckpt``), so a killed job
resumes where it stopped; under DDP run ``r`` goes to rank ``r % world_size``. Rank 0 merges all
runs into ``reconstruct/candidates.safetensors``. Candidates are always written in embedding
coordinates (a centred victim's mean added back).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from . import distributed
from .config import Section, as_range, auto_or_int, number_or_range, rule
from .errors import ConfigError, DataError, ModelMismatchError
from .objectives import (ACTIVATIONS, DTYPES, FORMS, MATMUL_PRECISIONS, MULTIPLIERS, OBJECTIVES, PRIORS, TARGETS,
                         HyperplaneTerm, KKTObjective, LambdaPenalty, Objective, PriorTerm, Term, build_objective,
                         fit_multipliers, load_target, make_prior, resolve_class, resolve_form, resolve_prior)
from .objectives.projection import JACOBIANS
from .matching import best_matches
from .stages import Stage
from .storage import fingerprint, load_tensors, save_tensors
from .victim import VictimMLP, check_given_victim, load_victim

log = logging.getLogger(__name__)

# A run that ends finite has still diverged (ReconstructionModule.diverged) when a term of its loss says so
# (Term.failures): its relative objective ends at or above both the trivial solution's (all multipliers zero: exactly
# 1) and its own starting loss; every multiplier ended at zero (kkt: the candidates explain nothing of the victim); or,
# with the prior in force (prior_weight > 0), a candidate lies farther outside the prior's range than
# objectives.priors.PRIOR_TOLERANCE times the range's size (box [0, 1] allows coordinates in [-1, 2]; sphere / norm
# allow norms up to twice the prior's). A run whose loss fell but not yet below 1 has not diverged: it is kept, with
# its final loss (too few reconstruct.steps).

# name -> how a [low, high] range is sampled
HPARAMS = {"init_scale": "log", "lr": "log", "lambda_lr": "log", "lambda_min": "uniform", "alpha": "uniform"}


@dataclass
class ReconstructConfig:
    """Schema of ``reconstruct`` (values and their meaning: configs/reconstruct/*.yaml). The sampled
    hyperparameters hold "a number or [low, high]": typed Any (OmegaConf has no Union of a float and a list),
    their rule checks the shape."""

    victim_dir: Optional[str] = MISSING
    embeddings_dir: Optional[str] = MISSING
    objective: Any = rule(test=lambda v: isinstance(v, str) or (isinstance(v, dict) and "_target_" in v),
                          what="a registered objective's name (kkt, projection) or {_target_: package.module.Class}")
    target: str = rule(choices=TARGETS)
    projection_ridge: float = rule(ge=0)
    projection_jacobian: str = rule(choices=JACOBIANS)
    num_runs: int = rule(ge=1)
    runs_per_batch: Any = auto_or_int(ge=1)  # auto = as many as the free memory holds (typed Any: auto or an int)
    steps: int = rule(ge=1)
    multiplier: float = rule(gt=0)
    candidates_per_class: Optional[int] = rule(ge=1)
    form: str = rule(choices=("auto", *FORMS))
    activation: str = rule(choices=ACTIVATIONS)
    dtype: str = rule(choices=tuple(DTYPES))
    optimizer: str = rule(choices=("adam", "sgd"))
    kkt_loss: str = rule(choices=("relative", "absolute"))
    init_scale: Any = number_or_range(gt=0)  # sampled log-uniformly: > 0
    lr: Any = number_or_range(gt=0)
    lambda_lr: Any = number_or_range(gt=0)  # null = the same as lr
    lambda_min: Any = number_or_range(ge=0)  # multipliers are non-negative
    alpha: Any = number_or_range(gt=0)  # sharpness of the smooth ReLU derivative
    lambda_weight: float = rule(ge=0)
    lambda_per_candidate: bool = MISSING
    lambda_constraint: str = rule(choices=("project", "penalty"))
    multipliers: str = rule(choices=MULTIPLIERS)
    prior: str = rule(test=lambda v: v == "auto" or v in PRIORS or (isinstance(v, str) and v.isidentifier()),
                      what=f"auto, one of {tuple(PRIORS)}, or the name of a module recon_lightning/objectives/<name>.py "
                           "registering a prior")
    project_candidates: bool = MISSING
    prior_weight: float = rule(ge=0)
    hyperplane_weight: float = rule(ge=0)
    hyperplane_tau: float = rule(gt=0)
    box: List[float] = rule(test=lambda v: len(v) == 2 and v[0] <= v[1], what="[low, high] with low <= high")
    box_on: str = rule(choices=("embedding", "victim_input"))
    seed: Optional[int] = MISSING  # null = the top-level seed
    score_with_train: bool = MISSING
    log_every_n_steps: int = rule(ge=0)  # 0 = off
    checkpoint_every_n_steps: int = rule(ge=0)  # 0 = off
    wait_timeout_s: float = rule(gt=0)
    compile: Any = rule(choices=(False, True, "auto"))  # typed Any: a bool or auto
    matmul_precision: str = rule(choices=MATMUL_PRECISIONS)


# ----------------------------------------------------------------------------- hyperparameters


def sample_hparams(rcfg: DictConfig | dict, seed: int, run_id: int) -> dict:
    """Hyperparameters of one run: deterministic in (seed, run_id), whatever batch or rank runs it."""
    rng = np.random.default_rng([int(seed), int(run_id)])
    out: dict[str, Any] = {}
    for name, kind in HPARAMS.items():
        value = rcfg.get(name)
        if value is None and name == "lambda_lr":
            value = rcfg.get("lr")
        lo, hi = as_range(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
        if kind == "log":
            out[name] = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else lo
        else:
            out[name] = float(rng.uniform(lo, hi)) if hi > lo else lo
        if name == "lambda_lr" and rcfg.get("lambda_lr") is None:
            out[name] = out["lr"]  # same learning rate unless set
    out["init_seed"] = int(rng.integers(2**62))
    return out


# ----------------------------------------------------------------------------- the Lightning module


def candidate_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Class of each candidate: ``per_class`` candidates for each class, class-major."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def inner_steps(rcfg: dict | DictConfig) -> int:
    """Optimisation steps per Lightning step: the largest count that keeps logging
    (``log_every_n_steps``), checkpoints (``checkpoint_every_n_steps``) and the end (``steps``) on whole
    Lightning steps. The host is touched once per Lightning step only."""
    steps = int(rcfg["steps"])
    log_every = int(rcfg["log_every_n_steps"])
    ckpt_every = int(rcfg["checkpoint_every_n_steps"])
    return max(1, math.gcd(math.gcd(log_every if log_every > 0 else steps, ckpt_every if ckpt_every > 0 else steps), steps))


class ReconstructionModule(L.LightningModule):
    """K runs' candidates and multipliers as parameters; the victim is fixed (in ``objective``).

    All K runs live in two stacked parameters, ``candidates`` (K, m, D) and ``multipliers`` (K, m[, C]), stepped by
    one :class:`~recon_lightning.run_optim.RunwiseOptimizer` with a learning rate per run. A Lightning step runs
    ``steps_per_call`` optimisation steps (manual optimisation: each is one optimiser step, so ``global_step``
    counts optimisation steps) without touching the host: a run whose loss turns NaN/inf is masked out on the
    device (its parameters stay as they were) and the step is recorded there. Once per Lightning step the host
    reads back which runs failed (their errors), stops when none is left, and logs the minimum and median
    relative KKT loss of the healthy runs.
    """

    def __init__(self, objective: Objective, run_ids: Sequence[int], hparams: Sequence[dict], y: torch.Tensor,
                 input_dim: int, rcfg: dict, prior: str, mean_norm: float | None, dtype: torch.dtype,
                 input_mean: torch.Tensor | None = None, steps_per_call: int | None = None):
        super().__init__()
        self.automatic_optimization = False  # per-run masking of failed runs and the inner loop need manual steps
        self.objective = objective
        self.run_ids, self.hp = list(run_ids), list(hparams)
        self.rcfg, self.prior, self.mean_norm = rcfg, prior, mean_norm
        self.steps_per_call = max(1, int(steps_per_call or (inner_steps(rcfg) if "steps" in rcfg else 1)))
        K, m = len(self.run_ids), len(y)
        self.register_buffer("y", y.clone(), persistent=False)
        self.register_buffer("alpha", torch.tensor([h["alpha"] for h in self.hp], dtype=dtype), persistent=False)
        self.register_buffer("lambda_min", torch.tensor([h["lambda_min"] for h in self.hp], dtype=dtype), persistent=False)
        # Candidates live in the victim's input coordinates (centred if it was trained centred); the
        # prior and everything written out use embedding coordinates, x + input_mean.
        mean = torch.zeros(input_dim, dtype=dtype) if input_mean is None else input_mean.detach().to(dtype)
        self.register_buffer("input_mean", mean.clone(), persistent=False)
        self.input_dim = int(input_dim)
        self.terms, self.weights, self.keys = self.loss_terms(mean.clone())
        x0, lam0 = self.initial_state()
        self.candidates = nn.Parameter(x0.to(dtype))
        self.multipliers = nn.Parameter(lam0.to(dtype))
        self.register_buffer("active", torch.ones(K, dtype=torch.bool), persistent=False)
        # The step at which each run's loss became non-finite (-1: healthy); written on the device.
        self.register_buffer("failed_at", torch.full((K,), -1, dtype=torch.long), persistent=False)
        self.errors: dict[int, str] = {}
        self.last_rel = torch.full((K,), float("nan"))
        self._plain_steps = 0
        self._terms_fn = None  # chosen at the first step, on the device: see compiled()

    def initial_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every run's starting candidates (K, m, D) and multipliers (float64, on the CPU): each run from its own
        generator (its ``init_seed``), so a run's start does not depend on its batch, and can be made again."""
        m, lam_shape = len(self.y), self.objective.lambda_shape(len(self.y))
        xs, lams = [], []
        for h in self.hp:
            g = torch.Generator().manual_seed(h["init_seed"])
            xs.append(torch.randn(m, self.input_dim, generator=g, dtype=torch.float64) * h["init_scale"])
            lams.append(torch.rand(lam_shape, generator=g, dtype=torch.float64))
        return torch.stack(xs), torch.stack(lams)

    def on_fit_start(self) -> None:
        # reconstruct.matmul_precision (high: TF32 on CUDA) for this fit only; on_fit_end restores the setting.
        self._matmul_before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(str(self.rcfg.get("matmul_precision", "highest")))

    def on_fit_end(self) -> None:
        torch.set_float32_matmul_precision(getattr(self, "_matmul_before", "highest"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Which runs have failed travels with the candidates (plain tensors and strings: weights_only loads it).
        checkpoint["reconstruction"] = {"run_ids": list(self.run_ids), "active": self.active.cpu(),
                                        "failed_at": self.failed_at.cpu(),
                                        "errors": {int(k): v for k, v in self.errors.items()}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("reconstruction") or {}
        if state.get("run_ids") != list(self.run_ids):
            raise DataError(f"checkpoint holds runs {state.get('run_ids')}, not {self.run_ids}; delete it to start over")
        self.active.copy_(state["active"])
        if "failed_at" in state:
            self.failed_at.copy_(state["failed_at"])
        self.errors = {int(k): v for k, v in state["errors"].items()}

    def x(self) -> torch.Tensor:
        """The candidates of every run, (K, m, D), in the victim's input coordinates."""
        return self.candidates

    def lam(self) -> torch.Tensor:
        return self.multipliers

    def loss_terms(self, input_mean: torch.Tensor) -> tuple[nn.ModuleList, list[float], list[str]]:
        """The loss's terms from the config, their weights and the value each contributes (:class:`Term`): the
        objective (its relative or absolute residual, ``kkt_loss``), the multipliers' penalty (``lambda_weight``,
        objectives with optimised multipliers), the prior (``prior_weight``), the hyperplane pull
        (``hyperplane_weight``, built only when > 0; a hand-built rcfg without the key, as some tests pass, has it off)."""
        rcfg, objective = self.rcfg, self.objective
        terms: list[Term] = [objective]
        weights = [1.0]
        keys = [objective.rel_key if rcfg["kkt_loss"] == "relative" else objective.abs_key]
        if objective.uses_multipliers:
            terms.append(LambdaPenalty(objective))
            weights.append(float(rcfg["lambda_weight"]))
        prior_weight = float(rcfg["prior_weight"])
        on_input = self.prior == "box" and rcfg.get("box_on", "embedding") == "victim_input"
        terms.append(PriorTerm(make_prior(self.prior, self.mean_norm, [float(v) for v in rcfg["box"]]), input_mean,
                               on_input=on_input, enforced=prior_weight > 0))
        weights.append(prior_weight)
        if float(rcfg.get("hyperplane_weight", 0.0)) > 0:
            terms.append(HyperplaneTerm(objective, float(rcfg["hyperplane_tau"]), input_mean.dtype))
            weights.append(float(rcfg["hyperplane_weight"]))
        keys += [term.key for term in terms[1:]]
        return nn.ModuleList(terms), weights, keys

    def runs(self, K: int) -> dict[str, torch.Tensor]:
        """The per-run tensors the terms read: labels (K, m), activation sharpness and lambda_min (K,)."""
        return {"y": self.y.expand(K, -1), "alpha": self.alpha, "lambda_min": self.lambda_min}

    def prior_term(self) -> PriorTerm:
        return next(t for t in self.terms if isinstance(t, PriorTerm))

    def _terms(self, x: torch.Tensor, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        runs = self.runs(len(x))
        values: dict[str, torch.Tensor] = {}
        total = None
        for term, weight, key in zip(self.terms, self.weights, self.keys):
            out = term(x, lam, runs)
            values.update(out)
            part = out[key] if weight == 1.0 else weight * out[key]
            total = part if total is None else total + part
        return {"total": total, **values}

    def compiled(self) -> bool:
        """Whether the objective runs through ``torch.compile`` (``reconstruct.compile``: true, false (default), or
        auto = on the CPU, off on GPUs; benchmarks/bench_precision.py measures it). The loss needs only a first-order backward (kkt.py's explicit parameter gradient), so
        the whole objective compiles into one graph; shapes never change within a batch, and other batches of the
        same shapes reuse it."""
        mode = self.rcfg.get("compile", False)
        return mode is True or (mode == "auto" and self.candidates.device.type == "cpu")

    def losses(self, create_graph: bool = True) -> dict[str, torch.Tensor]:
        """Every run's loss terms, each (K,); ``create_graph=False``: values only (no autograd graph)."""
        if not create_graph:
            with torch.no_grad():
                return self._terms(self.x(), self.lam())
        if self._terms_fn is None:
            if not self.compiled():
                self._terms_fn = self._terms
            else:
                compiled = torch.compile(self._terms, dynamic=False)
                try:  # the first call compiles: a machine without a working compiler toolchain runs eagerly
                    terms = compiled(self.x(), self.lam())
                except Exception as err:  # noqa: BLE001 - inductor / triton / C++ toolchain failures
                    log.warning("reconstruct.compile: torch.compile failed (%s: %s); the objective runs eagerly",
                                type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                    self._terms_fn = self._terms
                else:
                    self._terms_fn = compiled
                    return terms
        return self._terms_fn(self.x(), self.lam())

    def _step(self, opt, backward=None, last: bool = True) -> torch.Tensor:
        """One optimisation step of every run, with no host synchronisation: a run whose loss is non-finite is
        masked out (and its step recorded in ``failed_at``) on the device. Returns the relative KKT losses
        before the step (K,). ``opt``: a torch optimiser (plain loops), or training.InnerSteps (training_step)."""
        from .training import InnerSteps

        terms = self.losses()
        total = terms["total"]
        bad = ~torch.isfinite(total.detach())
        self.failed_at.masked_fill_(bad & self.active, self.steps_done())
        self.active &= ~bad
        # Only healthy runs contribute; runs are independent, so the gradient of the sum is each run's own
        # gradient (a failed run's is ignored: the optimiser leaves inactive runs unchanged).
        loss = torch.where(self.active, total, torch.zeros_like(total)).sum()
        if isinstance(opt, InnerSteps):
            opt.zero_grad()
            opt.backward(loss, last)
            opt.step(last)
        else:
            opt.zero_grad(set_to_none=True)
            (backward or torch.autograd.backward)(loss)
            opt.step()
        self._plain_steps += 1
        if self.rcfg.get("lambda_constraint", "project") == "project":
            with torch.no_grad():  # dual feasibility: lambda >= 0 exactly, not only penalised below lambda_min
                self.objective.project_lambda(self.multipliers)
        if self.rcfg.get("project_candidates", False):  # e.g. renormalised onto the sphere after every step
            self.prior_term().project_(self.candidates.data)
        return terms[self.objective.rel_key].detach()

    def steps_done(self) -> int:
        """Optimisation steps taken: the Trainer's global step, or the steps of a plain loop."""
        return int(self.global_step) if self._trainer is not None else self._plain_steps

    def optimization_steps(self, opt: torch.optim.Optimizer, n: int, backward=None) -> torch.Tensor:
        """``n`` optimisation steps without touching the host (the inner loop of training_step, and the plain
        loop of the benchmarks); the relative KKT losses before the last step (K,)."""
        rel = None
        n = max(1, int(n))
        for i in range(n):
            rel = self._step(opt, backward, last=i == n - 1)
        return rel

    def optimization_step(self, opt: torch.optim.Optimizer, backward=None) -> dict[str, torch.Tensor] | None:
        """One step of every still-healthy run then a host check (for plain loops): the relative KKT losses
        before the step, or None when every run has failed."""
        rel = self._step(opt, backward)
        return None if self.sync_failures() == 0 else {"kkt_rel": rel}

    def sync_failures(self, rel: torch.Tensor | None = None) -> int:
        """The host's look at the device state (one transfer): records the error of each newly failed run and
        returns the number of healthy runs; with ``rel``, also keeps it in ``last_rel``."""
        parts = [self.active.to(torch.float64), self.failed_at.to(torch.float64)]
        if rel is not None:
            parts.append(rel.to(torch.float64))
        state = torch.stack(parts).cpu()
        active, failed_at = state[0].bool(), state[1].long()
        for k in torch.nonzero(~active).flatten().tolist():
            if k not in self.errors:
                self.errors[k] = f"loss became non-finite (NaN/inf) at step {int(failed_at[k])}"
                log.warning("run %d: %s", self.run_ids[k], self.errors[k])
        if rel is not None:
            self.last_rel = state[2].float()
        self._host_active = active
        return int(active.sum())

    def training_step(self, batch, batch_idx):
        from .training import InnerSteps

        todo = self.steps_per_call
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            todo = min(todo, self.trainer.max_steps - self.global_step)
        rel = self.optimization_steps(InnerSteps(self), todo)
        healthy = self.sync_failures(rel)
        if healthy == 0:
            self.trainer.should_stop = True
            return None
        act = self.last_rel[self._host_active]  # read in the same transfer as the losses
        self.log_dict({"kkt_rel_min": float(act.min()), "kkt_rel_median": float(act.median()), "active_runs": float(healthy)},
                      prog_bar=True, on_step=True, batch_size=1)
        self.log("step", float(self.global_step), on_step=True, batch_size=1)  # loggers' x axis: optimisation steps
        return None

    def configure_optimizers(self):
        from .run_optim import RunwiseOptimizer

        name = self.rcfg["optimizer"]
        if name not in ("adam", "sgd"):
            raise ConfigError(f"reconstruct.optimizer must be adam or sgd, got {name!r}")
        dtype = self.candidates.dtype
        groups = [{"params": [self.candidates], "lr": torch.tensor([h["lr"] for h in self.hp], dtype=dtype)},
                  {"params": [self.multipliers], "lr": torch.tensor([h["lambda_lr"] for h in self.hp], dtype=dtype)}]
        return RunwiseOptimizer(groups, name, momentum=0.9, active=lambda: self.active)

    def train_dataloader(self):
        from .training import steps_loader

        return steps_loader(-(-int(self.rcfg["steps"]) // self.steps_per_call))  # one item per Lightning step

    @torch.no_grad()
    def diverged(self, values: dict[str, torch.Tensor]) -> dict[int, str]:
        """The runs (index: reason) whose final state is finite but diverged, as the loss's terms judge it from their
        final ``values`` and those at the start (:meth:`Term.failures`; see the note at the top of this module)."""
        x0, lam0 = (t.to(self.candidates) for t in self.initial_state())
        start = {k: v.cpu() for k, v in self._terms(x0, lam0).items()}
        values = {k: v.cpu() for k, v in values.items()}
        x, lam = self.x().detach(), self.lam().detach()
        why: dict[int, list[str]] = {}
        for term in self.terms:
            for k, reason in term.failures(x, lam, values, start).items():
                why.setdefault(k, []).append(reason)
        return {k: f"diverged: {'; '.join(reasons)}; lower reconstruct.lr" for k, reasons in sorted(why.items())}

    @torch.no_grad()
    def results(self) -> list[dict]:
        """Final state of every run: candidates, multipliers, losses recomputed at that state; runs whose loss became
        non-finite, or that diverged without (:meth:`diverged`), are failed with their reason."""
        self.sync_failures()
        terms = self.losses(create_graph=False)
        rel_key, abs_key = self.objective.rel_key, self.objective.abs_key
        bad = (~torch.isfinite(terms["total"]) | ~torch.isfinite(terms[rel_key])).cpu()
        active = self.active.cpu()
        for k in torch.nonzero(bad & active).flatten().tolist():
            self.errors[k] = f"final loss became non-finite (NaN/inf) at step {self.steps_done()}"
            log.warning("run %d: %s", self.run_ids[k], self.errors[k])
        active &= ~bad
        for k, reason in self.diverged(terms).items():
            if active[k]:
                self.errors[k], active[k] = reason, False
                log.warning("run %d: %s", self.run_ids[k], reason)
        self.active.copy_(active)
        x, lam = self.x().detach() + self.input_mean, self.lam().detach()
        lam = self.objective.reported_multipliers(self.x().detach(), lam, self.runs(len(x)))
        lam_sum = self.objective.multiplier_sum(lam, self.y.expand(len(x), -1))
        out = []
        for k, run in enumerate(self.run_ids):
            lam_full = lam[k] if self.objective.per_class_multipliers else None
            out.append({
                "run": run, "x": x[k], "y": self.y, "lam": lam_sum[k], "lam_full": lam_full,
                "status": "ok" if bool(active[k]) else "failed", "error": self.errors.get(k),
                "final_loss": float(terms[rel_key][k]), "final_loss_abs": float(terms[abs_key][k]),
                "lambda_penalty": float(terms["lambda_penalty"][k]) if "lambda_penalty" in terms else 0.0,
                "prior": float(terms["prior"][k]),
                "steps": self.steps_done(),
            })
        return out


# ----------------------------------------------------------------------------- scoring


def recon_score(candidates: torch.Tensor, train_x: torch.Tensor) -> float:
    """The sweep metric (evaluation mode only): mean over training samples of the cosine of their best candidate."""
    return float(best_matches("cosine", train_x, candidates)["best_score"].mean())


def kkt_residual_at(victim: VictimMLP, spec: dict, x: torch.Tensor, y: torch.Tensor, form: str = "auto",
                    steps: int = 300, lr: float = 0.05, multipliers: str = "runner_up",
                    target: dict[str, torch.Tensor] | None = None) -> dict:
    """How well the victim's parameters are explained by the KKT / stationarity condition at the points
    ``x`` (embedding coordinates, labels ``y``): the relative residual ||target - sum coef grad phi||^2 /
    ||target||^2 minimised over multipliers lambda >= 0 with the exact ReLU derivative
    (:func:`recon_lightning.kkt.fit_multipliers`).

    The same score for the true training set and for a run's candidates, so evaluations compare like with
    like: reconstruction can only find the training set if the victim is near a KKT point of it, and if
    candidates score lower than the truth, the objective is better explained by other points.
    """
    form = resolve_form(form, spec)
    objective = KKTObjective(victim, spec, form, "relu_sigmoid_grad", torch.float64, multipliers=multipliers,
                             target=target)
    xc = x.to(torch.float64) - victim.input_offset().to(torch.float64)
    return {"form": form, "residual": fit_multipliers(objective, xc, y, steps=steps, lr=lr), "steps": int(steps)}


def projection_residual_at(victim: VictimMLP, x: torch.Tensor, target: dict[str, torch.Tensor] | None = None,
                           sharpness: float = 1e6) -> float:
    """The projection objective's relative residual at the points ``x`` (embedding coordinates): the part of the
    target (theta, or the displacement ``target``) outside the span of their parameter gradients, with the exact ReLU
    derivative (a step: the smooth surrogate at ``sharpness``). The same score for the training set, as many held-out
    points, and a run's candidates (its ``final_loss``)."""
    from .objectives.projection import ProjectionObjective

    objective = ProjectionObjective(victim, "relu_sigmoid_grad", torch.float64, target=target)
    xc = (x.to(torch.float64) - victim.input_offset().to(torch.float64)).unsqueeze(0)
    with torch.no_grad():
        _, rel = objective.residual(xc, torch.tensor([sharpness], dtype=torch.float64))
    return float(rel[0])


# ----------------------------------------------------------------------------- run files and merging


def runs_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "reconstruct" / "runs"


def run_path(run_dir: Path, run: int) -> Path:
    return runs_dir(run_dir) / f"run_{run:05d}.safetensors"


def read_run(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A finished run's file, or None if it is missing or unreadable (then the run is redone)."""
    if not path.is_file():
        return None
    try:
        return load_tensors(path, what="reconstruction run")
    except DataError as err:
        log.warning("ignoring unreadable run file (the run will be redone): %s", err)
        return None


def write_run(run_dir: Path, result: dict, hparams: dict, extra: dict) -> None:
    tensors = {"x": result["x"].float(), "y": result["y"].long(), "lam": result["lam"].float()}
    if result.get("lam_full") is not None:
        tensors["lam_full"] = result["lam_full"].float()
    meta = {"run": result["run"], "hparams": hparams, "status": result["status"], "error": result["error"],
            "final_loss": result["final_loss"], "final_loss_abs": result["final_loss_abs"],
            "lambda_penalty": result["lambda_penalty"], "prior": result["prior"], "steps": result["steps"], **extra}
    save_tensors(run_path(run_dir, result["run"]), tensors, meta)


@dataclass
class Candidates:
    """Merged candidates (see docs/architecture.md); ``c["x"]`` works as well as ``c.x``."""

    x: torch.Tensor
    y: torch.Tensor
    lam: torch.Tensor
    run: torch.Tensor
    run_loss: torch.Tensor
    norm: torch.Tensor
    runs: list[dict]
    meta: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.extra[key] if key in self.extra else getattr(self, key)

    def __len__(self) -> int:
        return len(self.x)


CANDIDATE_KEYS = ("x", "y", "lam", "run", "run_loss", "norm")


def load_candidates(run_dir: str | Path) -> Candidates:
    """Load ``run_dir/reconstruct/candidates.safetensors``."""
    tensors, meta = load_tensors(Path(run_dir) / "reconstruct" / "candidates.safetensors",
                                 what="reconstruction candidates (run stage=reconstruct first)")
    missing = [k for k in CANDIDATE_KEYS if k not in tensors]
    if missing:
        raise DataError(f"candidates file in {run_dir} lacks {missing}")
    return Candidates(**{k: tensors[k] for k in CANDIDATE_KEYS}, runs=meta.get("runs", []), meta=meta,
                      extra={k: v for k, v in tensors.items() if k not in CANDIDATE_KEYS})


def merge_runs(run_dir: Path, num_runs: int, train_x: torch.Tensor | None, meta: dict) -> dict:
    """Merge every run file into candidates.safetensors (ok runs' candidates; all runs' records)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in CANDIDATE_KEYS}
    records = []
    for r in range(num_runs):
        loaded = read_run(run_path(run_dir, r))
        if loaded is None:
            raise DataError(f"run file for run {r} is missing or unreadable: {run_path(run_dir, r)}")
        t, m = loaded
        records.append({k: m.get(k) for k in ("run", "hparams", "final_loss", "status", "error", "recon_score")})
        if m["status"] != "ok":
            continue
        n = len(t["x"])
        parts["x"].append(t["x"])
        parts["y"].append(t["y"])
        parts["lam"].append(t["lam"])
        parts["run"].append(torch.full((n,), r, dtype=torch.long))
        parts["run_loss"].append(torch.full((n,), float(m["final_loss"])))
        parts["norm"].append(t["x"].norm(dim=1))
    ok = [rec for rec in records if rec["status"] == "ok"]
    if not ok:
        shown = "; ".join(f"run {rec['run']}: {rec['error']}" for rec in records[:2])
        more = f"; and {len(records) - 2} more" if len(records) > 2 else ""
        raise DataError(f"all {num_runs} reconstruction runs failed ({shown}{more}); each run's error is in its file in "
                        f"{runs_dir(run_dir)}")
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    summary = {"runs_ok": len(ok), "runs_failed": len(records) - len(ok), "candidates": len(tensors["x"]),
               "best_loss": min(rec["final_loss"] for rec in ok),
               "best_run": min(ok, key=lambda rec: rec["final_loss"])["run"]}
    if train_x is not None:
        # Each candidate's nearest training sample and each training sample's best candidate, for evaluation.
        match = best_matches("cosine", train_x, tensors["x"])
        tensors.update(candidate_best_cos=match["b_best_score"].float(), candidate_best_train=match["b_best_index"],
                       train_best_cos=match["best_score"].float(), train_best_candidate=match["best_index"])
        union = float(match["best_score"].mean())
        scores = [rec["recon_score"] for rec in ok if rec.get("recon_score") is not None]
        summary.update({
            "recon_score": max(scores) if scores else union,  # best single run (the sweep metric)
            "recon_score_union": union,  # all runs' candidates together
            "frac_train_cos_ge_0.9": float((match["best_score"] >= 0.9).double().mean()),
        })
    save_tensors(run_dir / "reconstruct" / "candidates.safetensors", tensors, {**meta, "runs": records, "summary": summary})
    return summary


# ----------------------------------------------------------------------------- the stage


def check_config(cfg: DictConfig) -> None:
    """What the schema's rules cannot check: ``trainer.precision`` against ``reconstruct.dtype``, and a victim from
    elsewhere (``reconstruct.victim_dir``), loaded now, its size checked against the embeddings it is scored with
    and its health judged; what depends on the victim is checked again once the stage loads it."""
    stage_precision(cfg)
    if cfg.reconstruct.victim_dir:
        victim, spec = load_victim(Path(cfg.reconstruct.victim_dir))
        _plan(cfg, spec, victim, Path(cfg.reconstruct.victim_dir))
        _train_embeddings(cfg, Path(cfg.run_dir), victim.input_dim, load=False)
        check_given_victim(cfg, victim)  # collapsed / misclassifying victims stop here (classifier.allow_unhealthy)


def victim_dir_of(cfg: DictConfig, run_dir: Path) -> Path:
    """The audited victim's folder: ``reconstruct.victim_dir`` (a head trained elsewhere), else the run's own."""
    return Path(cfg.reconstruct.victim_dir) if cfg.reconstruct.get("victim_dir") else Path(run_dir) / "classifier"


def _plan(cfg: DictConfig, spec: dict, victim: VictimMLP | None = None, victim_dir: Path | None = None) -> dict:
    """What every rank needs: the config as a dict, the candidates per class, the runs' hyperparameters, the form and
    prior resolved from the victim, the objective's class checked, and (with ``victim``) the target displacement
    (``reconstruct.target``), read from ``victim_dir``'s init file."""
    rcfg = OmegaConf.to_container(cfg.reconstruct, resolve=True)
    resolve_class(rcfg.get("objective", "kkt"), OBJECTIVES, "reconstruct.objective")
    form = resolve_form(rcfg["form"], spec)
    if rcfg.get("target", "theta") == "displacement" and form.endswith("_wd"):
        if rcfg["form"] != "auto":
            raise ConfigError(f"reconstruct.form={form} matches c * theta (weight decay), which reconstruct.target="
                              "displacement replaces: use form auto, binary or multiclass")
        form = form[: -len("_wd")]  # the displacement is a sum of training gradients whatever the decay
    C = int(spec["num_classes"])
    if rcfg.get("candidates_per_class"):
        per_class = int(rcfg["candidates_per_class"])
    else:
        n = spec.get("n_train")
        if not n:
            raise ConfigError("victim.json has no n_train: set reconstruct.candidates_per_class")
        per_class = max(1, math.ceil(float(rcfg["multiplier"]) * int(n) / C))
    seed = int(rcfg["seed"] if rcfg.get("seed") is not None else cfg.seed)
    hps = [sample_hparams(rcfg, seed, r) for r in range(int(rcfg["num_runs"]))]
    target = None
    if victim is not None:
        target = load_target(rcfg.get("target", "theta"), victim_dir, victim)
    return {"rcfg": rcfg, "per_class": per_class, "seed": seed, "hparams": hps, "form": form,
            "prior": resolve_prior(rcfg["prior"], spec), "target": target}


def _train_embeddings(cfg: DictConfig, run_dir: Path, input_dim: int, load: bool = True) -> torch.Tensor | None:
    """Training embeddings for evaluation-mode scoring, or None (the attack itself never uses them).
    Embeddings of another size than the victim's input are an error (evaluation would fail on them
    too); ``load=False`` only checks that."""
    rcfg = cfg.reconstruct
    if not rcfg.score_with_train:
        return None
    base = Path(rcfg.embeddings_dir).expanduser() if rcfg.get("embeddings_dir") else Path(run_dir)
    path = base / "embed" / "embeddings.safetensors"
    if not path.is_file():
        if rcfg.get("embeddings_dir"):
            hint = (f" ({base} is an embed/ folder itself: give the run folder that holds it, {base.parent})"
                    if (base / "embeddings.safetensors").is_file() else "")
            raise DataError(f"reconstruct.embeddings_dir: no training embeddings at {path}{hint}")
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            dim = int(f.get_slice("train_x").get_shape()[1])
    except Exception as err:  # noqa: BLE001 - any read failure means a corrupt file
        raise DataError(f"training embeddings are corrupt: {path}: {err}") from None
    if dim != input_dim:
        raise ModelMismatchError(
            f"embedding size mismatch: the training embeddings in {path} are {dim}-d but the victim takes "
            f"{input_dim}-d inputs; point reconstruct.embeddings_dir at the run whose embeddings trained the "
            f"victim, or set reconstruct.score_with_train=false")
    if not load:
        return None
    from .embed import load_embeddings

    return load_embeddings(base).train_x


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    """Reconstruct candidates from the victim (``reconstruct.victim_dir`` or ``run_dir/classifier``)."""
    from .training import run_on_every_rank

    run_dir = Path(run_dir)
    victim_dir = victim_dir_of(cfg, run_dir)
    victim, spec = load_victim(victim_dir)
    plan = _plan(cfg, spec, victim, victim_dir)
    if distributed.is_rank_zero():
        check_stationarity(cfg, run_dir, victim, spec, plan)
    # Runs are independent: each rank optimises its own runs on its own device (no DDP all-reduce).
    return run_on_every_rank(cfg, run_dir, "reconstruct", _work, cfg, run_dir, victim, spec, plan) or {}


# The victim's relative KKT residual at its own training set above which the stage warns that the victim is far from a
# stationary point: 0 = its parameters are exactly the KKT combination of its training samples' gradients, 1 = that
# combination explains none of them. Measured: the default victim 0.006, a no-weight-decay victim trained 3 epochs
# (fits its 20 samples) 0.96, the reference preset with a capped victim 0.94.
FAR_FROM_STATIONARY = 0.5


def check_stationarity(cfg: DictConfig, run_dir: Path, victim: VictimMLP, spec: dict, plan: dict) -> float | None:
    """The victim's KKT residual at its training set (:func:`kkt_residual_at`), with a warning when it is above
    :data:`FAR_FROM_STATIONARY`; None (nothing to check) in attacker mode, where the training set is unknown."""
    if _train_embeddings(cfg, run_dir, victim.input_dim) is None:  # also checks their size against the victim's
        return None
    from .embed import load_embeddings

    base = Path(cfg.reconstruct.embeddings_dir).expanduser() if cfg.reconstruct.get("embeddings_dir") else Path(run_dir)
    emb = load_embeddings(base)
    residual = kkt_residual_at(victim, spec, emb.train_x.float(), emb.train_y, form=plan["form"],
                               multipliers=plan["rcfg"]["multipliers"], target=plan["target"])["residual"]
    if residual > FAR_FROM_STATIONARY:
        log.warning("the victim is far from a stationary point of its training loss: its KKT residual at its training "
                    "set is %.3g (0 = stationary; near 1 = its parameters are not explained by its training samples, "
                    "and nothing can be reconstructed from them). A victim trained longer, with weight decay and a "
                    "decaying learning rate, gets closer (classifier=default reaches 0.006); reconstructing anyway",
                    residual)
    else:
        log.info("the victim's KKT residual at its training set: %.3g (0 = stationary, near 1 = nothing to reconstruct)",
                 residual)
    return residual


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# trainer.precision for this stage: what each Lightning precision means here, or why it cannot apply.
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
UNSUPPORTED_PRECISIONS = {
    "16-mixed": "float16's range (6e-5 to 65504) under- and overflows the KKT residuals and their gradients, and its "
                "GradScaler skips every run's step whenever one run's gradient is non-finite",
    "16-true": "float16 candidates and optimiser state cannot resolve the small relative KKT losses",
    "bf16-true": "bfloat16 candidates and optimiser state (8 significant bits) cannot resolve the small relative KKT losses",
}


def stage_precision(cfg: DictConfig) -> str:
    """``trainer.precision`` as the reconstruct stage applies it (its Trainer gets this value):

    * ``32-true``: the candidates and the objective in ``reconstruct.dtype`` (float32 or float64);
    * ``64-true``: float64 throughout; needs ``reconstruct.dtype=float64`` (a float32 setting is refused, not overridden);
    * ``bf16-mixed``: bfloat16 autocast of the objective's matrix products (candidates, optimiser and loss sums stay
      float32); needs ``reconstruct.dtype=float32`` (autocast leaves float64 alone). Measured less accurate than
      float32 (README, benchmarks/bench_precision.py): an option, not a default;
    * anything else (16-mixed, 16-true, bf16-true, transformer-engine) is refused with the reason.
    """
    raw = str(cfg.trainer.get("precision", "32-true"))
    precision = PRECISION_ALIASES.get(raw, raw)
    dtype = str(cfg.reconstruct.dtype)
    if precision == "32-true":
        return precision
    if precision == "64-true":
        if dtype != "float64":
            raise ConfigError("trainer.precision=64-true runs the reconstruction in float64, but reconstruct.dtype="
                              f"{dtype}: set reconstruct.dtype=float64 as well (reconstruct.dtype alone is enough to "
                              "reconstruct in float64 while the other stages keep trainer.precision=32-true)")
        return precision
    if precision == "bf16-mixed":
        if dtype != "float32":
            raise ConfigError(f"trainer.precision=bf16-mixed autocasts float32 products to bfloat16, but reconstruct.dtype={dtype} "
                              "(autocast leaves float64 alone): set reconstruct.dtype=float32, or trainer.precision=32-true")
        return precision
    why = UNSUPPORTED_PRECISIONS.get(precision, "it is not one of 32-true, 64-true, bf16-mixed")
    raise ConfigError(f"trainer.precision={raw} cannot apply to the reconstruct stage: {why}. "
                      "Use 32-true (reconstruct.dtype picks float32/float64), 64-true or bf16-mixed")


def trainer_settings(cfg: DictConfig) -> dict:
    """The reconstruct stage's own Trainer settings, over ``trainer.*`` (which reaches it whole: accelerator,
    devices, precision per :func:`stage_precision`, ...). Logging and checkpoint cadences are in optimisation steps;
    a Lightning step runs :func:`inner_steps` of them."""
    rcfg = cfg.reconstruct
    n = inner_steps(rcfg)
    return {"max_steps": int(rcfg.steps), "precision": stage_precision(cfg), "num_sanity_val_steps": 0,
            "log_every_n_steps": max(1, min(int(rcfg.log_every_n_steps) or n, int(rcfg.steps)) // n)}


def _relative_to(run_dir: Path, path: str | Path) -> str:
    """``path`` as recorded in run files: relative to ``run_dir``, so a copied or moved run_dir's files are the same."""
    return Path(os.path.relpath(Path(path).expanduser().resolve(), Path(run_dir).expanduser().resolve())).as_posix()


def _make_trainer(cfg: DictConfig, run_dir: Path, steps: int, **overrides) -> L.Trainer:
    from .training import make_trainer

    return make_trainer(cfg, run_dir, "reconstruct", **{**trainer_settings(cfg), "max_steps": steps, **overrides})


# ----------------------------------------------------------------------------- runs per batch (memory)

MAX_AUTO_RUNS = 128  # runs_per_batch=auto never batches more (one H200: K=64 1.31M, K=256 1.39M candidate-steps/s; docs/performance.md)
MEMORY_FRACTION = {"cuda": 0.85, "cpu": 0.5}  # of the free memory auto may plan for (CPU RAM is shared)


def run_memory_bytes(objective: Objective, m: int, input_dim: int, dtype: torch.dtype) -> int:
    """Estimated peak memory of one run during an optimisation step (bytes): 4 |theta| (the run's parameter
    gradient and the residual's temporaries) + 5.5 m sum(hidden widths) (activations and backpropagated errors,
    saved for the backward) + 6 m D (candidates, their gradient, Adam's two moments, temporaries) floats.
    Coefficients fitted to peaks measured on the CPU with torch's memory profiler (benchmarks/bench_reconstruct.py
    --memory): within -8 %..+21 % of them for victims 64-1000-1 .. 768-1000-1000-1, m = 200..1000 (the kkt objective;
    other objectives add their own, :meth:`Objective.extra_floats`, not fitted)."""
    theta = sum(p.numel() for p in objective.victim_params())
    widths = [p.shape[0] for p in objective.victim_params() if p.dim() == 2]  # each layer's output width
    hidden, out = sum(widths[:-1]), widths[-1]
    lam = math.prod(objective.lambda_shape(m))
    floats = 4.0 * theta + 5.5 * m * hidden + 6.0 * m * input_dim + 6.0 * lam + 4.0 * m * out
    floats += objective.extra_floats(m)  # what the objective holds beyond (the projection's m x m Gram, Jacobian)
    return int(floats * torch.finfo(dtype).bits // 8)


def peak_step_memory(module_for: Any, K: int, device: torch.device) -> int:
    """Peak CUDA memory (bytes, above what was allocated before) of building K runs (``module_for(K)``) and taking
    two optimisation steps on ``device``."""
    gc.collect()  # an earlier probe's module may still be alive in a reference cycle: it would count in ``base``
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    module = module_for(K).to(device)
    opt = module.configure_optimizers()
    module.optimization_steps(opt, 2)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del module, opt
    torch.cuda.empty_cache()
    return peak


def measure_run_memory(module_for: Any, device: torch.device) -> tuple[int, int]:
    """(bytes per run, fixed bytes) of one optimisation step, measured on a CUDA device: peak memory of K = 1 and
    K = 2 runs (``module_for(K)`` builds the module). A few steps' work, on the device that will run the batches."""
    # A first probe, not counted: the first step on a device allocates cuBLAS workspaces once for the process, which
    # would make K = 1 look dearer than it is and K = 2's increment (the per-run bytes) far too small.
    peak_step_memory(module_for, 1, device)
    peaks = [peak_step_memory(module_for, K, device) for K in (1, 2)]
    per_run = max(1, peaks[1] - peaks[0])
    return per_run, max(0, peaks[0] - per_run)


def available_memory(device: torch.device) -> int:
    """Free memory for new tensors on ``device`` (bytes): CUDA's free memory (``torch.cuda.mem_get_info``), or the
    available RAM (psutil, else /proc/meminfo's MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ConfigError("reconstruct.runs_per_batch=auto cannot tell the free memory here (no psutil, no /proc/meminfo): "
                      "set reconstruct.runs_per_batch to a number")


def auto_runs_per_batch(per_run: int, fixed: int, free: int, runs: int, fraction: float = 0.85,
                        interrupted: int | None = None) -> int:
    """K for ``runs_per_batch=auto``: the largest power of two (so a rerun with a little more or less free memory
    picks the same K, and resumes the same batches) whose runs fit in ``fraction`` of ``free`` bytes, at most
    :data:`MAX_AUTO_RUNS` and at most ``runs`` (the rank's runs; then exactly ``runs``: one batch). ``interrupted``:
    the size of a batch a killed attempt left a checkpoint of; kept when it still fits, so that batch resumes."""
    fits = int((free * fraction - fixed) // max(1, per_run))
    if interrupted is not None and 1 <= interrupted <= fits:
        return int(interrupted)
    if fits < 1:
        raise ConfigError(f"reconstruct.runs_per_batch=auto: one run needs ~{per_run / 2**30:.2f} GiB but "
                          f"{free / 2**30:.2f} GiB are free; free memory, use a smaller victim or fewer candidates")
    k = 1 << (min(fits, MAX_AUTO_RUNS).bit_length() - 1)
    return max(1, min(k, int(runs)))


def _interrupted_batch(run_dir: Path, rank: int, world: int) -> int | None:
    """Size of this rank's batch whose checkpoint a killed attempt left (its folder names its first and last run)."""
    from .training import checkpoint_dir

    for folder in sorted(checkpoint_dir(run_dir, "reconstruct").glob("runs_*-*_*")):
        try:
            first, last = (int(v) for v in folder.name.split("_")[1].split("-"))
        except ValueError:
            continue
        if first % world == rank and any(folder.glob("*.ckpt")):
            return len([r for r in range(first, last + 1, world) if not run_path(run_dir, r).is_file()]) or None
    return None


def runs_per_batch(rcfg: dict, module_for: Any, objective: Objective, m: int, input_dim: int, device: torch.device,
                   run_dir: Path, rank: int, world: int) -> int:
    """``reconstruct.runs_per_batch``, or for ``auto`` K from the device's free memory: per-run memory measured on
    CUDA (:func:`measure_run_memory`), estimated on the CPU (:func:`run_memory_bytes`)."""
    if rcfg["runs_per_batch"] != "auto":
        return int(rcfg["runs_per_batch"])
    dtype = DTYPES[rcfg["dtype"]]
    if device.type == "cuda":
        per_run, fixed = measure_run_memory(module_for, device)
        how = "measured"
    else:
        per_run = run_memory_bytes(objective, m, input_dim, dtype)
        fixed = sum(p.numel() * p.element_size() for p in objective.victim_params())
        how = "estimated"
    free = available_memory(device)
    runs = len(range(rank, int(rcfg["num_runs"]), world))
    K = auto_runs_per_batch(per_run, fixed, free, runs, MEMORY_FRACTION.get(device.type, 0.5),
                            _interrupted_batch(run_dir, rank, world))
    log.info("reconstruct.runs_per_batch=auto: K=%d on %s (%.1f MiB per run %s, %.0f MiB free)", K, device,
             per_run / 2**20, how, free / 2**20)
    return K


def _device(device_kw: dict) -> torch.device:
    return torch.device("cuda", device_kw["devices"][0]) if device_kw["accelerator"] == "cuda" else torch.device("cpu")


def batch_name(run_ids: Sequence[int], hparams: Sequence[dict]) -> str:
    """Checkpoint folder of one batch of runs: names its runs, so a resumed job finds the same batch (``/2``: the
    stacked-parameter checkpoints; folders of the earlier per-run layout are not resumed, and removed at the end)."""
    tag = fingerprint("reconstruct-batch/2", list(run_ids), list(hparams))
    return f"runs_{run_ids[0]:05d}-{run_ids[-1]:05d}_{tag}"


def _work(rank: int, world: int, device_kw: dict, cfg: DictConfig, run_dir: Path, victim: VictimMLP, spec: dict,
          plan: dict) -> dict | None:
    """One rank's runs (:func:`recon_lightning.sharded.run_shard`: run r on rank r % world, K runs a batch,
    each run's file written before the next batch starts); rank 0 merges every run into candidates.safetensors."""
    from .sharded import ShardedWork, run_shard

    rcfg, hps = plan["rcfg"], plan["hparams"]
    num_runs, steps = int(rcfg["num_runs"]), int(rcfg["steps"])
    dtype = DTYPES[rcfg["dtype"]]
    train_x = _train_embeddings(cfg, run_dir, victim.input_dim)
    y = candidate_labels(int(spec["num_classes"]), plan["per_class"])
    mean_norm = (spec.get("embedding") or {}).get("mean_norm")
    objective = build_objective(victim, spec, rcfg, plan["form"], dtype, target=plan["target"])
    input_mean = victim.input_offset().detach().cpu()
    probe = lambda k: ReconstructionModule(objective, list(range(k)), [hps[0]] * k, y, victim.input_dim,  # noqa: E731
                                           {**rcfg, "compile": False}, plan["prior"], mean_norm, dtype, input_mean=input_mean)
    K = runs_per_batch(rcfg, probe, objective, len(y), victim.input_dim, _device(device_kw), run_dir, rank, world)
    common_meta = {"form": plan["form"], "prior": plan["prior"], "activation": rcfg["activation"], "dtype": rcfg["dtype"],
                   "objective": objective.name, "target": rcfg.get("target", "theta"),
                   "multipliers": rcfg["multipliers"], "lambda_per_candidate": bool(rcfg["lambda_per_candidate"]),
                   "seed": plan["seed"], "victim_dir": _relative_to(run_dir, victim_dir_of(cfg, run_dir))}
    log.info("reconstruct: %d runs of %d steps, K=%d per batch, form %s, prior %s", num_runs, steps, K, plan["form"],
             plan["prior"])
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    def finished(runs: list[int]) -> set[int]:
        """Runs whose file is on disk, made with this run's hyperparameters and step count (resume). Compared as
        JSON, as the file stores them: a failed run's NaN hyperparameter equals itself there."""
        done = set()
        for r in runs:
            loaded = read_run(run_path(run_dir, r))
            if (loaded is not None and _as_json(loaded[1].get("hparams")) == _as_json(hps[r])
                    and loaded[1].get("steps_planned") == steps):
                done.add(r)
        return done

    def run_batch(batch) -> None:
        module = ReconstructionModule(objective, batch.ids, [hps[r] for r in batch.ids], y, victim.input_dim, rcfg,
                                      plan["prior"], mean_norm, dtype, input_mean=input_mean)
        trainer = batch.trainer(**trainer_settings(cfg), progress=(inner_steps(cfg.reconstruct), "step"),
                                progress_title=f"reconstruct runs {batch.ids[0]}..{batch.ids[-1]} of {num_runs}")
        trainer.fit(module, ckpt_path=batch.resume_from, weights_only=True)
        for res in module.results():
            extra = {**common_meta, "steps_planned": steps, "rank": batch.rank}
            if train_x is not None and res["status"] == "ok":
                extra["recon_score"] = recon_score(res["x"].cpu(), train_x)
            write_run(run_dir, res, hps[res["run"]], extra)
            if batch.logger and res["status"] == "ok":
                batch.logger.log_metrics({"run": res["run"], "run_final_loss": res["final_loss"],
                                          **({"run_recon_score": extra["recon_score"]} if "recon_score" in extra else {})})
            log.info("run %d: %s, relative KKT loss %.4g%s", res["run"], res["status"], res["final_loss"],
                     f", recon_score {extra['recon_score']:.4f}" if "recon_score" in extra else "")

    def merge(logger) -> dict:
        summary = merge_runs(run_dir, num_runs, train_x, common_meta)
        summary.update(form=plan["form"], prior=plan["prior"], world_size=world)
        if logger:
            logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return summary

    work = ShardedWork(stage="reconstruct", what="runs", items=range(num_runs), batch_size=K,
                       checkpoint_every=int(rcfg["checkpoint_every_n_steps"]), finished=finished,
                       batch_name=lambda ids: batch_name(ids, [hps[r] for r in ids]), run_batch=run_batch, merge=merge,
                       wait_timeout_s=float(rcfg["wait_timeout_s"]), poll_s=1.0)
    return run_shard(work, cfg, run_dir, rank, world, device_kw)


STAGE = Stage(
    name="reconstruct",
    run=run_stage,
    sections=[Section("reconstruct", ReconstructConfig)],
    config_keys=["reconstruct", "trainer.precision", "seed"],  # the whole section: objective and target included
    cadence_keys=["reconstruct.log_every_n_steps", "reconstruct.checkpoint_every_n_steps", "reconstruct.wait_timeout_s"],
    # run r is the same run whatever the total: raising the count only adds the missing runs
    resumable_keys=["reconstruct.num_runs", "reconstruct.runs_per_batch"],
    all_ranks=True,
    check=check_config,
    inputs=["classifier/model.safetensors", "classifier/victim.json", "embed/embeddings.safetensors",
            # a victim trained elsewhere, and the training set it is scored with
            "{reconstruct.victim_dir}/model.safetensors", "{reconstruct.victim_dir}/victim.json",
            "{reconstruct.victim_dir}/init.safetensors",  # reconstruct.target=displacement
            "{reconstruct.embeddings_dir}/embed/embeddings.safetensors"],
    outputs=["reconstruct/candidates.safetensors", "reconstruct/runs/*.safetensors"],
)
