"""Stage 3: reconstruct training-set candidates from the victim's parameters alone.

We optimise candidate inputs x^ and multipliers lambda until the KKT (or, for weight-decay
victims, stationarity) condition of :mod:`recon_lightning.kkt` reproduces the victim's fixed
parameters. This module holds the Lightning side: the candidates as parameters, the per-run
optimisers, run files, merging and scoring.

Many independent runs (different seeds and hyperparameters) are optimised at once as one
(K, m, D) tensor program. Each run has its own optimiser parameter group (own learning rate) and
is masked out if its loss turns NaN/inf. Finished runs are written to
``reconstruct/runs/run_XXXXX.safetensors`` before the next batch starts, and the running batch
keeps a Lightning checkpoint (``reconstruct/checkpoints/runs_*/last.ckpt``), so a killed job
resumes where it stopped; under DDP run ``r`` goes to rank ``r % world_size``. Rank 0 merges all
runs into ``reconstruct/candidates.safetensors``. Candidates are always written in embedding
coordinates (a centred victim's mean added back).
"""

from __future__ import annotations

import json
import logging
import math
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

from .errors import ConfigError, DataError, ModelMismatchError
from .kkt import (ACTIVATIONS, DTYPES, MULTIPLIERS, KKTObjective, fit_multipliers, prior_penalty, resolve_form,
                  resolve_prior)
from .matching import best_matches
from .storage import fingerprint, load_tensors, save_tensors
from .victim import VictimMLP, check_given_victim, load_victim

log = logging.getLogger(__name__)

# name -> how a [low, high] range is sampled
HPARAMS = {"init_scale": "log", "lr": "log", "lambda_lr": "log", "lambda_min": "uniform", "alpha": "uniform"}


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
        if name == "alpha" and lo <= 0:
            raise ConfigError(f"reconstruct.alpha (sharpness of the smooth ReLU derivative) must be > 0, got {value!r}")
        if name == "lambda_min" and lo < 0:
            raise ConfigError(f"reconstruct.lambda_min must be >= 0 (multipliers are non-negative), got {value!r}")
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


# ----------------------------------------------------------------------------- the Lightning module


