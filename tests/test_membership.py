"""Null-controlled leak figures (recon_lightning.membership): data the victim never saw scores at chance whatever the
pool size, a planted leak scores as a leak, and each figure equals a direct count written out here."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from recon_lightning.membership import attribution, membership_roc, pool_matched_leak_rate, roc_figures


@pytest.fixture(scope="module")
def digits_splits():
    """Real digits, centred on the training mean as a centred victim sees them: 100 members, 200 non-members and
    the rest unseen by both."""
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held, unseen = x[order[:100]], x[order[100:300]], x[order[300:]]
    mu = train.mean(0)
    return train - mu, held - mu, unseen - mu


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
def test_unseen_samples_as_candidates_score_at_chance_at_any_pool_size(digits_splits, pool):
    train, held, unseen = digits_splits
    figs = membership_roc(train, held, unseen[:pool], n_boot=300)
    lo, hi = figs["auc_ci95"]
    assert lo <= 0.5 <= hi, f"unseen data is no leak: AUC {figs['auc']:.3f} [{lo:.3f}, {hi:.3f}] must cover 0.5"
    assert abs(figs["auc"] - 0.5) < 0.1
    assert figs["tpr_at_fpr"]["0.01"]["tpr"] < 0.1 and figs["tpr_at_fpr"]["0.05"]["tpr"] < 0.2
    leak = pool_matched_leak_rate(train, unseen[:pool], held, repeats=10)
    assert abs(leak["leak_rate"] - 0.5) < 0.12 and leak["pool_size"] == min(pool, len(held))
    # a random order of unseen candidates: attribution at chance (1/3), not significant
    att = attribution(unseen[:pool], train, held, [24, 100])
    assert att["chance"] == pytest.approx(100 / 300)
    for row in att["at_k"].values():
        assert row["p_value"] > 0.005 and abs(row["attributed"] - 1 / 3) < 0.25


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
