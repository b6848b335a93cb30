"""Does the reconstruction objective hold the training set when it starts *at* it? (docs/results.md, "Starting at
the training set".)

Two measurements on a trained victim (a run directory with embed/ and classifier/):

1. **Drift.** The reconstruct stage's module with m = n candidates set to the training samples and the multipliers
   to their loss derivatives sigmoid(-y phi(x)) (what they are at a stationary point), optimised with the stage's
   objective and optimiser at fixed learning rates. Printed: the relative KKT loss, how far the candidates moved
   (cosine to where they started) and the leak rate against the held-out samples, at checkpoints.
2. **Local pinning.** The Jacobian of the stationarity residual with respect to every sample and multiplier at
   the training set (exact ReLU derivative; at the kinks, subgradients fitted in [0, 1]). A direction in its null
   space moves samples without changing the residual; a sample with no share in that null space is pinned.

    python -m recon_lightning.fit stage=classifier run_dir=runs/truth
    python benchmarks/start_at_truth.py runs/truth --out start_at_truth.json

Weight-decay binary victims with one hidden layer (the default D-1000-1) only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import recon_lightning.reconstruct as R
from recon_lightning.evaluate import leak_figures
from recon_lightning.fit import load_config
from recon_lightning.kkt import KKTObjective
from recon_lightning.storage import load_tensors
from recon_lightning.victim import load_victim

F64 = torch.float64


def load_run(run_dir: Path):
    victim, spec = load_victim(run_dir / "classifier")
    if spec.get("num_classes") != 2 or len(spec.get("hidden", [])) != 1 or not spec.get("weight_decay"):
        raise SystemExit("start_at_truth.py handles binary weight-decay victims with one hidden layer")
    emb, _ = load_tensors(run_dir / "embed" / "embeddings.safetensors", "embeddings")
    x, y = emb["train_x"].to(F64), emb["train_y"].long()
    order = torch.argsort(y, stable=True)  # the stage's candidates are class-major
    return victim.to(F64), spec, x[order], y[order], emb["test_x"].to(F64)


def drift(victim, spec, x, y, heldout, lr: float, steps: int, checkpoints: list[int], runs: int) -> list[dict]:
    """Start K runs of the stage's module (its default config, m = n, learning rate ``lr``) at the training set;
    leak rate and movement at the checkpoints."""
    rcfg = OmegaConf.to_container(load_config([f"reconstruct.lr={lr}", "reconstruct.multiplier=1"]).reconstruct,
                                  resolve=True)
    optimizer = rcfg["optimizer"]
    objective = KKTObjective(victim, spec, "binary_wd", rcfg["activation"], F64)
    hps = [R.sample_hparams(rcfg, 0, r) for r in range(runs)]
    mean = victim.input_offset().to(F64)
    module = R.ReconstructionModule(objective, list(range(runs)), hps, y, x.shape[1], rcfg, "box", None, F64,
                                    input_mean=mean)
    with torch.no_grad():
        module.candidates.copy_((x - mean).expand(runs, -1, -1))
        module.multipliers.copy_(torch.sigmoid(-(2.0 * y - 1) * victim(x).reshape(-1)).expand(runs, -1))
    opt = module.configure_optimizers()
    rows = []
    for step in range(steps + 1):
        if step in checkpoints:
            with torch.no_grad():
                cands = module.x() + module.input_mean
                moved = F.cosine_similarity(cands, x.expand_as(cands), dim=-1)
                rel = module.losses(create_graph=False)["kkt_rel"]
            leak = leak_figures(x.float(), cands.reshape(-1, x.shape[1]).float(), heldout.float())
            rows.append({"optimizer": optimizer, "lr": lr, "step": step, "kkt_rel_median": float(rel.median()),
                         "cos_to_start_median": float(moved.median()), "cos_to_start_min": float(moved.min()),
                         "leak_rate": leak["leak_rate"], "leak_rate_one_to_one": leak["leak_rate_one_to_one"]})
            print(f"  {optimizer} lr {lr:g} step {step:5d}: kkt_rel {rows[-1]['kkt_rel_median']:.4f}  cosine to start "
                  f"median {rows[-1]['cos_to_start_median']:.3f} min {rows[-1]['cos_to_start_min']:.3f}  leak "
                  f"{leak['leak_rate']:.2f} (1:1 {leak['leak_rate_one_to_one']:.2f})", flush=True)
        if step < steps:
            module.optimization_step(opt)
    return rows


def pinning(victim, spec, x, y, tolerances: list[float]) -> dict:
    """Null space of d(stationarity residual) / d(samples, multipliers) at the training set."""
    w, b = victim.layers[0].weight.detach(), victim.layers[0].bias.detach()
    a = victim.layers[1].weight.detach()[0]
    wd, n = float(spec["weight_decay"]), int(spec["n_train"])
    xc = x - victim.input_offset().to(F64)
    ys = 2.0 * y.to(F64) - 1.0
    z = xc @ w.T + b
    relu = z.clamp_min(0)
    lam0 = torch.sigmoid(-ys * (relu @ a))
    kink = (z.abs() / w.norm(dim=1)) < 1e-6
    target_sq = wd ** 2 * (w.pow(2).sum() + b.pow(2).sum() + a.pow(2).sum())

    def residual(lam, s):
        g = (lam * ys / n)[:, None] * s * a
        ga = ((lam * ys / n)[:, None] * relu).sum(0)
        return ((wd * w - g.T @ xc).pow(2).sum() + (wd * b - g.sum(0)).pow(2).sum() + (wd * a - ga).pow(2).sum()) / target_sq

    # Subgradients at the kinks (sigmoid(u) in [0, 1]) and multipliers (lam0 * exp(l)) fitted to the residual.
    u = torch.zeros_like(z, requires_grad=True)
    log_scale = torch.zeros(len(x), dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([u, log_scale], max_iter=2000, line_search_fn="strong_wolfe", tolerance_grad=1e-14,
                            tolerance_change=1e-16)
    deriv = lambda: torch.where(kink, torch.sigmoid(u), (z > 0).to(F64))  # noqa: E731

    def closure():
        opt.zero_grad()
        r = residual(lam0 * log_scale.exp(), deriv())
        r.backward()
        return r

    plain = float(residual(lam0, (z > 0).to(F64)))
    for _ in range(3):
        opt.step(closure)
    s, lam = deriv().detach(), (lam0 * log_scale.exp()).detach()
    fitted = float(residual(lam, s))
    # Jacobian of the parameter gradient (W, b, a blocks) w.r.t. (x_1..x_N, lambda_1..lambda_N), patterns fixed.
    N, D, H = len(x), x.shape[1], len(a)
    c = lam * ys / n
    jac = torch.zeros(H * D + 2 * H, N * D + N, dtype=F64)
    eye = torch.arange(D)
    for i in range(N):
        block = torch.zeros(H, D, D, dtype=F64)
        block[:, eye, eye] = (c[i] * s[i] * a)[:, None]
        jac[:H * D, i * D:(i + 1) * D] = block.reshape(H * D, D)
        jac[H * D + H:, i * D:(i + 1) * D] = c[i] * s[i][:, None] * w
        jac[:H * D, N * D + i] = ((ys[i] / n) * s[i] * a)[:, None].mul(xc[i][None, :]).reshape(-1)
        jac[H * D:H * D + H, N * D + i] = (ys[i] / n) * s[i] * a
        jac[H * D + H:, N * D + i] = (ys[i] / n) * relu[i]
    eigvals, vectors = torch.linalg.eigh(jac.T @ jac)
    sv = eigvals.clamp_min(0).sqrt()
    rows = []
    for tol in tolerances:
        null = vectors[:, sv < tol * sv.max()]
        free = null[:N * D].reshape(N, D, -1).pow(2).sum((1, 2))  # each sample's share of the null space (dims)
        rows.append({"tolerance": tol, "null_dim": int(null.shape[1]), "pinned": int((free < 1e-2).sum()),
                     "free_dims_median": float(free.median())})
        print(f"  singular values < {tol:g} x max: null space {null.shape[1]} of {N * D + N}; samples pinned "
              f"{rows[-1]['pinned']} of {N}", flush=True)
    return {"residual_relu_derivative": plain, "residual_fitted_subgradients": fitted,
            "kink_pairs": int(kink.sum()), "tolerances": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="the default range's ends")
    ap.add_argument("--skip-pinning", action="store_true", help="the Jacobian (3.4 GB, ~3 min on 2 cores for D-1000-1)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    victim, spec, x, y, heldout = load_run(args.run_dir)
    checkpoints = sorted({0, 100, 500, 1000, 2000, args.steps} & set(range(args.steps + 1)))
    t0 = time.time()
    out: dict = {"run_dir": str(args.run_dir), "n_train": len(x), "drift": []}
    for lr in args.lrs:
        out["drift"] += drift(victim, spec, x, y, heldout, lr, args.steps, checkpoints, args.runs)
    if not args.skip_pinning:
        out["pinning"] = pinning(victim, spec, x, y, [1e-8, 1e-6, 1e-4])
    out["seconds"] = round(time.time() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
