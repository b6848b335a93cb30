"""The objectives package: registries and config, priors as classes, the projection objective's Gram matrices against
brute-force Jacobians, the reconstruct.target displacement, and a short projection run of the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from recon_lightning import kkt as old_kkt
from recon_lightning import reconstruct as R
from recon_lightning.config import check_values
from recon_lightning.errors import ConfigError, DataError
from recon_lightning.objectives import (OBJECTIVES, PRIORS, KKTObjective, build_objective, load_target, lookup,
                                        make_prior, resolve_class)
from recon_lightning.objectives.projection import ProjectionObjective
from recon_lightning.storage import load_tensors
from recon_lightning.victim import VictimMLP, save_victim

F64 = torch.float64
BIG = 1e7  # sigmoid(BIG * h) is ReLU's own 0/1 derivative at these pre-activations


def rcfg(**over) -> dict:
    base = {"activation": "relu_sigmoid_grad", "multipliers": "runner_up", "lambda_per_candidate": True,
            "projection_ridge": 0.0, "projection_jacobian": "auto"}
    return {**base, **over}


# ----------------------------------------------------------------------------- registries and config


def test_registries_name_the_builtin_objectives_and_priors_and_refuse_unknown_names():
    assert {"kkt", "projection"} <= set(OBJECTIVES) and {"sphere", "norm", "box", "none"} <= set(PRIORS)
    assert lookup(OBJECTIVES, "projection", "reconstruct.objective") is ProjectionObjective
    with pytest.raises(ConfigError, match=r"reconstruct.objective must be one of .*got 'nope'"):
        lookup(OBJECTIVES, "nope", "reconstruct.objective")
    cls = resolve_class({"_target_": "recon_lightning.objectives.projection.ProjectionObjective"}, OBJECTIVES, "k")
    assert cls is ProjectionObjective
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_class({"_target_": "recon_lightning.objectives.nowhere.Thing"}, OBJECTIVES, "k")


def test_objective_built_from_config_by_name_or_target():
    torch.manual_seed(0)
    v = VictimMLP(4, [6], 2).double()
    spec = {"num_classes": 2, "weight_decay": 0.0}
    assert type(build_objective(v, spec, rcfg(), "binary", F64)) is KKTObjective  # the default
    assert type(build_objective(v, spec, rcfg(objective="projection"), "binary", F64)) is ProjectionObjective
    by_target = rcfg(objective={"_target_": "recon_lightning.objectives.kkt.KKTObjective"})
    assert type(build_objective(v, spec, by_target, "binary", F64)) is KKTObjective


def test_config_keys_compose_and_bad_values_are_refused(make_cfg):
    cfg = make_cfg()
    assert (cfg.reconstruct.objective, cfg.reconstruct.target) == ("kkt", "theta")
    cfg = make_cfg("reconstruct=projection")
    r = cfg.reconstruct
    assert (r.objective, r.optimizer, r.lr, r.multiplier, r.project_candidates) == ("projection", "sgd", [0.1, 1.0], 1, True)
    with pytest.raises(ConfigError, match="config key 'reconstruct.target'"):
        check_values(make_cfg("reconstruct.target=theta0"))
    with pytest.raises(ConfigError, match="config key 'reconstruct.objective'"):
        check_values(make_cfg("reconstruct.objective=[1]"))


# ----------------------------------------------------------------------------- priors


def test_prior_classes_equal_the_direct_formulas_and_the_old_functions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=F64) * 1.5
    norms = x.norm(dim=-1)
    expected = {
        "sphere": ((norms - 1) ** 2).sum(1),
        "norm": ((norms / 2.5 - 1) ** 2).sum(1),
        "box": ((torch.clamp(0.0 - x, min=0) ** 2) + (torch.clamp(x - 1.0, min=0) ** 2)).sum((1, 2)),
        "none": torch.zeros(3, dtype=F64),
    }
    excess = {
        "sphere": torch.clamp(norms.max(1).values - 1, min=0),
        "norm": torch.clamp(norms.max(1).values / 2.5 - 1, min=0),
        "box": torch.clamp(torch.maximum(-x, x - 1).flatten(1).max(1).values, min=0),
        "none": torch.zeros(3, dtype=F64),
    }
    for name in expected:
        prior = make_prior(name, 2.5, (0.0, 1.0))
        torch.testing.assert_close(prior.penalty(x), expected[name])
        torch.testing.assert_close(prior.excess(x), excess[name])
        torch.testing.assert_close(old_kkt.prior_penalty(x, name, 2.5, 0.0, 1.0), expected[name])
        torch.testing.assert_close(old_kkt.prior_excess(x, name, 2.5, 0.0, 1.0), excess[name])
    sphere = x.clone()
    make_prior("sphere").project_(sphere)
    torch.testing.assert_close(sphere.norm(dim=-1), torch.ones(3, 5, dtype=F64))
    box = x.clone()
    make_prior("box", None, (0.0, 1.0)).project_(box)
    assert box.min() >= 0 and box.max() <= 1


def test_a_prior_registered_elsewhere_is_used_by_the_module_by_name():
    """Adding a prior: a class registered under a new name is what reconstruct.prior=<name> applies."""
    from recon_lightning.objectives import Prior, register_prior

    @register_prior("test_shell")
    class ShellPrior(Prior):
        def penalty(self, x):
            return (x.norm(dim=-1) - 3.0).abs().sum(1)

    torch.manual_seed(0)
    v = VictimMLP(4, [6], 2).double()
    obj = KKTObjective(v, {"num_classes": 2, "weight_decay": 0.0}, "binary", "relu_sigmoid_grad", F64)
    hp = [{"init_scale": 0.5, "lr": 0.01, "lambda_lr": 0.01, "lambda_min": 0.0, "alpha": 10.0, "init_seed": 1}]
    cfg = {"kkt_loss": "relative", "lambda_weight": 0.0, "prior_weight": 2.0, "box": [0.0, 1.0], "steps": 1,
           "log_every_n_steps": 0, "checkpoint_every_n_steps": 0}
    module = R.ReconstructionModule(obj, [0], hp, R.candidate_labels(2, 2), 4, cfg, "test_shell", None, F64)
    terms = module.losses(create_graph=False)
    x = module.candidates.detach()
    torch.testing.assert_close(terms["prior"], (x.norm(dim=-1) - 3.0).abs().sum(1))
    torch.testing.assert_close(terms["total"], terms["kkt_rel"] + 2.0 * terms["prior"])


# ----------------------------------------------------------------------------- the projection objective


def brute_jacobian(v: VictimMLP, x: torch.Tensor) -> torch.Tensor:
    """Rows grad_theta phi(x_j) of the victim's own forward (hard ReLU), by autograd, one candidate at a time."""
    rows = []
    for xj in x:
        v.zero_grad()
        v(xj[None]).sum().backward()
        rows.append(torch.cat([p.grad.flatten() for p in v.parameters()]))
    return torch.stack(rows)


