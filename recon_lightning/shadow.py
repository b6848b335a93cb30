"""Stage: shadow victims, and the selection score learned from them (Shokri et al.'s shadow models, applied to
reconstruction).

The auditor knows the domain but not the training set. So the stage trains *shadow victims* with the audited
victim's recipe (``classifier.*``) on the auditor's **public** samples (``data.n_public_per_class``: samples that
neither the training set nor the evaluation's held-out pool contains), reconstructs from each one with the
reconstruction's own settings (``reconstruct.*``; ``shadow.num_runs`` runs, by default as many as the audit), and,
since a shadow's training set is known, labels each of its candidates: *real* when its nearest neighbour among the
shadow's members and as many public non-members (victim's frame) is a member. A logistic regression on the candidates' training-free features
(:mod:`recon_lightning.candidate_features`, each as its percentile rank within its victim) then predicts which
candidates are real reconstructions; the select stage applies it to the audited victim's candidates.

How well the score transfers is measured here, where the truth is known: each shadow is scored by a regression
fitted on the *other* shadows (ROC AUC of real vs not, and the attribution of its top ``GRID_K`` diverse picks).

Writes ``shadow/scorer.json`` (features, coefficients, transfer figures, or ``available: false`` with the reason
when there are no public samples) and, per shadow, ``shadow/victim_<s>/`` (its embeddings, victim and candidates).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .config import Section, rule
from .errors import ConfigError, DataError, UnhealthyVictimError
from .stages import Stage
from .storage import load_json, save_json, save_tensors

log = logging.getLogger(__name__)

GRID_K = 24  # attribution of the top picks is measured at the report grid's size
SCORER_FORMAT = "recon_lightning.scorer/1"


@dataclass
class ShadowConfig:
    """Schema of ``shadow`` (values: configs/shadow/default.yaml)."""

    num_victims: int = rule(ge=1)
    num_runs: Optional[int] = rule(ge=1)  # None: reconstruct.num_runs
    nonmembers_per_class: int = rule(ge=1)
    regularization: float = rule(gt=0)


# ----------------------------------------------------------------------------- data


def public_samples(cfg: DictConfig, run_dir: Path):
    """The public split of the embeddings the audit evaluates with (``reconstruct.embeddings_dir`` or run_dir), as
    ``(embeddings, x, y)``; x is None when there is none."""
    from .embed import load_embeddings

    base = Path(cfg.reconstruct.embeddings_dir).expanduser() if cfg.reconstruct.get("embeddings_dir") else Path(run_dir)
    if not (base / "embed" / "embeddings.safetensors").is_file():
        return None, None, None
    emb = load_embeddings(base)
    if emb.public_x is None or len(emb.public_x) == 0:
        return emb, None, None
    return emb, emb.public_x.float(), emb.public_y.long()


def draw_shadow_split(public_y: torch.Tensor, members_per_class: list[int], nonmembers_per_class: int,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint member / non-member indices into the public samples, class-balanced like the audited training set."""
    gen = torch.Generator().manual_seed(seed)
    members, nonmembers = [], []
    for c, n in enumerate(members_per_class):
        pool = torch.nonzero(public_y == c).squeeze(1)
        need = n + nonmembers_per_class
        if len(pool) < need:
            raise DataError(f"shadow victims need {n} members + {nonmembers_per_class} non-members of class {c} from the "
                            f"public split, which has {len(pool)}; raise data.n_public_per_class or lower "
                            f"shadow.nonmembers_per_class")
        pool = pool[torch.randperm(len(pool), generator=gen)]
        members.append(pool[:n])
        nonmembers.append(pool[n:need])
    return torch.cat(members), torch.cat(nonmembers)


def shadow_num_runs(cfg: DictConfig) -> int:
    """Reconstruction runs per shadow victim: ``shadow.num_runs``, or as many as the audit runs (null), so that the
    features that count runs (agreement, density) read alike on shadows and on the audited victim."""
    return int(cfg.shadow.num_runs if cfg.shadow.get("num_runs") is not None else cfg.reconstruct.num_runs)


