"""Stage 4: pick the candidates most likely to be real training samples, without the training set.

Reconstruction runs produce many candidates; most are junk, but candidates that several
independent runs converge to (a tight cluster fed by many runs, with non-negligible KKT
multipliers and a low final loss) are the likely copies of training samples (Haim et al. 2022,
Buzaglo et al. 2023). This stage clusters all candidates on the unit sphere with faiss and
ranks clusters by a score computed from the candidates alone:

=============  ====================================================================  ==========================
term           definition (per cluster, each in [0, 1])                              weight
=============  ====================================================================  ==========================
``size``       ``log(n) / log(n_max)`` (n = members, n_max = largest cluster)        ``select.weights.size``
``tightness``  mean pairwise cosine of the members, clipped to [0, 1] (0 for n = 1)  ``select.weights.tightness``
``runs``       ``log(r) / log(r_max)`` with r = distinct runs among the members       ``select.weights.runs``
``lam``        mean percentile rank of the members' multipliers ``lam``              ``select.weights.lam``
``loss``       mean of ``1 -`` percentile rank of the members' ``run_loss``          ``select.weights.loss``
=============  ====================================================================  ==========================

``score = sum_i w_i * term_i / sum_i w_i``. Each cluster is represented by its cosine medoid:
the member with the largest summed cosine to the other members, which on the unit sphere is
exactly the member closest to the members' mean direction (so it costs O(n), not O(n^2)).

Clustering methods (``select.method``):

* ``kmeans``: spherical k-means (``faiss.Kmeans``), ``num_clusters`` centroids (``auto`` =
  ``round(sqrt(N))`` clipped to [1, 4096]).
* ``knn``: connected components of the mutual k-nearest-neighbour graph restricted to edges
  with cosine >= ``knn.min_cosine``. Density-based: no cluster count to choose, junk stays in
  singletons. The default: on benchmarks/bench_select.py it finds planted near-duplicate groups
  that k-means merges with noise. Neighbours come from an exact ``IndexFlatIP`` search up to
  ``knn.exact_max`` candidates per class (and always on GPU). Above that, on CPU, neighbour
  *candidates* come from a cheap index and their cosines are then recomputed exactly in the full
  space (faiss ``IndexRefineFlat``), so ``min_cosine`` and the mutual test always see exact
  cosines; only the recall of the candidate search is approximate. The cheap index is an
  ``IndexIVFFlat`` (``knn.nlist`` lists, ``knn.nprobe`` probed) over a ``faiss.PCAMatrix``
  projection to ``knn.reduce_dim`` dims, returning ``knn.k_factor * (k + 1)`` candidates per row
  (``reduce_dim: 0``: IVF in the full space, the previous behaviour: on benchmarks/bench_select.py
  at 10^5 x 1024 on a 2-core CPU the whole stage took 52 s that way, 11 s with PCA to 64 dims).

With ``per_class: true`` each class label ``y`` is clustered separately and the ranking takes
the classes in turn (best cluster of each class, then the second best, ...), so every class is
represented. faiss runs on GPU when ``faiss.get_num_gpus() > 0``, on CPU otherwise.

Outputs (see ``docs/architecture.md``): ``select/selection.safetensors`` (representatives,
best first) and ``select/clusters.json`` (per-cluster statistics, best first).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from .config import Section, auto_or_int, rule, section
from .errors import ConfigError, DataError
from .stages import Stage
from .shadow import load_scorer, public_pool
from .storage import load_json, load_tensors, save_json, save_tensors

log = logging.getLogger(__name__)

METHODS = ("kmeans", "knn")
SCORES = ("auto", "learned", "cluster")
SCORE_TERMS = ("size", "tightness", "runs", "lam", "loss")


@dataclass
class ScoreWeights:
    """Weights of the cluster score's terms (see the module docstring)."""

    size: float = rule(ge=0)
    tightness: float = rule(ge=0)
    runs: float = rule(ge=0)
    lam: float = rule(ge=0)
    loss: float = rule(ge=0)


