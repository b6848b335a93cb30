"""The public split, shadow victims and the selection score learned from them."""

import json

import numpy as np
import pytest
import torch

from recon_lightning.data import load_dataset
from recon_lightning.errors import ConfigError, DataError
from recon_lightning.shadow import diverse_top, draw_shadow_split, label_candidates, score


def test_public_split_is_disjoint_and_leaves_train_and_test_unchanged(make_cfg):
    with_public = load_dataset(make_cfg("data.n_public_per_class=auto").data, seed=0)
    without = load_dataset(make_cfg("data.n_public_per_class=0").data, seed=0)
    assert with_public.train.ids == without.train.ids and with_public.test.ids == without.test.ids
    ids = [set(s.ids) for s in (with_public.train, with_public.test, with_public.public)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0]) + len(ids[1]) + len(ids[2]) == 1797  # auto: every digit is in one split
    assert len(without.public.ids) == 0
    five = load_dataset(make_cfg("data.n_public_per_class=5").data, seed=0)
    assert np.bincount(five.public.labels).tolist() == [5, 5]
    with pytest.raises(DataError, match="data.n_public_per_class=5000"):
        load_dataset(make_cfg("data.n_public_per_class=5000").data, seed=0)


def test_shadow_split_is_disjoint_balanced_and_refuses_too_few():
    y = torch.tensor([0] * 30 + [1] * 40)
    mem, non = draw_shadow_split(y, [5, 7], 10, seed=1)
    assert not set(mem.tolist()) & set(non.tolist())
    assert torch.bincount(y[mem]).tolist() == [5, 7] and torch.bincount(y[non]).tolist() == [10, 10]
    again, _ = draw_shadow_split(y, [5, 7], 10, seed=1)
    assert torch.equal(mem, again)
    with pytest.raises(DataError, match="class 0 from the public split, which has 30"):
        draw_shadow_split(y, [25, 7], 10, seed=1)


def test_labels_follow_the_nearest_member_or_nonmember():
    members, nonmembers = torch.eye(3)[:2] * 2, torch.eye(3)[2:] * 2
    cands = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.1, 1.0], [0.1, 1.0, 0.3]])
    labels, nearest = label_candidates(cands, torch.zeros(3), members, nonmembers)
    assert labels.tolist() == [True, False, True] and nearest.tolist() == [0, 2, 1]


def test_diverse_top_takes_the_best_and_skips_near_copies():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    chosen = diverse_top(x, scores, 3, max_cosine=0.9)
    # 1 is a near-copy of 0 (cosine > 0.99); 3 is at cosine 0.71 of both 0 and 2: kept
    assert chosen == [0, 2, 3]
    xn = torch.nn.functional.normalize(x[chosen], dim=1)
    assert float((xn @ xn.T - torch.eye(3)).max()) < 0.9
    assert diverse_top(x, scores, 5, max_cosine=1.01) == [0, 1, 2, 3, 4]


def test_score_is_the_logistic_function_of_the_ranks():
    scorer = {"coef": [2.0, -1.0], "intercept": 0.5}
    ranks = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert score(scorer, ranks) == pytest.approx([1 / (1 + np.exp(-2.5)), 1 / (1 + np.exp(0.5))])


TINY = ["data.n_per_class=10", "data.n_test_per_class=10", "classifier.hidden=[64]", "classifier.epochs=400",
        "reconstruct.num_runs=2", "reconstruct.steps=150", "shadow.num_runs=2", "shadow.nonmembers_per_class=20",
        "select.num_representatives=12", "invert.num_images=2", "evaluate.kkt_steps=0"]


