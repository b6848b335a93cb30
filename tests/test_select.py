"""Selection without training data: a planted tight multi-run cluster must outrank noise."""

import numpy as np
import pytest
import torch

from recon_lightning.config import shipped
from recon_lightning.errors import ConfigError, DataError
from recon_lightning.select import (
    SelectConfig,
    auto_num_clusters,
    cluster_stats,
    gpu_available,
    kmeans_labels,
    knn_index,
    knn_labels,
    knn_search,
    l2_normalize,
    load_selection,
    run_stage,
    select_candidates,
)
from recon_lightning.storage import load_json, save_tensors


def sel_cfg(**changes) -> SelectConfig:
    """The shipped select config with ``changes`` (nested sections as dicts)."""
    return shipped(SelectConfig, "select/default", **changes)


def planted(n_noise=300, n_planted=24, d=48, n_runs=12, seed=0):
    """Scattered noise plus one tight cluster of near-identical candidates from 6 different runs."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(d, generator=g)
    x = torch.cat([torch.randn(n_noise, d, generator=g), centre + 0.03 * torch.randn(n_planted, d, generator=g)])
    n = len(x)
    y = torch.randint(0, 2, (n,), generator=g)
    y[n_noise:] = 1
    run = torch.randint(0, n_runs, (n,), generator=g)
    run[n_noise:] = torch.arange(n_planted) % 6
    lam = torch.rand(n, generator=g)
    loss = torch.rand(n, generator=g)
    return x, y, lam, run, loss, torch.arange(n_noise, n)


@pytest.mark.parametrize("method", ["kmeans", "knn"])
def test_planted_cluster_ranked_first(method):
    x, y, lam, run, loss, planted_idx = planted()
    sel, clusters = select_candidates(x, y, lam, run, loss, sel_cfg(method=method, num_representatives=10, use_gpu=False),
                                      progress=False)
    assert int(sel["candidate_index"][0]) in set(planted_idx.tolist())
    top = clusters[0]
    # The whole planted cluster lands in the top cluster (k-means may also absorb a few noise points).
    assert set(planted_idx.tolist()) <= set(top["members"].tolist())
    assert top["num_runs"] >= 6
    assert top["mean_pairwise_cosine"] > max([c["mean_pairwise_cosine"] for c in clusters[1:] if c["size"] > 1], default=0.0)
    if method == "knn":  # density clustering keeps the noise out entirely
        assert set(top["members"].tolist()) == set(planted_idx.tolist()) and top["mean_pairwise_cosine"] > 0.99
    assert clusters[0]["score"] > max(c["score"] for c in clusters[1:])
    assert int(sel["candidate_index"][0]) in top["members"].tolist()
    assert int(sel["cluster_size"][0]) == top["size"]
    assert torch.equal(sel["x"][0], x[sel["candidate_index"][0]])


def test_per_class_alternates_classes():
    x, y, lam, run, loss, _ = planted()
    sel, _ = select_candidates(x, y, lam, run, loss, sel_cfg(method="kmeans", num_representatives=6), progress=False)
    ys = sel["y"].tolist()
    assert sorted(ys[:2]) == [0, 1] and sorted(ys[2:4]) == [0, 1]
    # Each representative's class is the class its candidate was optimised for (clusters are per class).
    assert torch.equal(sel["y"], y[sel["candidate_index"]])


def test_medoid_maximises_summed_cosine():
    g = torch.Generator().manual_seed(1)
    xn = l2_normalize(torch.randn(15, 5, generator=g))
    labels = torch.zeros(15, dtype=torch.int64).numpy()
    z = torch.zeros(15)
    (c,) = cluster_stats(xn, labels, z.long().numpy(), z.numpy(), z.long().numpy(), z.numpy())
    sims = torch.from_numpy(xn @ xn.T)
    assert c["medoid"] == int(sims.sum(1).argmax())
    expected_pairwise = (sims.sum() - sims.diag().sum()) / (15 * 14)
    assert c["mean_pairwise_cosine"] == pytest.approx(float(expected_pairwise), abs=1e-5)


def test_faiss_cpu_paths():
    assert gpu_available(False) is False
    x, *_ = planted(n_noise=60, n_planted=10)
    xn = l2_normalize(x)
    labels = kmeans_labels(xn, 5, gpu=False)
    assert labels.shape == (70,) and labels.max() < 5
    labels = knn_labels(xn, k=5, min_cosine=0.9, exact_max=10)  # forces the IVF index (48-d < reduce_dim: no PCA)
    assert len(set(labels[60:].tolist())) == 1 and len(set(labels[:60].tolist())) > 50
    assert auto_num_clusters(10_000) == 100 and auto_num_clusters(1) == 1


def test_failed_runs_excluded_and_stage_files(tmp_path, make_cfg):
    x, y, lam, run, loss, planted_idx = planted()
    meta = {"runs": [{"run": r, "status": "failed" if r == 0 else "ok"} for r in range(12)]}
    save_tensors(tmp_path / "reconstruct" / "candidates.safetensors",
                 {"x": x, "y": y, "lam": lam, "run": run, "run_loss": loss, "norm": x.norm(dim=1)}, meta)
    cfg = make_cfg("select.method=knn", "select.num_representatives=5", run_dir=tmp_path)
    summary = run_stage(cfg, tmp_path)
    sel, smeta = load_selection(tmp_path)
    assert summary["num_used"] == int((run != 0).sum())
    assert not torch.isin(sel["candidate_index"], torch.nonzero(run == 0).squeeze(1)).any()
    assert int(sel["candidate_index"][0]) in set(planted_idx.tolist())
    clusters = load_json(tmp_path / "select" / "clusters.json")
    assert clusters["excluded_failed_runs"] == [0]
    assert clusters["clusters"][0]["selected"] and clusters["clusters"][0]["medoid"] == int(sel["candidate_index"][0])
    assert sum(c["size"] for c in clusters["clusters"]) == summary["num_used"]


def test_bad_input_errors():
    x, y, lam, run, loss, _ = planted(n_noise=10, n_planted=4)
    with pytest.raises(ConfigError, match="select.method"):
        sel_cfg(method="dbscan")
    with pytest.raises(ConfigError, match="unknown config key 'select.weights.bogus'"):
        sel_cfg(weights={"size": 1.0, "bogus": 1.0})
    with pytest.raises(DataError, match="no usable candidates"):
        select_candidates(x, y, lam, run, loss, sel_cfg(), keep=torch.zeros(len(x), dtype=torch.bool))
    with pytest.raises(DataError, match="run_loss"):
        select_candidates(x, y, lam, run, loss[:3], sel_cfg())
    with pytest.raises(DataError, match="selection"):
        load_selection("/nonexistent/run")


def clustered(n_groups=40, per_group=12, n_noise=500, d=128, seed=3):
    """Unit rows: ``n_groups`` tight groups (cosine ~0.99 within, ~0 across) plus scattered noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_groups, d, generator=g)
    owner = torch.arange(n_groups).repeat_interleave(per_group)
    x = torch.cat([torch.randn(n_noise, d, generator=g), centres[owner] + 0.1 * torch.randn(len(owner), d, generator=g)])
    perm = torch.randperm(len(x), generator=g)  # groups not stored contiguously
    group = torch.cat([torch.full((n_noise,), -1), owner])[perm]
    return l2_normalize(x[perm]), group.numpy()


