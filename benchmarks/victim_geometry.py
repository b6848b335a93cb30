"""The geometry of a trained ReLU victim that decides what reconstruction can recover (docs/results.md, "The
victim's kinks"): how many distinct first-layer units it keeps, how many training samples share an activation
pattern, how many are identifiable from the first layer at all, how close it is to a stationary point, and where its
hyperplanes lie (through training samples, not held-out ones).

    python benchmarks/victim_geometry.py                                   # the default victim on the default digits
    python benchmarks/victim_geometry.py classifier.weight_decay=1e-3 classifier.lr=0.5   # any classifier override

Victims are trained by the classifier preset's recipe in a plain loop (benchmarks/study_reconstruct.py). Identifiable
sample i: the first layer's stationarity equations ``w_j / v_j = sum_{i active at unit j} c_i x_i`` (one per live unit
j) determine ``c_i x_i`` exactly when e_i lies in the span of the units' activation columns (given the patterns).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_reconstruct import digits, train_victim  # noqa: E402

from recon_lightning.evaluate import hyperplane_membership  # noqa: E402
from recon_lightning.fit import load_config  # noqa: E402
from recon_lightning.kkt import first_layer_hyperplanes  # noqa: E402


def geometry(victim, x: torch.Tensor) -> dict:
    """Live units, distinct unit directions, distinct activation patterns and identifiable samples (float64)."""
    w, b = victim.layers[0].weight.detach().double(), victim.layers[0].bias.detach().double()
    nxt = victim.layers[1].weight.detach().double()
    normals, offsets = first_layer_hyperplanes(w, b, nxt)
    planes = torch.cat([normals, offsets[:, None]], 1)
    planes = planes / planes.norm(dim=1, keepdim=True)
    # Distinct directions: greedy groups of live units whose (w, b) agree to cosine 0.99.
    left, directions = torch.ones(len(planes), dtype=torch.bool), 0
    for i in range(len(planes)):
        if left[i]:
            left &= ~((planes @ planes[i]) > 0.99)
            directions += 1
    xc = x.double() - victim.input_offset().double()
    active = ((xc @ normals.T + offsets) > 0).double()  # (n, live units)
    proj = torch.linalg.pinv(active.T) @ active.T  # projector onto the span of the units' activation columns
    off = (torch.eye(len(x), dtype=torch.float64) - proj).norm(dim=0)
    return {"live_units": int(len(normals)), "distinct_directions": directions,
            "distinct_patterns": len({tuple(r.tolist()) for r in active.int()}),
            "pattern_rank": int(torch.linalg.matrix_rank(active)), "identifiable": float((off < 1e-6).double().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="classifier / data overrides, as for recon_lightning.fit")
    ap.add_argument("--out", default=None, help="append the row to this JSON file")
    args = ap.parse_args()
    cfg = load_config(list(args.overrides))
    x, y, xt, _ = digits(int(cfg.data.n_per_class), int(cfg.seed))
    t = time.time()
    victim, info = train_victim(cfg.classifier, x, y, "cpu")
    member = hyperplane_membership(victim, x, xt)
    member.pop("train_counts")
    member.pop("heldout_counts", None)
    row = {"overrides": args.overrides, "train_s": round(time.time() - t, 1), "victim": info, **geometry(victim, x),
           "hyperplane_membership": member}
    print(json.dumps(row, indent=1))
    if args.out:
        path = Path(args.out)
        rows = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(rows + [row], indent=1))


if __name__ == "__main__":
    main()
