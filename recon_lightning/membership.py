"""Null-controlled leak figures, as the membership-inference literature reads them (Carlini et al. 2022).

A reconstruction leaks a training sample when some candidate is closer to it than chance allows, and "chance"
must not depend on how many candidates were made. So every figure here compares members (the training samples)
with non-members (held-out samples of the same distribution the victim never saw) *through the same candidates*:

* **membership ROC**: score every member and every non-member by its highest cosine to any candidate; the ROC
  of members against non-members gives the AUC and the TPR at a low FPR (1 %, 5 %). Members and non-members
  are exchangeable for candidates that carry no information about the training set, whatever their number, so
  unseen data as candidates scores AUC 0.5 and TPR@FPR = FPR;
* **attribution of a selection**: the fraction of the top-k representatives whose nearest neighbour in
  (training ∪ held-out) is a training sample, against the chance level n_train / (n_train + n_heldout), with a
  one-sided binomial p-value, and how many distinct training samples they point at;
* **pool-matched leak rate**: a training sample is leaked when its best candidate beats its best held-out
  sample; the candidates are subsampled to the held-out pool's size (and the comparison repeated), so the
  chance level is 0.5 whatever the number of candidates.

Cosines are taken in the *victim's frame* (inputs minus the mean the victim subtracts, zero for an uncentred
victim): the frame in which the victim, and so the reconstruction, sees the samples.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .matching import best_matches

FPRS = (0.01, 0.05)  # the low false-positive rates whose TPR is reported
SCORE_DECIMALS = 6  # cosines equal to float32's precision tie (a copy of a sample scores as the sample itself)


def max_cosine(samples: torch.Tensor, pool: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Each sample's highest cosine to any row of ``pool`` (float64, rounded to ``SCORE_DECIMALS``)."""
    return best_matches("cosine", samples, pool, chunk)["best_score"].double().round(decimals=SCORE_DECIMALS)


