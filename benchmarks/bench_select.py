"""Benchmark the selection stage's clustering on synthetic candidates.

    python benchmarks/bench_select.py                 # N = 10^4 and 10^5, D = 1024: kmeans, knn old and new
    python benchmarks/bench_select.py --n 100000 --method knn --knn-index old new
    python benchmarks/bench_select.py --n 100000 --method knn --knn-index new --reduce-dim 32 --nprobe 8

Candidates: ``N`` points, 90% Gaussian noise and 10% near-copies (cosine ~0.99) of ``N/100``
planted "training samples", each copy from a random run. Reports wall time per method and the
fraction of the top-``R`` representatives that are planted (the planted rate among all
candidates is 10%, so a random choice scores ~0.10).

``--knn-index`` picks how ``method=knn`` finds neighbours above ``select.knn.exact_max``
candidates per class (each variant is one run of ``select_candidates``):

* ``new``: the default configuration, PCA (``--reduce-dim``) + IVF candidates re-ranked by exact cosine;
* ``old``: ``select.knn.reduce_dim=0``, IVF in the full space (the approach before PCA);
* ``exact``: exact ``IndexFlatIP`` at every size (``exact_max`` = infinity).

Each knn line after the first also says whether its multi-member clusters are exactly those of
the first knn variant, and the old/new time ratio is printed when both ran.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from recon_lightning.config import shipped
from recon_lightning.select import SelectConfig, select_candidates

KNN_INDEXES = ("new", "old", "exact")


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


def knn_config(variant: str, args, **common) -> SelectConfig:
    """SelectConfig for one ``--knn-index`` variant (``new`` takes the tuning flags)."""
    if variant == "old":
        knn = {"reduce_dim": 0}
    elif variant == "exact":
        knn = {"exact_max": 2**62}
    else:
        knn = {key: getattr(args, key) for key in ("reduce_dim", "k_factor", "nprobe", "nlist") if getattr(args, key) is not None}
    return shipped(SelectConfig, "select/default", method="knn", knn=knn, **common)


def multi_clusters(clusters: list[dict]) -> set[frozenset]:
    return {frozenset(c["members"].tolist()) for c in clusters if c["size"] > 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--method", nargs="+", default=["kmeans", "knn"])
    ap.add_argument("--knn-index", nargs="+", default=["old", "new"], choices=KNN_INDEXES,
                    help="neighbour search variants for method=knn (default: old new)")
    ap.add_argument("--reduce-dim", type=int, help="select.knn.reduce_dim for the 'new' variant")
    ap.add_argument("--k-factor", type=float, help="select.knn.k_factor for the 'new' variant")
    ap.add_argument("--nprobe", type=int, help="select.knn.nprobe for the 'new' variant")
    ap.add_argument("--nlist", type=int, help="select.knn.nlist for the 'new' variant (default: auto)")
    ap.add_argument("--representatives", type=int, default=100)
    ap.add_argument("--progress", action="store_true", help="show select_candidates' progress bars")
    args = ap.parse_args()
    for n in args.n:
        x, y, lam, run, run_loss, is_planted = make_candidates(n, args.dim)
        times, first = {}, None
        runs = [(m, None) for m in args.method if m != "knn"]
        if "knn" in args.method:
            runs += [("knn", v) for v in args.knn_index]
        for method, variant in runs:
            common = {"num_representatives": args.representatives}
            scfg = knn_config(variant, args, **common) if method == "knn" else shipped(SelectConfig, "select/default", method=method, **common)
            t0 = time.perf_counter()
            sel, clusters = select_candidates(x, y, lam, run, run_loss, scfg, progress=args.progress)
            dt = time.perf_counter() - t0
            hit = is_planted[sel["candidate_index"]].float().mean().item()
            name = method if variant is None else f"knn/{variant}"
            note = ""
            if variant is not None:
                times[variant] = dt
                groups = multi_clusters(clusters)
                if first is None:
                    first = (variant, groups)
                else:
                    diff = len(groups ^ first[1])
                    note = f"  multi-member clusters {'==' if diff == 0 else '!='} knn/{first[0]}'s" + \
                           (f" ({diff} differ)" if diff else f" ({len(groups)})")
            print(f"N={n:>7} D={args.dim} method={name:<10} clusters={len(clusters):>6} "
                  f"time={dt:7.2f}s  planted@{len(sel['x'])}={hit:.2f} (random ~{is_planted.float().mean():.2f}){note}",
                  flush=True)
        if "old" in times and "new" in times:
            print(f"N={n:>7} knn old/new time ratio: {times['old'] / times['new']:.1f}x "
                  f"({times['old']:.1f}s -> {times['new']:.1f}s)", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
