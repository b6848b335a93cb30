"""The null-control table: every leak figure of a run, beside the value that real samples the victim never saw get
when they stand in for the candidates, at several pool sizes.

A figure is evidence of leakage only if unseen data scores clearly lower on it. The pool-dependent figures (the leak
rate against the whole held-out pool, SSIM > 0.4 over all candidates) grow with the number of "candidates" even when
they are unseen real samples; the null-controlled ones (membership AUC / TPR at low FPR, the pool-matched leak rate)
stay at chance.

    python benchmarks/null_control.py runs/digits-identity            # needs a public split (data.n_public_per_class)
    python benchmarks/null_control.py runs/digits-identity --pools 200 800 1497 --out docs/data/null_control.json

Pixel embeddings also get the SSIM figures (training images as [0, 1] images, candidates min-max scaled).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from recon_lightning.evaluate import _eligible_candidates, embeddings_are_pixels, leak_figures, pool_matched_ssim, \
    reference_ssim_figures
from recon_lightning.embed import load_embeddings, load_images
from recon_lightning.membership import membership_roc, pool_matched_leak_rate
from recon_lightning.victim import load_victim


def figures(train: torch.Tensor, held: torch.Tensor, cands: torch.Tensor, offset: torch.Tensor, images: dict | None) -> dict:
    roc = membership_roc(train - offset, held - offset, cands - offset, n_boot=200)
    row = {"candidates": len(cands), "leak_rate_whole_pool": leak_figures(train, cands, held)["leak_rate"],
           "membership_auc": roc["auc"], "membership_auc_ci95": roc["auc_ci95"],
           "tpr_at_1pct_fpr": roc["tpr_at_fpr"]["0.01"]["tpr"], "tpr_at_5pct_fpr": roc["tpr_at_fpr"]["0.05"]["tpr"],
           "leak_rate_pool_matched": pool_matched_leak_rate(train - offset, cands - offset, held - offset)["leak_rate"]}
    if images is not None:
        shape = images["train"].shape[1:]
        train_img = images["train"].float() / 255
        row["frac_train_ssim_gt_0.4_whole_pool"] = reference_ssim_figures(train_img, cands.reshape(-1, *shape))["frac_train_ssim_gt_0.4"]
        row["frac_train_ssim_gt_0.4_pool_matched"] = pool_matched_ssim(
            train_img, cands.reshape(-1, *shape), images["test"].float() / 255)["frac_train_ssim_gt_0.4_pool_matched"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--pools", type=int, nargs="+", default=[200, 800, 1497])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    emb = load_embeddings(args.run_dir)
    if emb.public_x is None:
        raise SystemExit(f"{args.run_dir}: the embeddings have no public split (data.n_public_per_class)")
    model, _ = load_victim(args.run_dir / "classifier")
    offset = model.input_offset().detach().float()
    images = load_images(args.run_dir)
    if images is not None and not embeddings_are_pixels(emb.train_x, images["train"]):
        images = None
    train, held = emb.train_x.float(), emb.test_x.float()
    public = emb.public_x.float()[torch.randperm(len(emb.public_x), generator=torch.Generator().manual_seed(0))]
    rows = []
    for pool in args.pools:
        rows.append({"candidates_are": "unseen public samples", **figures(train, held, public[:pool], offset, images)})
        print(json.dumps(rows[-1]), flush=True)
    tensors, keep, _ = _eligible_candidates(args.run_dir)
    rows.append({"candidates_are": "the run's reconstruction", **figures(train, held, tensors["x"][keep].float(), offset, images)})
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "n_train": len(train), "n_heldout": len(held),
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