def candidate_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Class of each candidate: ``per_class`` candidates for each class, class-major."""
    return torch.arange(num_classes).repeat_interleave(per_class)


class ReconstructionModule(L.LightningModule):
    """K runs' candidates and multipliers as parameters; the victim is fixed (in ``objective``)."""

    def __init__(self, objective: KKTObjective, run_ids: Sequence[int], hparams: Sequence[dict], y: torch.Tensor,
                 input_dim: int, rcfg: dict, prior: str, mean_norm: float | None, dtype: torch.dtype,
                 input_mean: torch.Tensor | None = None):
        super().__init__()
        self.automatic_optimization = False  # per-run masking of failed runs needs manual steps
        self.objective = objective
        self.run_ids, self.hp = list(run_ids), list(hparams)
        self.rcfg, self.prior, self.mean_norm = rcfg, prior, mean_norm
        K, m = len(self.run_ids), len(y)
        self.register_buffer("y", y.clone(), persistent=False)
        self.register_buffer("alpha", torch.tensor([h["alpha"] for h in self.hp], dtype=dtype), persistent=False)
        self.register_buffer("lambda_min", torch.tensor([h["lambda_min"] for h in self.hp], dtype=dtype), persistent=False)
        # Candidates live in the victim's input coordinates (centred if it was trained centred); the
        # prior and everything written out use embedding coordinates, x + input_mean.
        mean = torch.zeros(input_dim, dtype=dtype) if input_mean is None else input_mean.detach().to(dtype)
        self.register_buffer("input_mean", mean.clone(), persistent=False)
        lam_shape = objective.lambda_shape(m)
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
        low, high = self.rcfg["box"]
        # The box bounds embedding coordinates, or (box_on=victim_input, the reference) the centred inputs.
        on_input = self.prior == "box" and self.rcfg.get("box_on", "embedding") == "victim_input"
        prior = prior_penalty(x if on_input else x + self.input_mean, self.prior, self.mean_norm, float(low), float(high))
        kkt = kkt_rel if self.rcfg["kkt_loss"] == "relative" else kkt_abs
        total = kkt + float(self.rcfg["lambda_weight"]) * lam_pen + float(self.rcfg["prior_weight"]) * prior
        return {"total": total, "kkt_abs": kkt_abs, "kkt_rel": kkt_rel, "lambda_penalty": lam_pen, "prior": prior}

    def _mark_failed(self, bad: torch.Tensor, step: int, what: str = "loss") -> None:
        for k in torch.nonzero(bad & self.active).flatten().tolist():
            self.errors[k] = f"{what} became non-finite (NaN/inf) at step {step}"
            log.warning("run %d: %s", self.run_ids[k], self.errors[k])
        self.active &= ~bad

    def optimization_step(self, opt: torch.optim.Optimizer, backward=None) -> dict[str, torch.Tensor] | None:
        """One step of every still-healthy run; the terms before the step, or None when every run failed.
        Used by training_step and, in a plain loop, by the benchmarks (``backward`` defaults to autograd's)."""
        terms = self.losses()
        self._mark_failed(~torch.isfinite(terms["total"].detach()), self.global_step)
        if not bool(self.active.any()):
            return None
        # Only finished-so-far-healthy runs contribute; runs are independent, so the gradient of
        # the sum is each run's own gradient.
        total = torch.where(self.active, terms["total"], torch.zeros_like(terms["total"])).sum()
        opt.zero_grad(set_to_none=True)
        (backward or torch.autograd.backward)(total)
        for k in torch.nonzero(~self.active).flatten().tolist():
            self.xs[k].grad = None  # Adam/SGD skip parameters without a gradient
            self.lams[k].grad = None
        opt.step()
        if self.rcfg.get("lambda_constraint", "project") == "project":
            with torch.no_grad():  # dual feasibility: lambda >= 0 exactly, not only penalised below lambda_min
                for lam in self.lams:
                    self.objective.project_lambda(lam)
        return terms

    def training_step(self, batch, batch_idx):
        terms = self.optimization_step(self.optimizers(), self.manual_backward)
        if terms is None:
            self.trainer.should_stop = True
            return None
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
        from .training import steps_loader

        return steps_loader(int(self.rcfg["steps"]))

    @torch.no_grad()
    def results(self) -> list[dict]:
        """Final state of every run: candidates, multipliers, losses recomputed at that state."""
        terms = self.losses(create_graph=False)
        self._mark_failed(~torch.isfinite(terms["total"]) | ~torch.isfinite(terms["kkt_rel"]), self.global_step, "final loss")
        x, lam = self.x().detach() + self.input_mean, self.lam().detach()
        lam_sum = self.objective.multiplier_sum(lam, self.y.expand(len(x), -1))
        out = []
        for k, run in enumerate(self.run_ids):
            lam_full = lam[k] if self.objective.per_class_multipliers else None
            out.append({
                "run": run, "x": x[k], "y": self.y, "lam": lam_sum[k], "lam_full": lam_full,
                "status": "ok" if bool(self.active[k]) else "failed", "error": self.errors.get(k),
                "final_loss": float(terms["kkt_rel"][k]), "final_loss_abs": float(terms["kkt_abs"][k]),
                "lambda_penalty": float(terms["lambda_penalty"][k]), "prior": float(terms["prior"][k]),
                "steps": int(self.global_step),
            })
        return out


# ----------------------------------------------------------------------------- scoring


def recon_score(candidates: torch.Tensor, train_x: torch.Tensor) -> float:
    """The sweep metric (evaluation mode only): mean over training samples of the cosine of their best candidate."""
    return float(best_matches("cosine", train_x, candidates)["best_score"].mean())