def partition(labels):
    """The clusters of a labelling as a set of frozensets (label values themselves do not matter)."""
    return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}


@pytest.mark.parametrize("reduce_dim", [16, 0])
def test_approximate_knn_graph_equals_exact(reduce_dim):
    xn, group = clustered()
    exact = knn_labels(xn, k=10, min_cosine=0.9, exact_max=10**9)
    planted_groups = {frozenset(np.flatnonzero(group == c).tolist()) for c in range(40)}
    assert {c for c in partition(exact) if len(c) > 1} == planted_groups  # the data does have clear clusters
    kw = dict(exact_max=100, reduce_dim=reduce_dim, nprobe=4, k_factor=4)
    index, metric = knn_index(xn, **kw)
    assert index.ntotal == len(xn) and metric == ("l2" if reduce_dim else "ip")
    assert type(index).__name__ == ("IndexRefineFlat" if reduce_dim else "IndexIVFFlat")
    approx = knn_labels(xn, k=10, min_cosine=0.9, **kw)
    assert partition(approx) == partition(exact)
    # The cosines that min_cosine and the mutual test see are the exact full-space ones, even
    # though the candidates came from a 16-d PCA projection.
    sims, idx = knn_search(xn, 10, **kw)
    found = idx >= 0
    assert found[:, :5].all() and not (idx == np.arange(len(xn))[:, None]).any()
    true = np.einsum("id,ikd->ik", xn, xn[np.where(found, idx, 0)])
    np.testing.assert_allclose(sims[found], true[found], atol=1e-5)
    # Nearest first, and for the planted rows the same neighbours as the exact search.
    assert (np.diff(np.where(found, sims, -np.inf), axis=1) <= 1e-6).all()
    ex_sims, ex_idx = knn_search(xn, 10, exact_max=10**9)
    rows = group >= 0
    np.testing.assert_allclose(np.sort(sims[rows], 1), np.sort(ex_sims[rows], 1), atol=1e-5)