@pytest.mark.slow
def test_shadow_stage_learns_a_score_and_select_uses_it(make_cfg, tmp_path):
    from recon_lightning.embed import load_embeddings
    from recon_lightning.fit import main_with_config
    from recon_lightning.select import load_selection

    run_dir = tmp_path / "run"
    summaries = main_with_config(make_cfg(*TINY))
    assert "shadow" in summaries
    scorer = json.loads((run_dir / "shadow" / "scorer.json").read_text())
    assert scorer["available"] and len(scorer["coef"]) == len(scorer["features"])
    assert len(scorer["transfer"]) == 2  # each shadow scored by the regression fitted on the other
    # shadows train on public samples only: none of the audited training set or held-out pool
    emb = load_embeddings(run_dir)
    for s in range(2):
        shadow_emb = load_embeddings(run_dir / "shadow" / f"victim_{s}")
        for audited in (emb.train_x, emb.test_x):
            assert torch.cdist(shadow_emb.train_x, audited).min() > 0 and torch.cdist(shadow_emb.test_x, audited).min() > 0
        assert (run_dir / "shadow" / f"victim_{s}" / "classifier" / "model.safetensors").is_file()
    sel, meta = load_selection(run_dir)
    assert meta["score"] == "learned" and "baseline_x" in sel and len(sel["x"]) == 12
    assert torch.all(sel["score"][:-1] >= sel["score"][1:])  # best first
    report = json.loads((run_dir / "report.json").read_text())
    assert report["attribution"]["score"] == "learned" and "baseline" in report["attribution"]
    assert "baseline_selection_attribution_at_12" in report["summary"]
    # the learned score's AUC on this victim, recomputed: each scored candidate is real when its nearest sample
    # (victim's frame, plain cosines) among training ∪ held-out is a training sample
    from sklearn.metrics import roc_auc_score

    from recon_lightning.reconstruct import load_candidates
    from recon_lightning.victim import load_victim

    mu = load_victim(run_dir / "classifier")[0].input_offset().detach()
    cands = load_candidates(run_dir).x
    scored = torch.isfinite(sel["candidate_score"])
    unit = lambda a: torch.nn.functional.normalize((a - mu).double(), dim=1)  # noqa: E731
    pool = torch.cat([emb.train_x, emb.test_x])
    real = ((unit(cands[scored]) @ unit(pool).T).argmax(1) < len(emb.train_x)).numpy()
    expected = roc_auc_score(real, sel["candidate_score"][scored].double().numpy())
    assert report["summary"]["learned_score_auc_on_this_victim"] == pytest.approx(expected, abs=1e-9)
    assert report["summary"]["learned_score_auc_between_shadows"] == pytest.approx(scorer["transfer_auc_mean"])

    # select.score=cluster: no shadow stage, the cluster ranking, no baseline
    main_with_config(make_cfg(*TINY, "select.score=cluster"))
    sel, meta = load_selection(run_dir)
    assert meta["score"] == "cluster" and "baseline_x" not in sel


@pytest.mark.slow
def test_learned_score_without_public_samples(make_cfg, tmp_path, caplog):
    from recon_lightning.fit import main_with_config
    from recon_lightning.select import load_selection

    main_with_config(make_cfg(*TINY, "data.n_public_per_class=0", "stage=[embed,classifier,reconstruct,shadow,select]"))
    sel, meta = load_selection(tmp_path / "run")
    assert meta["score"] == "cluster" and "no public samples" in meta["score_reason"]
    with pytest.raises(ConfigError, match="select.score=learned trains shadow victims on public samples, but "
                                          "data.n_public_per_class=0"):
        main_with_config(make_cfg(*TINY, "data.n_public_per_class=0", "select.score=learned"))


@pytest.mark.slow
def test_unhealthy_shadow_victims_are_left_out_and_auto_falls_back(make_cfg, tmp_path, monkeypatch):
    """A shadow victim that cannot be a reconstruction target is left out with its reason; with none left,
    select.score=auto ranks by the cluster score and says why, select.score=learned stops with the reason."""
    from recon_lightning import victim
    from recon_lightning.errors import UnhealthyVictimError
    from recon_lightning.fit import main_with_config
    from recon_lightning.select import load_selection

    real_run_stage = victim.run_stage

    def unhealthy_shadows(cfg, run_dir):
        if "shadow" in run_dir.parts:
            raise UnhealthyVictimError("the victim trained in classifier/ cannot be a reconstruction target: planted")
        return real_run_stage(cfg, run_dir)

    monkeypatch.setattr(victim, "run_stage", unhealthy_shadows)
    main_with_config(make_cfg(*TINY, "stage=[embed,classifier,reconstruct,shadow,select]"))
    scorer = json.loads((tmp_path / "run" / "shadow" / "scorer.json").read_text())
    assert not scorer["available"] and "every shadow victim was unhealthy" in scorer["reason"]
    assert [s["shadow"] for s in scorer["skipped"]] == [0, 1]
    sel, meta = load_selection(tmp_path / "run")
    assert meta["score"] == "cluster" and "unhealthy" in meta["score_reason"]
    with pytest.raises(DataError, match="select.score=learned: every shadow victim was unhealthy"):
        main_with_config(make_cfg(*TINY, "select.score=learned", "shadow.num_runs=3"))


def test_shadows_run_as_many_reconstructions_as_the_audit_unless_told(make_cfg):
    """Features that count runs (agreement, density) read alike on shadows and on the audited victim only when both
    ran as many reconstructions."""
    from recon_lightning.shadow import _shadow_cfg

    assert _shadow_cfg(make_cfg("reconstruct.num_runs=5"), 0).reconstruct.num_runs == 5
    assert _shadow_cfg(make_cfg("reconstruct.num_runs=5", "shadow.num_runs=3"), 1).reconstruct.num_runs == 3
