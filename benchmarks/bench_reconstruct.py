"""Throughput of batched reconstruction runs: candidate-steps per second for K = 1, 16, 64 runs
optimised together (one tensor program) on the same victim.

    python benchmarks/bench_reconstruct.py [--hidden 1000 1000] [--dim 64] [--candidates 200] [--steps 5]

A candidate-step is one optimisation step of one candidate; batching K runs should raise it
well above K = 1 (on a GPU especially), since the per-step work becomes K times larger matmuls.
"""

from __future__ import annotations

import argparse
import time

import torch

from recon_lightning.kkt import KKTObjective, prior_penalty
from recon_lightning.reconstruct import candidate_labels
from recon_lightning.victim import VictimMLP


def bench(objective: KKTObjective, K: int, m: int, dim: int, steps: int, device: torch.device) -> float:
    y = candidate_labels(2, m // 2).to(device).expand(K, -1)
    x = (torch.randn(K, m, dim, device=device) * 0.01).requires_grad_()
    lam = torch.rand(K, m, device=device).requires_grad_()
    alpha = torch.full((K,), 100.0, device=device)
    opt = torch.optim.Adam([x, lam], lr=1e-3)

    def step():
        _, rel = objective.kkt(x, lam, y, alpha)
        loss = rel.sum() + objective.lambda_penalty(lam, y, torch.full((K,), 0.05, device=device)).sum() + prior_penalty(x, "box", None, 0.0, 1.0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return K * m * steps / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[1000, 1000])
    p.add_argument("--candidates", type=int, default=200, help="candidates per run (m)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--runs", type=int, nargs="+", default=[1, 16, 64], help="K values to compare")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    victim = VictimMLP(args.dim, args.hidden, 2, bias=[True] + [False] * len(args.hidden))
    objective = KKTObjective(victim, {"weight_decay": 0.0}, "binary", "relu_sigmoid_grad").to(device)
    print(f"victim {args.dim}-{'-'.join(map(str, args.hidden))}-1, {args.candidates} candidates per run, device {device}")
    rates = {}
    for K in args.runs:
        rates[K] = bench(objective, K, args.candidates, args.dim, args.steps, device)
        print(f"K={K:3d}: {rates[K]:12.0f} candidate-steps/s  ({rates[K] / args.candidates / K:8.2f} steps/s per run)"
              f"  x{rates[K] / rates[args.runs[0]]:.2f} vs K={args.runs[0]}", flush=True)


if __name__ == "__main__":
    main()