def flat_params(v: VictimMLP) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in v.parameters()])


@pytest.mark.parametrize("bias", [True, False, [True, False], [False, True]])
def test_projection_closed_form_equals_the_brute_force_jacobian_gram(bias):
    torch.manual_seed(1)
    v = VictimMLP(5, [9], 2, bias=bias).double()
    x = torch.randn(2, 6, 5, dtype=F64)  # K = 2 runs, m = 6 candidates
    obj = ProjectionObjective(v, "relu_sigmoid_grad", F64, ridge=0.0)
    A, c = obj.gram(x, torch.full((2,), BIG, dtype=F64))
    t = flat_params(v)
    for k in range(2):
        J = brute_jacobian(v, x[k])
        torch.testing.assert_close(A[k], J @ J.T)
        torch.testing.assert_close(c[k], J @ t)
        # the loss: the part of t outside the row space of J, by least squares
        coef = torch.linalg.lstsq(J.T, t[:, None]).solution[:, 0]
        expected = (t - J.T @ coef).pow(2).sum() / t.pow(2).sum()
        _, rel = obj.residual(x[k:k + 1], torch.full((1,), BIG, dtype=F64))
        torch.testing.assert_close(rel[0], expected)


def test_projection_residual_at_points_is_the_least_squares_remainder_of_the_target():
    """evaluate's identifiability figure: the part of the target outside the span of the points' gradients (hard
    ReLU), in the victim's input frame (its input mean subtracted)."""
    torch.manual_seed(4)
    v = VictimMLP(5, [7], 2, bias=[True, True], center=True).double()
    v.input_mean.copy_(torch.randn(5))
    x = torch.randn(6, 5, dtype=F64)
    J = brute_jacobian(v, x)  # the victim's own forward subtracts its input mean
    for target in (None, {name: torch.randn_like(p) for name, p in v.state_dict().items() if name.startswith("layers.")}):
        t = flat_params(v) if target is None else torch.cat([target[n].flatten() for n, _ in v.named_parameters()])
        coef = torch.linalg.lstsq(J.T, t[:, None]).solution[:, 0]
        expected = float((t - J.T @ coef).pow(2).sum() / t.pow(2).sum())
        assert R.projection_residual_at(v, x, target) == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_projection_torch_func_path_equals_the_closed_form_values_and_gradients():
    torch.manual_seed(2)
    v = VictimMLP(4, [7], 2, bias=True).double()
    closed = ProjectionObjective(v, "relu_sigmoid_grad", F64, ridge=1e-6)
    generic = ProjectionObjective(v, "relu_sigmoid_grad", F64, ridge=1e-6, jacobian="torch_func")
    assert closed.closed_form and not generic.closed_form
    alpha = torch.tensor([3.0, 20.0], dtype=F64)  # a smooth surrogate: its derivative enters the loss's gradient
    x1 = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    for a, b in zip(closed.gram(x1, alpha), generic.gram(x2, alpha)):
        torch.testing.assert_close(a, b)
    closed.residual(x1, alpha)[1].sum().backward()
    generic.residual(x2, alpha)[1].sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_projection_of_a_deeper_victim_equals_the_brute_force_jacobian():
    torch.manual_seed(3)
    v = VictimMLP(4, [6, 5], 2, bias=True).double()
    obj = ProjectionObjective(v, "relu_sigmoid_grad", F64, ridge=0.0)
    assert not obj.closed_form
    x = torch.randn(1, 4, 4, dtype=F64)
    A, c = obj.gram(x, torch.full((1,), BIG, dtype=F64))
    J = brute_jacobian(v, x[0])
    torch.testing.assert_close(A[0], J @ J.T)
    torch.testing.assert_close(c[0], J @ flat_params(v))
    with pytest.raises(ConfigError, match="closed_form needs one hidden layer"):
        ProjectionObjective(v, "relu_sigmoid_grad", F64, jacobian="closed_form")


