"""Reconstruction study: does the victim leak its training set, and how does that change with compute and recipe?

On the default data (scikit-learn digits, odd vs even, raw pixels, the pipeline's own split), for each row: a
victim trained with a classifier preset, then K reconstruction runs with a reconstruct preset (plus overrides),
scored against steps with the report's own metrics:

* ``leak_rate``: fraction of training images whose best candidate is closer (cosine) than the nearest held-out
  image (the test split) — memorisation, not "looks like a digit";
* ``frac_train_ssim_gt_0.4``: the reference's image metric (NCC-nearest candidate, SSIM window 3).

Sections: ``compute`` (the default and the reference presets against candidate-steps), ``ablation`` (each change
of the reference-method issue, cumulatively, on one victim), ``n`` (training-set size), ``epochs`` (victim training
length). Uses the stage's own pieces (config presets composed by Hydra, VictimMLP, ReconstructionModule and its
optimisers, the KKT objective) in plain loops; the Lightning stages add nothing to these numbers.

    python benchmarks/study_reconstruct.py --scale cpu --out study.json     # minutes on 2 cores (small)
    python benchmarks/study_reconstruct.py --scale gpu --out study.json     # the docs/results.md tables

The paper's regime (Oz et al. 2024: a victim on a pretrained backbone's embeddings): ``--embeddings RUN_DIR`` takes
the training and held-out sets from a run's embed stage instead of raw digits, e.g. DINOv2 embeddings of the digits
(``python -m recon_lightning.fit backbone=dinov2_vits14_offline data=digits stage=embed run_dir=runs/dd``), and runs
the ``paper`` section: the default victim (weight decay 1e-2, cosine-decayed learning rate), the earlier default
(weight decay 1e-3, constant lr 0.5) with a constant and a cosine-decayed lr, and the reference extraction.
Rows there add the paper's target metric
(fraction of training embeddings with a candidate at cosine >= 0.9), the same for the held-out set (the baseline),
and both after subtracting the training mean (raw DINOv2 embeddings share a large common direction).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from recon_lightning import reconstruct as R
from recon_lightning.data import load_dataset
from recon_lightning.evaluate import leak_figures, reference_ssim_figures
from recon_lightning.fit import load_config
from recon_lightning.kkt import KKTObjective, resolve_form
from recon_lightning.victim import VictimMLP, VictimModule, load_victim, loss_fn, margins, save_victim

PREVIOUS_DEFAULTS = ["classifier.lr_schedule=constant", "classifier.center=false", "classifier.hidden=[1000,1000]",
                     "classifier.bias=[true,false,false]",
                     "classifier.init_scale=[0.001,0.001,0.001]", "classifier.weight_decay=0.0", "classifier.epochs=3000",
                     "classifier.lr=0.5"]
OLD_RECON = ["reconstruct.lambda_per_candidate=false", "reconstruct.lambda_weight=1.0",
             "reconstruct.lambda_constraint=penalty"]
OLD_RECON_BASE = ["reconstruct.lr=0.01", "reconstruct.lambda_min=[0.01,0.1]"]  # the previous defaults' other values


def digits(n_per_class: int, seed: int = 0):
    cfg = load_config([f"data.n_per_class={n_per_class}", f"seed={seed}"])
    ds = load_dataset(cfg.data, seed)
    flat = lambda split: torch.tensor(np.stack([np.asarray(s, dtype=np.float32).reshape(-1) / 255.0 for s in split.samples]))  # noqa: E731
    return flat(ds.train), torch.tensor(ds.train.labels), flat(ds.test), ds.native_size or (1, 8, 8)


def embeddings(run_dir: str):
    """Training / held-out sets of a run's embed stage (the paper's regime: a backbone's embeddings)."""
    from recon_lightning.embed import load_embeddings

    e = load_embeddings(run_dir)
    return e.train_x.float(), e.train_y.float(), e.test_x.float(), None, dict(e.meta)


def stationarity(v: VictimMLP, x: torch.Tensor, y: torch.Tensor, wd: float) -> float | None:
    """||grad L + wd theta||^2 / ||wd theta||^2 at the training set (0 at an exact stationary point), float64."""
    if wd <= 0:
        return None
    v64 = copy.deepcopy(v).double()
    params = list(v64.parameters())
    g = torch.autograd.grad(loss_fn(v64(x.double()), y.double(), "bce"), params)
    with torch.no_grad():
        return float(sum(((gi + wd * p) ** 2).sum() for gi, p in zip(g, params)) / sum(((wd * p) ** 2).sum() for p in params))


