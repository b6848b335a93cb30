"""Stage 6: measure how much of the training set was reconstructed, then write the audit report.

With the true training set (``run_dir/embed`` exists, "evaluation mode"):

* every training sample's best candidate and that cosine (all candidates, not just the selection),
  and the fraction of the training set reconstructed above each cosine threshold (a curve);
* the headline ``leak_rate``: the fraction of training samples whose best candidate is closer than
  the nearest held-out (test) sample, and its one-to-one (Hungarian) variant;
* images: the literature's metrics (NCC matching, SSIM with window 3, ``frac_train_ssim_gt_0.4``,
  one-to-one variant), see "the literature's metrics and the leak rate" below;
* selection quality: precision@k of the top-k representatives, where a representative is
  *good* if its cosine to the nearest training sample is >= ``evaluate.good_threshold``;
  compared with a random choice among all candidates (expected precision = the base rate) and
  with choosing candidates by their run's final loss alone (expected precision with random
  tie-breaking, since every candidate of a run shares its loss);
* reconstructability vs the victim's margin on each training sample (binary ``y*phi(x)``,
  y in {-1, 1}; multiclass ``phi_y - max_{c != y} phi_c``): Spearman correlation + scatter plot;
* images: (training image | reconstruction) grids and SSIM per pair. The reconstruction is the
  candidate reshaped to an image when the embedding is the flattened pixels (identity backbone:
  detected by checking that the training embeddings equal the flattened training images), else
  the inverted PNG from ``run_dir/invert`` when it exists. LPIPS only when its pretrained
  backbone is available offline; otherwise the report says it was not computed;
* text: the nearest training sentences to the top representatives.

Without the training set ("attacker mode") the report shows the ranked selection and any
inverted images / text matches. The figures are written by :mod:`recon_lightning.report`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .config import Section, rule
from .errors import ConfigError, DataError
from .storage import load_json, load_png, load_tensor_meta
from .image_params import to_unit_range
from .matching import best_matches
from .stages import Stage

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- core figures


def fraction_curve(best_cos: torch.Tensor, thresholds: Sequence[float]) -> list[float]:
    """Fraction of training samples whose best candidate has cosine >= each threshold."""
    return [float((best_cos >= t).float().mean()) for t in thresholds]


def capped_ks(ks: Sequence[int], n: int) -> list[int]:
    """``ks`` capped at ``n`` (deduplicated, ascending); e.g. ([10, 50, 100], 30) -> [10, 30]."""
    return sorted({min(int(k), n) for k in ks if int(k) >= 1} - {0})


def precision_at_k(good_ranked: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """Fraction of good items among the first ``k`` of a ranked list, per k (k capped at the length)."""
    g = good_ranked.float()
    return [float(g[:k].mean()) for k in ks]


def expected_precision_by_key(good: torch.Tensor, key: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """Expected precision@k when items are taken in ascending ``key`` order, ties broken at random.

    Items with equal key (e.g. all candidates of one run share its loss) form a group; a group
    cut by the k boundary contributes its mean goodness times the number of items taken from it.
    """
    keys, inv = torch.unique(key.double(), sorted=True, return_inverse=True)
    counts = torch.bincount(inv, minlength=len(keys)).double()
    goods = torch.bincount(inv, weights=good.double(), minlength=len(keys))
    cum_n = torch.cumsum(counts, 0)
    out = []
    for k in ks:
        full = int(torch.searchsorted(cum_n, torch.tensor(float(k)), right=True))  # groups taken whole
        taken_n = float(cum_n[full - 1]) if full > 0 else 0.0
        total = float(goods[:full].sum())
        if taken_n < k and full < len(keys):
            total += (k - taken_n) * float(goods[full] / counts[full])
        out.append(total / k)
    return out


def spearman(x: torch.Tensor, y: torch.Tensor) -> tuple[float | None, float | None]:
    """Spearman rank correlation (rho, p-value); None when undefined (fewer than 3 points or constant)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return None, None
    res = spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def ssim_kernel_size(h: int, w: int) -> int:
    """Standard 11x11 window, shrunk to the largest odd size that fits tiny images (8x8 digits -> 7)."""
    k = min(11, h, w)
    return k if k % 2 == 1 else k - 1


def ssim_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM per image pair with the standard Gaussian window (11x11, sigma 1.5), shrunk for tiny images
    (:func:`ssim_kernel_size`, sigma scaled with it: 8x8 digits get window 7, sigma 0.95); ``a``, ``b`` float
    (N, C, H, W) in [0, 1]. Computed by :func:`ssim_reference` (reflect padding, every pixel in the mean), so the
    value does not depend on the installed torchmetrics: releases before its border-handling change crop
    (window - 1) / 2 pixels before averaging, which leaves 4 of the 64 pixels of an 8x8 digit."""
    if a.shape != b.shape:
        raise DataError(f"SSIM needs equally shaped image batches, got {tuple(a.shape)} and {tuple(b.shape)}")
    k = ssim_kernel_size(a.shape[-2], a.shape[-1])
    if k < 3:
        raise DataError(f"images of size {tuple(a.shape[-2:])} are too small for SSIM")
    return ssim_reference(a, b, window_size=k, sigma=1.5 * k / 11)


def lpips_status() -> tuple[bool, str]:
    """Whether torchmetrics' LPIPS can run offline: it needs torchvision's ImageNet AlexNet
    weights in the torch hub cache (it would otherwise try to download them)."""
    try:
        import torchvision

        url = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    except Exception as err:  # pragma: no cover - torchvision is a dependency
        return False, f"LPIPS not computed: torchvision unavailable ({err})"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return True, f"LPIPS (AlexNet) with cached weights {cached}"
    return False, (f"LPIPS not computed: it needs pretrained AlexNet weights that are not available offline "
                   f"(expected {cached}); SSIM is reported instead")


def lpips_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LPIPS per pair (lower = more similar); inputs in [0, 1], resized to at least 32x32."""
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity as lpips

    if a.shape[1] == 1:
        a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
    if min(a.shape[-2:]) < 32:
        a = F.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=(32, 32), mode="bilinear", align_corners=False)
    return torch.stack([lpips(a[i : i + 1], b[i : i + 1], net_type="alex", normalize=True) for i in range(len(a))])


def as_images(x: torch.Tensor, shape: Sequence[int], scaling: str = "minmax") -> torch.Tensor:
    """Flattened pixel vectors -> float images (N, C, H, W) in [0, 1].

    ``minmax`` stretches each image to [0, 1] (cosine ignores scale, and reconstructions are
    only determined up to scale); ``clip`` keeps values and clips them to [0, 1].
    """
    if scaling in ("clip", "minmax"):
        return to_unit_range(x.float().reshape(x.shape[0], *shape), scaling)
    raise ConfigError(f"evaluate.image_scaling must be minmax or clip, got {scaling!r}")


def embeddings_are_pixels(train_x: torch.Tensor, train_images: torch.Tensor | None, min_cosine: float = 0.999) -> bool:
    """True when each training embedding is its flattened image (identity backbone), so candidates
    can be viewed as images directly. Checked on the data rather than trusted from config names."""
    if train_images is None or len(train_images) != len(train_x) or len(train_x) == 0:
        return False
    if train_images[0].numel() != train_x.shape[1]:
        return False
    flat = train_images.flatten(1).float() / 255.0
    cos = F.cosine_similarity(flat, train_x.float(), dim=1)
    return bool((cos >= min_cosine).all())


