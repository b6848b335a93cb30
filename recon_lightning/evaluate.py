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
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, DataError
from .storage import load_json, load_png
from .image_params import to_unit_range
from .reconstruct import match_candidates

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- core figures


def max_cosine(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a``: the largest cosine to any row of ``b`` and that row's index."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise DataError(f"cosine matching needs non-empty sets, got {a.shape[0]} and {b.shape[0]} rows")
    if a.shape[1] != b.shape[1]:
        raise DataError(f"cannot compare {a.shape[1]}-d and {b.shape[1]}-d vectors (different embeddings?)")
    match = match_candidates(a, b, chunk)
    return match["candidate_best_cos"], match["candidate_best_train"]


def top_k_cosine(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest cosines from each row of ``a`` to the rows of ``b`` (small ``a``)."""
    sims = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T
    return sims.topk(min(k, b.shape[0]), dim=1)


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
    """SSIM per image pair; ``a``, ``b`` float (N, C, H, W) in [0, 1] (torchmetrics)."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    if a.shape != b.shape:
        raise DataError(f"SSIM needs equally shaped image batches, got {tuple(a.shape)} and {tuple(b.shape)}")
    k = ssim_kernel_size(a.shape[-2], a.shape[-1])
    if k < 3:
        raise DataError(f"images of size {tuple(a.shape[-2:])} are too small for SSIM")
    metric = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=k, sigma=1.5 * k / 11, reduction="none")
    return metric(a.float(), b.float()).reshape(-1)


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
    pixels and channels (the reference's ``get_ssim_pairs_kornia``). A small own implementation, not
    torchmetrics: with a Gaussian kernel torchmetrics derives the window from sigma (2 int(3.5 sigma + 0.5) + 1 = 11
    for sigma 1.5, whatever ``kernel_size`` says), older versions crop a border of (window-1)/2 pixels before
    averaging (28 of the 64 pixels of an 8x8 digit for window 3), and it clamps inputs; kornia is not a dependency.

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


def _prepare(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Rows ready for a dot product: unit vectors (``cosine``) or, for ``ncc``, images (N, C, H, W) normalised
    per image and channel to zero mean / unit std (unbiased, like the reference's ``normalize_batch``;
    a constant channel becomes 0 instead of NaN), flattened."""
    x = x.double()
    if kind == "cosine":
        return F.normalize(x.flatten(1), dim=1)
    if kind == "ncc":
        if x.dim() != 4:
            raise DataError(f"NCC needs images (N, C, H, W), got shape {tuple(x.shape)}")
        flat = x.flatten(2)
        z = (flat - flat.mean(2, keepdim=True)) / flat.std(2, keepdim=True).clamp_min(1e-12)
        return z.flatten(1)
    raise ValueError(f"unknown similarity {kind!r}")


def _scores(kind: str, pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """Similarity of prepared rows (higher = closer): cosine, or minus the NCC distance
    ||za - zb||^2 / D (the reference's ``ncc_dist(..., div_dim=True)``)."""
    dot = pa @ pb.T
    if kind == "cosine":
        return dot
    d2 = (pa * pa).sum(1)[:, None] + (pb * pb).sum(1)[None, :] - 2 * dot
    return -d2.clamp_min(0) / pa.shape[1]


def _row_chunks(b: torch.Tensor, chunk: int, max_elements: int = 1 << 24):
    """Row slices of ``b``: at most ``chunk`` rows and about ``max_elements`` values each (float64 memory bound)."""
    rows = max(1, min(chunk, max_elements // max(1, b[0].numel())))
    for start in range(0, len(b), rows):
        yield start, b[start : start + rows]


def pairwise_scores(kind: str, a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Full (len(a), len(b)) similarity matrix (``cosine`` or minus NCC distance); for a small ``a``."""
    _check_pair(a, b)
    pa = _prepare(kind, a)
    return torch.cat([_scores(kind, pa, _prepare(kind, part)) for _, part in _row_chunks(b, chunk)], dim=1)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if len(a) == 0 or len(b) == 0:
        raise DataError(f"matching needs non-empty sets, got {len(a)} and {len(b)} rows")
    if a.shape[1:] != b.shape[1:]:
        raise DataError(f"cannot match samples of shape {tuple(a.shape[1:])} with {tuple(b.shape[1:])}")


def assign_one_to_one(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-total-similarity one-to-one assignment of rows to columns (scipy's linear_sum_assignment).

    Returns (column per row, its score); rows left without a column (more rows than columns) get -1 / NaN.
    """
    from scipy.optimize import linear_sum_assignment

    s = scores.double()
    rows, cols = linear_sum_assignment(s.numpy(), maximize=True)
    col = torch.full((s.shape[0],), -1, dtype=torch.long)
    val = torch.full((s.shape[0],), float("nan"), dtype=torch.float64)
    rows_t, cols_t = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    col[rows_t], val[rows_t] = cols_t, s[rows_t, cols_t]
    return col, val


def best_and_one_to_one(kind: str, a: torch.Tensor, b: torch.Tensor, chunk: int = 4096, one_to_one: bool = True) -> dict:
    """For each row of ``a``: its most similar row of ``b`` (``best_index``, ``best_score``) and, with
    ``one_to_one``, its row of ``b`` in a maximum-total-similarity one-to-one assignment (``one_to_one_index``
    (-1 when unassigned), ``one_to_one_score``).

    ``b`` may be large: only each row's top-min(len(a), len(b)) columns are kept, which is exact (if row i were
    assigned a column outside its top n, one of its top n would be free, since only n-1 other rows exist, and
    moving there loses nothing). Memory ~ len(a)^2; time of the assignment ~ len(a)^2 x the kept columns.
    """
    _check_pair(a, b)
    n = len(a)
    k = min(n, len(b)) if one_to_one else 1
    pa = _prepare(kind, a)
    top_v = torch.empty(n, 0, dtype=torch.float64)
    top_i = torch.empty(n, 0, dtype=torch.long)
    for start, part in _row_chunks(b, chunk):
        s = _scores(kind, pa, _prepare(kind, part))
        v, i = s.topk(min(k, s.shape[1]), dim=1)
        top_v, pos = torch.cat([top_v, v], 1).topk(min(k, top_v.shape[1] + v.shape[1]), dim=1)
        top_i = torch.cat([top_i, i + start], 1).gather(1, pos)
    out = {"best_index": top_i[:, 0].clone(), "best_score": top_v[:, 0].clone()}
    if one_to_one:
        cols = torch.unique(top_i)
        local, val = assign_one_to_one(pairwise_scores(kind, a, b[cols], chunk))
        out["one_to_one_index"] = torch.where(local >= 0, cols[local.clamp_min(0)], torch.full_like(local, -1))
        out["one_to_one_score"] = val
    return out


def leak_figures(train_x: torch.Tensor, cand_x: torch.Tensor, heldout_x: torch.Tensor | None, chunk: int = 4096) -> dict:
    """The leak rate and its one-to-one variant (cosine in embedding space; module comment above).

    ``per_sample`` lists, per training sample: ``heldout_best_cosine`` / ``heldout_best_index`` (the baseline),
    ``leaked``, ``one_to_one_candidate`` (row of ``cand_x``, -1 if none), ``one_to_one_cosine``,
    ``leaked_one_to_one``. ``leak_rate`` is None (with a ``note``) when there is no held-out pool. The one-to-one
    rate is compared with the same per-sample baseline (the best held-out cosine, which is at least as hard to
    beat as any one-to-one pairing of held-out samples); training samples left unassigned (fewer candidates
    than samples) count as not leaked.
    """
    m = best_and_one_to_one("cosine", train_x, cand_x, chunk)
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
    h = best_and_one_to_one("cosine", train_x, heldout_x, chunk, one_to_one=False)
    leaked = m["best_score"] > h["best_score"] + LEAK_TOLERANCE
    leaked_o2o = (o2o_idx >= 0) & (torch.nan_to_num(o2o_cos, nan=-2.0) > h["best_score"] + LEAK_TOLERANCE)
    for i in range(n):
        per[i].update(heldout_best_cosine=float(h["best_score"][i]), heldout_best_index=int(h["best_index"][i]),
                      leaked=bool(leaked[i]), leaked_one_to_one=bool(leaked_o2o[i]))
    out.update(leak_rate=float(leaked.double().mean()), leak_rate_one_to_one=float(leaked_o2o.double().mean()),
               baseline_pool=int(len(heldout_x)), num_leaked=int(leaked.sum()), num_leaked_one_to_one=int(leaked_o2o.sum()),
               per_sample=per)
    return out


def reference_ssim_figures(train_img: torch.Tensor, cand_img: torch.Tensor, chunk: int = 4096) -> dict:
    """The reference's image metrics: each training image's candidate at the smallest NCC distance, its SSIM
    (:func:`ssim_reference`, candidate min-max normalised to [0, 1]); ``ssim_reference_mean``,
    ``frac_train_ssim_gt_0.4`` and the one-to-one variant (Hungarian on NCC distance; training images left
    without a candidate count as not reconstructed).

    ``train_img``: float (n, C, H, W) in [0, 1]; ``cand_img``: (N, C, H, W) in any range.
    """
    m = best_and_one_to_one("ncc", train_img, cand_img, chunk)
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


# ----------------------------------------------------------------------------- config


@dataclass
class EvalConfig:
    good_threshold: float = 0.9
    thresholds: tuple = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    curve_points: int = 101
    precision_ks: tuple = (10, 50, 100, 500, 1000)
    grid_pairs: int = 24
    image_scaling: str = "minmax"
    lpips: str = "auto"
    text_top: int = 10
    text_k: int = 3
    chunk: int = 4096
    kkt_steps: int = 300

    @classmethod
    def from_cfg(cls, cfg) -> "EvalConfig":
        e = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg or {})
        d = cls()
        out = cls(
            good_threshold=float(e.get("good_threshold", d.good_threshold)),
            thresholds=tuple(float(t) for t in e.get("thresholds", d.thresholds)),
            curve_points=int(e.get("curve_points", d.curve_points)),
            precision_ks=tuple(int(k) for k in e.get("precision_ks", d.precision_ks)),
            grid_pairs=int(e.get("grid_pairs", d.grid_pairs)),
            image_scaling=str(e.get("image_scaling", d.image_scaling)),
            lpips=str(e.get("lpips", d.lpips)),
            text_top=int(e.get("text_top", d.text_top)),
            text_k=int(e.get("text_k", d.text_k)),
            chunk=int(e.get("chunk", d.chunk)),
            kkt_steps=int(e.get("kkt_steps", d.kkt_steps)),
        )
        if not -1 <= out.good_threshold <= 1:
            raise ConfigError(f"evaluate.good_threshold is a cosine and must be in [-1, 1], got {out.good_threshold}")
        if out.curve_points < 2:
            raise ConfigError(f"evaluate.curve_points must be >= 2, got {out.curve_points}")
        if out.image_scaling not in ("minmax", "clip"):
            raise ConfigError(f"evaluate.image_scaling must be minmax or clip, got {out.image_scaling!r}")
        if out.kkt_steps < 0:
            raise ConfigError(f"evaluate.kkt_steps must be >= 0 (0 = off), got {out.kkt_steps}")
        if out.lpips not in ("auto", "off"):
            raise ConfigError(f"evaluate.lpips must be auto or off, got {out.lpips!r}")
        return out


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


def _victim_kkt(model, spec: dict, train_x: torch.Tensor, train_y: torch.Tensor, cands: dict, keep: torch.Tensor,
                cands_meta: dict, steps: int) -> dict:
    """The victim's KKT residual at its true training points beside the best reconstruction run's candidates,
    both scored the same way (exact ReLU derivative, multipliers refitted: :func:`reconstruct.kkt_residual_at`),
    so "the candidates explain the victim better than the training set" compares like with like."""
    from .reconstruct import kkt_residual_at

    form = cands_meta.get("form") or "auto"
    multipliers = cands_meta.get("multipliers") or "runner_up"
    truth = kkt_residual_at(model, spec, train_x, train_y, form=form, steps=steps, multipliers=multipliers)
    ok = [r for r in cands_meta.get("runs", []) if r.get("status") == "ok" and r.get("final_loss") is not None]
    best_run = min(ok, key=lambda r: r["final_loss"])["run"] if ok else None
    cand_res = None
    if best_run is not None:
        mine = keep & (cands["run"].long() == int(best_run))
        if bool(mine.any()):
            cand_res = kkt_residual_at(model, spec, cands["x"][mine].float(), cands["y"][mine].long(), form=form,
                                       steps=steps, multipliers=multipliers)["residual"]
    return {"form": truth["form"], "residual_at_train": truth["residual"], "steps": truth["steps"],
            "best_run": best_run, "candidates_residual": cand_res,
            "explains_candidates_better": cand_res is not None and cand_res < truth["residual"]}


def _victim_summary(run_dir: Path) -> dict | None:
    """The victim's training figures from ``classifier/victim.json`` (shown on the report's first lines)."""
    path = run_dir / "classifier" / "victim.json"
    if not path.is_file():
        return None
    spec = load_json(path, what="victim description (victim.json)")
    metrics = spec.get("metrics") or {}
    return {"train_acc": metrics.get("train_acc"), "test_acc": metrics.get("test_acc"), "n_train": spec.get("n_train"),
            "margin_min": metrics.get("train_margin_min"), "problems": (spec.get("health") or {}).get("problems", [])}


def _inversion(run_dir: Path) -> list[dict] | None:
    path = run_dir / "invert" / "inversion.json"
    return load_json(path, what="inversion results") if path.is_file() else None


def _text_matches(run_dir: Path) -> list[dict] | None:
    path = run_dir / "invert" / "text_matches.json"
    return load_json(path, what="text matches") if path.is_file() else None


def build_report(run_dir: Path, ecfg: EvalConfig, progress: bool = True) -> dict:
    """Compute every figure and write the plots/grids to ``run_dir/report``; returns report.json's dict."""
    from . import report as rp
    from .select import load_selection

    run_dir = Path(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    sel, sel_meta = load_selection(run_dir)
    R = sel["x"].shape[0]
    reps = [
        {"rank": r, "candidate_index": int(sel["candidate_index"][r]), "score": float(sel["score"][r]),
         "cluster_size": int(sel["cluster_size"][r]), "y": int(sel["y"][r])}
        for r in range(R)
    ]
    report: dict = {
        "format": rp.REPORT_FORMAT,
        "mode": "attacker",
        "modality": None,
        "summary": {"num_representatives": R},
        "selection": {k: sel_meta.get(k) for k in ("method", "num_candidates", "num_used", "num_clusters")},
        "figures": {},
        "grids": {},
        "notes": [],
    }
    report["selection"]["representatives"] = reps
    victim = _victim_summary(run_dir)
    if victim:
        report["victim"] = victim
        report["summary"].update({f"victim_{k}": victim[k] for k in ("train_acc", "test_acc") if victim.get(k) is not None})
        report["notes"] += [f"the victim cannot be a reconstruction target: {p}" for p in victim.get("problems", [])]
    report["figures"]["selection_scores"] = _rel(run_dir, rp.plot_scores(out_dir / "selection_scores.png", sel["score"]))

    inversion = _inversion(run_dir)
    if inversion is not None:
        by_rank = {int(e["rank"]): e for e in inversion}
        for rep in reps:
            if rep["rank"] in by_rank:
                rep["image"] = by_rank[rep["rank"]]["path"]
                rep["inversion_cosine"] = by_rank[rep["rank"]].get("cosine")
        report["inversion"] = inversion
    text_matches = _text_matches(run_dir)
    if text_matches is not None:
        report["text_matches_attacker"] = text_matches
        corpus_path = run_dir / "invert" / "text_corpus.json"
        if corpus_path.is_file():
            report["text_corpus"] = load_json(corpus_path, what="text corpus record")
            if report["text_corpus"].get("note"):
                report["notes"].append(report["text_corpus"]["note"])

    evaluation = (run_dir / "embed" / "embeddings.safetensors").is_file()
    if not evaluation:
        report["notes"].append("training set unknown (no run_dir/embed): attacker mode, evaluation figures omitted")
        if inversion:
            imgs = torch.stack([load_png(run_dir / e["path"]).float() / 255.0 for e in sorted(inversion, key=lambda e: e["rank"])[: ecfg.grid_pairs]])
            caps = [f"#{e['rank']}" for e in sorted(inversion, key=lambda e: e["rank"])[: ecfg.grid_pairs]]
            report["grids"]["inverted"] = _rel(run_dir, rp.image_grid(out_dir / "inverted.png", imgs, caps, "Inverted representatives"))
        return report

    from .embed import load_embeddings, load_images, load_samples

    report["mode"] = "evaluation"
    emb = load_embeddings(run_dir)
    modality = emb.meta.get("modality", "image")
    report["modality"] = modality
    train_x, train_y = emb.train_x.float(), emb.train_y.long()
    if train_x.shape[1] != sel["x"].shape[1]:
        raise DataError(f"selection is {sel['x'].shape[1]}-d but the training embeddings are {train_x.shape[1]}-d")
    cands, keep, cands_meta = _eligible_candidates(run_dir)
    cand_idx = torch.nonzero(keep).squeeze(1)
    if len(cand_idx) == 0:
        raise DataError("no usable candidates to evaluate (all non-finite or from failed runs)")
    cand_x = cands["x"].float()[cand_idx]
    n_train = len(train_x)

    # 1. every training sample's best candidate (and, for step 2, every candidate's nearest sample)
    match = match_candidates(cand_x, train_x, ecfg.chunk)
    best_cos, best_local = match["train_best_cos"], match["train_best_candidate"]
    best_cand = cand_idx[best_local]
    thresholds = torch.linspace(0, 1, ecfg.curve_points).tolist()
    curve = fraction_curve(best_cos, thresholds)
    above = {f"{t:g}": v for t, v in zip(ecfg.thresholds, fraction_curve(best_cos, ecfg.thresholds))}
    # How many training samples each best candidate is the best match of, and whether its class agrees.
    cand_y = cands["y"].long()[cand_idx]
    shared = torch.bincount(best_local, minlength=len(cand_idx))[best_local]
    agrees = cand_y[best_local] == train_y
    per_sample = [{"train_index": i, "y": int(train_y[i]), "best_candidate": int(best_cand[i]), "best_cosine": float(best_cos[i]),
                   "best_candidate_y": int(cand_y[best_local[i]]), "label_agrees": bool(agrees[i]),
                   "best_candidate_shared_by": int(shared[i])} for i in range(n_train)]
    distinct = int(len(torch.unique(best_local)))
    report["reconstruction"] = {
        "num_train": n_train,
        "num_candidates": int(len(cand_idx)),
        "best_cosine": {"mean": float(best_cos.mean()), "median": float(best_cos.median()),
                        "min": float(best_cos.min()), "max": float(best_cos.max())},
        "fraction_curve": {"thresholds": thresholds, "fraction": curve},
        "fraction_above": above,
        "per_sample": per_sample,
        "distinct_best_candidates": distinct,
        "label_agreement": float(agrees.float().mean()),
    }
    if distinct < n_train / 2:
        report["notes"].append(f"the {n_train} training samples have only {distinct} distinct best candidates: the same few "
                               f"candidates are the nearest to many samples (see 'best for N' in the best-match grid), "
                               f"which is closeness to typical samples rather than reconstruction of individual ones")
    # Baseline: held-out samples of the same distribution. Candidates that come no closer than
    # unseen data (common for raw pixels, where all images are alike) show no leakage.
    heldout_curve = None
    if len(emb.test_x):
        heldout = match_candidates(emb.test_x.float(), train_x, ecfg.chunk)["train_best_cos"]
        heldout_curve = fraction_curve(heldout, thresholds)
        report["reconstruction"]["heldout_baseline"] = {
            "best_cosine_mean": float(heldout.mean()),
            "fraction_above": {f"{t:g}": v for t, v in zip(ecfg.thresholds, fraction_curve(heldout, ecfg.thresholds))},
            "fraction_curve": heldout_curve,
        }
    _add_leak_rate(report, train_x, cand_x, cand_idx, emb.test_x.float() if len(emb.test_x) else None, ecfg.chunk)
    report["figures"]["fraction_curve"] = _rel(run_dir, rp.plot_fraction_curve(
        out_dir / "fraction_curve.png", thresholds, curve, ecfg.good_threshold, heldout_curve))
    s = report["summary"]
    s.update(num_train=n_train, num_candidates=int(len(cand_idx)), best_cosine_mean=float(best_cos.mean()),
             best_cosine_median=float(best_cos.median()), distinct_best_candidates=distinct,
             best_match_label_agreement=float(agrees.float().mean()))
    for t, v in above.items():
        s[f"frac_train_cos_ge_{t}"] = v
    if heldout_curve is not None:
        s["heldout_best_cosine_mean"] = report["reconstruction"]["heldout_baseline"]["best_cosine_mean"]
        s["heldout_frac_cos_ge_0.9"] = float(fraction_curve(heldout, [0.9])[0])

    # 2. selection quality
    cand_near_cos, cand_near_idx = match["candidate_best_cos"], match["candidate_best_train"]
    cand_good = cand_near_cos >= ecfg.good_threshold
    sel_cos, sel_near = max_cosine(sel["x"].float(), train_x, ecfg.chunk)
    sel_good = sel_cos >= ecfg.good_threshold
    for r, rep in enumerate(reps):
        rep.update(nearest_train_index=int(sel_near[r]), nearest_train_cosine=float(sel_cos[r]), good=bool(sel_good[r]),
                   label_agrees=rep["y"] == int(train_y[sel_near[r]]))
    ks = capped_ks(ecfg.precision_ks, R)
    base = float(cand_good.float().mean())
    prec_sel = precision_at_k(sel_good, ks)
    prec_loss = expected_precision_by_key(cand_good, cands["run_loss"].float()[cand_idx], [min(k, len(cand_idx)) for k in ks])
    distinct = [int(len(torch.unique(sel_near[:k][sel_good[:k]]))) for k in ks]
    report["selection_quality"] = {
        "good_threshold": ecfg.good_threshold, "k": ks, "precision_selected": prec_sel,
        "precision_random": [base] * len(ks), "precision_by_run_loss": prec_loss,
        "distinct_train_at_k": distinct, "base_rate": base,
    }
    report["figures"]["precision_at_k"] = _rel(run_dir, rp.plot_precision(out_dir / "precision_at_k.png", ks, prec_sel, [base] * len(ks), prec_loss, ecfg.good_threshold))
    s["precision_random"] = base
    for k, a, b in zip(ks, prec_sel, prec_loss):
        s[f"precision_selected_at_{k}"] = a
        s[f"precision_by_run_loss_at_{k}"] = b

    # 3. reconstructability vs margin
    margin_info: dict = {"available": False}
    if (run_dir / "classifier" / "victim.json").is_file():
        from .victim import load_victim, margins

        model, spec = load_victim(run_dir / "classifier", expected_input_dim=train_x.shape[1])
        with torch.no_grad():
            m = margins(model(train_x), train_y)
        if ecfg.kkt_steps > 0:
            report["victim_kkt"] = _victim_kkt(model, spec, train_x, train_y, cands, keep, cands_meta, ecfg.kkt_steps)
            s["kkt_residual_at_train"] = report["victim_kkt"]["residual_at_train"]
            if report["victim_kkt"]["explains_candidates_better"]:
                report["notes"].append(
                    f"other points fit the victim better than its training set: its KKT residual at the true training points "
                    f"is {report['victim_kkt']['residual_at_train']:.3g}, higher than the best reconstruction run's "
                    f"{report['victim_kkt']['candidates_residual']:.3g} (both scored with the exact ReLU derivative and "
                    f"refitted multipliers); either the victim is far from a KKT point of its "
                    f"training set (train it longer) or the KKT conditions do not single the training set out (few, "
                    f"low-dimensional samples); a low reconstruction rate here is weak evidence of no leakage")
        rho, p = spearman(m, best_cos)
        for i in range(n_train):
            per_sample[i]["margin"] = float(m[i])
        margin_info = {"available": True, "spearman_rho": rho, "spearman_p": p, "n": n_train}
        report["figures"]["margin_scatter"] = _rel(run_dir, rp.plot_margin_scatter(out_dir / "margin_scatter.png", m, best_cos, rho))
        s["spearman_margin_rho"] = rho
    else:
        report["notes"].append("no victim in run_dir/classifier: margin analysis omitted")
    report["margin"] = margin_info

    # 4. modality-specific: images or text
    if modality == "text":
        samples = load_samples(run_dir)
        texts = samples.get("train_texts") or []
        top = sel["x"][: ecfg.text_top].float()
        if len(top) and texts:
            cos, idx = top_k_cosine(top, train_x, ecfg.text_k)
            report["text"] = {"nearest_train_texts": [
                {"rank": r, "candidate_index": reps[r]["candidate_index"],
                 "matches": [{"train_index": int(j), "text": texts[int(j)], "cosine": float(c)} for c, j in zip(cos[r], idx[r])]}
                for r in range(len(top))]}
    else:
        report["images"] = _image_figures(run_dir, out_dir, ecfg, emb, load_images(run_dir), cand_x, best_local, best_cos,
                                          sel, sel_near, sel_cos, reps, inversion, (cand_idx, cand_y, shared))
        for key in ("ssim_reference_mean", "frac_train_ssim_gt_0.4", "frac_train_ssim_gt_0.4_one_to_one"):
            if (report["images"].get("reference_ssim") or {}).get(key) is not None:
                s[key] = report["images"]["reference_ssim"][key]
        for key in ("ssim_best_matches_mean", "ssim_selection_mean", "lpips_best_matches_mean"):
            if report["images"].get(key) is not None:
                s[key] = report["images"][key]
        report["grids"].update(report["images"].pop("grids"))
    return report


def _add_leak_rate(report: dict, train_x, cand_x, cand_idx, heldout_x, chunk: int) -> None:
    """``report["leak"]``, the per-sample baseline / leak flags and the summary's leak_rate keys (the headline)."""
    leak = leak_figures(train_x, cand_x, heldout_x, chunk)
    for row, extra in zip(report["reconstruction"]["per_sample"], leak.pop("per_sample")):
        if extra["one_to_one_candidate"] >= 0:  # back to the index among all candidates
            extra["one_to_one_candidate"] = int(cand_idx[extra["one_to_one_candidate"]])
        row.update(extra)
    report["leak"] = leak
    report["summary"].update(leak_rate=leak["leak_rate"], leak_rate_one_to_one=leak["leak_rate_one_to_one"],
                             leak_rate_baseline_pool=leak["baseline_pool"])
    if leak.get("note"):
        report["notes"].append(leak["note"])


def _reference_ssim_inverted(train_img: torch.Tensor, inv: list[torch.Tensor], reps: list[dict], chunk: int) -> dict:
    """The reference's SSIM metrics with the inverted PNGs as the only candidates (resized to the training
    images' size and channels); each representative also gets its NCC-nearest training image and that SSIM."""
    cand = torch.stack([match_channels_and_size(t[None], train_img[:1])[0] for t in inv])
    out = reference_ssim_figures(train_img, cand, chunk)
    out["note"] = (f"candidates are the {len(inv)} inverted representatives only (not every candidate): "
                   "frac_train_ssim_gt_0.4 is bounded by their number")
    near = pairwise_scores("ncc", cand, train_img, chunk).argmax(1)
    ssim = ssim_reference(train_img[near], to_unit_range(cand, "minmax"))
    for rep, j, v in zip(reps, near.tolist(), ssim.tolist()):
        rep.update(ncc_nearest_train_index=j, ssim_reference=v)
    return out


def _image_figures(run_dir, out_dir, ecfg, emb, images, cand_x, best_local, best_cos, sel, sel_near, sel_cos, reps, inversion,
                   cand_info) -> dict:
    from . import report as rp

    info: dict = {"source": None, "grids": {}}
    use_lpips, info["lpips_note"] = lpips_status() if ecfg.lpips == "auto" else (False, "LPIPS disabled (evaluate.lpips=off)")
    info["lpips_available"] = use_lpips
    if images is None:
        info["note"] = "no embed/images.safetensors: image figures omitted"
        return info
    train_img = images["train"].float() / 255.0
    shape = tuple(train_img.shape[1:])
    if embeddings_are_pixels(emb.train_x, images["train"]):
        info["source"] = "reshape"
        # Best matches: every training sample against its best candidate (SSIM over all of them).
        recon = as_images(cand_x[best_local], shape, ecfg.image_scaling)
        ssim = ssim_pairs(train_img, recon)
        info["ssim_best_matches_mean"] = float(ssim.mean())
        info["ssim_best_matches"] = ssim.tolist()
        info["reference_ssim"] = {"source": "reshape", **reference_ssim_figures(train_img, cand_x.reshape(-1, *shape), ecfg.chunk)}
        if use_lpips:
            info["lpips_best_matches_mean"] = float(lpips_pairs(train_img, recon).mean())
        order = torch.argsort(best_cos, descending=True)[: ecfg.grid_pairs]
        cand_idx, cand_y, shared = cand_info
        train_y = emb.train_y.long()
        caps = []
        for i in order.tolist():
            c = int(best_local[i])
            label = f"y {int(train_y[i])}" + ("" if int(cand_y[c]) == int(train_y[i]) else f" vs cand y {int(cand_y[c])}!")
            caps.append(f"train {i} <- cand {int(cand_idx[c])}, best for {int(shared[i])}\n"
                        f"cos {float(best_cos[i]):.3f} ssim {float(ssim[i]):.2f} {label}")
        info["grids"]["best_matches"] = _rel(run_dir, rp.image_pair_grid(
            out_dir / "best_matches.png", train_img[order], recon[order], caps,
            "Best reconstructions (training | reconstruction); 'best for N': the candidate is the best match of N "
            "training samples; '!': its class differs"))
        sel_img = as_images(sel["x"], shape, ecfg.image_scaling)
    elif inversion:
        info["source"] = "inversion"
        by_rank = {int(e["rank"]): e for e in inversion}
        ranks = [r for r in range(len(reps)) if r in by_rank]
        if not ranks:
            return info
        inv = [load_png(run_dir / by_rank[r]["path"]).float() / 255.0 for r in ranks]
        info["reference_ssim"] = {"source": "inversion", **_reference_ssim_inverted(train_img, inv, [reps[r] for r in ranks], ecfg.chunk)}
        sel_img = torch.stack([F.interpolate(t[None], size=inv[0].shape[-2:], mode="bilinear", align_corners=False)[0] for t in inv])
        sel_near, sel_cos = sel_near[ranks], sel_cos[ranks]
        reps = [reps[r] for r in ranks]
    else:
        info["note"] = "embeddings are not pixels and there are no inverted images: image grids omitted"
        return info
    # Selection: top representatives next to their nearest training image.
    n = min(ecfg.grid_pairs, len(sel_img))
    nearest = match_channels_and_size(train_img[sel_near[:n]], sel_img[:n])
    ssim_sel = ssim_pairs(nearest, sel_img[:n].clamp(0, 1))
    info["ssim_selection_mean"] = float(ssim_sel.mean())
    for rep, v in zip(reps[:n], ssim_sel.tolist()):
        rep["ssim"] = v
    caps = [f"#{rep['rank']} -> train {int(j)}: cos {float(c):.3f}\nssim {float(v):.2f}"
            + ("" if rep.get("label_agrees", True) else " class differs!")
            for rep, j, c, v in zip(reps[:n], sel_near[:n], sel_cos[:n], ssim_sel)]
    info["grids"]["selection"] = _rel(run_dir, rp.image_pair_grid(
        out_dir / "selection.png", nearest, sel_img[:n], caps, "Top representatives (nearest training | reconstruction)"))
    return info


def check_config(cfg: DictConfig) -> None:
    """Cheap checks of evaluate.*, run by ``fit`` before any stage starts (``cfg`` is the whole config)."""
    EvalConfig.from_cfg(cfg.get("evaluate", {}))


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    from . import report as rp

    run_dir = Path(run_dir)
    ecfg = EvalConfig.from_cfg(cfg.get("evaluate", {}))
    report = build_report(run_dir, ecfg)
    rp.write_report(run_dir, report)
    rp.log_report(cfg, run_dir, report)
    return {"mode": report["mode"], **{k: v for k, v in report["summary"].items() if isinstance(v, (int, float))}}
