"""The owner's audit on a lazy victim (docs/objectives.md, "target"): a binary D-H-1 ReLU victim with its output layer
at NTK scale, trained by MSE with full-batch SGD on n random unit-norm points, its initial parameters saved as
init.safetensors; then the reconstruct stage with ``reconstruct.target=displacement`` at several learning rates.
Printed: per learning rate the best final loss and, per run, the mean over training points of their best
candidate's cosine (1.0: every training point recovered); then the projection residual at the training set and at
random unit-norm points.

    python benchmarks/owner_audit_lazy.py --width 2000 --lr 0.03 0.3 1 --out runs/owner_audit
    python benchmarks/owner_audit_lazy.py --width 2000 --lr 0.03 --objective kkt --out runs/owner_audit_kkt
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from recon_lightning import reconstruct as R
from recon_lightning.fit import load_config
from recon_lightning.objectives import load_target
from recon_lightning.victim import INIT_FILE, VictimMLP, save_initial_parameters, save_victim


def lazy_victim(D: int, n: int, H: int, seed: int = 0):
    torch.manual_seed(seed)
    x = F.normalize(torch.randn(n, D), dim=1)
    y = torch.tensor([0, 1] * (n // 2))
    v = VictimMLP(D, [H], 2, bias=[True, True])
    with torch.no_grad():
        v.layers[1].weight.normal_(0, 1 / H ** 0.5)  # NTK scale: training stays lazy
    init = {k: t.clone().contiguous() for k, t in v.state_dict().items()}
    opt = torch.optim.SGD(v.parameters(), lr=0.02)
    for _ in range(1000):
        loss = ((v(x) - (2 * y - 1).float()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        moved = float((v.layers[0].weight - init["layers.0.weight"]).norm() / init["layers.0.weight"].norm())
    return v, init, x, y, float(loss), moved


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--lr", type=float, nargs="+", default=[0.03, 0.3, 1.0])
    ap.add_argument("--objective", default="projection", choices=["projection", "kkt"])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("runs/owner_audit"))
    args = ap.parse_args(argv)
    v, init, x, y, loss, moved = lazy_victim(args.dim, args.n, args.width)
    print(f"victim {args.dim}-{args.width}-1: training MSE {loss:.2e}, first layer moved {moved:.4f}")
    preset = ["reconstruct=projection"] if args.objective == "projection" else ["reconstruct.multiplier=1"]
    best_cosines = {}
    for lr in args.lr:
        run_dir = args.out / f"lr{lr:g}"
        shutil.rmtree(run_dir, ignore_errors=True)  # run files are resumed by hyperparameters, not by victim
        save_initial_parameters(run_dir / "classifier", init)
        save_victim(run_dir / "classifier", v, {"loss": "mse", "weight_decay": 0.0, "n_train": args.n, "init": INIT_FILE,
                                                "embedding": {"normalize": "l2", "mean_norm": 1.0}})
        cfg = load_config([f"run_dir={run_dir}", "logger.name=none", "trainer.enable_progress_bar=false", *preset,
                           "reconstruct.target=displacement", f"reconstruct.lr={lr}", f"reconstruct.steps={args.steps}",
                           f"reconstruct.num_runs={args.runs}", f"reconstruct.runs_per_batch={args.runs}", "seed=0"])
        start = time.time()
        summary = R.run_stage(cfg, run_dir)
        c = R.load_candidates(run_dir)
        best = [float((F.normalize(c.x[c.run == r], dim=1) @ x.T).max(0).values.mean()) for r in sorted(set(c.run.tolist()))]
        best_cosines[lr] = best
        print(f"lr {lr:g}: best loss {summary['best_loss']:.4f}, per-run mean best cosine "
              f"{[round(b, 3) for b in best]}, {time.time() - start:.0f} s")
    target = load_target("displacement", run_dir / "classifier", v)
    random = F.normalize(torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=-1)
    # the surrogate's derivative at this sharpness is ReLU's own
    residual = {"train": R.projection_residual_at(v, x, target, sharpness=1e7),
                "random": R.projection_residual_at(v, random, target, sharpness=1e7)}
    print(f"projection residual at the training set {residual['train']:.4f}, at random unit-norm points "
          f"{residual['random']:.4f}")
    return {"projection_residual": residual, "best_cosines": best_cosines}


if __name__ == "__main__":
    main()
