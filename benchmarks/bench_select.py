"""Benchmark the selection stage's clustering on synthetic candidates.

    python benchmarks/bench_select.py                 # N = 10^4 and 10^5, D = 1024, both methods
    python benchmarks/bench_select.py --n 10000 --method kmeans

Candidates: ``N`` points, 90% Gaussian noise and 10% near-copies (cosine ~0.99) of ``N/100``
planted "training samples", each copy from a random run. Reports wall time per method and the
fraction of the top-``R`` representatives that are planted (the planted rate among all
candidates is 10%, so a random choice scores ~0.10).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from recon_lightning.select import SelectConfig, select_candidates


def make_candidates(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_planted = n // 10
    n_centres = max(1, n // 100)
    centres = torch.randn(n_centres, d, generator=g)
    owner = torch.randint(0, n_centres, (n_planted,), generator=g)
    planted = centres[owner] + 0.1 * torch.randn(n_planted, d, generator=g)
    noise = torch.randn(n - n_planted, d, generator=g)
    x = torch.cat([noise, planted])
    is_planted = torch.cat([torch.zeros(n - n_planted, dtype=torch.bool), torch.ones(n_planted, dtype=torch.bool)])
    y = torch.randint(0, 2, (n,), generator=g)
    y[n - n_planted:] = owner % 2
    lam = torch.rand(n, generator=g)
    run = torch.randint(0, max(2, n // 200), (n,), generator=g)
    run_loss = torch.rand(n, generator=g)
    return x, y, lam, run, run_loss, is_planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--method", nargs="+", default=["kmeans", "knn"])
    ap.add_argument("--representatives", type=int, default=100)
    args = ap.parse_args()
    for n in args.n:
        x, y, lam, run, run_loss, is_planted = make_candidates(n, args.dim)
        for method in args.method:
            scfg = SelectConfig(method=method, num_representatives=args.representatives)
            t0 = time.perf_counter()
            sel, clusters = select_candidates(x, y, lam, run, run_loss, scfg, progress=False)
            dt = time.perf_counter() - t0
            hit = is_planted[sel["candidate_index"]].float().mean().item()
            print(f"N={n:>7} D={args.dim} method={method:<6} clusters={len(clusters):>6} "
                  f"time={dt:7.2f}s  planted@{len(sel['x'])}={hit:.2f} (random ~{is_planted.float().mean():.2f})",
                  flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