def train_victim(c, x, y, device, epochs=None, cosine: bool = False) -> tuple[VictimMLP, dict]:
    """The classifier stage's recipe (full batch, BCE, the preset's optimiser and lr schedule), as a plain loop;
    ``cosine`` decays the learning rate to 0 over the schedule whatever the preset says."""
    as_plain = lambda v: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v  # noqa: E731
    torch.manual_seed(0)
    v = VictimMLP(x.shape[1], list(c.hidden), 2, bias=as_plain(c.bias), init_scale=as_plain(c.init_scale), center=bool(c.center))
    if v.center:
        v.input_mean.copy_(x.mean(0))
    v = v.to(device)
    xd, yd = x.to(device), y.to(device)
    opt = VictimModule(v, "bce", c.optimizer, float(c.lr), float(c.momentum), float(c.weight_decay)).configure_optimizers()
    total = int(epochs or c.epochs)
    cosine = cosine or c.get("lr_schedule") == "cosine"
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if cosine else None
    for _ in range(total):
        loss = loss_fn(v(xd), yd, "bce")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    v = v.cpu().eval()
    with torch.no_grad():
        logits = v(x)
        m = margins(logits, y)
        info = {"train_loss": float(loss_fn(logits, y, "bce")), "train_acc": float((m > 0).float().mean()),
                "margin_min": float(m.min())}
    info["stationarity"] = stationarity(v, x, y, float(c.weight_decay))
    return v, info


def cosine_fractions(x_train: torch.Tensor, cands: torch.Tensor, x_test: torch.Tensor, at: float = 0.9) -> dict:
    """Fraction of training samples with a candidate (and, the baseline, a held-out sample) at cosine >= ``at``, raw
    and after subtracting the training mean."""
    mu = x_train.mean(0)
    out = {}
    for tag, shift in (("", 0.0), ("centred_", mu)):
        a = F.normalize(x_train - shift, dim=1)
        for name, pool in (("candidates", cands), ("heldout", x_test)):
            best = (a @ F.normalize(pool - shift, dim=1).T).max(dim=1).values
            out[f"{tag}frac_cos_ge_{at}_{name}"] = float((best >= at).float().mean())
    return out