@dataclass
class KmeansConfig:
    niter: int = rule(ge=1)
    max_points_per_centroid: int = rule(ge=1)


@dataclass
class KnnConfig:
    k: int = rule(ge=1)
    min_cosine: float = rule(ge=-1, le=1)
    exact_max: int = rule(ge=0)
    reduce_dim: int = rule(ge=0)  # 0 = no reduction
    k_factor: float = rule(ge=1)
    nlist: Any = auto_or_int(ge=1)  # typed Any: auto or an integer (OmegaConf has no Union of str and int)
    nprobe: int = rule(ge=1)


@dataclass
class SelectConfig:
    """Schema of ``select`` (values: configs/select/default.yaml); the core functions take it as an object
    (``OmegaConf.to_object(cfg.select)``, or :func:`recon_lightning.config.shipped` outside the pipeline)."""

    score: str = rule(choices=SCORES)
    diversity_cosine: float = rule(ge=-1, le=1)
    method: str = rule(choices=METHODS)
    num_clusters: Any = auto_or_int(ge=1)
    num_representatives: int = rule(ge=1)
    per_class: bool = MISSING
    exclude_failed_runs: bool = MISSING
    min_cluster_size: int = rule(ge=1)
    use_gpu: Any = rule(choices=("auto", True, False))  # typed Any: auto or a bool
    weights: ScoreWeights = section(ScoreWeights, test=lambda w: sum(w.values()) > 0, what="weights not all 0")
    kmeans: KmeansConfig = section(KmeansConfig)
    knn: KnnConfig = section(KnnConfig)


# ----------------------------------------------------------------------------- faiss helpers


def _faiss():
    # faiss's loader tries its AVX512 and AVX2 builds first and logs each missing one as a
    # ModuleNotFoundError at INFO level on every start; the build it ends up with works. Keep quiet.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss  # imported lazily: only this stage and evaluation need it

    return faiss