def _shadow_cfg(cfg: DictConfig, s: int) -> DictConfig:
    """The audited run's config for shadow ``s``: its own seed, :func:`shadow_num_runs` reconstruction runs, the
    victim and training set of its own folder, no logger of its own (the stage logs its summary)."""
    sc = copy.deepcopy(cfg)
    with open_dict(sc):
        sc.seed = int(cfg.seed) + 1000 * (s + 1)
        sc.reconstruct.num_runs = shadow_num_runs(cfg)
        sc.reconstruct.victim_dir = None
        sc.reconstruct.embeddings_dir = None
        sc.reconstruct.seed = None
        sc.logger.name = "none"
    return sc


# ----------------------------------------------------------------------------- labels, fit, transfer


def label_candidates(x: torch.Tensor, offset: torch.Tensor, members: torch.Tensor, nonmembers: torch.Tensor
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Whether each candidate's nearest neighbour (victim's frame) among members ∪ non-members is a member, and which."""
    from .matching import best_matches

    m = best_matches("cosine", x.float() - offset, torch.cat([members, nonmembers]).float() - offset)
    return (m["best_index"] < len(members)).numpy(), m["best_index"].numpy()


def fit_scorer(ranks: np.ndarray, labels: np.ndarray, regularization: float):
    from sklearn.linear_model import LogisticRegression

    if labels.min() == labels.max():
        raise DataError(f"every shadow candidate is labelled {bool(labels[0])}: the score cannot be learned "
                        f"(more shadow.num_runs or shadow.num_victims)")
    return LogisticRegression(C=1.0 / regularization, max_iter=2000).fit(ranks, labels)


def score(scorer: dict, ranks: np.ndarray) -> np.ndarray:
    """The learned probability that each candidate (rows of ``ranks``, :func:`candidate_features.percentile_ranks`)
    is a real reconstruction."""
    z = ranks @ np.asarray(scorer["coef"]) + float(scorer["intercept"])
    return 1.0 / (1.0 + np.exp(-z))


def diverse_top(x: torch.Tensor, scores: np.ndarray, k: int, max_cosine: float) -> list[int]:
    """The ``k`` best-scored rows of ``x``, skipping any within cosine ``max_cosine`` of one already taken
    (near-copies of one sample would show it k times)."""
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    chosen: list[int] = []
    for i in np.argsort(-scores, kind="stable").tolist():
        if chosen and float((xn[chosen] @ xn[i]).max()) >= max_cosine:
            continue
        chosen.append(i)
        if len(chosen) == k:
            break
    return chosen


def transfer_figures(shadows: list[dict], regularization: float, max_cosine: float) -> list[dict]:
    """Each shadow scored by a regression fitted on the others: ROC AUC of real vs not, and the attribution and
    distinct members of its top ``GRID_K`` diverse picks (against the chance level of its member share)."""
    from sklearn.metrics import roc_auc_score

    out = []
    for i, sh in enumerate(shadows):
        rest = [o for j, o in enumerate(shadows) if j != i]
        ranks = np.concatenate([o["ranks"] for o in rest])
        labels = np.concatenate([o["labels"] for o in rest])
        if labels.min() == labels.max() or sh["labels"].min() == sh["labels"].max():
            out.append({"shadow": i, "auc": None, "note": "one class only"})
            continue
        model = fit_scorer(ranks, labels, regularization)
        p = model.predict_proba(sh["ranks"])[:, 1]
        top = diverse_top(sh["xf"], p, GRID_K, max_cosine)
        hits = sh["labels"][top]
        out.append({"shadow": i, "auc": float(roc_auc_score(sh["labels"], p)), "attribution_at_24": float(hits.mean()),
                    "distinct_members_at_24": int(len(set(sh["nearest"][top][hits].tolist()))),
                    "chance": sh["chance"], "real_fraction": float(sh["labels"].mean())})
    return out


# ----------------------------------------------------------------------------- the stage


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    from . import distributed
    from . import reconstruct, victim
    from .candidate_features import FEATURES, candidate_features, percentile_ranks
    from .embed import Embeddings
    from .reconstruct import load_candidates
    from .victim import load_victim

    run_dir = Path(run_dir)
    out = run_dir / "shadow"
    shcfg: ShadowConfig = OmegaConf.to_object(cfg.shadow)
    emb, public_x, public_y = public_samples(cfg, run_dir)
    if public_x is None:
        reason = ("no public samples: the embeddings have no public split (data.n_public_per_class)" if emb is not None
                  else "no embeddings to take public samples from (run_dir/embed or reconstruct.embeddings_dir)")
        if cfg.select.score == "learned":
            raise DataError(f"select.score=learned needs shadow victims, but there are {reason}")
        log.warning("shadow: %s; the selection falls back to the cluster score (select.score=auto)", reason)
        if distributed.is_rank_zero():
            save_json(out / "scorer.json", {"format": SCORER_FORMAT, "available": False, "reason": reason})
        return {"available": 0}
    members_per_class = torch.bincount(emb.train_y.long(), minlength=emb.num_classes).tolist()
    shadows, skipped = [], []
    for s in range(shcfg.num_victims):
        sub = out / f"victim_{s}"
        sc = _shadow_cfg(cfg, s)
        mem, non = draw_shadow_split(public_y, members_per_class, shcfg.nonmembers_per_class, sc.seed)
        if distributed.is_rank_zero():
            save_tensors(sub / "embed" / "embeddings.safetensors",
                         {"train_x": public_x[mem].contiguous(), "train_y": public_y[mem].contiguous(),
                          "test_x": public_x[non].contiguous(), "test_y": public_y[non].contiguous()},
                         {**emb.meta, "public_indices_members": mem.tolist(),
                          "public_indices_nonmembers": non.tolist()})
        distributed.barrier()
        log.info("shadow %d/%d: victim on %d public members, %d reconstruction runs", s + 1, shcfg.num_victims,
                 len(mem), shadow_num_runs(cfg))
        try:
            victim.run_stage(sc, sub)
        except UnhealthyVictimError as err:  # a shadow that cannot be a reconstruction target teaches nothing
            log.warning("shadow %d left out: %s", s, err)
            skipped.append({"shadow": s, "reason": str(err)})
            continue
        distributed.barrier()  # rank 0 writes the shadow victim's files; every rank reads them to reconstruct
        reconstruct.run_stage(sc, sub)
        if not distributed.is_rank_zero():
            continue
        model, _ = load_victim(sub / "classifier")
        cands = load_candidates(sub)
        keep = torch.isfinite(cands.x).all(1)
        # the public pool this shadow's candidates are compared with: every public sample outside its own draw
        rest = torch.ones(len(public_x), dtype=torch.bool)
        rest[mem], rest[non] = False, False
        feats = candidate_features(model, cands.x[keep], cands.y[keep], cands.lam[keep], cands.run[keep], cands.run_loss[keep],
                                   public_x[rest])
        offset = model.input_offset().detach().float()
        labels, nearest = label_candidates(cands.x[keep], offset, public_x[mem], public_x[non])
        shadows.append({"ranks": percentile_ranks(feats), "labels": labels, "nearest": nearest,
                        "xf": cands.x[keep].float() - offset, "chance": len(mem) / (len(mem) + len(non))})
    if not distributed.is_rank_zero():
        return {}
    if not shadows:
        reason = f"every shadow victim was unhealthy ({skipped[0]['reason']})"
        if cfg.select.score == "learned":
            raise DataError(f"select.score=learned: {reason}")
        log.warning("shadow: %s; the selection falls back to the cluster score (select.score=auto)", reason)
        save_json(out / "scorer.json", {"format": SCORER_FORMAT, "available": False, "reason": reason, "skipped": skipped})
        return {"available": 0}
    max_cosine = float(cfg.select.diversity_cosine)
    model = fit_scorer(np.concatenate([s["ranks"] for s in shadows]), np.concatenate([s["labels"] for s in shadows]),
                       shcfg.regularization)  # every usable shadow's candidates together
    transfer = transfer_figures(shadows, shcfg.regularization, max_cosine) if len(shadows) > 1 else []
    aucs = [t["auc"] for t in transfer if t.get("auc") is not None]
    scorer = {"format": SCORER_FORMAT, "available": True, "features": list(FEATURES),
              "public_pool_size": int(len(public_x) - len(mem) - len(non)),
              "coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]),
              "num_victims": len(shadows), "num_candidates": int(sum(len(s["labels"]) for s in shadows)),
              "real_fraction": float(np.mean(np.concatenate([s["labels"] for s in shadows]))),
              "transfer": transfer, "transfer_auc_mean": float(np.mean(aucs)) if aucs else None, "skipped": skipped}
    save_json(out / "scorer.json", scorer)
    log.info("shadow: learned score from %d candidates of %d shadow victims (%.0f %% real); transfer between shadows: "
             "AUC %s", scorer["num_candidates"], len(shadows), 100 * scorer["real_fraction"],
             "n/a" if not aucs else f"{np.mean(aucs):.3f}")
    _log_summary(cfg, run_dir, scorer)
    return {"available": 1, "transfer_auc_mean": scorer["transfer_auc_mean"], "real_fraction": scorer["real_fraction"]}


def _log_summary(cfg: DictConfig, run_dir: Path, scorer: dict) -> None:
    from .training import build_logger

    logger = build_logger(cfg, run_dir, "shadow")
    if not logger:
        return
    metrics = {"shadow/real_fraction": scorer["real_fraction"]}
    if scorer["transfer_auc_mean"] is not None:
        metrics["shadow/transfer_auc_mean"] = scorer["transfer_auc_mean"]
    metrics.update({f"shadow/coef_{f}": c for f, c in zip(scorer["features"], scorer["coef"])})
    logger.log_metrics(metrics, step=0)
    logger.finalize("success")


def public_pool(cfg: DictConfig, run_dir: Path, size: int) -> torch.Tensor:
    """The public samples the audited victim's candidates are compared with: ``size`` of them (as many as each
    shadow's candidates saw), drawn with a fixed seed."""
    _, public_x, _ = public_samples(cfg, run_dir)
    if public_x is None or len(public_x) < size:
        raise DataError(f"the learned score compares candidates with {size} public samples, but the embeddings hold "
                        f"{0 if public_x is None else len(public_x)}: rerun the shadow stage")
    return public_x[torch.randperm(len(public_x), generator=torch.Generator().manual_seed(int(cfg.seed)))[:size]]