def _auc_and_tprs(members: np.ndarray, nonmembers: np.ndarray, fprs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """For rows of scores (B, n) and (B, m), each row one ROC: the AUC (P(member > non-member), ties half) and, per
    FPR f, the highest TPR whose FPR is at most f, i.e. the fraction of members strictly above the
    (floor(f m) + 1)-th highest non-member. All rows at once (the bootstrap's replicates)."""
    b, m = nonmembers.shape
    neg = np.sort(nonmembers, axis=1)
    # each member's count of non-members below it and equal to it, by one searchsorted over rows offset apart
    lo_all = min(float(members.min()), float(neg.min()))
    span = max(float(members.max()), float(neg.max())) - lo_all + 1.0  # every row's values fit in [0, span)
    shift = np.arange(b)[:, None] * span * 2.0
    flat_neg = (neg - lo_all + shift).ravel()
    q = members - lo_all + shift
    below = np.searchsorted(flat_neg, q, side="left") - np.arange(b)[:, None] * m
    at_or_below = np.searchsorted(flat_neg, q, side="right") - np.arange(b)[:, None] * m
    auc = (below + 0.5 * (at_or_below - below)).sum(1) / (members.shape[1] * m)
    tprs = []
    for f in fprs:
        a = int(np.floor(f * m + 1e-9))
        tprs.append(np.ones(b) if a >= m else (members > neg[:, m - 1 - a][:, None]).mean(1))
    return auc, np.stack(tprs, axis=1)


def roc_figures(members: torch.Tensor | np.ndarray, nonmembers: torch.Tensor | np.ndarray,
                fprs: Sequence[float] = FPRS, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC and TPR at each FPR of ``fprs`` for scores of members against non-members (higher = more likely a
    member), with percentile-bootstrap 95 % intervals (members and non-members resampled independently, ``n_boot``
    times), the chance levels and the ROC curve's points (sklearn's ``roc_curve``)."""
    from sklearn.metrics import roc_curve

    a, b = np.asarray(members, dtype=np.float64), np.asarray(nonmembers, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"a membership ROC needs members and non-members, got {len(a)} and {len(b)}")
    auc, tprs = (v[0] for v in _auc_and_tprs(a[None], b[None], fprs))
    if n_boot:
        rng = np.random.default_rng(seed)
        boot_auc, boot_tpr = _auc_and_tprs(a[rng.integers(0, len(a), (n_boot, len(a)))],
                                           b[rng.integers(0, len(b), (n_boot, len(b)))], fprs)
        auc_ci = np.percentile(boot_auc, [2.5, 97.5])
        tpr_ci = np.percentile(boot_tpr, [2.5, 97.5], axis=0).T
    else:
        auc_ci, tpr_ci = (auc, auc), [(t, t) for t in tprs]
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b])
    return {
        "auc": float(auc), "auc_ci95": [float(auc_ci[0]), float(auc_ci[1])], "auc_chance": 0.5,
        "tpr_at_fpr": {f"{f:g}": {"tpr": float(t), "ci95": [float(ci[0]), float(ci[1])], "chance": float(f)}
                       for f, t, ci in zip(fprs, tprs, tpr_ci)},
        "num_members": int(len(a)), "num_nonmembers": int(len(b)), "bootstrap": int(n_boot),
        "curve": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def membership_roc(train_x: torch.Tensor, heldout_x: torch.Tensor, cand_x: torch.Tensor, chunk: int = 4096,
                   n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`roc_figures` of the training samples against the held-out samples, each scored by its highest
    cosine to the candidates (all three in the same frame); the per-sample scores are returned too."""
    members, nonmembers = max_cosine(train_x, cand_x, chunk), max_cosine(heldout_x, cand_x, chunk)
    out = roc_figures(members, nonmembers, n_boot=n_boot, seed=seed)
    out.update(member_scores=members.tolist(), nonmember_scores=nonmembers.tolist(), num_candidates=int(len(cand_x)))
    return out


def attribution(sel_x: torch.Tensor, train_x: torch.Tensor, heldout_x: torch.Tensor, ks: Sequence[int],
                chunk: int = 4096) -> dict:
    """For the representatives ``sel_x`` (best first): each one's nearest neighbour in training ∪ held-out, and
    for each k of ``ks``: the fraction of the top k attributed to a training sample, the distinct training samples
    they point at, the chance level n_train / (n_train + n_heldout) and the one-sided binomial p-value of seeing
    that many (or more) by chance."""
    from scipy.stats import binomtest

    n_train, n_held = len(train_x), len(heldout_x)
    m = best_matches("cosine", sel_x, torch.cat([train_x, heldout_x]), chunk)
    nearest = m["best_index"]
    is_train = nearest < n_train
    chance = n_train / (n_train + n_held)
    at_k = {}
    for k in sorted({min(int(k), len(sel_x)) for k in ks if k > 0}):
        hits = int(is_train[:k].sum())
        at_k[str(k)] = {"k": k, "attributed": hits / k, "distinct_train": int(len(torch.unique(nearest[:k][is_train[:k]]))),
                        "chance": chance, "p_value": float(binomtest(hits, k, chance, alternative="greater").pvalue)}
    return {"chance": chance, "at_k": at_k, "nearest_index": nearest.tolist(), "nearest_is_train": is_train.tolist(),
            "nearest_cosine": m["best_score"].tolist()}


def pool_matched_leak_rate(train_x: torch.Tensor, cand_x: torch.Tensor, heldout_x: torch.Tensor, repeats: int = 20,
                           seed: int = 0, chunk: int = 4096) -> dict:
    """The leak rate with equal pools: the fraction of training samples whose best candidate is closer than their
    best held-out sample, with the larger pool subsampled (without replacement) to the smaller one's size and the
    comparison averaged over ``repeats`` draws. Chance is 0.5 for any number of candidates."""
    size = min(len(cand_x), len(heldout_x))
    gen = torch.Generator().manual_seed(seed)
    cand_full = best_matches("cosine", train_x, cand_x, chunk) if len(cand_x) == size else None
    held_full = best_matches("cosine", train_x, heldout_x, chunk) if len(heldout_x) == size else None
    rates = []
    for _ in range(repeats):
        c = cand_full or best_matches("cosine", train_x, cand_x[torch.randperm(len(cand_x), generator=gen)[:size]], chunk)
        h = held_full or best_matches("cosine", train_x, heldout_x[torch.randperm(len(heldout_x), generator=gen)[:size]], chunk)
        rates.append(float((c["best_score"] > h["best_score"]).double().mean()))
    return {"leak_rate": float(np.mean(rates)), "std": float(np.std(rates)), "chance": 0.5, "pool_size": size,
            "repeats": int(repeats)}