@contextmanager
def _omp_threads(n: int):
    """Run faiss (and its OpenMP BLAS) on ``n`` threads inside the block."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def gpu_available(use_gpu: str | bool = "auto") -> bool:
    """Whether to run faiss on GPU: ``auto`` = when the installed faiss sees a GPU."""
    if use_gpu in (False, "false", "off", "cpu"):
        return False
    faiss = _faiss()
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu in (True, "true", "on", "gpu") and n == 0:
        raise ConfigError("select.use_gpu=true but faiss sees no GPU (install faiss-gpu, or set select.use_gpu=auto)")
    return n > 0


def l2_normalize(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float32 C-contiguous rows of unit L2 norm (zero rows stay zero), as faiss wants them."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def auto_num_clusters(n: int) -> int:
    """``round(sqrt(n))``, clipped to [1, min(n, 4096)]: grows with N but keeps k-means affordable."""
    return int(max(1, min(n, 4096, round(math.sqrt(n)))))


def kmeans_labels(xn: np.ndarray, k: int, niter: int = 25, seed: int = 0, gpu: bool = False,
                  max_points_per_centroid: int = 256) -> np.ndarray:
    """Spherical k-means on unit rows ``xn`` -> cluster label per row."""
    faiss = _faiss()
    n, d = xn.shape
    k = int(min(k, n))
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, gpu=gpu, verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(xn)
    _, labels = km.index.search(xn, 1)
    return _compact(labels[:, 0])


def auto_nlist(n: int) -> int:
    """IVF lists for ``n`` rows: ``round(sqrt(n))``, clipped to [1, n]."""
    return int(max(1, min(n, round(math.sqrt(n)))))


def knn_index(xn: np.ndarray, exact_max: int = 20000, gpu: bool = False, nprobe: int = 16,
              nlist: int | str = "auto", reduce_dim: int = 64, k_factor: float = 4.0, seed: int = 0):
    """The faiss index :func:`knn_search` queries, built and filled with ``xn``; ``(index, metric)``.

    * up to ``exact_max`` rows, or on GPU: exact ``IndexFlatIP`` (metric ``"ip"``);
    * above, ``0 < reduce_dim < d``: ``IndexRefineFlat(IndexPreTransform(PCAMatrix(d, reduce_dim),
      IndexIVFFlat(L2)))`` (metric ``"l2"``): the PCA+IVF index proposes ``k_factor * k`` candidates
      per query, whose exact full-space squared L2 distances (``2 - 2 cos`` on unit rows) rank them;
    * above, ``reduce_dim`` 0 or >= d (or >= the rows): ``IndexIVFFlat``, inner product, full space ("ip").
    """
    faiss = _faiss()
    n, d = xn.shape
    if n <= exact_max or gpu:
        index = faiss.IndexFlatIP(d)
        if gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(xn)
        return index, "ip"
    nl = auto_nlist(n) if nlist == "auto" else int(max(1, min(int(nlist), n)))
    # PCA and k-means need a sample, not all rows (the PCA covariance is O(n d^2)). A PCA to as
    # many dims as there are training rows would lose nothing (and faiss refuses it): no PCA then.
    n_train = min(n, max(16384, 64 * nl))
    if 0 < reduce_dim < min(d, n_train):
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(reduce_dim), reduce_dim, nl, faiss.METRIC_L2)
        index = faiss.IndexRefineFlat(faiss.IndexPreTransform(faiss.PCAMatrix(d, reduce_dim), ivf))
        index.k_factor = float(k_factor)
        metric = "l2"
        train = xn if n_train == n else xn[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
    else:
        ivf = index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nl, faiss.METRIC_INNER_PRODUCT)
        metric, train = "ip", xn
    ivf.cp.seed = int(seed)
    if metric == "l2":
        # PCA training is an eigendecomposition made of many small (Open)BLAS calls: on a CPU shared
        # with other jobs, OpenMP threads spinning at each barrier made it 30x slower (1 s -> 40 s).
        with _omp_threads(1):
            index.train(train)
    else:
        index.train(train)
    ivf.nprobe = int(min(nprobe, nl))
    index.add(xn)
    return index, metric


def knn_search(xn: np.ndarray, k: int, exact_max: int = 20000, gpu: bool = False, nprobe: int = 16,
               nlist: int | str = "auto", reduce_dim: int = 64, k_factor: float = 4.0, seed: int = 0,
               chunk_size: int = 8192, progress: bool = False, desc: str = "select: kNN search"):
    """``k`` nearest neighbours by cosine (inner product on unit rows), excluding each row itself.

    Returns ``(cosines, indices)``, both ``(n, k)``, nearest first; an index of -1 (cosine -inf)
    where an approximate search found fewer than ``k`` neighbours. The index is
    :func:`knn_index`'s: exact up to ``exact_max`` rows or on GPU; above that on CPU, candidates
    from PCA (``reduce_dim``) + IVF (``nlist``/``nprobe``), re-ranked by exact cosine. Exact
    search of 10^5 x 10^5 in 1024-d is ~10^13 flops; PCA+IVF proposes candidates for a small
    fraction of that and the exact re-ranking costs ``n * k_factor * k * d``. Queries go in chunks
    of ``chunk_size`` rows (a progress bar when ``progress``).
    """
    from tqdm.auto import tqdm

    n, d = xn.shape
    k = int(min(k, n - 1))
    if k < 1:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    index, metric = knn_index(xn, exact_max=exact_max, gpu=gpu, nprobe=nprobe, nlist=nlist, reduce_dim=reduce_dim,
                              k_factor=k_factor, seed=seed)
    sims = np.empty((n, k + 1), np.float32)
    idx = np.empty((n, k + 1), np.int64)
    starts = range(0, n, max(1, int(chunk_size)))
    for s in tqdm(starts, desc=desc, unit="chunk", leave=False, disable=not progress or len(starts) < 2):
        sims[s:s + chunk_size], idx[s:s + chunk_size] = index.search(xn[s:s + chunk_size], k + 1)
    if metric == "l2":
        sims = 1.0 - 0.5 * sims  # |a - b|^2 = 2 - 2 cos(a, b) on unit rows
    sims[idx < 0] = -np.inf
    # Drop self-matches (usually column 0, but exact duplicates may come in another order):
    # stable-sort each row so non-self entries come first, then keep the first k.
    is_self = idx == np.arange(n)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)


def knn_labels(xn: np.ndarray, k: int = 10, min_cosine: float = 0.9, exact_max: int = 20000, gpu: bool = False,
               nprobe: int = 16, nlist: int | str = "auto", reduce_dim: int = 64, k_factor: float = 4.0,
               seed: int = 0, progress: bool = False) -> np.ndarray:
    """Connected components of the mutual-kNN graph with cosine >= ``min_cosine`` (see :func:`knn_search`)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = xn.shape[0]
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    sims, idx = knn_search(xn, k, exact_max=exact_max, gpu=gpu, nprobe=nprobe, nlist=nlist, reduce_dim=reduce_dim,
                           k_factor=k_factor, seed=seed, progress=progress)
    src = np.repeat(np.arange(n), idx.shape[1])
    dst, s = idx.ravel(), sims.ravel()
    ok = (dst >= 0) & (s >= min_cosine)
    src, dst = src[ok], dst[ok]
    adj = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n)).tocsr()
    mutual = adj.multiply(adj.T)  # edge i-j only if each is among the other's k nearest
    _, labels = connected_components(mutual, directed=False)
    return _compact(labels)