def check_config(cfg: DictConfig) -> None:
    """Before any stage: a learned score asked for where the data config leaves no public sample to learn it on."""
    if cfg.select.score == "learned" and not cfg.reconstruct.get("embeddings_dir") and cfg.data.get("n_public_per_class") == 0:
        raise ConfigError("select.score=learned trains shadow victims on public samples, but data.n_public_per_class=0; "
                          "set it (e.g. auto: every sample neither split uses) or use select.score=cluster")


def load_scorer(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "shadow" / "scorer.json"
    return load_json(path, what="learned selection score (shadow/scorer.json)") if path.is_file() else None


STAGE = Stage(
    name="shadow",
    run=run_stage,
    sections=[Section("shadow", ShadowConfig)],
    config_keys=["shadow", "classifier", "reconstruct", "trainer.max_epochs", "trainer.precision", "seed",
                 "select.diversity_cosine"],
    # what changes no shadow output: batching and every logging / checkpoint interval (the audited run count does,
    # through shadow.num_runs=null)
    cadence_keys=["reconstruct.runs_per_batch", "reconstruct.log_every_n_steps",
                  "reconstruct.checkpoint_every_n_steps", "reconstruct.wait_timeout_s",
                  "classifier.log_every_n_epochs", "classifier.checkpoint_every_n_epochs"],
    all_ranks=True,
    enabled=lambda cfg: cfg.select.score != "cluster",
    check=check_config,
    inputs=["embed/embeddings.safetensors", "{reconstruct.embeddings_dir}/embed/embeddings.safetensors"],
    outputs=["shadow/scorer.json"],
)
