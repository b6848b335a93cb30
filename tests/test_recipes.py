"""The victim's training recipe (victim.json ``regularization`` / ``loss_reduction``) picks the stationarity condition
the reconstruction matches: a head trained to a stationary point by one recipe satisfies that recipe's condition at
its training set, with the multipliers its own loss gives (|l'_i| = |sigmoid(phi(x_i)) - y_i|), and not the others'.

The heads are linear (no hidden layer): their regularised losses are strictly convex, so training reaches the
stationary point to float64 precision; the recipe enters the condition per parameter, the same for every layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recon_lightning.errors import ConfigError
from recon_lightning.kkt import KKTObjective, decay_coefficients, resolve_form, training_recipe
from recon_lightning.victim import VictimMLP

F64 = torch.float64
N, D, WD, EPS = 24, 4, 0.1, 0.1
EXACT_RELU = torch.tensor([1e8], dtype=F64)

RECIPES = {
    "l2_all_mean": {"regularization": {"kind": "l2", "coefficient": WD, "params": "all"}, "loss_reduction": "mean"},
    "l2_weights_mean": {"regularization": {"kind": "l2", "coefficient": WD, "params": "weights"}, "loss_reduction": "mean"},
    "l2_all_sum": {"regularization": {"kind": "l2", "coefficient": WD, "params": "all"}, "loss_reduction": "sum"},
    "adamw": {"regularization": {"kind": "adamw", "coefficient": WD, "params": "all", "adam_eps": EPS},
              "loss_reduction": "mean"},
}


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=F64) + 2.0  # off-centre: the bias matters
    y = (torch.randn(N, generator=g) > 0).long()
    return x, y


def bce(model, x, y, reduction="mean"):
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y.to(F64), reduction=reduction)


def train(recipe: str, x, y) -> nn.Linear:
    """A linear head trained to its stationary point by ``recipe``, written out by hand."""
    torch.manual_seed(1)
    model = nn.Linear(D, 1).double()
    if recipe == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2, eps=EPS, weight_decay=WD)
        for _ in range(8000):
            opt.zero_grad()
            bce(model, x, y).backward()
            opt.step()
        return model
    reduction = "sum" if recipe == "l2_all_sum" else "mean"
    decayed = [model.weight] if recipe == "l2_weights_mean" else [model.weight, model.bias]
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bce(model, x, y, reduction) + WD / 2 * sum((p ** 2).sum() for p in decayed)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def residual(model: nn.Linear, spec: dict, x, y) -> float:
    victim = VictimMLP(D, [], 2).double()
    victim.layers[0].load_state_dict(model.state_dict())
    spec = {"num_classes": 2, "n_train": N, **spec}
    objective = KKTObjective(victim, spec, resolve_form("auto", spec), "relu_sigmoid_grad", F64)
    with torch.no_grad():
        lam = (torch.sigmoid(model(x).squeeze(-1)) - y.to(F64)).abs()  # |l'_i| of the logistic loss
    return objective.kkt(x[None], lam[None], y[None], EXACT_RELU, create_graph=False)[1].item()


@pytest.fixture(scope="module")
def trained():
    x, y = data()
    return x, y, {name: train(name, x, y) for name in RECIPES}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_is_stationary_under_its_own_form_only(trained, recipe):
    x, y, models = trained
    own = residual(models[recipe], RECIPES[recipe], x, y)
    assert own < 1e-6, f"{recipe}: relative residual {own:.3g} under its own recipe"
    for other, spec in RECIPES.items():
        if other != recipe:
            assert residual(models[recipe], spec, x, y) > 1e-3, f"{recipe} also fits {other}'s form"


def test_a_victim_json_without_a_recipe_is_l2_on_every_parameter_with_a_mean_loss(trained):
    x, y, models = trained
    legacy = {"weight_decay": WD}
    assert training_recipe(legacy) == {**training_recipe({**RECIPES["l2_all_mean"]}), "adam_eps": None}
    assert residual(models["l2_all_mean"], legacy, x, y) < 1e-6


def test_coefficients_per_parameter():
    w, b = torch.tensor([[0.5, -2.0]], dtype=F64), torch.tensor([1.0], dtype=F64)
    spec = {"n_train": 10, "regularization": {"kind": "l2", "coefficient": 0.2, "params": "weights"}, "loss_reduction": "sum"}
    assert decay_coefficients(spec, [("layers.0.weight", w), ("layers.0.bias", b)]) == [pytest.approx(0.02), 0.0]
    spec = {"regularization": {"kind": "adamw", "coefficient": 0.2, "params": "all", "adam_eps": 1e-3}}
    c = decay_coefficients(spec, [("layers.0.weight", w)])[0]
    assert torch.allclose(c, torch.tensor([[1e-3 * 0.2 / 0.9, 1e-3 * 0.2 / 0.6]], dtype=F64))


@pytest.mark.parametrize("spec, words", [
    ({"regularization": {"kind": "l1", "coefficient": 0.1}}, "l1"),
    ({"regularization": {"kind": "l2", "coefficient": 0.1, "params": "biases"}}, "params"),
    ({"regularization": {"kind": "adamw", "coefficient": 0.1}}, "adam_eps"),
    ({"weight_decay": 0.1, "loss_reduction": "max"}, "loss_reduction"),
])
def test_recipes_the_forms_cannot_express_are_refused(spec, words):
    with pytest.raises(ConfigError, match=words):
        training_recipe(spec)


def test_adamw_weights_beyond_any_fixed_point_are_refused():
    spec = {"regularization": {"kind": "adamw", "coefficient": 0.5, "params": "all", "adam_eps": 1e-8}}
    with pytest.raises(ConfigError, match="no fixed point"):
        decay_coefficients(spec, [("layers.0.weight", torch.tensor([3.0]))])