def _compact(labels: np.ndarray) -> np.ndarray:
    _, inv = np.unique(labels, return_inverse=True)
    return inv.astype(np.int64)


# ----------------------------------------------------------------------------- scoring


def _percentile_rank(v: np.ndarray) -> np.ndarray:
    """Rank of each value in [0, 1] (ties share their mean rank); 0.5 everywhere if all equal."""
    from scipy.stats import rankdata

    if len(v) <= 1 or np.all(v == v[0]):
        return np.full(len(v), 0.5)
    return (rankdata(v) - 1) / (len(v) - 1)


def cluster_stats(xn: np.ndarray, labels: np.ndarray, y: np.ndarray, lam: np.ndarray, run: np.ndarray,
                  run_loss: np.ndarray) -> list[dict]:
    """Per-cluster statistics (unscored): members, medoid, size, tightness, runs, lam/loss terms."""
    lam_pct = _percentile_rank(np.abs(lam))
    loss_pct = 1.0 - _percentile_rank(run_loss)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    sizes = np.diff(np.concatenate([starts, [len(order)]]))
    # Singletons (most candidates under knn: junk) in one vectorised pass instead of one by one.
    single = order[starts[sizes == 1]]
    norm1 = np.sqrt(np.einsum("ij,ij->i", xn[single], xn[single], dtype=np.float64))
    cos1 = (norm1 ** 2 / np.maximum(norm1, 1e-12)).tolist()  # v . (v / |v|)
    single_stats = iter(zip(single.tolist(), cos1, y[single].tolist(), lam[single].tolist(),
                            run_loss[single].tolist(), lam_pct[single].tolist(), loss_pct[single].tolist()))
    stats = []
    for start, n in zip(starts.tolist(), sizes.tolist()):
        if n == 0:
            continue
        members = order[start:start + n]
        if n == 1:
            m, cos_c, ym, lam_m, loss_m, lam_t, loss_t = next(single_stats)
            stats.append({
                "members": members, "size": 1, "medoid": m, "y": int(ym), "y_purity": 1.0,
                "mean_pairwise_cosine": 0.0, "mean_cosine_to_centroid": float(cos_c), "num_runs": 1,
                "mean_lam": float(lam_m), "mean_run_loss": float(loss_m), "lam_term": float(lam_t),
                "loss_term": float(loss_t),
            })
            continue
        v = xn[members]
        s = v.sum(0)
        s2 = float(s @ s)
        # Mean pairwise cosine from the sum vector: (|sum|^2 - n) / (n (n - 1)).
        pairwise = (s2 - float((v * v).sum())) / (n * (n - 1))
        centroid = s / max(math.sqrt(s2), 1e-12)
        cos_c = v @ centroid
        medoid = int(members[int(np.argmax(cos_c))])
        ys, counts = np.unique(y[members], return_counts=True)
        stats.append({
            "members": members,
            "size": n,
            "medoid": medoid,
            "y": int(ys[np.argmax(counts)]),
            "y_purity": float(counts.max() / n),
            "mean_pairwise_cosine": float(pairwise),
            "mean_cosine_to_centroid": float(cos_c.mean()),
            "num_runs": int(len(np.unique(run[members]))),
            "mean_lam": float(np.mean(lam[members])),
            "mean_run_loss": float(np.mean(run_loss[members])),
            "lam_term": float(lam_pct[members].mean()),
            "loss_term": float(loss_pct[members].mean()),
        })
    return stats


