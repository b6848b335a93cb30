"""benchmarks/displacement_identifiability.py: the projection residual against a least-squares fit written here."""

from __future__ import annotations

import torch
from benchmark_scripts import load_benchmark

from recon_lightning.victim import VictimMLP


def load_script():
    return load_benchmark("displacement_identifiability")


def test_projection_residual_is_the_least_squares_remainder():
    script = load_script()
    torch.manual_seed(0)
    model = VictimMLP(4, [6], 2, bias=[True, False], center=True).double()
    model.input_mean.copy_(torch.randn(4))
    params = {k: p.detach() for k, p in model.named_parameters()}
    x = torch.randn(3, 4, dtype=torch.float64)
    rows = []
    for xi in x:  # each sample's logit gradient, by autograd, flattened in the parameters' order
        model.zero_grad()
        model(xi[None]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    jac = torch.stack(rows)
    sizes = [p.numel() for p in params.values()]
    as_dict = lambda v: {k: t.reshape(p.shape) for (k, p), t in zip(params.items(), v.split(sizes))}  # noqa: E731
    t = torch.randn(jac.shape[1], dtype=torch.float64)
    coef = torch.linalg.lstsq(jac.T, t[:, None]).solution[:, 0]
    want = float((t - jac.T @ coef).square().sum() / t.square().sum())
    with torch.no_grad():
        assert abs(script.projection_residual(model, x, as_dict(t), params) - want) < 1e-10
        inside = jac.T @ torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)  # in the gradients' span: nothing left
        assert abs(script.projection_residual(model, x, as_dict(inside), params)) < 1e-10
