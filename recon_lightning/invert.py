"""Stage 5: invert the selected reconstructed embeddings back into images (or sentences).

Reads the ranked representatives ``select/selection.safetensors`` (``x`` (R, D), best first)
and the backbone (``cfg.backbone``); inverts the top ``invert.num_images``:

* image backbones, ``invert.method=direct``: optimise images x so that
  ``cosine(F(aug(x)), target) -> 1`` (plus total-variation / L2 priors) through the frozen
  backbone's differentiable ``embed_pixels``; x is parameterised by a Deep Image Prior U-Net,
  a decorrelated Fourier spectrum, or raw sigmoid pixels (``invert.param``), optimised
  coarse-to-fine (``invert.scales``) under random augmentations (``invert.augment``).
  One LightningModule per batch of targets; each finished batch's images are on disk before
  the next starts and the running batch keeps a Lightning checkpoint, so a killed job resumes.
  Under DDP target ``t`` goes to rank ``t % world_size``, which fits it on its own device.
* the identity backbone (raw pixels): the embedding *is* the image; it is reshaped and written.
* ``invert.method=unclip``: a diffusion decoder for CLIP embeddings (see ``invert_unclip``).
* text backbones: nearest sentences of a corpus (``invert.text_corpus``) by cosine (faiss).

Outputs: ``invert/images/rank_XXXX.png`` and ``invert/inversion.json`` (list of ``{"rank",
"candidate_index", "cosine", "path"}``, cosine between F(saved PNG) without augmentation and
the target), or ``invert/text_matches.json`` for text.

The target is used exactly as stored (the victim's input space). When the embeddings are
L2-normalised (embeddings metadata ``normalize: l2``) the cosine loss is unaffected, since
cosine ignores the target's scale; only unCLIP decoding needs a scale (see ``invert_unclip``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from PIL import Image
from tqdm.auto import tqdm

from . import distributed
from .backbones import Backbone, build_backbone, embedding_dim
from .config import Section, rule, section
from .errors import ConfigError, DataError, DivergedError, ModelMismatchError
from .image_params import (PARAMETERISATIONS, Augment, AugmentConfig, DipConfig, FourierConfig, build_param,
                           to_unit_range, total_variation)
from .invert_unclip import UnclipConfig
from .stages import Stage
from .storage import fingerprint, load_json, load_png, load_tensors, save_json, save_png  # noqa: F401 (load_png: API)
from .training import resolve_device, run_on_every_rank, steps_loader

log = logging.getLogger(__name__)

METHODS = ("direct", "unclip")


@dataclass
class InvertConfig:
    """Schema of ``invert`` (values and meaning: configs/invert/*.yaml)."""

    num_images: int = MISSING  # <= 0: all
    method: str = rule(choices=METHODS)
    device: str = MISSING  # auto | cpu | cuda
    seed: int = MISSING
    param: str = rule(choices=PARAMETERISATIONS)
    steps: int = rule(ge=1)
    batch_size: int = rule(ge=1)
    checkpoint_every_n_steps: int = rule(ge=0)  # 0 = off
    log_every_n_steps: int = rule(ge=0)
    lr: Optional[float] = rule(gt=0)  # null = per-parameterisation default
    scales: List[float] = rule(gt=0, le=1, test=lambda v: len(v) > 0, what="a non-empty list of fractions")
    decorrelate: bool = MISSING
    tv_weight: float = rule(ge=0)
    l2_weight: float = rule(ge=0)
    augment: AugmentConfig = section(AugmentConfig)
    fourier: FourierConfig = section(FourierConfig)
    dip: DipConfig = section(DipConfig)
    identity_scaling: str = rule(choices=("minmax", "clip", "auto"))
    unclip: UnclipConfig = section(UnclipConfig)
    text_corpus: Optional[str] = MISSING
    top_k: int = rule(ge=1)


# ----------------------------------------------------------------------------- inputs


def load_targets(run_dir: Path, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``num_images`` representatives ``(x (R, D), candidate_index (R,))`` from the selection."""
    try:
        from .select import load_selection

        tensors, _ = load_selection(run_dir)
    except ImportError:  # select stage module not available: read its file directly
        tensors, _ = load_tensors(run_dir / "select" / "selection.safetensors", what="selection (run the select stage first)")
    path = run_dir / "select" / "selection.safetensors"
    x = tensors.get("x")
    if x is None or x.ndim != 2 or x.shape[0] == 0:
        shape = None if x is None else tuple(x.shape)
        raise DataError(f"selection file has no usable representatives 'x' (expected (R, D), got {shape}): {path}")
    if not torch.isfinite(x).all():
        raise DataError(f"selection file holds NaN/inf embeddings: {path}")
    idx = tensors.get("candidate_index", torch.arange(len(x)))
    n = len(x) if num_images is None or int(num_images) <= 0 else min(int(num_images), len(x))
    return x[:n].float(), idx[:n].long()


def embeddings_meta(run_dir: Path) -> dict:
    """Metadata of ``embed/embeddings.safetensors`` without loading its tensors ({} if absent)."""
    path = run_dir / "embed" / "embeddings.safetensors"
    if not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except Exception as err:  # noqa: BLE001 - any read failure means a corrupt file
        raise DataError(f"embeddings file is corrupt: {path}: {err}") from None


def native_input_size(run_dir: Path, meta: dict, victim_dir: Path | None = None) -> tuple[int, int, int] | None:
    """The data's (C, H, W) as embedded (needed by the identity backbone): from the embeddings' metadata or images,
    else (auditing a victim without its training data) from ``embedding.input_size`` in ``victim_dir/victim.json``."""
    if meta.get("input_size"):
        return tuple(int(v) for v in meta["input_size"])
    path = run_dir / "embed" / "images.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return tuple(f.get_slice("train").get_shape()[1:])
    spec_path = Path(victim_dir) / "victim.json" if victim_dir else None
    if spec_path is not None and spec_path.is_file():
        size = (load_json(spec_path, what="victim description (victim.json)").get("embedding") or {}).get("input_size")
        if size:
            return tuple(int(v) for v in size)
    return None


def check_dim(targets: torch.Tensor, backbone: Backbone) -> None:
    if targets.shape[1] != backbone.embed_dim:
        raise ModelMismatchError(
            f"embedding size mismatch: the selected embeddings are {targets.shape[1]}-d but backbone "
            f"{backbone.name!r} produces {backbone.embed_dim}-d embeddings (is cfg.backbone the backbone "
            f"the embeddings were made with?)"
        )


# ----------------------------------------------------------------------------- outputs


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def cosine_of_images(backbone: Backbone, images_u8: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cos(F(image), target) for uint8 images as written to disk (no augmentation)."""
    dev = backbone.device
    emb = backbone.embed_pixels(images_u8.to(dev).float() / 255.0)
    return F.cosine_similarity(emb.float(), targets.to(dev).float(), dim=1).cpu()


# ----------------------------------------------------------------------------- direct inversion


def inner_steps(cfg: DictConfig, steps: int) -> int:
    """Optimisation steps per Lightning step: the largest count that keeps logging (``invert.log_every_n_steps``),
    checkpoints (``invert.checkpoint_every_n_steps``) and the end on whole Lightning steps."""
    steps = max(1, int(steps))
    log_every = int(cfg.get("log_every_n_steps", 50) or 0)
    ckpt_every = int(cfg.get("checkpoint_every_n_steps", 0) or 0)
    return max(1, math.gcd(math.gcd(log_every if log_every > 0 else steps, ckpt_every if ckpt_every > 0 else steps), steps))


def trainer_settings(icfg: DictConfig) -> dict:
    """The invert stage's own Trainer settings over ``trainer.*`` (which reaches it whole, precision included):
    cadences in optimisation steps, a Lightning step being :func:`inner_steps` of them."""
    steps = int(icfg.steps)
    n = inner_steps(icfg, steps)
    return {"max_steps": steps, "max_epochs": 1, "num_sanity_val_steps": 0,
            "log_every_n_steps": max(1, min(int(icfg.get("log_every_n_steps", 50) or n), steps) // n)}


class DirectInversion(L.LightningModule):
    """The parameters are a batch of images; the loss pulls their embeddings onto ``targets``.

    ``target_ids`` (the targets' ranks in the selection) seed each pixel / Fourier image's start,
    so an image does not depend on the batch or DDP rank it is optimised in. The random draws of optimisation
    step s (augmentations, DIP's input noise) come from a generator seeded by (``invert.seed``, the batch's
    targets, s): a batch resumed from its checkpoint draws what an uninterrupted one drew.
    """

    def __init__(self, backbone: Backbone, targets: torch.Tensor, cfg: DictConfig, steps: int,
                 target_ids: list[int] | None = None):
        super().__init__()
        if backbone.input_size is None:
            raise ConfigError(f"backbone {backbone.name!r} has no image input size: direct inversion needs an image backbone")
        self.backbone = backbone.eval().requires_grad_(False)
        self.size = tuple(backbone.input_size)
        self.register_buffer("targets", targets.float().clone())
        self.target_ids = list(range(len(targets))) if target_ids is None else [int(t) for t in target_ids]
        self.seed = int(cfg.seed)
        self.image = build_param(cfg.param, len(targets), self.size, cfg,
                                 seeds=[self.seed + t for t in self.target_ids])
        self.augment = Augment.from_config(cfg.augment)
        self.copies = max(1, int(cfg.augment.copies))
        self.tv_weight, self.l2_weight = float(cfg.tv_weight), float(cfg.l2_weight)
        self.lr = float(cfg.lr) if cfg.get("lr") is not None else {"dip": 0.002, "fourier": 0.05, "pixels": 0.05}[cfg.param]
        self.steps = int(steps)
        self.scales = [float(s) for s in cfg.scales] or [1.0]  # fractions in (0, 1]: InvertConfig's rule
        # Many optimisation steps per Lightning step (manual optimisation; see training_step).
        self.automatic_optimization = False
        self.steps_per_call = inner_steps(cfg, self.steps)
        self.register_buffer("diverged_at", torch.tensor(-1, dtype=torch.long), persistent=False)
        self.strict_loading = False  # checkpoints leave out the frozen backbone (see on_save_checkpoint)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The backbone is frozen and can be huge (ViT-H): checkpoint only the images being optimised.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("backbone.")}
        checkpoint["inversion"] = {"target_ids": self.target_ids}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = (checkpoint.get("inversion") or {}).get("target_ids")
        if saved != self.target_ids:
            raise DataError(f"inversion checkpoint holds targets {saved}, not {self.target_ids}; delete it to start over")
        # A checkpoint of the earlier automatic-optimisation module counted its steps in the automatic loop's
        # progress; manual optimisation reads global_step from the manual loop's: carry the count over.
        loops = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        manual = loops.get("epoch_loop.manual_optimization.optim_step_progress")
        auto = loops.get("epoch_loop.automatic_optimization.optim_progress")
        if manual is not None and auto is not None and manual["total"]["completed"] == 0:
            done = auto["optimizer"]["step"]["total"]["completed"]
            manual["total"].update(ready=done, completed=done)
            manual["current"].update(ready=done, completed=done)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics and dropout stay in inference mode
        return self

    def resolution(self, step: int) -> tuple[int, int]:
        """Coarse-to-fine: ``scales`` split the steps evenly, each stage at scale * native size."""
        stage = min(len(self.scales) - 1, step * len(self.scales) // max(1, self.steps))
        s = self.scales[stage]
        _, h, w = self.size
        return max(4, round(h * s)), max(4, round(w * s))

    def step_generator(self, step: int) -> torch.Generator:
        """The random draws of optimisation step ``step``, on the images' device: a function of the step, not of
        the draws before it, so nothing about them needs to be checkpointed."""
        seed = int(fingerprint("invert-step", self.seed, self.target_ids, int(step))[:15], 16)
        return torch.Generator(device=self.targets.device).manual_seed(seed)

    def render(self, res: tuple[int, int] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.image(res or tuple(self.size[1:]), generator=generator)
        if tuple(x.shape[-2:]) != tuple(self.size[1:]):
            x = F.interpolate(x, size=self.size[1:], mode="bilinear", align_corners=False)
        return x

    def loss(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective at optimisation step ``step`` (its coarse-to-fine resolution): (loss, cosine per image)."""
        gen = self.step_generator(step)
        x = self.render(self.resolution(step), generator=gen)
        xa = self.augment(x.repeat(self.copies, 1, 1, 1), generator=gen)
        emb = self.backbone.embed_pixels(xa)
        cos = F.cosine_similarity(emb.float(), self.targets.repeat(self.copies, 1), dim=1)
        cos = cos.view(self.copies, -1).mean(0)
        # Per-image objectives are summed so each image's gradient does not depend on the batch size.
        loss = (1 - cos).sum()
        if self.tv_weight:
            loss = loss + self.tv_weight * total_variation(x).sum()
        if self.l2_weight:
            loss = loss + self.l2_weight * (x - 0.5).pow(2).flatten(1).mean(1).sum()
        return loss, cos

    def training_step(self, batch, batch_idx):
        """``steps_per_call`` optimisation steps (manual optimisation: each counts in ``global_step``), with the host
        touched once at the end: the divergence check (the first non-finite loss is recorded on the device) and
        the logged cosine / loss of the last step."""
        from .training import InnerSteps

        opt = InnerSteps(self)
        todo = self.steps_per_call
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            todo = min(todo, self.trainer.max_steps - self.global_step)
        todo = max(1, todo)
        for i in range(todo):
            step = int(self.global_step)
            loss, cos = self.loss(step)
            self.diverged_at.masked_fill_(~torch.isfinite(loss.detach()) & (self.diverged_at < 0), step)
            opt.zero_grad()
            opt.backward(loss, i == todo - 1)
            opt.step(i == todo - 1)
        diverged_at, cos_mean, loss_mean = torch.stack([self.diverged_at.double(), cos.detach().mean().double(),
                                                        loss.detach().double() / len(cos)]).tolist()
        if diverged_at >= 0:
            raise DivergedError(f"inversion loss became non-finite (NaN/inf) at step {int(diverged_at)}; lower invert.lr")
        self.log("cos", cos_mean, prog_bar=True, batch_size=1)
        self.log("loss", loss_mean, prog_bar=False, batch_size=1)
        self.log("step", float(self.global_step), batch_size=1)  # loggers' x axis: optimisation steps
        return None

    def configure_optimizers(self):
        return torch.optim.Adam(self.image.parameters(), lr=self.lr)

    @torch.no_grad()
    def final_images(self) -> torch.Tensor:
        self.eval()
        return self.render()


def invert_batch(backbone: Backbone, targets: torch.Tensor, cfg: DictConfig, target_ids: list[int],
                 trainer: L.Trainer, ckpt_path: str | None = None) -> torch.Tensor:
    """One Lightning fit: images (B, C, H, W) in [0, 1] for ``targets`` (B, D); resumes ``ckpt_path`` if given."""
    steps = int(cfg.steps)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen backbone, on purpose
    L.seed_everything(int(cfg.seed) + int(target_ids[0]), verbose=False)  # DIP's initial weights
    module = DirectInversion(backbone, targets, cfg, steps, target_ids)
    trainer.fit(module, train_dataloaders=steps_loader(-(-steps // module.steps_per_call)), ckpt_path=ckpt_path,
                weights_only=True)
    return module.final_images().detach().cpu()


def invert_direct(
    backbone: Backbone, targets: torch.Tensor, cfg: DictConfig, trainer_factory=None
) -> torch.Tensor:
    """Invert ``targets`` (B, D) into images (B, C, H, W) in [0, 1], one Lightning fit per batch.

    ``trainer_factory(steps) -> Trainer`` defaults to a plain CPU/GPU Trainer (for library use);
    the stage builds its own (``trainer.*``, checkpoints) and calls ``invert_batch`` itself.
    """
    check_dim(targets, backbone)
    steps = int(cfg.steps)
    bs = max(1, int(cfg.batch_size))
    if trainer_factory is None:

        def trainer_factory(n):
            return L.Trainer(max_steps=n, max_epochs=1, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, enable_progress_bar=False)

    out = []
    for start in range(0, len(targets), bs):
        ids = list(range(start, min(start + bs, len(targets))))
        out.append(invert_batch(backbone, targets[ids], cfg, ids, trainer_factory(steps)))
    return torch.cat(out)


# ----------------------------------------------------------------------------- identity backbone


def identity_images(targets: torch.Tensor, size: tuple[int, int, int], scaling: str, normalize: str) -> torch.Tensor:
    """The identity backbone's embedding is the flattened image: reshape and map into [0, 1].

    ``scaling``: ``clip`` (values are pixels), ``minmax`` (per image, for embeddings of another
    scale, e.g. L2-normalised), ``auto`` = clip when the embeddings are raw pixels (normalize
    none) and mostly within [0, 1], else minmax.
    """
    x = targets.view(len(targets), *size).float()
    if scaling == "auto":
        inside = ((x >= -0.05) & (x <= 1.05)).float().mean().item()
        scaling = "clip" if normalize != "l2" and inside > 0.9 else "minmax"
    if scaling in ("clip", "minmax"):
        return to_unit_range(x, scaling)
    raise ConfigError(f"invert.identity_scaling must be auto | clip | minmax, got {scaling!r}")


# ----------------------------------------------------------------------------- text


def read_corpus(path: Path) -> list[str]:
    """Sentences of a corpus file: ``.tsv`` = ``label<TAB>text`` per line (text = last column), else one per line."""
    if not path.is_file():
        raise DataError(f"text corpus not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"text corpus is not UTF-8 text: {path}: {err}") from None
    texts = []
    for line in lines:
        if not line.strip():
            continue
        text = line.split("\t")[-1].strip() if path.suffix.lower() == ".tsv" else line.strip()
        if text:
            texts.append(text)
    texts = list(dict.fromkeys(texts))  # de-duplicate, keep order
    if not texts:
        raise DataError(f"text corpus is empty: {path}")
    return texts


def default_corpus() -> Path:
    return Path(__file__).resolve().parent / "assets" / "text_topics.tsv"


def text_matches(backbone: Backbone, targets: torch.Tensor, corpus: list[str], top_k: int, batch_size: int = 64) -> list[list[dict]]:
    """For each target, the ``top_k`` corpus sentences by cosine (faiss inner product on unit vectors)."""
    from .select import _faiss

    faiss = _faiss()

    check_dim(targets, backbone)
    embs = []
    for i in tqdm(range(0, len(corpus), batch_size), desc="embed corpus", leave=False):
        with torch.no_grad():
            embs.append(backbone.embed(corpus[i : i + batch_size]).float().cpu())
    corpus_x = F.normalize(torch.cat(embs), dim=1).numpy().astype(np.float32)
    index = faiss.IndexFlatIP(corpus_x.shape[1])
    index.add(corpus_x)
    q = F.normalize(targets.float(), dim=1).numpy().astype(np.float32)
    sims, ids = index.search(q, min(int(top_k), len(corpus)))
    return [[{"text": corpus[j], "cosine": float(s)} for s, j in zip(srow, irow) if j >= 0] for srow, irow in zip(sims, ids)]


# ----------------------------------------------------------------------------- stage


def check_config(cfg: DictConfig) -> None:
    """What the schema's rules cannot check: auditing a victim from elsewhere, the backbone named in the config must
    make embeddings of the victim's input size, or inversion would fail only after the whole reconstruction."""
    victim_dir = cfg.reconstruct.victim_dir
    if victim_dir and (Path(victim_dir) / "victim.json").is_file():
        spec = load_json(Path(victim_dir) / "victim.json", what="victim description (victim.json)")
        input_size = (spec.get("embedding") or {}).get("input_size")
        dim = embedding_dim(cfg.backbone, tuple(input_size) if input_size else None)
        if dim is not None and int(spec.get("input_dim", dim)) != dim:
            raise ModelMismatchError(
                f"embedding size mismatch: the victim in {victim_dir} takes {spec['input_dim']}-d inputs but backbone "
                f"{cfg.backbone.name!r} ({cfg.backbone.get('model', cfg.backbone.kind)}) makes {dim}-d embeddings; "
                f"set backbone= to the backbone the victim was trained on")


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    icfg = cfg.invert
    run_dir = Path(run_dir)
    out = run_dir / "invert"
    meta = embeddings_meta(run_dir)
    normalize = meta.get("normalize", "none")
    targets, cand = load_targets(run_dir, icfg.num_images)
    victim_dir = Path(cfg.reconstruct.victim_dir) if cfg.reconstruct.get("victim_dir") else run_dir / "classifier"
    backbone = build_backbone(cfg.backbone, input_size=native_input_size(run_dir, meta, victim_dir))
    check_dim(targets, backbone)
    rank0 = distributed.is_rank_zero()

    if backbone.modality == "text":
        if not rank0:
            return {}
        corpus_path = Path(icfg.text_corpus).expanduser() if icfg.get("text_corpus") else default_corpus()
        corpus = read_corpus(corpus_path)
        record = {"path": str(corpus_path), "size": len(corpus), "bundled": not icfg.get("text_corpus")}
        if record["bundled"] and (meta.get("data") or {}).get("path"):
            record["note"] = (f"the text was inverted by searching the bundled example corpus ({corpus_path.name}), not "
                              f"sentences like your data ({meta['data']['path']}); set invert.text_corpus to a file of "
                              f"candidate sentences from your domain")
            log.warning("%s", record["note"])
        save_json(out / "text_corpus.json", record)
        backbone.to(resolve_device(icfg.device))
        matches = text_matches(backbone, targets, corpus, int(icfg.top_k))
        rows = [{"rank": r, "candidate_index": int(cand[r]), "matches": m} for r, m in enumerate(matches)]
        save_json(out / "text_matches.json", rows)
        best = [m[0]["cosine"] for m in matches if m]
        return {"n": len(rows), "corpus": str(corpus_path), "corpus_size": len(corpus),
                "mean_top1_cosine": float(np.mean(best)) if best else None}

    if backbone.name == "identity":
        # No optimisation: the embedding is the image.
        if not rank0:
            return {}
        imgs = to_uint8(identity_images(targets, backbone.input_size, icfg.identity_scaling, normalize))
        rows = write_images(run_dir, list(range(len(targets))), imgs, backbone, targets, cand,
                            resolve_device(icfg.device), worker_rank=0)
    else:
        rows = run_on_every_rank(cfg, run_dir, "invert", _invert_on_rank, cfg, run_dir, backbone, targets, cand, meta)
        if rows is None:  # a rank other than 0
            return {}
    save_json(out / "inversion.json", rows)
    cosines = [row["cosine"] for row in rows]
    method = "identity" if backbone.name == "identity" else icfg.method
    return {"n": len(rows), "method": method, "param": icfg.param if method == "direct" else None,
            "mean_cosine": float(np.mean(cosines)) if cosines else None,
            "min_cosine": float(np.min(cosines)) if cosines else None}


def write_images(run_dir: Path, ids: list[int], imgs: torch.Tensor, backbone: Backbone, targets: torch.Tensor,
                 cand: torch.Tensor, device: torch.device, worker_rank: int) -> list[dict]:
    """Save the images of targets ``ids`` as PNGs and score them: cosine(F(saved PNG), target)."""
    backbone.to(device)
    cos = cosine_of_images(backbone, imgs, targets[ids])
    rows = []
    for j, t in enumerate(ids):
        path = run_dir / "invert" / "images" / f"rank_{t:04d}.png"
        save_png(imgs[j], path)
        rows.append({"rank": t, "candidate_index": int(cand[t]), "cosine": float(cos[j]),
                     "path": str(path.relative_to(run_dir)), "worker_rank": worker_rank,
                     "target_key": target_key(targets[t])})
    return rows


def batches_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "invert" / "batches"


def target_key(target: torch.Tensor) -> str:
    """Identifies a target embedding, so a finished image is reused only for the very same target."""
    return hashlib.sha1(target.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def finished_rows(run_dir: Path, targets: torch.Tensor) -> dict[int, dict]:
    """Rows of the targets whose batch finished earlier (a batch's record is written after its PNGs) and whose
    PNG is still there and readable (a deleted or damaged image is made again)."""
    keys = [target_key(t) for t in targets]
    rows = {}
    for record in sorted(batches_dir(run_dir).glob("*.json")):
        for row in load_json(record, what="inversion batch record"):
            t = int(row["rank"])
            if t < len(keys) and row.get("target_key") == keys[t] and _readable_png(Path(run_dir) / row["path"]):
                rows[t] = row
    return rows


def _readable_png(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


class StepProgress(L.Callback):
    """Advances one progress bar over a whole stage (every image's every step, with an ETA) from
    the separate Lightning fits of its batches."""

    def __init__(self, bar, images: int):
        self.bar, self.images, self.done = bar, images, 0

    def on_train_start(self, trainer, pl_module):
        self.done = trainer.global_step  # a resumed batch starts there

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # a Lightning step runs many optimisation steps: advance by the steps taken
        self.bar.update(self.images * (trainer.global_step - self.done))
        self.done = trainer.global_step


def _invert_on_rank(rank: int, world: int, device_kw: dict, cfg: DictConfig, run_dir: Path, backbone: Backbone,
                    targets: torch.Tensor, cand: torch.Tensor, meta: dict) -> list[dict] | None:
    """One rank's share (:func:`recon_lightning.sharded.run_shard`: target t on rank t % world, not finished
    earlier, a batch at a time; each finished batch's images and record are on disk before the next starts).
    Rank 0 then returns every target's row."""
    from .sharded import ShardedWork, run_shard

    icfg = cfg.invert
    steps = int(icfg.steps)
    cuda = device_kw["accelerator"] == "cuda"
    device = torch.device("cuda", device_kw["devices"][0]) if cuda else resolve_device(icfg.device)
    decoder, bar = None, None

    def start(pending: list[int]) -> None:
        # One bar for the rank's whole share, in image-steps (a batch of B images advances it by B per step).
        nonlocal bar
        show = bool(cfg.trainer.get("enable_progress_bar", True)) and bool(pending)
        bar = tqdm(total=len(pending) * steps, desc=f"invert {len(pending)} images (rank {rank})", unit="img-step",
                   disable=not show)

    def run_batch(batch) -> None:
        nonlocal decoder
        ids = batch.ids
        if icfg.method == "unclip":
            from .invert_unclip import invert_unclip, load_decoder

            decoder = decoder or load_decoder(cfg, backbone, device)
            imgs = invert_unclip(backbone, targets[ids], cfg, meta, pipe=decoder, device=device)
            bar.update(len(ids) * steps)
        else:
            trainer = batch.trainer([StepProgress(bar, len(ids))], **trainer_settings(icfg), enable_progress_bar=False)
            imgs = invert_batch(backbone, targets[ids], icfg, ids, trainer, batch.resume_from)
        rows = write_images(run_dir, ids, to_uint8(imgs), backbone, targets, cand, device, batch.rank)
        save_json(batches_dir(run_dir) / f"{batch.name}.json", rows)

    def merge(logger) -> list[dict]:
        rows = finished_rows(run_dir, targets)
        return [rows[t] for t in range(len(targets))]

    work = ShardedWork(stage="invert", what="targets", items=range(len(targets)), batch_size=int(icfg.batch_size),
                       checkpoint_every=int(icfg.checkpoint_every_n_steps),
                       finished=lambda ids: set(finished_rows(run_dir, targets)) & set(ids),
                       batch_name=lambda ids: f"targets_{ids[0]:04d}-{ids[-1]:04d}_{fingerprint('invert-batch', ids)}",
                       run_batch=run_batch, merge=merge, poll_s=0.5, on_start=start, on_end=lambda: bar.close())
    return run_shard(work, cfg, run_dir, rank, world, device_kw)


STAGE = Stage(
    name="invert",
    run=run_stage,
    sections=[Section("invert", InvertConfig)],
    config_keys=["invert", "trainer.precision"],
    cadence_keys=["invert.checkpoint_every_n_steps", "invert.log_every_n_steps"],
    resumable_keys=["invert.num_images"],  # target t is the same whatever the total: only the missing ones are added
    all_ranks=True,
    check=check_config,
    inputs=["select/selection.safetensors", "embed/embeddings.safetensors", "embed/images.safetensors"],
    outputs=["invert/inversion.json", "invert/text_matches.json", "invert/images/*.png"],
)