def score_clusters(stats: list[dict], weights: dict) -> None:
    """Add ``terms`` and ``score`` (see the module docstring) to each cluster dict, in place."""
    if not stats:
        return
    max_size = max(c["size"] for c in stats)
    max_runs = max(c["num_runs"] for c in stats)
    w = {t: float(weights.get(t, 0.0)) for t in SCORE_TERMS}
    total = sum(w.values())
    for c in stats:
        terms = {
            "size": math.log(c["size"]) / math.log(max_size) if max_size > 1 else 0.0,
            "tightness": min(max(c["mean_pairwise_cosine"], 0.0), 1.0),
            "runs": math.log(c["num_runs"]) / math.log(max_runs) if max_runs > 1 else 0.0,
            "lam": c["lam_term"],
            "loss": c["loss_term"],
        }
        c["terms"] = terms
        c["score"] = sum(w[t] * terms[t] for t in SCORE_TERMS) / total


def _interleave(per_class: list[list[dict]]) -> list[dict]:
    """Round-robin over the classes' ranked lists; within a round, the higher score first."""
    out, depth = [], 0
    while True:
        round_ = [lst[depth] for lst in per_class if depth < len(lst)]
        if not round_:
            return out
        out.extend(sorted(round_, key=lambda c: -c["score"]))
        depth += 1


