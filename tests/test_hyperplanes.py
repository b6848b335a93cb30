"""The victim's first-layer ReLU hyperplanes: where they are (kkt.first_layer_hyperplanes), the reconstruction's pull
onto them (kkt.hyperplane_penalty, reconstruct.hyperplane_weight) and the report's membership evidence
(evaluate.hyperplane_membership). Expected values are worked out from the planted geometry, not by the code under test."""

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from recon_lightning import evaluate as ev
from recon_lightning import reconstruct as R
from recon_lightning.config import shipped
from recon_lightning.kkt import KKTObjective, first_layer_hyperplanes, hyperplane_penalty, hyperplane_scale
from recon_lightning.victim import VictimMLP

F64 = torch.float64


def planted_victim(train: torch.Tensor, mean: torch.Tensor, dead_through: torch.Tensor, seed: int = 0) -> VictimMLP:
    """A centred D-(n+1)-1 victim: hidden unit j's hyperplane passes through training point j (w_j . (x_j - mean) +
    b_j = 0); one more unit passes through ``dead_through`` but its output weight is 0 (switched off)."""
    g = torch.Generator().manual_seed(seed)
    n, D = train.shape
    v = VictimMLP(D, [n + 1], 2, bias=[True, False], center=True).double()
    through = torch.cat([train, dead_through[None]]) - mean
    w = torch.randn(n + 1, D, dtype=F64, generator=g)
    with torch.no_grad():
        v.input_mean.copy_(mean)
        v.layers[0].weight.copy_(w)
        v.layers[0].bias.copy_(-(w * through).sum(1))
        out = 0.5 + torch.rand(n + 1, dtype=F64, generator=g)
        out[-1] = 0.0
        v.layers[1].weight.copy_(out[None])
    return v


def test_first_layer_hyperplanes_are_unit_normals_through_the_planted_points_without_dead_units():
    g = torch.Generator().manual_seed(1)
    train, mean, held = torch.rand(5, 6, dtype=F64, generator=g), torch.rand(6, dtype=F64, generator=g), torch.rand(6, dtype=F64, generator=g)
    v = planted_victim(train, mean, held)
    normals, offsets = first_layer_hyperplanes(v.layers[0].weight, v.layers[0].bias, v.layers[1].weight)
    assert normals.shape == (5, 6)  # the unit with output weight 0 is left out
    assert torch.allclose(normals.norm(dim=1), torch.ones(5, dtype=F64))
    # Signed distance of point i (centred) to plane i is 0; to the held-out point's plane (dropped) irrelevant.
    dist = (train - mean) @ normals.T + offsets
    assert torch.allclose(dist.diagonal(), torch.zeros(5, dtype=F64), atol=1e-12)
    assert dist.abs().min(1).values.max() < 1e-12 and (dist - torch.diag(dist.diagonal())).abs().sum() > 0.1
    # No hidden layer: no hyperplanes.
    assert first_layer_hyperplanes(v.layers[0].weight, None, None)[0].shape == (0, 6)


def test_hyperplane_scale_is_the_median_distance_from_the_origin_or_one():
    # |offsets| = 3, 1, 2, 0.5, 4: the middle one is 2.
    assert hyperplane_scale(torch.tensor([-3.0, 1.0, 2.0, -0.5, 4.0])) == 2.0
    # Planes through the origin (a first layer without bias), or none at all: distances stay absolute.
    assert hyperplane_scale(torch.zeros(4)) == 1.0 and hyperplane_scale(torch.zeros(0)) == 1.0


def test_hyperplane_penalty_is_the_mean_log_distance_and_pulls_points_onto_planes():
    normals = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64), dim=1)
    offsets = torch.tensor([-1.0, 0.0], dtype=F64)  # x = 1 and x + y = 0
    x = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]], dtype=F64, requires_grad=True)  # K=1, m=2
    tau = 0.5
    # Distances, by hand: (1, 2): 0 to x=1, 3/sqrt(2) to x+y=0; (0, 0): 1 to x=1, 0 to x+y=0.
    d = [0.0, 3 / math.sqrt(2), 1.0, 0.0]
    expected = sum(math.log1p((di / tau) ** 2) for di in d) / 4
    pen = hyperplane_penalty(x, normals, offsets, tau)
    assert pen.shape == (1,) and abs(float(pen.detach()) - expected) < 1e-12
    pen.sum().backward()
    # The gradient at (0, 0) points away from x = 1 only (it already lies on x + y = 0): descending it moves the
    # point towards the plane x = 1, along +x.
    assert x.grad[0, 1, 0] < 0 and abs(float(x.grad[0, 1, 1])) < abs(float(x.grad[0, 1, 0]))


def _module(victim: VictimMLP, weight: float) -> R.ReconstructionModule:
    spec = {"num_classes": 2, "weight_decay": 0.0, "n_train": 4}
    obj = KKTObjective(victim, spec, "binary", "relu_sigmoid_grad", F64)
    rcfg = dict(asdict(shipped(R.ReconstructConfig, "reconstruct/default")), hyperplane_weight=weight)
    hp = [R.sample_hparams(rcfg, 0, r) for r in range(2)]
    return R.ReconstructionModule(obj, [0, 1], hp, R.candidate_labels(2, 2), victim.input_dim, rcfg, "box", None, F64,
                                  input_mean=victim.input_offset())


