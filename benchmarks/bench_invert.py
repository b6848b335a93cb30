"""Direct-inversion throughput: optimisation steps per second for batch 1 vs batch 16 (same backbone).

Batching pays when the backbone call dominates: one forward/backward serves 16 images.
Images per second = steps/s * batch.

    python benchmarks/bench_invert.py                                  # random-init EfficientNet-Lite0 (224 px)
    python benchmarks/bench_invert.py --backbone timm --model test_vit  # any timm model, random init
    python benchmarks/bench_invert.py --param dip --steps 10 --device cuda
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from omegaconf import OmegaConf

from recon_lightning.backbones import build_backbone
from recon_lightning.invert import DirectInversion
from recon_lightning.training import steps_loader

CONFIG = "configs/invert/default.yaml"


def steps_per_second(backbone, cfg, batch: int, steps: int, device: str) -> float:
    targets = torch.randn(batch, backbone.embed_dim)
    module = DirectInversion(backbone, targets, cfg, steps=steps + 2)
    trainer = L.Trainer(max_steps=steps + 2, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False,
                        accelerator="gpu" if device == "cuda" else "cpu", devices=1)

    class Timer(L.Callback):  # time steps after 2 warm-up steps
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 2:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *args):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    timer = Timer()
    trainer.callbacks.append(timer)
    trainer.fit(module, train_dataloaders=steps_loader(steps + 2))
    return steps / (timer.t1 - timer.t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite", help="backbone kind (efficientnet_lite | timm | open_clip)")
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--param", default="fourier", choices=["dip", "fourier", "pixels"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--copies", type=int, default=1, help="augmented views per image per step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = build_backbone({"kind": args.backbone, "model": args.model, "pretrained": False})
    cfg = OmegaConf.load(CONFIG)
    cfg.param, cfg.augment.copies = args.param, args.copies
    print(f"backbone {args.backbone}:{args.model} input {backbone.input_size} dim {backbone.embed_dim}, "
          f"param {args.param}, copies {args.copies}, device {args.device}")
    rates = {}
    for batch in (1, 16):
        rates[batch] = steps_per_second(backbone, cfg, batch, args.steps, args.device)
        print(f"batch {batch:2d}: {rates[batch]:.3f} steps/s = {rates[batch] * batch:.2f} images*steps/s")
    print(f"ratio steps/s batch1 / batch16 = {rates[1] / rates[16]:.2f}; "
          f"throughput gain of batch 16 = {16 * rates[16] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
