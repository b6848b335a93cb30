"""Does a victim's target single out its training set? The projection residual of the target at the training set
against the same number of held-out samples, before any optimisation.

For samples x_1..x_n, J holds their logit's parameter gradients (one row each) and the residual is the part of the
target t outside their span, ``1 - c^T A^-1 c / |t|^2`` with ``A = J J^T`` and ``c = J t`` (float64, exact gradients
by torch.func). Near 0 at the training set and far higher at held-out samples: the target identifies the training
set, and what is left is for an optimiser to find it. The targets: the displacement theta_T - theta_0 (gradients at
theta_0 and at theta_T) and theta_T itself. Needs a run_dir whose classifier stage saved init.safetensors and a
two-class victim (one logit).

    python benchmarks/displacement_identifiability.py runs/lazy4000 runs/lazy16000 --heldout 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

from recon_lightning.embed import load_embeddings
from recon_lightning.victim import load_initial_parameters, load_victim


def projection_residual(model, x: torch.Tensor, target: dict, at: dict) -> float:
    """``1 - c^T A^-1 c / |t|^2`` of ``target`` on the logit gradients of ``x`` taken at parameters ``at``."""
    buffers = dict(model.named_buffers())

    def logit(params, xi):
        return functional_call(model, {**params, **buffers}, (xi[None],)).squeeze()

    grads = vmap(grad(logit), in_dims=(None, 0))(at, x.double())
    jac = torch.cat([grads[k].reshape(len(x), -1) for k in target], 1)
    t = torch.cat([target[k].reshape(-1) for k in target])
    a, c = jac @ jac.T, jac @ t
    return float(1 - c @ torch.linalg.solve(a, c) / (t @ t))


def residuals(run_dir: Path, heldout: int) -> dict:
    emb = load_embeddings(run_dir)
    model, _ = load_victim(run_dir / "classifier")
    if model.out_dim != 1:
        raise SystemExit(f"{run_dir}: a two-class victim (one logit) is needed")
    init = load_initial_parameters(run_dir / "classifier")
    if init is None:
        raise SystemExit(f"{run_dir}/classifier has no initial parameters (init.safetensors)")
    model = model.double()
    trained = {k: p.detach() for k, p in model.named_parameters()}
    start = {k: init[k].double() for k in trained}
    displacement = {k: trained[k] - start[k] for k in trained}
    n = min(len(emb.train_x), heldout, len(emb.test_x))
    train_x, held_x = emb.train_x[:n], emb.test_x[:n]
    out = {"n": n}
    with torch.no_grad():
        for name, target, at in (("displacement_at_theta0", displacement, start),
                                 ("displacement_at_thetaT", displacement, trained), ("theta_at_thetaT", trained, trained)):
            out[name] = {"train": projection_residual(model, train_x, target, at),
                         "heldout": projection_residual(model, held_x, target, at)}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--heldout", type=int, default=100, help="samples of each set (the first n)")
    args = parser.parse_args(argv)
    print("| run_dir | n | target (gradients at) | train | held-out |\n|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        res = residuals(run_dir, args.heldout)
        for name in ("displacement_at_theta0", "displacement_at_thetaT", "theta_at_thetaT"):
            print(f"| {run_dir} | {res['n']} | {name} | {res[name]['train']:.3g} | {res[name]['heldout']:.3g} |")


if __name__ == "__main__":
    main()