def test_reconstruction_objective_adds_the_weighted_hyperplane_term_only_when_asked():
    g = torch.Generator().manual_seed(2)
    v = planted_victim(torch.rand(5, 6, dtype=F64, generator=g), torch.rand(6, dtype=F64, generator=g),
                       torch.rand(6, dtype=F64, generator=g))
    # Move the 5 live planes to distances 0.2, 0.4, 0.6, 0.8, 1.0 from the origin: the length scale is 0.6, and
    # tau = hyperplane_tau (0.1 in the shipped config) * 0.6 = 0.06.
    w = v.layers[0].weight[:5]
    with torch.no_grad():
        v.layers[0].bias[:5] = torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=F64) * w.norm(dim=1)
    on, off = _module(v, 0.25), _module(v, 0.0)
    assert on.rcfg["hyperplane_tau"] == 0.1
    with torch.no_grad():
        off.candidates.copy_(on.candidates)
        off.multipliers.copy_(on.multipliers)
    t_on, t_off = on.losses(create_graph=False), off.losses(create_graph=False)
    assert "hyperplanes" not in t_off
    # The term by hand: distances of the centred candidates to the 5 live planes (the dead one is not among them).
    dist = (on.candidates.detach() @ w.T + v.layers[0].bias[:5].detach()) / w.norm(dim=1)
    by_hand = torch.log1p((dist / 0.06) ** 2).mean((1, 2))
    assert torch.allclose(t_on["hyperplanes"], by_hand)
    assert torch.allclose(t_on["total"] - t_off["total"], 0.25 * by_hand)


def test_membership_finds_the_planted_training_points_and_ignores_a_dead_unit():
    g = torch.Generator().manual_seed(3)
    train, held = torch.rand(6, 5, dtype=F64, generator=g), torch.rand(8, 5, dtype=F64, generator=g)
    v = planted_victim(train, train.mean(0), held[0])  # the dead unit passes through a held-out point
    out = ev.hyperplane_membership(v, train, held)
    assert out["available"] and out["num_hyperplanes"] == 6
    assert out["train_counts"] == [1] * 6  # each training point on its own plane (random planes miss the others)
    assert out["train_frac_on_any"] == 1.0 and out["heldout_frac_on_any"] == 0.0 and out["auc"] == 1.0
    # Without a held-out pool: no AUC.
    assert "auc" not in ev.hyperplane_membership(v, train, None)


@pytest.mark.slow
def test_a_weight_decay_relu_victim_puts_its_hyperplanes_on_its_training_digits():
    """The property the reconstruction term and the membership figure rest on, on a real (small) trained victim."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target % 2, dtype=torch.float32)
    from plain_victim import train_plain_victim

    train, train_y, held = x[:60], y[:60], x[60:260]
    v = train_plain_victim(train, train_y, hidden=200, lr=0.15, weight_decay=1e-2, epochs=4000)
    out = ev.hyperplane_membership(v, train, held)
    # Measured with seeds 0 and 1 (and 300 units): 58-67 % of the training digits on a hyperplane, 6-10 % of the
    # held-out digits, AUC 0.78-0.81.
    assert out["train_frac_on_any"] > 0.4 and out["heldout_frac_on_any"] < 0.2
    assert out["auc"] > 0.7


@pytest.mark.slow
def test_the_report_carries_the_membership_figures_and_plot(tmp_path):
    """The evaluate stage's report on a run directory whose victim has a plane through each of training samples
    2..11 and a dead unit through sample 0; the held-out pool is a copy of samples 0 and 1 (make_run_dir). Expected
    from that geometry: counts 0, 0, 1 x 10; 10 of 12 training samples on a plane, neither held-out one; AUC =
    (10 x 2 wins + 2 x 2 ties x 0.5) / 24 = 22 / 24."""
    from test_evaluate import make_run_dir

    from recon_lightning.victim import save_victim

    d = make_run_dir(tmp_path)
    train = d["train_x"].double()
    save_victim(tmp_path / "classifier", planted_victim(train[2:], train.mean(0), train[0], seed=5).float())
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False)
    s = report["summary"]
    assert report["hyperplane_membership"]["num_hyperplanes"] == 10
    assert [p["victim_hyperplanes_through"] for p in report["reconstruction"]["per_sample"]] == [0, 0] + [1] * 10
    assert s["frac_train_on_victim_hyperplane"] == pytest.approx(10 / 12)
    assert report["hyperplane_membership"]["heldout_frac_on_any"] == 0.0
    assert s["hyperplane_membership_auc"] == pytest.approx(22 / 24)
    assert "train_counts" not in report["hyperplane_membership"]
    assert (tmp_path / report["figures"]["hyperplane_membership"]).is_file()


def test_rank_auc_equals_the_pairwise_count():
    g = torch.Generator().manual_seed(4)
    pos, neg = torch.randint(0, 5, (37,), generator=g), torch.randint(0, 4, (23,), generator=g)
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos.tolist() for n in neg.tolist()]
    assert abs(ev.rank_auc(pos, neg) - sum(pairs) / len(pairs)) < 1e-12
    assert ev.rank_auc(torch.tensor([3, 4]), torch.tensor([0, 1, 2])) == 1.0