def test_knn_search_chunks_match_one_pass():
    xn, _ = clustered(n_groups=10, n_noise=200)
    kw = dict(exact_max=50, reduce_dim=16)
    one_sims, one_idx = knn_search(xn, 5, chunk_size=10**6, **kw)
    sims, idx = knn_search(xn, 5, chunk_size=64, progress=True, **kw)
    assert np.array_equal(idx, one_idx) and np.allclose(sims, one_sims)


def test_select_candidates_approximate_knn_path(monkeypatch):
    """select_candidates passes the knn.* settings on: with exact_max lowered it takes the PCA path."""
    import recon_lightning.select as select_mod

    xn, group = clustered()
    n = len(xn)
    g = torch.Generator().manual_seed(0)
    args = (torch.from_numpy(xn), torch.zeros(n, dtype=torch.int64), torch.rand(n, generator=g),
            torch.randint(0, 20, (n,), generator=g), torch.rand(n, generator=g))
    seen = []
    real = select_mod.knn_index
    monkeypatch.setattr(select_mod, "knn_index", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    scfg = sel_cfg(knn={"exact_max": 100, "reduce_dim": 16, "k_factor": 3, "nlist": 12, "nprobe": 3})
    _, clusters = select_candidates(*args, scfg, progress=False)
    assert [(kw["exact_max"], kw["reduce_dim"], kw["k_factor"], kw["nlist"], kw["nprobe"]) for kw in seen] == \
        [(100, 16, 3.0, 12, 3)]
    _, exact_clusters = select_candidates(*args, sel_cfg(knn={"exact_max": 10**9}), progress=False)
    assert partition_of(clusters) == partition_of(exact_clusters)
    assert sum(c["size"] > 1 for c in clusters) == 40


def partition_of(clusters):
    return {frozenset(c["members"].tolist()) for c in clusters}


def test_knn_config_keys_read_and_defaults(make_cfg):
    scfg = sel_cfg()
    assert (scfg.knn.reduce_dim, scfg.knn.k_factor, scfg.knn.nlist, scfg.knn.nprobe) == (64, 4.0, "auto", 16)
    # Command-line overrides arrive as text: Hydra reads numbers as numbers, the schema converts to its types.
    knn = make_cfg("select.knn.reduce_dim=0", "select.knn.k_factor=2.5", "select.knn.nlist=32").select.knn
    assert (knn.reduce_dim, knn.k_factor, knn.nlist) == (0, 2.5, 32)


@pytest.mark.parametrize("key,value", [
    ("reduce_dim", -1), ("reduce_dim", "pca"), ("reduce_dim", 12.5), ("k_factor", 0.5), ("k_factor", "lots"),
    ("nlist", 0), ("nlist", "many"), ("nprobe", 0), ("exact_max", -5), ("k", 0), ("min_cosine", 1.5),
])
def test_bad_knn_config_values(key, value):
    with pytest.raises(ConfigError, match=rf"config key 'select\.knn\.{key}'"):
        sel_cfg(knn={key: value})