def match_channels_and_size(train_img: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Resize/convert training images (N, C, H, W) in [0, 1] to ``like``'s channels and size."""
    out = train_img
    if out.shape[1] != like.shape[1]:
        out = out.mean(1, keepdim=True).repeat(1, like.shape[1], 1, 1) if like.shape[1] == 3 else out.mean(1, keepdim=True)
    if out.shape[-2:] != like.shape[-2:]:
        out = F.interpolate(out, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return out.clamp(0, 1)


# ----------------------------------------------------------------------------- the literature's metrics and the leak rate
#
# Leak rate (every modality): training sample i is *leaked* when its best candidate is closer to it (cosine in
# embedding space) than the nearest sample the victim never saw (the held-out pool, ``emb.test_x``). Candidates
# that only "look like the data" (class prototypes, generic images) come no closer than unseen data and do not
# count. The one-to-one variant pairs training samples and candidates by a maximum-cosine assignment
# (Hungarian), so one generic candidate cannot count for many samples.
#
# Image metrics as Haim et al. 2022 compute them (nivha/dataset_reconstruction, evaluations.py): every training
# image is paired with the candidate at the smallest normalised cross-correlation distance (``ncc_dist``), the
# candidate is min-max normalised to [0, 1] and SSIM (Gaussian window 3, sigma 1.5, kornia's definition) is
# taken against the training image in [0, 1]. Differences from the reference: no bicubic 1/2 downsampling before
# the NCC search (it was meant for 32x32 CIFAR; 8x8 digits would keep 4x4), and NCC is computed on the images
# as stored (mean added back) rather than on mean-subtracted images.

LEAK_TOLERANCE = 1e-9  # a candidate must beat the held-out baseline by more than float64 rounding to count
SSIM_LEAK_THRESHOLD = 0.4  # the reference's "reconstructed" bar: SSIM > 0.4


def ssim_reference(a: torch.Tensor, b: torch.Tensor, window_size: int = 3, sigma: float = 1.5, max_val: float = 1.0) -> torch.Tensor:
    """SSIM per image pair, exactly as kornia's ``metrics.ssim(a, b, window_size=3)`` followed by a mean over
    pixels and channels (the reference's ``get_ssim_pairs_kornia``); :func:`ssim_pairs` is this function with a
    larger window. A small own implementation, not torchmetrics: with a Gaussian kernel torchmetrics derives the
    window from sigma (2 int(3.5 sigma + 0.5) + 1 = 11 for sigma 1.5, whatever ``kernel_size`` says), older versions
    crop a border of (window-1)/2 pixels before averaging (28 of the 64 pixels of an 8x8 digit for window 3), and it
    clamps inputs; kornia is not a dependency (the tests compare with it when it is installed).

    Definition: Gaussian window (``window_size``, ``sigma``, normalised to sum 1), local statistics with
    reflect padding ("same" output size), C1 = (0.01 max_val)^2, C2 = (0.03 max_val)^2,
    map = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2) + 1e-12).
    ``a``, ``b``: float (N, C, H, W), normally in [0, 1]. Computed in float64.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise DataError(f"SSIM needs two equally shaped (N, C, H, W) batches, got {tuple(a.shape)} and {tuple(b.shape)}")
    if window_size % 2 != 1 or min(a.shape[-2:]) <= window_size // 2:
        raise DataError(f"SSIM window {window_size} does not fit images of size {tuple(a.shape[-2:])} (odd window, reflect padding)")
    a, b = a.double(), b.double()
    x = torch.arange(window_size, dtype=torch.float64) - window_size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    channels = a.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window_size, window_size)
    pad = window_size // 2

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), kernel, groups=channels)

    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mu_a, mu_b = filt(a), filt(b)
    s_a = filt(a * a) - mu_a ** 2
    s_b = filt(b * b) - mu_b ** 2
    s_ab = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_a + s_b + c2)
    return (num / (den + 1e-12)).flatten(1).mean(1)


def leak_figures(train_x: torch.Tensor, cand_x: torch.Tensor, heldout_x: torch.Tensor | None, chunk: int = 4096,
                 cand_match: dict | None = None, heldout_match: dict | None = None) -> dict:
    """The leak rate and its one-to-one variant (cosine in embedding space; module comment above).
    ``cand_match`` / ``heldout_match``: :func:`recon_lightning.matching.best_matches` of the training samples
    against the candidates (``one_to_one=True``) / the held-out samples, when the caller has them already.

    ``per_sample`` lists, per training sample: ``heldout_best_cosine`` / ``heldout_best_index`` (the baseline),
    ``leaked``, ``one_to_one_candidate`` (row of ``cand_x``, -1 if none), ``one_to_one_cosine``,
    ``leaked_one_to_one``. ``leak_rate`` is None (with a ``note``) when there is no held-out pool. The one-to-one
    rate is compared with the same per-sample baseline (the best held-out cosine, which is at least as hard to
    beat as any one-to-one pairing of held-out samples); training samples left unassigned (fewer candidates
    than samples) count as not leaked.
    """
    m = cand_match if cand_match is not None else best_matches("cosine", train_x, cand_x, chunk, one_to_one=True)
    n = len(train_x)
    o2o_idx, o2o_cos = m["one_to_one_index"], m["one_to_one_score"]
    out: dict = {"leak_rate": None, "leak_rate_one_to_one": None, "baseline_pool": 0, "tolerance": LEAK_TOLERANCE,
                 "num_train": n, "num_candidates": int(len(cand_x))}
    per = [{"one_to_one_candidate": int(o2o_idx[i]),
            "one_to_one_cosine": None if o2o_idx[i] < 0 else float(o2o_cos[i])} for i in range(n)]
    if heldout_x is None or len(heldout_x) == 0:
        out["note"] = ("no held-out samples (empty test split): leak_rate is not computed, since without them no "
                       "candidate can be told apart from generic data of the same distribution")
        out["per_sample"] = per
        return out
    h = heldout_match if heldout_match is not None else best_matches("cosine", train_x, heldout_x, chunk)
    leaked = m["best_score"] > h["best_score"] + LEAK_TOLERANCE
    leaked_o2o = (o2o_idx >= 0) & (torch.nan_to_num(o2o_cos, nan=-2.0) > h["best_score"] + LEAK_TOLERANCE)
    for i in range(n):
        per[i].update(heldout_best_cosine=float(h["best_score"][i]), heldout_best_index=int(h["best_index"][i]),
                      leaked=bool(leaked[i]), leaked_one_to_one=bool(leaked_o2o[i]))
    out.update(leak_rate=float(leaked.double().mean()), leak_rate_one_to_one=float(leaked_o2o.double().mean()),
               baseline_pool=int(len(heldout_x)), num_leaked=int(leaked.sum()), num_leaked_one_to_one=int(leaked_o2o.sum()),
               per_sample=per)
    return out


def reference_ssim_figures(train_img: torch.Tensor, cand_img: torch.Tensor, chunk: int = 4096, match: dict | None = None) -> dict:
    """The reference's image metrics: each training image's candidate at the smallest NCC distance, its SSIM
    (:func:`ssim_reference`, candidate min-max normalised to [0, 1]); ``ssim_reference_mean``,
    ``frac_train_ssim_gt_0.4`` and the one-to-one variant (Hungarian on NCC distance; training images left
    without a candidate count as not reconstructed).

    ``train_img``: float (n, C, H, W) in [0, 1]; ``cand_img``: (N, C, H, W) in any range; ``match``:
    ``best_matches("ncc", train_img, cand_img, one_to_one=True)`` when the caller has it already.
    """
    m = match if match is not None else best_matches("ncc", train_img, cand_img, chunk, one_to_one=True)
    n = len(train_img)
    ssim = ssim_reference(train_img, to_unit_range(cand_img[m["best_index"]].float(), "minmax"))
    o2o = m["one_to_one_index"]
    ssim_o2o = torch.full((n,), float("nan"), dtype=torch.float64)
    assigned = o2o >= 0
    if assigned.any():
        ssim_o2o[assigned] = ssim_reference(train_img[assigned], to_unit_range(cand_img[o2o[assigned]].float(), "minmax"))
    return {
        "ssim_reference_mean": float(ssim.mean()),
        "frac_train_ssim_gt_0.4": float((ssim > SSIM_LEAK_THRESHOLD).double().mean()),
        "frac_train_ssim_gt_0.4_one_to_one": float((torch.nan_to_num(ssim_o2o, nan=-2.0) > SSIM_LEAK_THRESHOLD).double().mean()),
        "ssim_reference_one_to_one_mean": float(ssim_o2o[assigned].mean()) if assigned.any() else None,
        "per_sample": [{"ncc_candidate": int(m["best_index"][i]), "ncc_distance": float(-m["best_score"][i]), "ssim": float(ssim[i]),
                        "one_to_one_candidate": int(o2o[i]), "ssim_one_to_one": None if o2o[i] < 0 else float(ssim_o2o[i])}
                       for i in range(n)],
    }


def pool_matched_ssim(train_img: torch.Tensor, cand_img: torch.Tensor, heldout_img: torch.Tensor, chunk: int = 4096,
                      repeats: int = 5, seed: int = 0) -> dict:
    """``frac_train_ssim_gt_0.4`` with a null beside it: the candidates subsampled to the held-out pool's size (the
    mean over ``repeats`` draws), and the held-out images themselves as the candidates. With more candidates than
    unseen images the fraction grows whatever they are, so only equal pools compare."""
    size = min(len(cand_img), len(heldout_img))
    gen = torch.Generator().manual_seed(seed)
    draws = [cand_img[torch.randperm(len(cand_img), generator=gen)[:size]] for _ in range(repeats if len(cand_img) > size else 1)]
    held = heldout_img[torch.randperm(len(heldout_img), generator=gen)[:size]]
    fracs = [reference_ssim_figures(train_img, d, chunk)["frac_train_ssim_gt_0.4"] for d in draws]
    return {"pool_size": size, "repeats": len(draws), "frac_train_ssim_gt_0.4_pool_matched": float(np.mean(fracs)),
            "frac_train_ssim_gt_0.4_heldout": reference_ssim_figures(train_img, held, chunk)["frac_train_ssim_gt_0.4"]}


# ----------------------------------------------------------------------------- config


@dataclass
class EvalConfig:
    """Schema of ``evaluate`` (values and meaning: configs/evaluate/default.yaml); :func:`build_report` takes it as
    an object (``OmegaConf.to_object(cfg.evaluate)``, or :func:`recon_lightning.config.shipped` outside the pipeline)."""

    good_threshold: float = rule(ge=-1, le=1)  # a cosine
    thresholds: List[float] = rule(ge=-1, le=1)
    curve_points: int = rule(ge=2)
    precision_ks: List[int] = rule(ge=1)
    grid_pairs: int = rule(ge=0)
    image_scaling: str = rule(choices=("minmax", "clip"))
    lpips: str = rule(choices=("auto", "off"))
    text_top: int = rule(ge=0)
    text_k: int = rule(ge=1)
    chunk: int = rule(ge=1)
    kkt_steps: int = rule(ge=0)  # 0 = off


# ----------------------------------------------------------------------------- the stage


def _rel(run_dir: Path, path: Path) -> str:
    return path.relative_to(run_dir).as_posix()


def _eligible_candidates(run_dir: Path):
    """Candidates as the selection saw them (finite, not from failed runs): tensors, keep mask, metadata."""
    from .select import failed_runs, read_candidates

    tensors, meta = read_candidates(run_dir)
    x = tensors["x"].float()
    keep = torch.isfinite(x).all(1)
    failed = failed_runs(meta)
    if failed:
        keep &= ~torch.isin(tensors["run"].long(), torch.tensor(sorted(failed), dtype=torch.int64))
    return tensors, keep, meta


def _victim_kkt(model, spec: dict, train_x: torch.Tensor, train_y: torch.Tensor, heldout_x: torch.Tensor | None,
                heldout_y: torch.Tensor | None, cands_meta: dict, steps: int, victim_dir: Path) -> dict:
    """The victim's KKT residual at its true training points beside the residual at as many held-out points
    (the point count alone moves the residual, so only equal counts compare), both scored the same way (exact
    ReLU derivative, multipliers refitted: :func:`reconstruct.kkt_residual_at`), against the target the
    reconstruction explained (``reconstruct.target``: theta, or the displacement from the saved initialisation).
    Near 0 at the training set and far higher at unseen data: the victim is near a KKT point of its training set,
    which reconstruction inverts; near 1 at the training set: the condition does not hold there and nothing can be
    reconstructed from it. For a run with the projection objective, its own residual at the same points too
    (:func:`reconstruct.projection_residual_at`): below the candidates' ``final_loss``, the optimiser fell short of
    an identifiable optimum; not below it, the objective does not single out the training set."""
    from .objectives import load_target
    from .reconstruct import kkt_residual_at, projection_residual_at

    target_name = cands_meta.get("target") or "theta"
    target = load_target(target_name, victim_dir, model)
    form = cands_meta.get("form") or "auto"
    multipliers = cands_meta.get("multipliers") or "runner_up"
    truth = kkt_residual_at(model, spec, train_x, train_y, form=form, steps=steps, multipliers=multipliers, target=target)
    projection = cands_meta.get("objective") == "projection"
    out = {"form": truth["form"], "target": target_name, "residual_at_train": truth["residual"], "steps": truth["steps"],
           "num_points": len(train_x), "residual_at_heldout": None}
    if projection:
        out.update(projection_residual_at_train=projection_residual_at(model, train_x, target),
                   projection_residual_at_heldout=None)
    n = len(train_x)
    if heldout_x is not None and len(heldout_x) >= n:
        # the first n held-out samples of each class in the training set's class proportions
        pick = torch.cat([torch.nonzero(heldout_y == c).squeeze(1)[: int((train_y == c).sum())] for c in train_y.unique()])
        if len(pick) == n:
            out["residual_at_heldout"] = kkt_residual_at(model, spec, heldout_x[pick], heldout_y[pick], form=form,
                                                         steps=steps, multipliers=multipliers, target=target)["residual"]
            if projection:
                out["projection_residual_at_heldout"] = projection_residual_at(model, heldout_x[pick], target)
    return out


# A sample counts as lying on a victim hyperplane within this distance, relative to kkt.hyperplane_scale (the
# hyperplanes' median distance from the input origin): 3e-4 pixels on the default digits, where 66 % of the training
# digits and 1 % of the held-out digits lie on one (docs/results.md, "The victim's kinks").
MEMBERSHIP_RADIUS = 1e-3


def rank_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney U statistic over n_pos * n_neg),
    from average ranks: no n_pos x n_neg comparison matrix."""
    from scipy.stats import rankdata

    ranks = rankdata(torch.cat([positive, negative]).double().numpy())
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def hyperplane_membership(model, train_x: torch.Tensor, heldout_x: torch.Tensor | None) -> dict:
    """Membership evidence read off the victim's first layer alone: how many of its ReLU hyperplanes pass through
    each training sample, against the held-out samples. A weight-decay ReLU victim ends with its hyperplanes *on*
    training samples (kkt.first_layer_hyperplanes), so a sample on many of them was very likely trained on.
    ``auc``: the probability that a training sample lies on more hyperplanes than a held-out one (ties count
    half; 0.5 = no signal, 1 = every training sample above every held-out one)."""
    from .kkt import first_layer_hyperplanes, hyperplane_scale, hyperplanes_near

    if len(model.layers) < 2:
        return {"available": False, "note": "the victim has no hidden layer: no ReLU hyperplanes"}
    first, nxt = model.layers[0], model.layers[1]
    with torch.no_grad():
        normals, offsets = first_layer_hyperplanes(first.weight.double(), None if first.bias is None else first.bias.double(),
                                                   nxt.weight.double())
        radius = MEMBERSHIP_RADIUS * hyperplane_scale(offsets)
        shift = model.input_offset().double()
        train = hyperplanes_near(train_x.double() - shift, normals, offsets, radius)
        out = {"available": True, "num_hyperplanes": int(len(offsets)), "radius": radius,
               "train_median": float(train.double().median()), "train_frac_on_any": float((train > 0).double().mean()),
               "train_counts": train.tolist()}
        if heldout_x is not None and len(heldout_x):
            held = hyperplanes_near(heldout_x.double() - shift, normals, offsets, radius)
            out["heldout_counts"] = held.tolist()
            out.update(heldout_median=float(held.double().median()), heldout_frac_on_any=float((held > 0).double().mean()),
                       auc=rank_auc(train, held))
    return out


def _victim_summary(victim_dir: Path) -> dict | None:
    """The victim's training figures from its ``victim.json`` (shown on the report's first lines)."""
    path = victim_dir / "victim.json"
    if not path.is_file():
        return None
    spec = load_json(path, what="victim description (victim.json)")
    metrics = spec.get("metrics") or {}
    return {"train_acc": metrics.get("train_acc"), "test_acc": metrics.get("test_acc"), "n_train": spec.get("n_train"),
            "margin_min": metrics.get("train_margin_min"), "problems": (spec.get("health") or {}).get("problems", [])}


def _run_records(run_dir: Path) -> list[dict]:
    """Every reconstruction run's record (``run, status, error, final_loss, ...``) from the candidates' metadata."""
    path = run_dir / "reconstruct" / "candidates.safetensors"
    return load_tensor_meta(path, what="reconstruction candidates").get("runs", []) if path.is_file() else []


def _inversion(run_dir: Path) -> list[dict] | None:
    path = run_dir / "invert" / "inversion.json"
    return load_json(path, what="inversion results") if path.is_file() else None


def _text_matches(run_dir: Path) -> list[dict] | None:
    path = run_dir / "invert" / "text_matches.json"
    return load_json(path, what="text matches") if path.is_file() else None


@dataclass
class _Inputs:
    """What every report shows: the selection, the victim's figures and the inversions (attacker's view)."""

    run_dir: Path
    out_dir: Path
    ecfg: EvalConfig
    victim_dir: Path  # reconstruct.victim_dir, or run_dir/classifier
    embeddings_dir: Path  # the run folder whose embed/ holds the training set: reconstruct.embeddings_dir, or run_dir
    sel: dict
    sel_meta: dict
    reps: list[dict]  # one row per representative, best first; the steps below add their columns
    victim: dict | None
    runs: list[dict]  # every reconstruction run's record, failed ones included
    inversion: list[dict] | None
    text_matches: list[dict] | None
    text_corpus: dict | None


@dataclass
class _Evaluation:
    """The training set, the usable candidates and every matching between them, each computed once per report
    (:func:`recon_lightning.matching.best_matches`) and passed down to the steps that read them."""

    emb: Any
    modality: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    heldout_x: torch.Tensor | None
    cands: dict
    keep: torch.Tensor
    cands_meta: dict
    cand_idx: torch.Tensor  # usable candidates' indices among all candidates
    cand_x: torch.Tensor
    cand_y: torch.Tensor
    cand: dict  # training samples x usable candidates (cosine; best each way and one-to-one)
    heldout: dict | None  # training samples x held-out samples (cosine), None without a test split
    sel: dict  # representatives x training samples (cosine; top evaluate.text_k for text)
    victim: Any  # (model, spec) from run_dir/classifier, or None
    offset: torch.Tensor  # the mean the victim subtracts from its inputs (zeros without a centred victim)
    public_x: torch.Tensor | None  # the public split (seen by no stage that touches the victim), when embedded

    def frame(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the victim's frame (its input mean subtracted), where the null-controlled figures are taken."""
        return x - self.offset

    @property
    def best_cos(self) -> torch.Tensor:
        """Each training sample's best cosine over the usable candidates."""
        return self.cand["best_score"]

    @property
    def best_local(self) -> torch.Tensor:
        """Each training sample's best candidate (index among the usable candidates)."""
        return self.cand["best_index"]

    @property
    def shared(self) -> torch.Tensor:
        """For each training sample: how many training samples share its best candidate."""
        return torch.bincount(self.best_local, minlength=len(self.cand_idx))[self.best_local]

    @property
    def agrees(self) -> torch.Tensor:
        """Whether each training sample's best candidate has its class."""
        return self.cand_y[self.best_local] == self.train_y


def build_report(run_dir: Path, ecfg: EvalConfig, progress: bool = True, victim_dir: str | Path | None = None,
                 embeddings_dir: str | Path | None = None) -> dict:
    """Compute every figure and write the plots/grids to ``run_dir/report``; returns report.json's dict.

    What every report shows comes first (the selection, the victim, the inversions); with the training set,
    the matchings are computed once and the figures built on them follow; the notes come last."""
    inputs = _gather_inputs(Path(run_dir), ecfg, victim_dir, embeddings_dir)
    report = _attacker_view(inputs)
    if (inputs.embeddings_dir / "embed" / "embeddings.safetensors").is_file():
        ev = _evaluation_inputs(inputs)
        report.update(mode="evaluation", modality=ev.modality)
        _reconstruction_figures(report, inputs, ev)
        _membership_figures(report, inputs, ev)
        _leak_rate(report, inputs, ev)
        _fraction_curve(report, inputs, ev)
        _selection_figures(report, inputs, ev)
        _attribution_figures(report, inputs, ev)
        _victim_figures(report, inputs, ev)
        if ev.modality == "text":
            _text_figures(report, inputs, ev)
        else:
            _image_figures(report, inputs, ev)
    else:
        _inverted_grid(report, inputs)
    report["notes"] = _notes(report)
    return report


def _gather_inputs(run_dir: Path, ecfg: EvalConfig, victim_dir: str | Path | None = None,
                   embeddings_dir: str | Path | None = None) -> _Inputs:
    from .select import load_selection

    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    sel, sel_meta = load_selection(run_dir)
    reps = [
        {"rank": r, "candidate_index": int(sel["candidate_index"][r]), "score": float(sel["score"][r]),
         "cluster_size": int(sel["cluster_size"][r]), "y": int(sel["y"][r])}
        for r in range(sel["x"].shape[0])
    ]
    text_matches = _text_matches(run_dir)
    corpus_path = run_dir / "invert" / "text_corpus.json"
    text_corpus = load_json(corpus_path, what="text corpus record") if text_matches is not None and corpus_path.is_file() else None
    return _Inputs(run_dir=run_dir, out_dir=out_dir, ecfg=ecfg, sel=sel, sel_meta=sel_meta, reps=reps,
                   victim_dir=Path(victim_dir).expanduser() if victim_dir else run_dir / "classifier",
                   embeddings_dir=Path(embeddings_dir).expanduser() if embeddings_dir else run_dir,
                   victim=_victim_summary(Path(victim_dir).expanduser() if victim_dir else run_dir / "classifier"),
                   runs=_run_records(run_dir), inversion=_inversion(run_dir),
                   text_matches=text_matches,
                   text_corpus=text_corpus)


def _attacker_view(inputs: _Inputs) -> dict:
    """The report's frame and what it shows without the training set: the ranked selection, the victim's
    figures, the inversions and text matches."""
    from . import report as rp

    report: dict = {
        "format": rp.REPORT_FORMAT,
        "mode": "attacker",
        "modality": None,
        "summary": {"num_representatives": len(inputs.reps)},
        "selection": {k: inputs.sel_meta.get(k) for k in ("method", "num_candidates", "num_used", "num_clusters")},
        "figures": {},
        "grids": {},
        "notes": [],
    }
    report["selection"]["representatives"] = inputs.reps
    if inputs.victim:
        report["victim"] = inputs.victim
        report["summary"].update({f"victim_{k}": inputs.victim[k] for k in ("train_acc", "test_acc")
                                  if inputs.victim.get(k) is not None})
    if inputs.runs:
        failed = [{k: r.get(k) for k in ("run", "final_loss", "error")} for r in inputs.runs if r.get("status") != "ok"]
        report["runs"] = {"total": len(inputs.runs), "ok": len(inputs.runs) - len(failed), "failed": failed}
        report["summary"].update(runs_ok=report["runs"]["ok"], runs_failed=len(failed))
    report["figures"]["selection_scores"] = _rel(inputs.run_dir, rp.plot_scores(inputs.out_dir / "selection_scores.png",
                                                                                inputs.sel["score"]))
    if inputs.inversion is not None:
        by_rank = {int(e["rank"]): e for e in inputs.inversion}
        for rep in inputs.reps:
            if rep["rank"] in by_rank:
                rep["image"] = by_rank[rep["rank"]]["path"]
                rep["inversion_cosine"] = by_rank[rep["rank"]].get("cosine")
        report["inversion"] = inputs.inversion
    if inputs.text_matches is not None:
        report["text_matches_attacker"] = inputs.text_matches
        if inputs.text_corpus is not None:
            report["text_corpus"] = inputs.text_corpus
    return report


def _inverted_grid(report: dict, inputs: _Inputs) -> None:
    """Attacker mode: the inverted representatives, best first."""
    from . import report as rp

    if not inputs.inversion:
        return
    shown = sorted(inputs.inversion, key=lambda e: e["rank"])[: inputs.ecfg.grid_pairs]
    imgs = torch.stack([load_png(inputs.run_dir / e["path"]).float() / 255.0 for e in shown])
    report["grids"]["inverted"] = _rel(inputs.run_dir, rp.image_grid(inputs.out_dir / "inverted.png", imgs,
                                                                      [f"#{e['rank']}" for e in shown], "Inverted representatives"))


def _evaluation_inputs(inputs: _Inputs) -> _Evaluation:
    """Load the training set and the usable candidates, and match them (and the held-out samples and the
    representatives) with the training samples, once."""
    from .embed import load_embeddings

    emb = load_embeddings(inputs.embeddings_dir)
    train_x, train_y = emb.train_x.float(), emb.train_y.long()
    sel_x = inputs.sel["x"].float()
    if train_x.shape[1] != sel_x.shape[1]:
        raise DataError(f"selection is {sel_x.shape[1]}-d but the training embeddings are {train_x.shape[1]}-d")
    cands, keep, cands_meta = _eligible_candidates(inputs.run_dir)
    cand_idx = torch.nonzero(keep).squeeze(1)
    if len(cand_idx) == 0:
        raise DataError("no usable candidates to evaluate (all non-finite or from failed runs)")
    cand_x = cands["x"].float()[cand_idx]
    heldout_x = emb.test_x.float() if len(emb.test_x) else None
    modality = emb.meta.get("modality", "image")
    chunk = inputs.ecfg.chunk
    victim = None
    if (inputs.victim_dir / "victim.json").is_file():
        from .victim import load_victim

        victim = load_victim(inputs.victim_dir, expected_input_dim=train_x.shape[1])
    offset = victim[0].input_offset().detach().float() if victim else torch.zeros(train_x.shape[1])
    public_x = emb.public_x.float() if emb.public_x is not None and len(emb.public_x) else None
    return _Evaluation(
        emb=emb, modality=modality, train_x=train_x, train_y=train_y, heldout_x=heldout_x, cands=cands, keep=keep,
        cands_meta=cands_meta, cand_idx=cand_idx, cand_x=cand_x, cand_y=cands["y"].long()[cand_idx],
        cand=best_matches("cosine", train_x, cand_x, chunk, one_to_one=True),
        heldout=None if heldout_x is None else best_matches("cosine", train_x, heldout_x, chunk),
        sel=best_matches("cosine", sel_x, train_x, chunk, top=inputs.ecfg.text_k if modality == "text" else 1),
        victim=victim, offset=offset, public_x=public_x)


def _reconstruction_figures(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """``report["reconstruction"]``: every training sample's best candidate, the fraction of the training set
    above each cosine, and the same for the held-out samples (the baseline: candidates that come no closer than
    unseen data, common for raw pixels where all images are alike, show no leakage)."""
    ecfg = inputs.ecfg
    best_cos, best_local, shared, agrees = ev.best_cos, ev.best_local, ev.shared, ev.agrees
    best_cand = ev.cand_idx[best_local]
    thresholds = torch.linspace(0, 1, ecfg.curve_points).tolist()
    per_sample = [{"train_index": i, "y": int(ev.train_y[i]), "best_candidate": int(best_cand[i]),
                   "best_cosine": float(best_cos[i]), "best_candidate_y": int(ev.cand_y[best_local[i]]),
                   "label_agrees": bool(agrees[i]), "best_candidate_shared_by": int(shared[i])}
                  for i in range(len(ev.train_x))]
    report["reconstruction"] = {
        "num_train": len(ev.train_x),
        "num_candidates": int(len(ev.cand_idx)),
        "best_cosine": {"mean": float(best_cos.mean()), "median": float(best_cos.median()),
                        "min": float(best_cos.min()), "max": float(best_cos.max())},
        "fraction_curve": {"thresholds": thresholds, "fraction": fraction_curve(best_cos, thresholds)},
        "fraction_above": {f"{t:g}": v for t, v in zip(ecfg.thresholds, fraction_curve(best_cos, ecfg.thresholds))},
        "per_sample": per_sample,
        "distinct_best_candidates": int(len(torch.unique(best_local))),
        "label_agreement": float(agrees.float().mean()),
    }
    if ev.heldout is not None:
        heldout = ev.heldout["best_score"]
        report["reconstruction"]["heldout_baseline"] = {
            "best_cosine_mean": float(heldout.mean()),
            "fraction_above": {f"{t:g}": v for t, v in zip(ecfg.thresholds, fraction_curve(heldout, ecfg.thresholds))},
            "fraction_curve": fraction_curve(heldout, thresholds),
        }


def _membership_figures(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """``report["membership"]``: the ROC of training samples (members) against held-out samples (non-members), each
    scored by its highest cosine to the candidates, in the victim's frame (the headline) and raw; with a public
    split, the same ROC with public samples as the candidates, the control that must score at chance."""
    from . import report as rp
    from .membership import membership_roc

    if ev.heldout_x is None:
        report["membership"] = {"available": False, "note": "no held-out samples: no membership figures"}
        return
    chunk = inputs.ecfg.chunk
    frames = {"victim_frame": ev.frame, "raw": lambda x: x}
    out: dict = {"available": True, "frame": "victim_frame", "centred": bool(ev.offset.abs().sum() > 0)}
    for name, frame in frames.items():
        out[name] = membership_roc(frame(ev.train_x), frame(ev.heldout_x), frame(ev.cand_x), chunk)
    if ev.public_x is not None:
        size = min(len(ev.public_x), len(ev.cand_x))
        pool = ev.public_x[torch.randperm(len(ev.public_x), generator=torch.Generator().manual_seed(0))[:size]]
        out["control_public"] = membership_roc(ev.frame(ev.train_x), ev.frame(ev.heldout_x), ev.frame(pool), chunk)
    for row, score in zip(report["reconstruction"]["per_sample"], out["victim_frame"]["member_scores"]):
        row["membership_score"] = score
    for name in out:
        if isinstance(out[name], dict):
            out[name].pop("member_scores"), out[name].pop("nonmember_scores")
    report["membership"] = out
    main, control = out["victim_frame"], out.get("control_public")
    report["figures"]["membership_roc"] = _rel(inputs.run_dir, rp.plot_membership_roc(
        inputs.out_dir / "membership_roc.png", main, out["raw"], control))
    s = report["summary"]
    for prefix, figs in (("membership", main), ("membership_raw", out["raw"]), ("control_membership", control)):
        if figs is None:
            continue
        s[f"{prefix}_auc"] = figs["auc"]
        s[f"{prefix}_auc_ci95"] = figs["auc_ci95"]
        for f, key in (("0.01", "1pct"), ("0.05", "5pct")):
            s[f"{prefix}_tpr_at_{key}_fpr"] = figs["tpr_at_fpr"][f]["tpr"]
            s[f"{prefix}_tpr_at_{key}_fpr_ci95"] = figs["tpr_at_fpr"][f]["ci95"]


def _leak_rate(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """``report["leak"]``: the per-sample baseline / leak flags, the leak rate against the whole held-out pool (whose
    chance level grows with the number of candidates, so it stays out of the summary) and the pool-matched leak rate
    (candidates subsampled to the held-out pool's size: chance 0.5 whatever their number), which the summary shows."""
    from .membership import pool_matched_leak_rate

    leak = leak_figures(ev.train_x, ev.cand_x, ev.heldout_x, cand_match=ev.cand, heldout_match=ev.heldout)
    for row, extra in zip(report["reconstruction"]["per_sample"], leak.pop("per_sample")):
        if extra["one_to_one_candidate"] >= 0:  # back to the index among all candidates
            extra["one_to_one_candidate"] = int(ev.cand_idx[extra["one_to_one_candidate"]])
        row.update(extra)
    report["leak"] = leak
    if ev.heldout_x is None:
        return
    matched = pool_matched_leak_rate(ev.frame(ev.train_x), ev.frame(ev.cand_x), ev.frame(ev.heldout_x), chunk=inputs.ecfg.chunk)
    leak["pool_matched"] = matched
    report["summary"].update(leak_rate_pool_matched=matched["leak_rate"], leak_rate_pool_matched_chance=matched["chance"],
                             leak_rate_pool_size=matched["pool_size"])


def _fraction_curve(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """The fraction-reconstructed plot (with the held-out baseline) and the reconstruction's summary keys."""
    from . import report as rp

    rec = report["reconstruction"]
    baseline = rec.get("heldout_baseline")
    report["figures"]["fraction_curve"] = _rel(inputs.run_dir, rp.plot_fraction_curve(
        inputs.out_dir / "fraction_curve.png", rec["fraction_curve"]["thresholds"], rec["fraction_curve"]["fraction"],
        inputs.ecfg.good_threshold, baseline["fraction_curve"] if baseline else None))
    s = report["summary"]
    s.update(num_train=rec["num_train"], num_candidates=rec["num_candidates"], best_cosine_mean=rec["best_cosine"]["mean"],
             best_cosine_median=rec["best_cosine"]["median"], distinct_best_candidates=rec["distinct_best_candidates"],
             best_match_label_agreement=rec["label_agreement"])
    for t, v in rec["fraction_above"].items():
        s[f"frac_train_cos_ge_{t}"] = v
    if baseline:
        s["heldout_best_cosine_mean"] = baseline["best_cosine_mean"]
        s["heldout_frac_cos_ge_0.9"] = float(fraction_curve(ev.heldout["best_score"], [0.9])[0])


def _selection_figures(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """Each representative's nearest training sample, and precision@k of the ranked selection against a random
    choice of candidates and against choosing them by run loss."""
    from . import report as rp

    ecfg = inputs.ecfg
    cand_good = ev.cand["b_best_score"] >= ecfg.good_threshold
    sel_cos, sel_near = ev.sel["best_score"], ev.sel["best_index"]
    sel_good = sel_cos >= ecfg.good_threshold
    for r, rep in enumerate(inputs.reps):
        rep.update(nearest_train_index=int(sel_near[r]), nearest_train_cosine=float(sel_cos[r]), good=bool(sel_good[r]),
                   label_agrees=rep["y"] == int(ev.train_y[sel_near[r]]))
    ks = capped_ks(ecfg.precision_ks, len(inputs.reps))
    base = float(cand_good.float().mean())
    prec_sel = precision_at_k(sel_good, ks)
    prec_loss = expected_precision_by_key(cand_good, ev.cands["run_loss"].float()[ev.cand_idx],
                                          [min(k, len(ev.cand_idx)) for k in ks])
    distinct = [int(len(torch.unique(sel_near[:k][sel_good[:k]]))) for k in ks]
    report["selection_quality"] = {
        "good_threshold": ecfg.good_threshold, "k": ks, "precision_selected": prec_sel,
        "precision_random": [base] * len(ks), "precision_by_run_loss": prec_loss,
        "distinct_train_at_k": distinct, "base_rate": base,
    }
    report["figures"]["precision_at_k"] = _rel(inputs.run_dir, rp.plot_precision(
        inputs.out_dir / "precision_at_k.png", ks, prec_sel, [base] * len(ks), prec_loss, ecfg.good_threshold))
    s = report["summary"]
    s["precision_random"] = base
    for k, a, b in zip(ks, prec_sel, prec_loss):
        s[f"precision_selected_at_{k}"] = a
        s[f"precision_by_run_loss_at_{k}"] = b


def _attribution_figures(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """``report["attribution"]``: how many of the top-k representatives are nearest (victim's frame) to a training
    sample rather than a held-out one, against chance n_train / (n_train + n_heldout), and how many distinct training
    samples they show; for the selection's own ranking and, when the selection recorded it, the cluster-score
    baseline's."""
    from .membership import attribution

    if ev.heldout_x is None:
        return
    from .report import GRID_K

    ks = sorted(set(inputs.ecfg.precision_ks) | {GRID_K})
    train_f, held_f = ev.frame(ev.train_x), ev.frame(ev.heldout_x)
    rankings = {"selection": inputs.sel["x"].float()}
    if "baseline_x" in inputs.sel:
        rankings["baseline"] = inputs.sel["baseline_x"].float()
    out = {"score": inputs.sel_meta.get("score", "cluster"), "chance": None}
    for name, sel_x in rankings.items():
        figs = attribution(ev.frame(sel_x), train_f, held_f, ks, inputs.ecfg.chunk)
        out["chance"] = figs["chance"]
        out[name] = {"at_k": figs["at_k"]}
        if name == "selection":
            for rep, is_train, j, c in zip(inputs.reps, figs["nearest_is_train"], figs["nearest_index"], figs["nearest_cosine"]):
                rep.update(attributed_to_train=bool(is_train), nearest_member_or_heldout=int(j), nearest_member_or_heldout_cosine=c)
    if "candidate_score" in inputs.sel:
        out["learned_score"] = _learned_score_transfer(inputs, ev, train_f, held_f)
    report["attribution"] = out
    s = report["summary"]
    s["selection_attribution_chance"] = out["chance"]
    for key in ("auc_on_this_victim", "auc_between_shadows"):
        if (out.get("learned_score") or {}).get(key) is not None:
            s[f"learned_score_{key}"] = out["learned_score"][key]
    for name, prefix in (("selection", "selection"), ("baseline", "baseline_selection")):
        for k, row in (out.get(name) or {}).get("at_k", {}).items():
            s[f"{prefix}_attribution_at_{k}"] = row["attributed"]
            s[f"{prefix}_distinct_train_at_{k}"] = row["distinct_train"]
            s[f"{prefix}_attribution_p_at_{k}"] = row["p_value"]


def _learned_score_transfer(inputs: _Inputs, ev: _Evaluation, train_f: torch.Tensor, held_f: torch.Tensor) -> dict:
    """How well the score learned on shadow victims tells this victim's real reconstructions (candidates nearest to
    a training sample among training ∪ held-out) from the rest: its ROC AUC here, beside the AUC it had from one
    shadow victim to another (``shadow/scorer.json``)."""
    from sklearn.metrics import roc_auc_score

    from .shadow import load_scorer

    scores = inputs.sel["candidate_score"].double()[ev.cand_idx]
    ok = torch.isfinite(scores)
    near = best_matches("cosine", ev.frame(ev.cand_x[ok]), torch.cat([train_f, held_f]), inputs.ecfg.chunk)["best_index"]
    real = (near < len(train_f)).numpy()
    scorer = load_scorer(inputs.run_dir) or {}
    return {"auc_on_this_victim": float(roc_auc_score(real, scores[ok].numpy())) if 0 < real.sum() < len(real) else None,
            "real_fraction": float(real.mean()), "auc_between_shadows": scorer.get("transfer_auc_mean")}


def _victim_figures(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """The victim on its training set: its KKT residual there (beside the best run's candidates'), the
    hyperplane membership evidence (training against held-out samples) and reconstructability versus its margin."""
    from . import report as rp

    if ev.victim is None:
        report["margin"] = {"available": False}
        return
    from .victim import margins

    model, spec = ev.victim
    with torch.no_grad():
        m = margins(model(ev.train_x), ev.train_y)
    s = report["summary"]
    if inputs.ecfg.kkt_steps > 0:
        heldout_y = ev.emb.test_y.long() if ev.heldout_x is not None else None
        report["victim_kkt"] = _victim_kkt(model, spec, ev.train_x, ev.train_y, ev.heldout_x, heldout_y, ev.cands_meta,
                                           inputs.ecfg.kkt_steps, inputs.victim_dir)
        s["kkt_residual_at_train"] = report["victim_kkt"]["residual_at_train"]
        s["kkt_residual_at_heldout"] = report["victim_kkt"]["residual_at_heldout"]
        for where in ("train", "heldout"):
            if f"projection_residual_at_{where}" in report["victim_kkt"]:
                s[f"projection_residual_at_{where}"] = report["victim_kkt"][f"projection_residual_at_{where}"]
    planes = hyperplane_membership(model, ev.train_x, ev.heldout_x)
    report["hyperplane_membership"] = {k: v for k, v in planes.items() if not k.endswith("_counts")}
    if planes["available"]:
        report["figures"]["hyperplane_membership"] = _rel(inputs.run_dir, rp.plot_hyperplane_membership(
            inputs.out_dir / "hyperplane_membership.png", planes["train_counts"], planes.get("heldout_counts"),
            planes.get("auc")))
        s["frac_train_on_victim_hyperplane"] = planes["train_frac_on_any"]
        if "auc" in planes:
            s["frac_heldout_on_victim_hyperplane"] = planes["heldout_frac_on_any"]
            s["hyperplane_membership_auc"] = planes["auc"]
    rho, p = spearman(m, ev.best_cos)
    for i, (row, margin) in enumerate(zip(report["reconstruction"]["per_sample"], m.tolist())):
        row["margin"] = float(margin)
        if planes["available"]:
            row["victim_hyperplanes_through"] = int(planes["train_counts"][i])
    report["margin"] = {"available": True, "spearman_rho": rho, "spearman_p": p, "n": len(ev.train_x)}
    report["figures"]["margin_scatter"] = _rel(inputs.run_dir, rp.plot_margin_scatter(
        inputs.out_dir / "margin_scatter.png", m, ev.best_cos, rho))
    s["spearman_margin_rho"] = rho


def _text_figures(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """Text: the nearest training sentences of the top representatives."""
    from .embed import load_samples

    texts = load_samples(inputs.embeddings_dir).get("train_texts") or []
    top = min(inputs.ecfg.text_top, len(inputs.reps))
    if not (top and texts):
        return
    cos, idx = ev.sel["top_score"], ev.sel["top_index"]
    report["text"] = {"nearest_train_texts": [
        {"rank": r, "candidate_index": inputs.reps[r]["candidate_index"],
         "matches": [{"train_index": int(j), "text": texts[int(j)], "cosine": float(c)} for c, j in zip(cos[r], idx[r])]}
        for r in range(top)]}


def _image_figures(report: dict, inputs: _Inputs, ev: _Evaluation) -> None:
    """Images: (training | reconstruction) grids and SSIM figures, from the candidates themselves when the
    embeddings are pixels, else from the inverted representatives."""
    from .embed import load_images

    info = _image_info(inputs, ev, load_images(inputs.embeddings_dir))
    report["images"] = info
    s = report["summary"]
    for key in ("frac_train_ssim_gt_0.4_pool_matched", "frac_train_ssim_gt_0.4_heldout"):
        if (info.get("pool_matched_ssim") or {}).get(key) is not None:
            s[key] = info["pool_matched_ssim"][key]
    for key in ("ssim_best_matches_mean", "ssim_selection_mean", "lpips_best_matches_mean"):
        if info.get(key) is not None:
            s[key] = info[key]
    report["grids"].update(info.pop("grids"))


def _fmt_or_na(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _notes(report: dict) -> list[str]:
    """Human-readable remarks on what the figures mean or why some are missing, read off the report."""
    from .reconstruct import FAR_FROM_STATIONARY

    notes = [f"the victim cannot be a reconstruction target: {p}" for p in (report.get("victim") or {}).get("problems", [])]
    if (report.get("text_corpus") or {}).get("note"):
        notes.append(report["text_corpus"]["note"])
    runs = report.get("runs")
    if runs and runs["failed"]:
        first = "; ".join(f"run {r['run']}: {r['error']}" for r in runs["failed"][:3])
        more = f"; and {len(runs['failed']) - 3} more" if len(runs["failed"]) > 3 else ""
        notes.append(f"{len(runs['failed'])} of {runs['total']} reconstruction runs failed and their candidates were left "
                     f"out (listed under 'Failed reconstruction runs'): {first}{more}")
    if report["mode"] != "evaluation":
        notes.append("training set unknown (no run_dir/embed, no reconstruct.embeddings_dir): attacker mode, evaluation figures omitted")
        return notes
    rec = report["reconstruction"]
    n_train, distinct = rec["num_train"], rec["distinct_best_candidates"]
    if distinct < n_train / 2:
        notes.append(f"the {n_train} training samples have only {distinct} distinct best candidates: the same few "
                     f"candidates are the nearest to many samples (see 'best for N' in the best-match grid), "
                     f"which is closeness to typical samples rather than reconstruction of individual ones")
    if report["leak"].get("note"):
        notes.append(report["leak"]["note"])
    kkt = report.get("victim_kkt")
    if kkt and kkt["residual_at_train"] > FAR_FROM_STATIONARY:
        notes.append(
            f"the victim's KKT residual at its training set is {kkt['residual_at_train']:.3g}: near 1 means it is far "
            f"from a stationary point of its training loss and nothing can be reconstructed from it "
            f"({_fmt_or_na(kkt.get('residual_at_heldout'))} at as many held-out samples; 0 = the condition holds "
            f"exactly); a low leak figure here is weak evidence of no leakage (a victim trained longer, with weight decay "
            f"and a decaying learning rate, gets closer to 0)")
    if not report["margin"]["available"]:
        notes.append("no victim in run_dir/classifier: margin analysis omitted")
    return notes


def _reference_ssim_inverted(train_img: torch.Tensor, inv: list[torch.Tensor], reps: list[dict], chunk: int) -> dict:
    """The reference's SSIM metrics with the inverted PNGs as the only candidates (resized to the training
    images' size and channels); each representative also gets its NCC-nearest training image and that SSIM."""
    cand = torch.stack([match_channels_and_size(t[None], train_img[:1])[0] for t in inv])
    match = best_matches("ncc", train_img, cand, chunk, one_to_one=True)
    out = reference_ssim_figures(train_img, cand, chunk, match=match)
    out["note"] = (f"candidates are the {len(inv)} inverted representatives only (not every candidate): "
                   "frac_train_ssim_gt_0.4 is bounded by their number")
    near = match["b_best_index"]
    ssim = ssim_reference(train_img[near], to_unit_range(cand, "minmax"))
    for rep, j, v in zip(reps, near.tolist(), ssim.tolist()):
        rep.update(ncc_nearest_train_index=j, ssim_reference=v)
    return out


def _image_info(inputs: _Inputs, ev: _Evaluation, images: dict | None) -> dict:
    """``report["images"]`` (with its ``grids``, moved to ``report["grids"]`` by the caller)."""
    ecfg = inputs.ecfg
    info: dict = {"source": None, "grids": {}}
    use_lpips, info["lpips_note"] = lpips_status() if ecfg.lpips == "auto" else (False, "LPIPS disabled (evaluate.lpips=off)")
    info["lpips_available"] = use_lpips
    if images is None:
        info["note"] = "no embed/images.safetensors: image figures omitted"
        return info
    train_img = images["train"].float() / 255.0
    reps, sel_near, sel_cos = inputs.reps, ev.sel["best_index"], ev.sel["best_score"]
    if embeddings_are_pixels(ev.emb.train_x, images["train"]):
        info["source"] = "reshape"
        sel_img = _reshaped_candidate_figures(info, inputs, ev, train_img, use_lpips, images)
    elif inputs.inversion:
        info["source"] = "inversion"
        by_rank = {int(e["rank"]): e for e in inputs.inversion}
        ranks = [r for r in range(len(reps)) if r in by_rank]
        if not ranks:
            return info
        inv = [load_png(inputs.run_dir / by_rank[r]["path"]).float() / 255.0 for r in ranks]
        info["reference_ssim"] = {"source": "inversion", **_reference_ssim_inverted(train_img, inv, [reps[r] for r in ranks], ecfg.chunk)}
        sel_img = torch.stack([F.interpolate(t[None], size=inv[0].shape[-2:], mode="bilinear", align_corners=False)[0] for t in inv])
        sel_near, sel_cos = sel_near[ranks], sel_cos[ranks]
        reps = [reps[r] for r in ranks]
    else:
        info["note"] = "embeddings are not pixels and there are no inverted images: image grids omitted"
        return info
    _selection_grid(info, inputs, train_img, sel_img, reps, sel_near, sel_cos)
    return info


def _reshaped_candidate_figures(info: dict, inputs: _Inputs, ev: _Evaluation, train_img: torch.Tensor,
                                use_lpips: bool, images: dict) -> torch.Tensor:
    """Pixel embeddings: every training sample against its best candidate seen as an image (SSIM over all of
    them, the reference's NCC / SSIM metrics, the best-match grid); returns the representatives as images."""
    from . import report as rp

    ecfg = inputs.ecfg
    shape = tuple(train_img.shape[1:])
    best_cos, best_local, shared = ev.best_cos, ev.best_local, ev.shared
    recon = as_images(ev.cand_x[best_local], shape, ecfg.image_scaling)
    ssim = ssim_pairs(train_img, recon)
    info["ssim_best_matches_mean"] = float(ssim.mean())
    info["ssim_best_matches"] = ssim.tolist()
    info["reference_ssim"] = {"source": "reshape", **reference_ssim_figures(train_img, ev.cand_x.reshape(-1, *shape), ecfg.chunk)}
    if images.get("test") is not None and len(images["test"]):
        info["pool_matched_ssim"] = pool_matched_ssim(train_img, ev.cand_x.reshape(-1, *shape), images["test"].float() / 255.0,
                                                      ecfg.chunk)
    if use_lpips:
        info["lpips_best_matches_mean"] = float(lpips_pairs(train_img, recon).mean())
    order = torch.argsort(best_cos, descending=True)[: ecfg.grid_pairs]
    caps = []
    for i in order.tolist():
        c = int(best_local[i])
        y, cand_y = int(ev.train_y[i]), int(ev.cand_y[c])
        label = f"y {y}" + ("" if cand_y == y else f" vs cand y {cand_y}!")
        caps.append(f"train {i} <- cand {int(ev.cand_idx[c])}, best for {int(shared[i])}\n"
                    f"cos {float(best_cos[i]):.3f} ssim {float(ssim[i]):.2f} {label}")
    info["grids"]["best_matches"] = _rel(inputs.run_dir, rp.image_pair_grid(
        inputs.out_dir / "best_matches.png", train_img[order], recon[order], caps,
        "Best reconstructions (training | reconstruction); 'best for N': the candidate is the best match of N "
        "training samples; '!': its class differs"))
    return as_images(inputs.sel["x"], shape, ecfg.image_scaling)


def _selection_grid(info: dict, inputs: _Inputs, train_img: torch.Tensor, sel_img: torch.Tensor, reps: list[dict],
                    sel_near: torch.Tensor, sel_cos: torch.Tensor) -> None:
    """The top representatives next to their nearest training image, with SSIM."""
    from . import report as rp

    n = min(inputs.ecfg.grid_pairs, len(sel_img))
    nearest = match_channels_and_size(train_img[sel_near[:n]], sel_img[:n])
    ssim_sel = ssim_pairs(nearest, sel_img[:n].clamp(0, 1))
    info["ssim_selection_mean"] = float(ssim_sel.mean())
    for rep, v in zip(reps[:n], ssim_sel.tolist()):
        rep["ssim"] = v
    caps = [f"#{rep['rank']} -> train {int(j)}: cos {float(c):.3f}\nssim {float(v):.2f}"
            + ("" if rep.get("label_agrees", True) else " class differs!")
            for rep, j, c, v in zip(reps[:n], sel_near[:n], sel_cos[:n], ssim_sel)]
    info["grids"]["selection"] = _rel(inputs.run_dir, rp.image_pair_grid(
        inputs.out_dir / "selection.png", nearest, sel_img[:n], caps, "Top representatives (nearest training | reconstruction)"))


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    from . import report as rp

    run_dir = Path(run_dir)
    ecfg: EvalConfig = OmegaConf.to_object(cfg.evaluate)
    report = build_report(run_dir, ecfg, victim_dir=cfg.reconstruct.get("victim_dir"),
                          embeddings_dir=cfg.reconstruct.get("embeddings_dir"))
    rp.write_report(run_dir, report)
    rp.log_report(cfg, run_dir, report)
    return {"mode": report["mode"], **{k: v for k, v in report["summary"].items() if isinstance(v, (int, float))}}


STAGE = Stage(
    name="evaluate",
    run=run_stage,
    sections=[Section("evaluate", EvalConfig)],
    config_keys=["evaluate"],
    # the training set, when known (evaluation mode), and every earlier stage's results
    inputs=["embed/*.safetensors", "embed/samples.json", "classifier/model.safetensors", "classifier/victim.json",
            "reconstruct/candidates.safetensors", "select/*", "invert/*.json", "invert/images/*.png",
            "{reconstruct.victim_dir}/*", "{reconstruct.embeddings_dir}/embed/*"],
    outputs=["report.json", "report.html", "report/*.png"],
)
