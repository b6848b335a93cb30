"""Stage 3: reconstruct training-set candidates from the victim's parameters alone.

A ReLU network trained to convergence on a classification loss ends near a KKT point of the
margin-maximisation problem (Haim et al. 2022; Buzaglo et al. 2023)::

    theta = sum_j lambda_j y_j grad_theta phi(x_j),   lambda_j >= 0            (binary)
    theta = sum_j sum_{c != y_j} lambda_{j,c} grad_theta (phi_{y_j} - phi_c)(x_j)  (multiclass)

so we optimise candidate inputs x^ and multipliers lambda until the right-hand side matches the
victim's fixed parameters. ``sum_j lambda_j y_j grad phi(x_j)`` is the gradient of the scalar
``sum_j lambda_j y_j phi(x_j)``: one backward pass with ``create_graph=True``, no per-sample grads.

Many independent runs (different seeds and hyperparameters) are optimised at once: the
candidates of K runs form a (K, m, D) tensor, and the victim's weights are *expanded* to
(K, out, in) leaves, so one backward gives every run its own gradient (a batched matmul each
layer). Each run has its own optimiser parameter group (own learning rate) and is masked out
if its loss turns NaN/inf. Finished runs are written to ``reconstruct/runs/run_XXXXX.safetensors``
before the next batch starts, and the running batch keeps a Lightning checkpoint
(``reconstruct/checkpoints/runs_*/last.ckpt``), so a killed job resumes where it stopped; under
DDP run ``r`` goes to rank ``r % world_size``. Rank 0 merges all runs into ``reconstruct/candidates.safetensors``.
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from . import distributed
from .errors import ConfigError, DataError, ModelMismatchError
from .storage import fingerprint, load_tensors, save_tensors
from .victim import VictimMLP, load_victim

log = logging.getLogger(__name__)

FORMS = ("binary", "multiclass", "binary_wd", "multiclass_wd")
ACTIVATIONS = ("relu_sigmoid_grad", "softplus")
PRIORS = ("sphere", "norm", "box", "none")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# name -> how a [low, high] range is sampled
HPARAMS = {"init_scale": "log", "lr": "log", "lambda_lr": "log", "lambda_min": "uniform", "alpha": "uniform"}


# ----------------------------------------------------------------------------- activations


class ReluSigmoidGrad(torch.autograd.Function):
    """ReLU forward, ``sigmoid(alpha * x)`` as its derivative (Haim et al.'s smooth surrogate).

    The backward is written with differentiable torch ops, so a second backward through it
    (needed because the loss contains a gradient) gets the surrogate's own derivative.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, alpha = ctx.saved_tensors
        return grad_out * torch.sigmoid(alpha * x), None


def make_activation(kind: str, alpha: torch.Tensor):
    """The activation used in place of ReLU; ``alpha`` broadcasts against the pre-activations."""
    if kind == "relu_sigmoid_grad":
        return lambda h: ReluSigmoidGrad.apply(h, alpha)
    if kind == "softplus":
        return lambda h: F.softplus(alpha * h) / alpha
    raise ConfigError(f"reconstruct.activation must be one of {ACTIVATIONS}, got {kind!r}")


# ----------------------------------------------------------------------------- hyperparameters


def _range(value: Any, name: str) -> tuple[float, float]:
    """A config value that is a number (fixed) or [low, high] (sampled) -> (low, high)."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), float(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        lo, hi = float(value[0]), float(value[1])
        if lo > hi:
            raise ConfigError(f"reconstruct.{name}: range [{lo}, {hi}] has low > high")
        return lo, hi
    raise ConfigError(f"reconstruct.{name} must be a number or a [low, high] range, got {value!r}")


def sample_hparams(rcfg: DictConfig | dict, seed: int, run_id: int) -> dict:
    """Hyperparameters of one run: deterministic in (seed, run_id), whatever batch or rank runs it."""
    rng = np.random.default_rng([int(seed), int(run_id)])
    out: dict[str, Any] = {}
    for name, kind in HPARAMS.items():
        value = rcfg.get(name)
        if value is None and name == "lambda_lr":
            value = rcfg.get("lr")
        lo, hi = _range(value, name)
        if kind == "log":
            if lo <= 0:
                raise ConfigError(f"reconstruct.{name} must be > 0 (sampled log-uniformly), got {value!r}")
            out[name] = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if hi > lo else lo
        else:
            out[name] = float(rng.uniform(lo, hi)) if hi > lo else lo
        if name == "lambda_lr" and rcfg.get("lambda_lr") is None:
            out[name] = out["lr"]  # same learning rate unless set
    out["init_seed"] = int(rng.integers(2**62))
    return out


# ----------------------------------------------------------------------------- the objective


def resolve_form(form: str, spec: dict) -> str:
    """``auto``: multiclass if more than 2 classes; ``_wd`` (stationarity) if trained with weight decay."""
    if form != "auto":
        if form not in FORMS:
            raise ConfigError(f"reconstruct.form must be auto or one of {FORMS}, got {form!r}")
        return form
    base = "binary" if int(spec["num_classes"]) == 2 else "multiclass"
    return base + ("_wd" if float(spec.get("weight_decay") or 0.0) > 0 else "")


def resolve_prior(prior: str, spec: dict) -> str:
    if prior != "auto":
        if prior not in PRIORS:
            raise ConfigError(f"reconstruct.prior must be auto or one of {PRIORS}, got {prior!r}")
        return prior
    emb = spec.get("embedding") or {}
    if emb.get("normalize") == "l2":
        return "sphere"
    if (emb.get("backbone_name") or emb.get("backbone")) == "identity":
        return "box"
    return "norm" if emb.get("mean_norm") else "none"


class KKTObjective(nn.Module):
    """The victim's fixed parameters and the KKT residual for K runs of candidates at once.

    Weight-decay form: a victim trained with mean loss (1/n) sum_i l(x_i) plus an L2 penalty
    (wd/2)||theta||^2 (SGD/Adam ``weight_decay``) stops at a *stationary* point, not at a KKT
    point of margin maximisation: 0 = (1/n) sum_i l'_i grad phi(x_i) + wd * theta, i.e.
    ``wd * theta = (1/n) sum_i |l'_i| y_i grad phi(x_i)`` with |l'_i| in (0, 1) for logistic/CE
    losses (multiclass: the softmax probabilities of the wrong classes). So we match
    ``wd * theta`` with coefficients lambda / n, and keep lambda in [lambda_min, 1].
    """

    def __init__(self, victim: VictimMLP, spec: dict, form: str, activation: str, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.form, self.activation = form, activation
        self.num_classes = int(victim.num_classes)
        self.multiclass = form.startswith("multiclass")
        if self.multiclass != (victim.num_classes > 2):
            raise ConfigError(f"reconstruct.form={form} does not fit a victim with {victim.num_classes} classes")
        self.wd = form.endswith("_wd")
        wd = float(spec.get("weight_decay") or 0.0)
        if self.wd and wd <= 0:
            raise ConfigError(f"reconstruct.form={form} needs a victim trained with weight_decay > 0 (victim.json says {wd})")
        n = spec.get("n_train")
        if self.wd and not n:
            raise ConfigError("the weight-decay form needs the training-set size: victim.json has no n_train")
        self.target_scale = wd if self.wd else 1.0
        self.coef_scale = 1.0 / float(n) if self.wd else 1.0
        self.has_bias = [layer.bias is not None for layer in victim.layers]
        self.n_layers = len(victim.layers)
        for i, layer in enumerate(victim.layers):
            self.register_buffer(f"w{i}", layer.weight.detach().to(dtype).clone(), persistent=False)
            if layer.bias is not None:
                self.register_buffer(f"b{i}", layer.bias.detach().to(dtype).clone(), persistent=False)
        self.register_buffer("target_sq", torch.zeros((), dtype=dtype), persistent=False)
        self.target_sq = sum(((self.target_scale * p) ** 2).sum() for p in self.victim_params())

    def victim_params(self) -> list[torch.Tensor]:
        out = []
        for i in range(self.n_layers):
            out.append(getattr(self, f"w{i}"))
            if self.has_bias[i]:
                out.append(getattr(self, f"b{i}"))
        return out

    def forward_runs(self, x: torch.Tensor, alpha: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The victim on candidates x (K, m, D) with per-run parameter copies; logits (K, m, out)."""
        act = make_activation(self.activation, alpha.view(-1, 1, 1))
        h, k = x, 0
        for i in range(self.n_layers):
            h = torch.bmm(h, params[k].transpose(1, 2))
            k += 1
            if self.has_bias[i]:
                h = h + params[k].unsqueeze(1)
                k += 1
            if i < self.n_layers - 1:
                h = act(h)
        return h

    def coefficients(self, lam: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Weights of the logits in the scalar whose gradient must equal the target, (K, m, out).

        binary: lambda_j * y_j (y in {-1, +1}); multiclass: for sample j of class y_j,
        sum_{c != y} lambda_{j,c} on logit y_j and -lambda_{j,c} on logit c.
        """
        if not self.multiclass:
            return (self.coef_scale * lam * (2.0 * y.to(lam.dtype) - 1.0)).unsqueeze(-1)
        onehot = F.one_hot(y, self.num_classes).to(lam.dtype)
        off = lam * (1.0 - onehot)
        return self.coef_scale * (onehot * off.sum(-1, keepdim=True) - off)

    def kkt(self, x: torch.Tensor, lam: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor,
            create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-run residual ||target - sum coef grad phi||^2 (absolute, relative), each (K,)."""
        K = x.shape[0]
        # Per-run leaves: expanded views (no copy) whose gradients are per run.
        params = [p.expand(K, *p.shape).requires_grad_() for p in self.victim_params()]
        with torch.enable_grad():
            out = self.forward_runs(x, alpha, params)
            s = (self.coefficients(lam, y) * out).sum()
            grads = torch.autograd.grad(s, params, create_graph=create_graph)
        res = torch.zeros(K, dtype=x.dtype, device=x.device)
        for p, g in zip(self.victim_params(), grads):
            res = res + (self.target_scale * p - g).pow(2).flatten(1).sum(1)
        return res, res / self.target_sq

    def lambda_penalty(self, lam: torch.Tensor, y: torch.Tensor, lambda_min: torch.Tensor) -> torch.Tensor:
        """relu(lambda_min - lambda)^2 (and, for the weight-decay form, lambda <= 1) per run (K,)."""
        lmin = lambda_min.view(-1, *([1] * (lam.dim() - 1)))
        low = F.relu(lmin - lam).pow(2)
        if self.multiclass:
            mask = 1.0 - F.one_hot(y, self.num_classes).to(lam.dtype)
            low = low * mask
            pen = low.flatten(1).sum(1)
            if self.wd:  # wrong-class softmax probabilities sum to at most 1
                pen = pen + F.relu((lam * mask).sum(-1) - 1.0).pow(2).sum(1)
            return pen
        pen = low.sum(1)
        if self.wd:  # |l'| <= 1 for the logistic loss
            pen = pen + F.relu(lam - 1.0).pow(2).sum(1)
        return pen


def prior_penalty(x: torch.Tensor, prior: str, mean_norm: float | None, box: Sequence[float]) -> torch.Tensor:
    """Keeps candidates in the embedding space's range, per run (K,)."""
    if prior == "none":
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if prior == "sphere":  # l2-normalised embeddings live on the unit sphere
        return (x.norm(dim=-1) - 1.0).pow(2).sum(1)
    if prior == "norm":  # unnormalised embeddings: keep ||x|| near the training set's mean norm
        ref = float(mean_norm or 1.0)
        return (x.norm(dim=-1) / ref - 1.0).pow(2).sum(1)
    if prior == "box":  # raw pixels
        lo, hi = float(box[0]), float(box[1])
        return (F.relu(lo - x).pow(2) + F.relu(x - hi).pow(2)).flatten(1).sum(1)
    raise ConfigError(f"unknown prior {prior!r}; choose from {PRIORS}")


# ----------------------------------------------------------------------------- the Lightning module


def candidate_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Class of each candidate: ``per_class`` candidates for each class, class-major."""
    return torch.arange(num_classes).repeat_interleave(per_class)


class _Steps(IterableDataset):
    """An endless stream of empty batches: the optimisation has no data, ``max_steps`` ends it."""

    def __iter__(self):
        while True:
            yield 0


class ReconstructionModule(L.LightningModule):
    """K runs' candidates and multipliers as parameters; the victim is fixed (in ``objective``)."""

    def __init__(self, objective: KKTObjective, run_ids: Sequence[int], hparams: Sequence[dict], y: torch.Tensor,
                 input_dim: int, rcfg: dict, prior: str, mean_norm: float | None, dtype: torch.dtype):
        super().__init__()
        self.automatic_optimization = False  # per-run masking of failed runs needs manual steps
        self.objective = objective
        self.run_ids, self.hp = list(run_ids), list(hparams)
        self.rcfg, self.prior, self.mean_norm = rcfg, prior, mean_norm
        K, m = len(self.run_ids), len(y)
        self.register_buffer("y", y.clone(), persistent=False)
        self.register_buffer("alpha", torch.tensor([h["alpha"] for h in self.hp], dtype=dtype), persistent=False)
        self.register_buffer("lambda_min", torch.tensor([h["lambda_min"] for h in self.hp], dtype=dtype), persistent=False)
        lam_shape = (m, objective.num_classes) if objective.multiclass else (m,)
        xs, lams = [], []
        for h in self.hp:
            # Own generator per run: a run's init does not depend on which batch it is in.
            g = torch.Generator().manual_seed(h["init_seed"])
            xs.append(nn.Parameter((torch.randn(m, input_dim, generator=g, dtype=torch.float64) * h["init_scale"]).to(dtype)))
            lams.append(nn.Parameter(torch.rand(lam_shape, generator=g, dtype=torch.float64).to(dtype)))
        self.xs, self.lams = nn.ParameterList(xs), nn.ParameterList(lams)
        self.register_buffer("active", torch.ones(K, dtype=torch.bool), persistent=False)
        self.errors: dict[int, str] = {}
        self.last_rel = torch.full((K,), float("nan"))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Which runs have failed travels with the candidates (plain tensors and strings: weights_only loads it).
        checkpoint["reconstruction"] = {"run_ids": list(self.run_ids), "active": self.active.cpu(),
                                        "errors": {int(k): v for k, v in self.errors.items()}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("reconstruction") or {}
        if state.get("run_ids") != list(self.run_ids):
            raise DataError(f"checkpoint holds runs {state.get('run_ids')}, not {self.run_ids}; delete it to start over")
        self.active.copy_(state["active"])
        self.errors = {int(k): v for k, v in state["errors"].items()}

    def x(self) -> torch.Tensor:
        return torch.stack(list(self.xs))

    def lam(self) -> torch.Tensor:
        return torch.stack(list(self.lams))

    def losses(self, create_graph: bool = True) -> dict[str, torch.Tensor]:
        x, lam = self.x(), self.lam()
        kkt_abs, kkt_rel = self.objective.kkt(x, lam, self.y.expand(len(x), -1), self.alpha, create_graph=create_graph)
        lam_pen = self.objective.lambda_penalty(lam, self.y.expand(len(x), -1), self.lambda_min)
        prior = prior_penalty(x, self.prior, self.mean_norm, self.rcfg["box"])
        kkt = kkt_rel if self.rcfg["kkt_loss"] == "relative" else kkt_abs
        total = kkt + float(self.rcfg["lambda_weight"]) * lam_pen + float(self.rcfg["prior_weight"]) * prior
        return {"total": total, "kkt_abs": kkt_abs, "kkt_rel": kkt_rel, "lambda_penalty": lam_pen, "prior": prior}

    def _mark_failed(self, bad: torch.Tensor, step: int, what: str = "loss") -> None:
        for k in torch.nonzero(bad & self.active).flatten().tolist():
            self.errors[k] = f"{what} became non-finite (NaN/inf) at step {step}"
            log.warning("run %d: %s", self.run_ids[k], self.errors[k])
        self.active &= ~bad

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        terms = self.losses()
        self._mark_failed(~torch.isfinite(terms["total"].detach()), self.global_step)
        if not bool(self.active.any()):
            self.trainer.should_stop = True
            return None
        # Only finished-so-far-healthy runs contribute; runs are independent, so the gradient of
        # the sum is each run's own gradient.
        total = torch.where(self.active, terms["total"], torch.zeros_like(terms["total"])).sum()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        for k in torch.nonzero(~self.active).flatten().tolist():
            self.xs[k].grad = None  # Adam/SGD skip parameters without a gradient
            self.lams[k].grad = None
        opt.step()
        rel = terms["kkt_rel"].detach()
        self.last_rel = rel.cpu()
        act = rel[self.active]
        self.log_dict({"kkt_rel_min": act.min(), "kkt_rel_median": act.median(), "active_runs": float(self.active.sum())},
                      prog_bar=True, on_step=True, batch_size=1)
        return None

    def configure_optimizers(self):
        groups = []
        for k, h in enumerate(self.hp):
            groups += [{"params": [self.xs[k]], "lr": h["lr"]}, {"params": [self.lams[k]], "lr": h["lambda_lr"]}]
        name = self.rcfg["optimizer"]
        if name == "adam":
            return torch.optim.Adam(groups)
        if name == "sgd":
            return torch.optim.SGD(groups, momentum=0.9)
        raise ConfigError(f"reconstruct.optimizer must be adam or sgd, got {name!r}")

    def train_dataloader(self):
        return DataLoader(_Steps(), batch_size=None)

    @torch.no_grad()
    def results(self) -> list[dict]:
        """Final state of every run: candidates, multipliers, losses recomputed at that state."""
        terms = self.losses(create_graph=False)
        self._mark_failed(~torch.isfinite(terms["total"]) | ~torch.isfinite(terms["kkt_rel"]), self.global_step, "final loss")
        x, lam = self.x().detach(), self.lam().detach()
        out = []
        for k, run in enumerate(self.run_ids):
            lam_k = lam[k]
            if self.objective.multiclass:
                off = lam_k * (1 - F.one_hot(self.y, self.objective.num_classes).to(lam_k.dtype))
                lam_sum, lam_full = off.sum(-1), off
            else:
                lam_sum, lam_full = lam_k, None
            out.append({
                "run": run, "x": x[k], "y": self.y, "lam": lam_sum, "lam_full": lam_full,
                "status": "ok" if bool(self.active[k]) else "failed", "error": self.errors.get(k),
                "final_loss": float(terms["kkt_rel"][k]), "final_loss_abs": float(terms["kkt_abs"][k]),
                "lambda_penalty": float(terms["lambda_penalty"][k]), "prior": float(terms["prior"][k]),
                "steps": int(self.global_step),
            })
        return out


# ----------------------------------------------------------------------------- scoring


def match_candidates(candidates: torch.Tensor, train_x: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Cosine matching between candidates (N, D) and training embeddings (M, D).

    Returns ``candidate_best_train`` / ``candidate_best_cos`` (N,): each candidate's nearest
    training sample; ``train_best_candidate`` / ``train_best_cos`` (M,): each training sample's
    best candidate; ``score``: mean over training samples of their best cosine.
    """
    if candidates.ndim != 2 or train_x.ndim != 2 or candidates.shape[1] != train_x.shape[1]:
        raise DataError(f"match_candidates needs (N, D) and (M, D) with the same D, got {tuple(candidates.shape)} and {tuple(train_x.shape)}")
    if len(candidates) == 0 or len(train_x) == 0:
        raise DataError("match_candidates: no candidates or no training samples to match")
    c = F.normalize(candidates.float(), dim=1)
    t = F.normalize(train_x.float(), dim=1)
    cand_cos, cand_idx = [], []
    train_cos = torch.full((len(t),), -2.0)
    train_idx = torch.zeros(len(t), dtype=torch.long)
    for start in range(0, len(c), chunk):
        sim = c[start : start + chunk] @ t.T  # (n, M)
        v, i = sim.max(1)
        cand_cos.append(v)
        cand_idx.append(i)
        tv, ti = sim.max(0)
        better = tv > train_cos
        train_cos[better], train_idx[better] = tv[better], ti[better] + start
    return {
        "candidate_best_cos": torch.cat(cand_cos), "candidate_best_train": torch.cat(cand_idx),
        "train_best_cos": train_cos, "train_best_candidate": train_idx, "score": float(train_cos.mean()),
    }


def kkt_residual_at(victim: VictimMLP, spec: dict, x: torch.Tensor, y: torch.Tensor, form: str = "auto",
                    steps: int = 300, lr: float = 0.05) -> dict:
    """How well the victim's parameters are explained by the KKT / stationarity condition *at the true
    training points* ``x`` (labels ``y``): the relative residual ||target - sum coef grad phi||^2 / ||target||^2
    minimised over multipliers lambda >= 0 (exact ReLU derivative).

    A diagnostic for evaluations: reconstruction can only find the training set if the victim is near a
    KKT point of it. If candidates reach a lower residual than the truth, the objective is better
    explained by other points, and failing to reconstruct says little about what the victim leaks.
    Multipliers are ``c * exp(u)`` (c: the best common scale, fitted in closed form; u: Adam), so the
    value is an upper bound on the minimum; the weight-decay form's bound lambda <= 1 is not imposed.
    """
    form = resolve_form(form, spec)
    objective = KKTObjective(victim, spec, form, "relu_sigmoid_grad", torch.float64)
    xs = x.to(torch.float64).unsqueeze(0)
    ys = y.long().unsqueeze(0)
    alpha = torch.tensor([1e6], dtype=torch.float64)  # sigmoid(1e6 h): ReLU's own derivative
    lam_shape = (1, len(x), objective.num_classes) if objective.multiclass else (1, len(x))
    with torch.no_grad():  # best common scale c for lambda = c * 1: <target, g> / <g, g>
        params = [p.expand(1, *p.shape).requires_grad_() for p in objective.victim_params()]
        with torch.enable_grad():
            out = objective.forward_runs(xs, alpha, params)
            g = torch.autograd.grad((objective.coefficients(torch.ones(lam_shape, dtype=torch.float64), ys) * out).sum(), params)
        dot = sum((objective.target_scale * p * gi[0]).sum() for p, gi in zip(objective.victim_params(), g))
        scale = float(dot / sum((gi ** 2).sum() for gi in g).clamp_min(1e-30))
    scale = max(scale, 1e-12)
    u = torch.zeros(lam_shape, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    best = float("inf")
    for _ in range(max(1, int(steps))):
        _, rel = objective.kkt(xs, scale * u.exp(), ys, alpha)
        best = min(best, float(rel.detach()))
        opt.zero_grad()
        rel.sum().backward()
        opt.step()
    with torch.no_grad():
        _, rel = objective.kkt(xs, scale * u.exp(), ys, alpha, create_graph=False)
    return {"form": form, "residual": min(best, float(rel)), "steps": int(steps)}


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
        raise DataError(f"all {num_runs} reconstruction runs failed (see {runs_dir(run_dir)}); try smaller reconstruct.lr")
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    summary = {"runs_ok": len(ok), "runs_failed": len(records) - len(ok), "candidates": len(tensors["x"]),
               "best_loss": min(rec["final_loss"] for rec in ok),
               "best_run": min(ok, key=lambda rec: rec["final_loss"])["run"]}
    if train_x is not None:
        match = match_candidates(tensors["x"], train_x)
        tensors.update({k: match[k] for k in ("candidate_best_cos", "candidate_best_train", "train_best_cos", "train_best_candidate")})
        scores = [rec["recon_score"] for rec in ok if rec.get("recon_score") is not None]
        summary.update({
            "recon_score": max(scores) if scores else match["score"],  # best single run (the sweep metric)
            "recon_score_union": match["score"],  # all runs' candidates together
            "frac_train_cos_ge_0.9": float((match["train_best_cos"] >= 0.9).float().mean()),
        })
    save_tensors(run_dir / "reconstruct" / "candidates.safetensors", tensors, {**meta, "runs": records, "summary": summary})
    return summary


# ----------------------------------------------------------------------------- the stage


def check_config(cfg: DictConfig) -> None:
    """Cheap checks of reconstruct.* (values, ranges, choices), run by ``fit`` before any stage starts;
    what depends on the victim is checked again once it is loaded. A victim from elsewhere
    (``reconstruct.victim_dir``) is loaded now, and checked against the embeddings it is scored with."""
    _plan(cfg, {"num_classes": 2, "n_train": 1})
    if cfg.reconstruct.get("victim_dir"):
        victim, spec = load_victim(Path(cfg.reconstruct.victim_dir))
        _plan(cfg, spec)
        _train_embeddings(cfg, Path(cfg.run_dir), victim.input_dim, load=False)


def _plan(cfg: DictConfig, spec: dict) -> dict:
    rcfg = OmegaConf.to_container(cfg.reconstruct, resolve=True)
    for key in ("num_runs", "runs_per_batch", "steps"):
        if int(rcfg[key]) < 1:
            raise ConfigError(f"reconstruct.{key} must be >= 1, got {rcfg[key]}")
    if int(rcfg["checkpoint_every_n_steps"]) < 0:
        raise ConfigError(f"reconstruct.checkpoint_every_n_steps must be >= 0 (0 = off), got {rcfg['checkpoint_every_n_steps']}")
    if rcfg["dtype"] not in DTYPES:
        raise ConfigError(f"reconstruct.dtype must be one of {list(DTYPES)}, got {rcfg['dtype']!r}")
    if rcfg["activation"] not in ACTIVATIONS:
        raise ConfigError(f"reconstruct.activation must be one of {ACTIVATIONS}, got {rcfg['activation']!r}")
    if rcfg["kkt_loss"] not in ("relative", "absolute"):
        raise ConfigError(f"reconstruct.kkt_loss must be relative or absolute, got {rcfg['kkt_loss']!r}")
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
    return {"rcfg": rcfg, "per_class": per_class, "seed": seed, "hparams": hps,
            "form": resolve_form(rcfg["form"], spec), "prior": resolve_prior(rcfg["prior"], spec)}


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
            raise DataError(f"reconstruct.embeddings_dir: no training embeddings at {path}")
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
    victim_dir = Path(cfg.reconstruct.victim_dir) if cfg.reconstruct.get("victim_dir") else run_dir / "classifier"
    victim, spec = load_victim(victim_dir)
    plan = _plan(cfg, spec)
    # Runs are independent: each rank optimises its own runs on its own device (no DDP all-reduce).
    return run_on_every_rank(cfg, run_dir, "reconstruct", _work, cfg, run_dir, victim, spec, plan)


def _make_trainer(cfg: DictConfig, run_dir: Path, steps: int, **overrides) -> L.Trainer:
    from .training import make_trainer

    return make_trainer(cfg, run_dir, "reconstruct", max_steps=steps, precision="32-true",
                        log_every_n_steps=int(cfg.reconstruct.log_every_n_steps), num_sanity_val_steps=0,
                        **overrides)


def batch_name(run_ids: Sequence[int], hparams: Sequence[dict]) -> str:
    """Checkpoint folder of one batch of runs: names its runs, so a resumed job finds the same batch."""
    tag = fingerprint("reconstruct-batch", list(run_ids), list(hparams))
    return f"runs_{run_ids[0]:05d}-{run_ids[-1]:05d}_{tag}"


def _work(rank: int, world: int, device_kw: dict, cfg: DictConfig, run_dir: Path, victim: VictimMLP, spec: dict,
          plan: dict) -> dict:
    from .training import build_logger, checkpoint_dir, checkpointing

    rcfg, hps = plan["rcfg"], plan["hparams"]
    num_runs, K, steps = int(rcfg["num_runs"]), int(rcfg["runs_per_batch"]), int(rcfg["steps"])
    dtype = DTYPES[rcfg["dtype"]]
    train_x = _train_embeddings(cfg, run_dir, victim.input_dim)
    y = candidate_labels(int(spec["num_classes"]), plan["per_class"])
    mean_norm = (spec.get("embedding") or {}).get("mean_norm")
    objective = KKTObjective(victim, spec, plan["form"], rcfg["activation"], dtype)
    common_meta = {"form": plan["form"], "prior": plan["prior"], "activation": rcfg["activation"], "dtype": rcfg["dtype"],
                   "seed": plan["seed"], "victim_dir": str(cfg.reconstruct.victim_dir or run_dir / "classifier")}

    mine = [r for r in range(num_runs) if r % world == rank]
    pending = []
    for r in mine:
        loaded = read_run(run_path(run_dir, r))
        if loaded is not None and loaded[1].get("hparams") == hps[r] and loaded[1].get("steps_planned") == steps:
            continue  # finished earlier (resume)
        pending.append(r)
    log.info("reconstruct rank %d/%d: %d runs, %d already done, %d to do (K=%d, form %s, prior %s)",
             rank, world, len(mine), len(mine) - len(pending), len(pending), K, plan["form"], plan["prior"])
    logger = build_logger(cfg, run_dir, "reconstruct")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    # Our checkpoints hold the state after step N with global_step N, which is what resuming needs.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    for b in range(0, len(pending), K):
        batch = pending[b : b + K]
        module = ReconstructionModule(objective, batch, [hps[r] for r in batch], y, victim.input_dim, rcfg,
                                      plan["prior"], mean_norm, dtype)
        # Long runs checkpoint every reconstruct.checkpoint_every_n_steps; a killed batch resumes there.
        every = int(rcfg["checkpoint_every_n_steps"])
        name = batch_name(batch, [hps[r] for r in batch])
        callbacks, resume_from = [], None
        if every > 0:
            callback, resume_from = checkpointing(run_dir, "reconstruct", every, name=name)
            callbacks.append(callback)
            if resume_from:
                log.info("runs %s: resuming from %s", batch, resume_from)
        trainer = _make_trainer(cfg, run_dir, steps, logger=logger, callbacks=callbacks, enable_checkpointing=every > 0,
                                default_root_dir=str(checkpoint_dir(run_dir, "reconstruct", name)), **device_kw)
        trainer.fit(module, ckpt_path=resume_from, weights_only=True)
        for res in module.results():
            extra = {**common_meta, "steps_planned": steps, "rank": rank}
            if train_x is not None and res["status"] == "ok":
                extra["recon_score"] = match_candidates(res["x"].cpu(), train_x)["score"]
            write_run(run_dir, res, hps[res["run"]], extra)
            if logger and res["status"] == "ok":
                logger.log_metrics({"run": res["run"], "run_final_loss": res["final_loss"],
                                    **({"run_recon_score": extra["recon_score"]} if "recon_score" in extra else {})})
            log.info("run %d: %s, relative KKT loss %.4g%s", res["run"], res["status"], res["final_loss"],
                     f", recon_score {extra['recon_score']:.4f}" if "recon_score" in extra else "")
        shutil.rmtree(checkpoint_dir(run_dir, "reconstruct", name), ignore_errors=True)  # its runs are on disk

    if rank != 0:
        return {"rank": rank, "runs": mine}
    # Rank 0 merges once every rank's run files exist (shared filesystem; works with any launcher).
    distributed.wait_for(lambda: all(run_path(run_dir, r).is_file() for r in range(num_runs)),
                         "the other ranks' reconstruction runs", timeout_s=float(rcfg["wait_timeout_s"]), poll_s=1.0)
    summary = merge_runs(run_dir, num_runs, train_x, common_meta)
    # Every run is on disk now: checkpoints left by batches of another runs_per_batch or world size go too.
    shutil.rmtree(checkpoint_dir(run_dir, "reconstruct"), ignore_errors=True)
    summary.update(form=plan["form"], prior=plan["prior"], world_size=world)
    if logger:
        logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        logger.finalize("success")
    return summary
