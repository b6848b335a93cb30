"""Write a small synthetic image set (one sub-folder per class) for auditing with data=imagefolder.

Two classes of 16x16 grayscale images: filled ellipses and filled rectangles, each with a random centre, size,
orientation (ellipses), intensity and background noise, so every image is its own sample (no two alike) and a
reconstruction can be told from a class prototype. Deterministic for a seed.

    python benchmarks/make_shapes.py --out /tmp/shapes --per-class 600
    python -m recon_lightning.fit data=imagefolder data.root=/tmp/shapes data.n_per_class=50 \\
        data.n_test_per_class=100 data.n_public_per_class=auto run_dir=runs/shapes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def shape_image(kind: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    a, b = rng.uniform(size * 0.15, size * 0.35, 2)
    if kind == "ellipse":
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
    else:
        inside = (np.abs(xx - cx) <= a) & (np.abs(yy - cy) <= b)
    img = rng.uniform(0.0, 0.25) + rng.normal(0, 0.05, (size, size))
    img[inside] = rng.uniform(0.6, 1.0)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=600)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    for kind in ("ellipse", "rectangle"):
        folder = args.out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            Image.fromarray(shape_image(kind, rng, args.size)).save(folder / f"{kind}_{i:04d}.png")
    print(f"wrote {2 * args.per_class} images to {args.out}")


if __name__ == "__main__":
    main()
