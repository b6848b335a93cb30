"""Nearest-neighbour matching between two point sets, as pure tensor code (no Lightning, no I/O): the one
place where candidates are matched to training samples (and training samples to held-out samples).

Similarities (higher = closer), computed in float64:

* ``cosine``: rows flattened and normalised to unit length, then dot products;
* ``ncc``: images (N, C, H, W) normalised per image and channel to zero mean / unit std (unbiased, like the
  reference's ``normalize_batch``; a constant channel becomes 0 instead of NaN), then minus the normalised
  cross-correlation distance ||za - zb||^2 / D (the reference's ``ncc_dist(..., div_dim=True)``).

:func:`best_matches` scans ``b`` (candidates, any number) once, a chunk of rows at a time, against ``a``
(training samples, few): each row of ``a`` gets its most similar row of ``b``, each row of ``b`` its most
similar row of ``a``, and optionally ``a``'s one-to-one (Hungarian) assignment to ``b``. The reconstruct
stage scores its runs with it and the evaluate stage builds its report from one call per pair of sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DataError

KINDS = ("cosine", "ncc")


def _prepare(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Rows ready for a dot product: unit vectors (``cosine``) or z-scored images, flattened (``ncc``)."""
    x = x.double()
    if kind == "cosine":
        return F.normalize(x.flatten(1), dim=1)
    if kind == "ncc":
        if x.dim() != 4:
            raise DataError(f"NCC needs images (N, C, H, W), got shape {tuple(x.shape)}")
        flat = x.flatten(2)
        z = (flat - flat.mean(2, keepdim=True)) / flat.std(2, keepdim=True).clamp_min(1e-12)
        return z.flatten(1)
    raise ValueError(f"unknown similarity {kind!r}; choose from {KINDS}")


def _scores(kind: str, pa: torch.Tensor, pb: torch.Tensor) -> torch.Tensor:
    """Similarity of prepared rows: cosine, or minus the NCC distance."""
    dot = pa @ pb.T
    if kind == "cosine":
        return dot
    d2 = (pa * pa).sum(1)[:, None] + (pb * pb).sum(1)[None, :] - 2 * dot
    return -d2.clamp_min(0) / pa.shape[1]


def _row_chunks(b: torch.Tensor, chunk: int, max_elements: int = 1 << 24):
    """Row slices of ``b``: at most ``chunk`` rows and about ``max_elements`` values each (float64 memory bound)."""
    rows = max(1, min(int(chunk), max_elements // max(1, b[0].numel())))
    for start in range(0, len(b), rows):
        yield start, b[start : start + rows]


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if len(a) == 0 or len(b) == 0:
        raise DataError(f"matching needs non-empty sets, got {len(a)} and {len(b)} rows")
    if a.shape[1:] != b.shape[1:]:
        raise DataError(f"cannot match samples of shape {tuple(a.shape[1:])} with {tuple(b.shape[1:])} "
                        f"(different embeddings?)")


def pairwise_scores(kind: str, a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Full (len(a), len(b)) similarity matrix; for a small ``a`` and ``b``."""
    _check_pair(a, b)
    pa = _prepare(kind, a)
    return torch.cat([_scores(kind, pa, _prepare(kind, part)) for _, part in _row_chunks(b, chunk)], dim=1)


def assign_one_to_one(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximum-total-similarity one-to-one assignment of rows to columns (scipy's linear_sum_assignment);
    ``-inf`` marks a pair that may not be assigned.

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


def best_matches(kind: str, a: torch.Tensor, b: torch.Tensor, chunk: int = 4096, one_to_one: bool = False,
                 top: int = 1) -> dict:
    """Match the rows of ``a`` (few: training samples) and ``b`` (any number: candidates) in one pass over ``b``.

    Returns ``best_index`` / ``best_score`` (len(a),): each row of ``a``'s most similar row of ``b``;
    ``top_index`` / ``top_score`` (len(a), min(top, len(b))): its ``top`` most similar rows, best first;
    ``b_best_index`` / ``b_best_score`` (len(b),): each row of ``b``'s most similar row of ``a``; with
    ``one_to_one``, ``one_to_one_index`` (-1 when unassigned) / ``one_to_one_score`` (NaN then): each row of
    ``a``'s row of ``b`` in a maximum-total-similarity one-to-one assignment. Scores are float64.

    The assignment sees only each row's top-min(len(a), len(b)) columns, which is exact: if row i were assigned
    a column outside its top n, one of its top n would be free (only n-1 other rows exist) and moving there loses
    nothing. Memory ~ len(a)^2 beside a chunk; time of the assignment ~ len(a)^2 x the kept columns.
    """
    _check_pair(a, b)
    n = len(a)
    k = max(int(top), min(n, len(b)) if one_to_one else 1)
    pa = _prepare(kind, a)
    top_v = torch.empty(n, 0, dtype=torch.float64)
    top_i = torch.empty(n, 0, dtype=torch.long)
    b_v, b_i = [], []
    for start, part in _row_chunks(b, chunk):
        s = _scores(kind, pa, _prepare(kind, part))  # (len(a), rows of this chunk)
        v, i = s.max(0)
        b_v.append(v)
        b_i.append(i)
        v, i = s.topk(min(k, s.shape[1]), dim=1)
        top_v, pos = torch.cat([top_v, v], 1).topk(min(k, top_v.shape[1] + v.shape[1]), dim=1)
        top_i = torch.cat([top_i, i + start], 1).gather(1, pos)
    out = {"best_index": top_i[:, 0].clone(), "best_score": top_v[:, 0].clone(),
           "top_index": top_i[:, : int(top)].clone(), "top_score": top_v[:, : int(top)].clone(),
           "b_best_index": torch.cat(b_i), "b_best_score": torch.cat(b_v)}
    if one_to_one:
        cols, local = torch.unique(top_i, return_inverse=True)
        kept = torch.full((n, len(cols)), float("-inf"), dtype=torch.float64)
        kept.scatter_(1, local, top_v)
        col, score = assign_one_to_one(kept)
        out["one_to_one_index"] = torch.where(col >= 0, cols[col.clamp_min(0)], torch.full_like(col, -1))
        out["one_to_one_score"] = score
    return out