def kkt_residual_at(victim: VictimMLP, spec: dict, x: torch.Tensor, y: torch.Tensor, form: str = "auto",
                    steps: int = 300, lr: float = 0.05, multipliers: str = "runner_up") -> dict:
    """How well the victim's parameters are explained by the KKT / stationarity condition at the points
    ``x`` (embedding coordinates, labels ``y``): the relative residual ||target - sum coef grad phi||^2 /
    ||target||^2 minimised over multipliers lambda >= 0 with the exact ReLU derivative
    (:func:`recon_lightning.kkt.fit_multipliers`).

    The same score for the true training set and for a run's candidates, so evaluations compare like with
    like: reconstruction can only find the training set if the victim is near a KKT point of it, and if
    candidates score lower than the truth, the objective is better explained by other points.
    """
    form = resolve_form(form, spec)
    objective = KKTObjective(victim, spec, form, "relu_sigmoid_grad", torch.float64, multipliers=multipliers)
    xc = x.to(torch.float64) - victim.input_offset().to(torch.float64)
    return {"form": form, "residual": fit_multipliers(objective, xc, y, steps=steps, lr=lr), "steps": int(steps)}


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
    """Cheap checks of reconstruct.* (values, ranges, choices), run by ``fit`` before any stage starts;
    what depends on the victim is checked again once it is loaded. A victim from elsewhere
    (``reconstruct.victim_dir``) is loaded now, and checked against the embeddings it is scored with."""
    _plan(cfg, {"num_classes": 2, "n_train": 1})
    if cfg.reconstruct.get("victim_dir"):
        victim, spec = load_victim(Path(cfg.reconstruct.victim_dir))
        _plan(cfg, spec)
        _train_embeddings(cfg, Path(cfg.run_dir), victim.input_dim, load=False)
        check_given_victim(cfg, victim)  # collapsed / misclassifying victims stop here (classifier.allow_unhealthy)


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
    if rcfg["multipliers"] not in MULTIPLIERS:
        raise ConfigError(f"reconstruct.multipliers must be one of {MULTIPLIERS}, got {rcfg['multipliers']!r}")
    if rcfg["lambda_constraint"] not in ("project", "penalty"):
        raise ConfigError(f"reconstruct.lambda_constraint must be project or penalty, got {rcfg['lambda_constraint']!r}")
    if rcfg["box_on"] not in ("embedding", "victim_input"):
        raise ConfigError(f"reconstruct.box_on must be embedding or victim_input, got {rcfg['box_on']!r}")
    if not isinstance(rcfg["lambda_per_candidate"], bool):
        raise ConfigError(f"reconstruct.lambda_per_candidate must be true or false, got {rcfg['lambda_per_candidate']!r}")
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
    return run_on_every_rank(cfg, run_dir, "reconstruct", _work, cfg, run_dir, victim, spec, plan) or {}


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def batch_name(run_ids: Sequence[int], hparams: Sequence[dict]) -> str:
    """Checkpoint folder of one batch of runs: names its runs, so a resumed job finds the same batch."""
    tag = fingerprint("reconstruct-batch", list(run_ids), list(hparams))
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
    objective = KKTObjective(victim, spec, plan["form"], rcfg["activation"], dtype, multipliers=rcfg["multipliers"],
                             per_candidate=bool(rcfg["lambda_per_candidate"]))
    input_mean = victim.input_offset().detach().cpu()
    common_meta = {"form": plan["form"], "prior": plan["prior"], "activation": rcfg["activation"], "dtype": rcfg["dtype"],
                   "multipliers": rcfg["multipliers"], "lambda_per_candidate": bool(rcfg["lambda_per_candidate"]),
                   "seed": plan["seed"], "victim_dir": str(cfg.reconstruct.victim_dir or run_dir / "classifier")}
    log.info("reconstruct: %d runs of %d steps, K=%d per batch, form %s, prior %s", num_runs, steps,
             int(rcfg["runs_per_batch"]), plan["form"], plan["prior"])
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Our checkpoints hold the state after step N with global_step N, which is what resuming needs.
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")

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
        trainer = batch.trainer(max_steps=steps, precision="32-true", log_every_n_steps=int(rcfg["log_every_n_steps"]),
                                num_sanity_val_steps=0)
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

    work = ShardedWork(stage="reconstruct", what="runs", items=range(num_runs), batch_size=int(rcfg["runs_per_batch"]),
                       checkpoint_every=int(rcfg["checkpoint_every_n_steps"]), finished=finished,
                       batch_name=lambda ids: batch_name(ids, [hps[r] for r in ids]), run_batch=run_batch, merge=merge,
                       wait_timeout_s=float(rcfg["wait_timeout_s"]), poll_s=1.0)
    return run_shard(work, cfg, run_dir, rank, world, device_kw)
