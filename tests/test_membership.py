"""Null-controlled leak figures (recon_lightning.membership): data the victim never saw scores at chance whatever the
pool size, a planted leak scores as a leak, and each figure equals a direct count written out here."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from recon_lightning.membership import attribution, membership_roc, pool_matched_leak_rate, roc_figures


def _splits(seed: int):
    """Real digits, centred on the training mean as a centred victim sees them: 100 members, 200 non-members and
    the rest unseen by both."""
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, held, unseen = x[order[:100]], x[order[100:300]], x[order[300:]]
    mu = train.mean(0)
    return train - mu, held - mu, unseen - mu


@pytest.fixture(scope="module")
def digits_splits():
    return _splits(0)


def _direct_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(member scores above non-member), ties half: every pair counted."""
    d = pos[:, None] - neg[None, :]
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


def _direct_tpr_at(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """The highest TPR over thresholds t (flag score >= t) whose FPR is at most ``fpr``."""
    best = 0.0
    for t in np.r_[pos, neg, np.inf]:
        if (neg >= t).mean() <= fpr + 1e-12:
            best = max(best, (pos >= t).mean())
    return float(best)


@pytest.mark.parametrize("pool", [200, 800, 1400])
def test_unseen_samples_as_candidates_score_at_chance_at_any_pool_size(pool):
    """Five random splits of the digits: the membership AUC of unseen candidates averages 0.5 (its spread between
    splits, about 0.05, is the split's own: one pool of candidates serves all members and non-members) and its
    bootstrap interval covers 0.5 in most splits; the pool-matched leak rate averages 0.5; a random order of them
    is attributed at chance."""
    aucs, covered, leaks = [], 0, []
    for seed in range(5):
        train, held, unseen = _splits(seed)
        figs = membership_roc(train, held, unseen[:pool], n_boot=300)
        aucs.append(figs["auc"])
        covered += figs["auc_ci95"][0] <= 0.5 <= figs["auc_ci95"][1]
        assert figs["tpr_at_fpr"]["0.01"]["tpr"] < 0.1 and figs["tpr_at_fpr"]["0.05"]["tpr"] < 0.2
        leaks.append(pool_matched_leak_rate(train, unseen[:pool], held, repeats=10)["leak_rate"])
        att = attribution(unseen[:pool], train, held, [24, 100])
        assert att["chance"] == pytest.approx(100 / 300)
        for row in att["at_k"].values():
            assert row["p_value"] > 0.001 and abs(row["attributed"] - 1 / 3) < 0.3
    assert abs(np.mean(aucs) - 0.5) < 0.06 and max(abs(a - 0.5) for a in aucs) < 0.15 and covered >= 3
    assert abs(np.mean(leaks) - 0.5) < 0.06


def test_a_planted_leak_scores_as_a_leak(digits_splits):
    train, held, unseen = digits_splits
    gen = torch.Generator().manual_seed(1)
    planted = train + 0.02 * torch.randn(train.shape, generator=gen)
    cands = torch.cat([planted, unseen[:1000]])
    figs = membership_roc(train, held, cands, n_boot=100)
    assert figs["auc"] > 0.99 and figs["tpr_at_fpr"]["0.01"]["tpr"] > 0.95
    # 200 of the 1100 candidates are drawn: a sample's planted copy is among them with probability 200/1100 (then it
    # leaks), otherwise its best candidate is unseen data, which beats the best held-out sample half the time
    expected = 200 / 1100 + (1 - 200 / 1100) * 0.5
    assert pool_matched_leak_rate(train, cands, held, repeats=40)["leak_rate"] == pytest.approx(expected, abs=0.05)
    att = attribution(planted[:24], train, held, [24])
    row = att["at_k"]["24"]
    assert row["attributed"] == 1.0 and row["distinct_train"] == 24 and row["p_value"] < 1e-8


def test_roc_figures_equal_a_direct_count():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0.6, 1, 150), rng.normal(0, 1, 300)
    pos[:5] = neg[:5]  # ties between members and non-members
    figs = roc_figures(pos, neg, n_boot=0)
    assert figs["auc"] == pytest.approx(_direct_auc(pos, neg), abs=1e-12)
    for f in ("0.01", "0.05"):
        assert figs["tpr_at_fpr"][f]["tpr"] == pytest.approx(_direct_tpr_at(pos, neg, float(f)), abs=1e-12)
    with pytest.raises(ValueError, match="members and non-members"):
        roc_figures(pos, neg[:0])


def test_attribution_counts_nearest_members_and_distinct_ones():
    train = torch.eye(4)[:2] * 3  # two members along e0, e1
    held = torch.eye(4)[2:] * 3   # two non-members along e2, e3
    sel = torch.tensor([[1.0, 0.1, 0, 0], [0.9, 0, 0.1, 0], [0, 0, 1, 0], [0, 1, 0, 0.2]])
    att = attribution(sel, train, held, [2, 3, 4])
    assert att["nearest_index"] == [0, 0, 2, 1] and att["nearest_is_train"] == [True, True, False, True]
    assert att["at_k"]["2"]["attributed"] == 1.0 and att["at_k"]["2"]["distinct_train"] == 1
    assert att["at_k"]["4"]["attributed"] == 0.75 and att["at_k"]["4"]["distinct_train"] == 2
    from scipy.stats import binom

    assert att["at_k"]["4"]["p_value"] == pytest.approx(binom.sf(2, 4, 0.5))  # P(X >= 3), X ~ Bin(4, 1/2)


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_samples():
    rng = np.random.default_rng(5)
    small = roc_figures(rng.normal(0.5, 1, 50), rng.normal(0, 1, 100), n_boot=500)
    large = roc_figures(rng.normal(0.5, 1, 2000), rng.normal(0, 1, 4000), n_boot=500)
    for figs in (small, large):
        lo, hi = figs["auc_ci95"]
        assert lo < figs["auc"] < hi
    # the AUC of N(0.5, 1) against N(0, 1) is Phi(0.5 / sqrt(2)) = 0.638
    assert large["auc_ci95"][0] < 0.638 < large["auc_ci95"][1]
    assert np.ptp(large["auc_ci95"]) < np.ptp(small["auc_ci95"]) / 3