def select_candidates(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, run: torch.Tensor,
                      run_loss: torch.Tensor, scfg: SelectConfig, keep: torch.Tensor | None = None,
                      progress: bool = True, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Cluster and rank candidates. ``keep`` (bool mask) excludes e.g. failed runs.

    Returns the selection tensors (``x``, ``candidate_index``, ``score``, ``cluster_size``, ``y``;
    best first, indices into the *original* candidate array) and all clusters best first.
    """
    from tqdm.auto import tqdm

    n_all = x.shape[0]
    if x.ndim != 2 or n_all == 0:
        raise DataError(f"selection needs a non-empty (N, D) candidate array, got shape {tuple(x.shape)}")
    for name, t in (("y", y), ("lam", lam), ("run", run), ("run_loss", run_loss)):
        if t.shape[0] != n_all:
            raise DataError(f"candidate field {name!r} has {t.shape[0]} entries but there are {n_all} candidates")
    mask = torch.isfinite(x).all(1)
    if keep is not None:
        mask &= keep.bool()
    idx_all = torch.nonzero(mask).squeeze(1).numpy()
    if len(idx_all) == 0:
        raise DataError(f"no usable candidates: all {n_all} are non-finite or from failed runs")
    xn = l2_normalize(x[idx_all])
    y_np, lam_np = y[idx_all].numpy(), torch.nan_to_num(lam[idx_all].double()).numpy()
    run_np, loss_np = run[idx_all].numpy(), torch.nan_to_num(run_loss[idx_all].double(), nan=np.inf).numpy()
    gpu = gpu_available(scfg.use_gpu)
    groups = [np.flatnonzero(y_np == c) for c in np.unique(y_np)] if scfg.per_class else [np.arange(len(idx_all))]
    all_stats = []
    for g in tqdm(groups, desc="select: clustering", disable=not progress or len(groups) < 2):
        xg = xn[g]
        if scfg.method == "kmeans":
            k = auto_num_clusters(len(g)) if scfg.num_clusters == "auto" else int(scfg.num_clusters)
            labels = kmeans_labels(xg, k, niter=scfg.kmeans.niter, seed=seed, gpu=gpu,
                                   max_points_per_centroid=scfg.kmeans.max_points_per_centroid)
        else:
            knn = scfg.knn
            labels = knn_labels(xg, k=knn.k, min_cosine=knn.min_cosine, exact_max=knn.exact_max, gpu=gpu,
                                nprobe=knn.nprobe, nlist=knn.nlist, reduce_dim=knn.reduce_dim, k_factor=knn.k_factor,
                                seed=seed, progress=progress)
        stats = cluster_stats(xg, labels, y_np[g], lam_np[g], run_np[g], loss_np[g])
        # cluster_stats indexes within the group (xg); map back to the original candidate array.
        for c in stats:
            c["members"] = idx_all[g[c["members"]]]
            c["medoid"] = int(idx_all[g[c["medoid"]]])
        all_stats.append(stats)
    # Score over all clusters together, so the size/runs normalisation is shared across classes.
    flat = [c for stats in all_stats for c in stats]
    score_clusters(flat, asdict(scfg.weights))
    ranked_lists = [
        sorted([c for c in stats if c["size"] >= scfg.min_cluster_size], key=lambda c: -c["score"]) for stats in all_stats
    ]
    ranked = _interleave(ranked_lists) if scfg.per_class else ranked_lists[0]
    reps = ranked[: scfg.num_representatives]
    if not reps:
        raise DataError(f"no cluster has at least select.min_cluster_size={scfg.min_cluster_size} members")
    medoids = torch.tensor([c["medoid"] for c in reps], dtype=torch.int64)
    selection = {
        "x": x[medoids].float(),
        "candidate_index": medoids,
        "score": torch.tensor([c["score"] for c in reps], dtype=torch.float32),
        "cluster_size": torch.tensor([c["size"] for c in reps], dtype=torch.int64),
        "y": torch.tensor([c["y"] for c in reps], dtype=torch.int64),
    }
    # Clusters below min_cluster_size are still listed (after the ranked ones) for inspection.
    rest = sorted([c for c in flat if c["size"] < scfg.min_cluster_size], key=lambda c: -c["score"])
    return selection, ranked + rest


# ----------------------------------------------------------------------------- stage I/O


def read_candidates(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Candidates written by the reconstruct stage (its ``load_candidates`` when available)."""
    try:
        from .reconstruct import load_candidates
    except ImportError:  # reconstruct.py not installed: read the documented file format directly
        load_candidates = None
    if load_candidates is not None:
        out = load_candidates(run_dir)
        if isinstance(out, tuple):
            return out[0], out[1]
        if isinstance(out, dict):
            return out, out.get("meta", {}) if isinstance(out.get("meta"), dict) else {}
        # An object with attributes (x, y, lam, run, run_loss, meta).
        return {k: getattr(out, k) for k in ("x", "y", "lam", "run", "run_loss")}, getattr(out, "meta", {}) or {}
    return load_tensors(Path(run_dir) / "reconstruct" / "candidates.safetensors", what="reconstruction candidates")


def failed_runs(meta: dict) -> set[int]:
    return {int(r["run"]) for r in meta.get("runs", []) if r.get("status", "ok") != "ok"}


def run_stage(cfg: DictConfig, run_dir: Path) -> dict:
    from .training import progress_enabled

    run_dir = Path(run_dir)
    scfg: SelectConfig = OmegaConf.to_object(cfg.select)
    tensors, meta = read_candidates(run_dir)
    missing = [k for k in ("x", "y", "lam", "run", "run_loss") if k not in tensors]
    if missing:
        raise DataError(f"reconstruction candidates lack field(s) {missing} (see docs/architecture.md)")
    x, run = tensors["x"].float(), tensors["run"].long()
    keep = torch.isfinite(x).all(1)
    failed = failed_runs(meta) if scfg.exclude_failed_runs else set()
    if failed:
        keep &= ~torch.isin(run, torch.tensor(sorted(failed), dtype=torch.int64))
    log.info("select: %d candidates, %d from failed runs excluded", x.shape[0], int((~keep).sum()))
    selection, clusters = select_candidates(x, tensors["y"].long(), tensors["lam"].float(), run,
                                            tensors["run_loss"].float(), scfg, keep=keep, seed=int(cfg.seed),
                                            progress=progress_enabled(cfg))
    score_used, reason = _score_to_use(cfg, scfg, run_dir)
    if score_used == "learned":
        baseline = selection
        scorer = load_scorer(run_dir)
        selection = learned_selection(tensors, keep, clusters, scfg, _victim_for(cfg, run_dir), scorer,
                                      public_pool(cfg, run_dir, scorer["public_pool_size"]))
        selection.update(baseline_x=baseline["x"], baseline_candidate_index=baseline["candidate_index"])
    out_dir = run_dir / "select"
    n_used = int(sum(c["size"] for c in clusters))
    save_tensors(out_dir / "selection.safetensors", selection,
                 {"method": scfg.method, "num_candidates": x.shape[0], "num_used": n_used, "score": score_used,
                  "score_reason": reason, "num_clusters": len(clusters), "weights": asdict(scfg.weights),
                  "per_class": scfg.per_class})
    save_json(out_dir / "clusters.json", clusters_json(clusters, scfg, x.shape[0], n_used, failed))
    top = selection["score"][:1].tolist()
    return {"num_candidates": int(x.shape[0]), "num_used": n_used, "num_clusters": len(clusters),
            "num_representatives": int(selection["x"].shape[0]), "top_score": top[0] if top else None}


def _score_to_use(cfg: DictConfig, scfg: SelectConfig, run_dir: Path) -> tuple[str, str]:
    """``learned`` or ``cluster``, and why: ``select.score=auto`` learns when the shadow stage could."""
    if scfg.score == "cluster":
        return "cluster", "select.score=cluster"
    scorer = load_scorer(run_dir)
    if scorer is None or not scorer.get("available"):
        why = (scorer or {}).get("reason", "no shadow/scorer.json")
        if scfg.score == "learned":
            raise DataError(f"select.score=learned, but the shadow stage learned no score: {why}")
        log.warning("select: ranking by the cluster score (select.score=auto): %s", why)
        return "cluster", f"select.score=auto and no learned score: {why}"
    return "learned", f"select.score={scfg.score}: the score learned on {scorer['num_victims']} shadow victims"


def _victim_for(cfg: DictConfig, run_dir: Path):
    from .reconstruct import victim_dir_of
    from .victim import load_victim

    return load_victim(victim_dir_of(cfg, run_dir))[0]


def learned_selection(tensors: dict, keep: torch.Tensor, clusters: list[dict], scfg: SelectConfig, model,
                      scorer: dict, public: torch.Tensor) -> dict[str, torch.Tensor]:
    """Representatives ranked by the score learned on shadow victims (:mod:`recon_lightning.shadow`), best first,
    none within ``select.diversity_cosine`` (victim's frame) of a better one; the same tensors as the cluster
    ranking (``cluster_size``: the size of the candidate's cluster)."""
    from .candidate_features import FEATURES, candidate_features, percentile_ranks
    from .shadow import diverse_top, score

    if list(scorer["features"]) != list(FEATURES):
        raise DataError(f"shadow/scorer.json was learned on features {scorer['features']}, this version computes "
                        f"{list(FEATURES)}: rerun the shadow stage")
    idx = torch.nonzero(keep).squeeze(1)
    x = tensors["x"].float()[idx]
    feats = candidate_features(model, x, tensors["y"][idx], tensors["lam"][idx], tensors["run"][idx], tensors["run_loss"][idx],
                               public)
    p = score(scorer, percentile_ranks(feats))
    top = diverse_top(x - model.input_offset().detach().float(), p, scfg.num_representatives, scfg.diversity_cosine)
    chosen = idx[top]
    size_of = np.zeros(len(tensors["x"]), dtype=np.int64)
    for c in clusters:
        size_of[np.asarray(c["members"], dtype=np.int64)] = c["size"]
    every = torch.full((len(tensors["x"]),), float("nan"))
    every[idx] = torch.tensor(p, dtype=torch.float32)
    return {"x": tensors["x"][chosen].float(), "candidate_index": chosen,
            "score": torch.tensor(p[top], dtype=torch.float32),
            "cluster_size": torch.from_numpy(size_of[chosen.numpy()]), "y": tensors["y"][chosen].long(),
            "candidate_score": every}  # every candidate's learned score (NaN: excluded), for the report


def clusters_json(clusters: list[dict], scfg: SelectConfig, n_candidates: int, n_used: int, failed: set[int],
                  max_members: int = 1000) -> dict:
    """``select/clusters.json``: settings plus one entry per cluster, best first.

    Entry keys: ``rank``, ``score``, ``terms`` (the score's [0,1] terms), ``size``, ``medoid``
    (candidate index of the representative), ``y`` (majority class), ``y_purity``,
    ``mean_pairwise_cosine``, ``mean_cosine_to_centroid``, ``num_runs``, ``mean_lam``,
    ``mean_run_loss``, ``members`` (candidate indices; first ``max_members`` only) and
    ``selected`` (whether its medoid is in selection.safetensors).
    """
    entries = []
    for rank, c in enumerate(clusters):
        e = {k: v for k, v in c.items() if k not in ("members", "lam_term", "loss_term")}
        e = {"rank": rank, **e, "selected": rank < scfg.num_representatives and c["size"] >= scfg.min_cluster_size}
        e["members"] = [int(m) for m in c["members"][:max_members]]
        entries.append(e)
    return {"method": scfg.method, "num_candidates": n_candidates, "num_used": n_used,
            "excluded_failed_runs": sorted(failed), "weights": asdict(scfg.weights), "per_class": scfg.per_class,
            "num_clusters": len(clusters), "clusters": entries}


def load_selection(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of ``select/selection.safetensors``: representatives best first."""
    tensors, meta = load_tensors(Path(run_dir) / "select" / "selection.safetensors", what="selection (run the select stage first)")
    missing = [k for k in ("x", "candidate_index", "score", "cluster_size", "y") if k not in tensors]
    if missing:
        raise DataError(f"selection file lacks field(s) {missing}: {Path(run_dir) / 'select' / 'selection.safetensors'}")
    return tensors, meta


STAGE = Stage(
    name="select",
    run=run_stage,
    sections=[Section("select", SelectConfig)],
    config_keys=["select"],
    # the learned score reads the victim's weights and the shadow stage's scorer
    inputs=["reconstruct/candidates.safetensors", "shadow/scorer.json", "classifier/model.safetensors",
            "{reconstruct.victim_dir}/model.safetensors"],
    outputs=["select/selection.safetensors", "select/clusters.json"],
)