def test_projection_loss_vanishes_when_the_target_is_in_the_span_of_the_training_gradients():
    """t = J(x_true)^T a: the training points explain it exactly (loss ~0), random candidates do not."""
    torch.manual_seed(4)
    v = VictimMLP(6, [40], 2, bias=True).double()
    x_true = torch.randn(5, 6, dtype=F64)
    J = brute_jacobian(v, x_true)
    t = J.T @ torch.tensor([1.0, -0.5, 2.0, 0.7, -1.3], dtype=F64)
    sizes = [p.numel() for p in v.parameters()]
    target = {name: part.view_as(p) for (name, p), part in zip(v.state_dict().items(), t.split(sizes))}
    obj = ProjectionObjective(v, "relu_sigmoid_grad", F64, ridge=1e-9, target=target)
    alpha = torch.full((1,), BIG, dtype=F64)
    _, at_truth = obj.residual(x_true[None], alpha)
    _, at_random = obj.residual(torch.randn(1, 5, 6, dtype=F64), alpha)
    assert at_truth.item() < 1e-6
    assert at_random.item() > 0.05


def test_projection_refuses_multiclass_victims():
    with pytest.raises(ConfigError, match="binary victims"):
        ProjectionObjective(VictimMLP(4, [6], 3), "relu_sigmoid_grad", F64)