def run_recipe(victim, spec, rcfg, x_train, x_test, shape, device, steps, evals, runs, budget_end, prior="box", mean_norm=None):
    """K runs of the reconstruct preset, scored at each step in ``evals`` (union of all runs' candidates)."""
    form = resolve_form(rcfg["form"], spec)
    dtype = {"float32": torch.float32, "float64": torch.float64}[rcfg["dtype"]]
    obj = KKTObjective(victim, spec, form, rcfg["activation"], dtype, multipliers=rcfg["multipliers"],
                       per_candidate=bool(rcfg["lambda_per_candidate"]))
    per_class = math.ceil(float(rcfg["multiplier"]) * spec["n_train"] / 2)
    hps = [R.sample_hparams(rcfg, 0, r) for r in range(runs)]
    module = R.ReconstructionModule(obj, list(range(runs)), hps, R.candidate_labels(2, per_class), x_train.shape[1], rcfg,
                                    prior, mean_norm, dtype, input_mean=victim.input_offset()).to(device)
    opt = module.configure_optimizers()
    train_img = x_train.reshape(-1, *shape) if shape else None
    rows, t0 = [], time.time()
    for step in range(1, steps + 1):
        if module.optimization_step(opt) is None:
            break
        if step in evals or step == steps or time.time() > budget_end:
            with torch.no_grad():
                cands = (module.x() + module.input_mean).detach().float().cpu()[module.active.cpu()].reshape(-1, x_train.shape[1])
                rel = module.losses(create_graph=False)["kkt_rel"].detach().cpu()
            leak = leak_figures(x_train, cands, x_test)
            ssim = reference_ssim_figures(train_img, cands.reshape(-1, *shape)) if shape else {}
            rows.append({"step": step, "seconds": round(time.time() - t0, 1),
                         "candidate_steps": int(step * runs * per_class * 2), "leak_rate": leak["leak_rate"],
                         "leak_rate_one_to_one": leak["leak_rate_one_to_one"],
                         "frac_train_ssim_gt_0.4": ssim.get("frac_train_ssim_gt_0.4"),
                         **({} if shape else cosine_fractions(x_train, cands, x_test)),
                         "kkt_rel_median": float(rel[module.active.cpu()].median()) if module.active.any() else None,
                         "runs_ok": int(module.active.sum())})
            extra = (f"ssim>0.4 {rows[-1]['frac_train_ssim_gt_0.4']:.2f}" if shape else
                     f"cos>=0.9 {rows[-1]['frac_cos_ge_0.9_candidates']:.2f} (held-out {rows[-1]['frac_cos_ge_0.9_heldout']:.2f}) "
                     f"centred {rows[-1]['centred_frac_cos_ge_0.9_candidates']:.2f} "
                     f"(held-out {rows[-1]['centred_frac_cos_ge_0.9_heldout']:.2f})")
            print(f"    step {step:6d} {rows[-1]['seconds']:7.1f}s leak {rows[-1]['leak_rate']:.2f} (1:1 "
                  f"{rows[-1]['leak_rate_one_to_one']:.2f}) {extra} kkt {rows[-1]['kkt_rel_median']}", flush=True)
            if time.time() > budget_end:
                rows[-1]["stopped_by_budget"] = True
                break
    return {"form": form, "candidates_per_run": per_class * 2, "curve": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--sections", default="compute,ablation,n,epochs")
    ap.add_argument("--budget-s", type=float, default=None, help="stop (and write what is measured) after this long")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: 3000 gpu, 300 cpu)")
    ap.add_argument("--runs", type=int, default=None, help="runs per row (default: 16 gpu, 2 cpu)")
    ap.add_argument("--out", default="study_reconstruct.json")
    ap.add_argument("--embeddings", default=None, metavar="RUN_DIR",
                    help="the paper's regime: a run_dir whose embed stage holds a backbone's embeddings (section paper)")
    ap.add_argument("--rows", default=None, help="only the rows whose name contains one of these comma-separated strings")
    ap.add_argument("--victim-epochs", type=int, default=None, help="section paper: the victims' full-batch epochs")
    ap.add_argument("--victim-cache", default=None, metavar="DIR",
                    help="save each trained victim here and load it from here when present (train on a CPU, reconstruct on a GPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.scale == "gpu" and torch.cuda.is_available() else "cpu")
    big = args.scale == "gpu"
    steps, runs = (3000, 16) if big else (300, 2)
    steps, runs = args.steps or steps, args.runs or runs
    evals = {s for s in (100, 300, 1000, 3000, 10000, 20000, 30000, 50000) if s <= steps}
    budget_end = time.time() + (args.budget_s or (600 if big else 1800))
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "scale": args.scale,
           "runs": runs, "steps": steps, "rows": []}
    sections = args.sections.split(",")
    if args.embeddings:
        sections = ["paper"]
        out["embeddings"] = str(args.embeddings)

    plan = []  # (section, name, classifier overrides, reconstruct overrides, n_per_class, epochs)
    if "compute" in sections:
        plan += [("compute", "defaults", [], [], 50, None),
                 ("compute", "default victim, reference extraction", [], ["reconstruct=reference"], 50, None)]
    if "ablation" in sections:
        steps_ab = [OLD_RECON, OLD_RECON[1:], OLD_RECON[2:], []]
        names = ["previous defaults", "+ lambda/m", "+ lambda penalty x5", "+ projection lambda >= 0"]
        plan += [("ablation", nm, PREVIOUS_DEFAULTS, OLD_RECON_BASE + ov, 50, None) for nm, ov in zip(names, steps_ab)]
        plan += [("ablation", "+ centred victim", PREVIOUS_DEFAULTS + ["classifier.center=true"], OLD_RECON_BASE, 50, None),
                 ("ablation", "+ SGD momentum, float64, absolute loss",
                  PREVIOUS_DEFAULTS + ["classifier.center=true"],
                  OLD_RECON_BASE + ["reconstruct.optimizer=sgd", "reconstruct.dtype=float64", "reconstruct.kkt_loss=absolute",
                                    "reconstruct.lr=[0.001,0.1]"], 50, None),
                 ("ablation", "wd 1e-3 victim, 1 hidden layer (the previous default: constant lr 0.5)",
                  ["classifier.lr=0.5", "classifier.weight_decay=1e-3", "classifier.lr_schedule=constant"], [], 50, None),
                 ("ablation", "defaults (+ wd 1e-2, lr 0.15 cosine-decayed)", [], [], 50, None)]
    if "n" in sections:
        plan += [("n", f"n_per_class={n}", [], [], n, None) for n in (10, 25, 50)]
    if "epochs" in sections:
        plan += [("epochs", f"epochs={e}", [], [], 50, e) for e in ((1000, 3000, 10000, 60000) if big else (2000, 5000, 20000))]
    if "compute" in sections:  # last: the reference victim trains 10^5 epochs
        plan += [("compute", "reference victim + extraction", ["classifier=reference"], ["reconstruct=reference"], 50,
                  None if big else 2000)]

    if "paper" in sections:  # (the victim's training is the plan's epochs slot: "cosine" = lr decayed to 0)
        old_victim = ["classifier.lr=0.5", "classifier.weight_decay=1e-3", "classifier.lr_schedule=constant"]
        plan += [("paper", "defaults (wd 1e-2, lr 0.15 cosine-decayed)", [], [], None, None),
                 ("paper", "previous default victim (lr 0.5 constant, wd 1e-3)", old_victim, [], None, None),
                 ("paper", "previous default victim, lr cosine-decayed", old_victim, [], None, "cosine"),
                 ("paper", "default victim, reference extraction (prior auto)", [], ["reconstruct=reference", "reconstruct.prior=auto"],
                  None, None)]

    if args.rows:
        plan = [row for part in args.rows.split(",") for row in plan if part in row[1]]  # in the order asked
    if args.victim_epochs:
        out["victim_epochs"] = args.victim_epochs

    victims: dict = {}
    for section, name, c_over, r_over, n_per_class, epochs in plan:
        if time.time() > budget_end:
            print("budget reached: remaining rows skipped", flush=True)
            break
        cfg = load_config([*c_over, *r_over] + ([f"data.n_per_class={n_per_class}"] if n_per_class else []))
        rcfg = OmegaConf.to_container(cfg.reconstruct, resolve=True)
        if args.embeddings:
            x, y, xt, shape, meta = embeddings(args.embeddings)
            emb = {"backbone_name": meta.get("backbone_name"), "normalize": meta.get("normalize"),
                   "mean_norm": float(x.norm(dim=1).mean())}
        else:
            (x, y, xt, shape), emb = digits(n_per_class), {"backbone_name": "identity"}
        cosine = epochs == "cosine"
        epochs = None if cosine else epochs
        if section == "paper" and args.victim_epochs:
            epochs = args.victim_epochs
        key = (tuple(c_over), n_per_class, epochs, cosine)
        cached = Path(args.victim_cache) / f"{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}" if args.victim_cache else None
        if key not in victims and cached and (cached / "victim.json").is_file():  # trained earlier, e.g. on a CPU
            v, spec = load_victim(cached)
            victims[key] = v.eval(), {**spec["study"], "cached": str(cached)}
            print(f"victim {c_over or 'default'}: loaded from {cached}: {victims[key][1]}", flush=True)
        if key not in victims:
            t = time.time()
            victims[key] = train_victim(cfg.classifier, x, y, device, epochs, cosine)
            if cached:
                save_victim(cached, victims[key][0], {"study": victims[key][1]})
            print(f"victim {c_over or 'default'} n={n_per_class} epochs={epochs or cfg.classifier.epochs}: "
                  f"{victims[key][1]} ({time.time() - t:.0f}s)", flush=True)
        victim, vinfo = victims[key]
        spec = {"num_classes": 2, "weight_decay": float(cfg.classifier.weight_decay), "n_train": len(x), "embedding": emb}
        prior = R.resolve_prior(rcfg["prior"], spec)
        print(f"  [{section}] {name} (prior {prior})", flush=True)
        res = run_recipe(victim, spec, rcfg, x, xt, shape, device, steps, evals, runs, budget_end, prior, emb.get("mean_norm"))
        out["rows"].append({"section": section, "name": name, "classifier": c_over, "reconstruct": r_over,
                            "n_train": len(x), "victim_epochs": int(epochs or cfg.classifier.epochs), "victim_lr_cosine": cosine, "victim": vinfo, **res})
        Path(args.out).write_text(json.dumps(out, indent=1))
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