# ----------------------------------------------------------------------------- target = displacement


def _victim_dir(tmp_path: Path, weight_decay: float = 0.0, init: bool = False) -> tuple[Path, VictimMLP]:
    torch.manual_seed(0)
    v = VictimMLP(8, [16], 2, bias=[True, True])
    run_dir = tmp_path / "run"
    save_victim(run_dir / "classifier", v, {"loss": "bce", "weight_decay": weight_decay, "n_train": 4,
                                            "embedding": {"normalize": "l2", "mean_norm": 1.0},
                                            **({"init": "init.safetensors"} if init else {})})
    if init:
        torch.manual_seed(1)
        v0 = VictimMLP(8, [16], 2, bias=[True, True])
        save_file({k: t.contiguous() for k, t in v0.state_dict().items()}, str(run_dir / "classifier" / "init.safetensors"))
    return run_dir, v


def test_displacement_target_without_init_file_is_a_clear_error(tmp_path, make_cfg):
    run_dir, v = _victim_dir(tmp_path)
    with pytest.raises(DataError, match=r"init\.safetensors.*missing.*train the victim with this version, or import "
                                        r"it with --init"):
        load_target("displacement", run_dir / "classifier", v)
    cfg = make_cfg("logger.name=none", "reconstruct.target=displacement", "reconstruct.steps=2", run_dir=run_dir)
    with pytest.raises(DataError, match="init.safetensors"):
        R.run_stage(cfg, run_dir)


def test_kkt_displacement_target_is_theta_minus_theta0_without_decay(tmp_path):
    run_dir, v = _victim_dir(tmp_path, weight_decay=0.01, init=True)
    init = load_tensors(run_dir / "classifier" / "init.safetensors")[0]
    target = load_target("displacement", run_dir / "classifier", v)
    spec = {"num_classes": 2, "weight_decay": 0.01, "n_train": 4}
    obj = KKTObjective(v, spec, "binary", "relu_sigmoid_grad", F64, target=target)
    expected = [(p.detach().double() - init[name].double()) for name, p in v.state_dict().items()]
    for got, want in zip(obj.targets(), expected):
        torch.testing.assert_close(got, want)
    with pytest.raises(ConfigError, match="weight-decay form"):
        KKTObjective(v, spec, "binary_wd", "relu_sigmoid_grad", F64, target=target)


# ----------------------------------------------------------------------------- the stage with the projection objective


def test_stage_with_the_projection_objective_writes_candidates_and_finite_multipliers(tmp_path, make_cfg):
    run_dir, _ = _victim_dir(tmp_path, weight_decay=0.01, init=True)
    cfg = make_cfg("logger.name=none", "reconstruct=projection", "reconstruct.steps=10", "reconstruct.num_runs=2",
                   "reconstruct.runs_per_batch=2", "reconstruct.lr=0.05", "reconstruct.target=displacement",
                   run_dir=run_dir)
    summary = R.run_stage(cfg, run_dir)
    assert summary["runs_ok"] == 2 and summary["form"] == "binary"  # displacement: no weight-decay form
    c = R.load_candidates(run_dir)
    assert len(c) == 2 * 4 and torch.isfinite(c.lam).all() and (c.lam != 0).any()
    torch.testing.assert_close(c.norm, torch.ones(8), rtol=0, atol=1e-6)  # renormalised onto the sphere every step
    runs = c.meta["runs"]
    assert all(0.0 <= r["final_loss"] <= 1.0 for r in runs)
    meta = load_tensors(R.run_path(run_dir, 0))[1]
    assert (meta["objective"], meta["target"], meta["lambda_penalty"]) == ("projection", "displacement", 0.0)
    json.dumps(meta)
