"""Selection without training data: a planted tight multi-run cluster must outrank noise."""

import pytest
import torch

from recon_lightning.errors import ConfigError, DataError
from recon_lightning.select import (
    SelectConfig,
    auto_num_clusters,
    cluster_stats,
    gpu_available,
    kmeans_labels,
    knn_labels,
    l2_normalize,
    load_selection,
    run_stage,
    select_candidates,
)
from recon_lightning.storage import load_json, save_tensors


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
    sel, clusters = select_candidates(x, y, lam, run, loss, SelectConfig(method=method, num_representatives=10, use_gpu=False),
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
    sel, _ = select_candidates(x, y, lam, run, loss, SelectConfig(method="kmeans", num_representatives=6), progress=False)
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
    labels = knn_labels(xn, k=5, min_cosine=0.9, exact_max=10)  # forces the IVF index
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
        select_candidates(x, y, lam, run, loss, SelectConfig(method="dbscan"))
    with pytest.raises(ConfigError, match="weights"):
        select_candidates(x, y, lam, run, loss, SelectConfig(weights={"size": 1.0, "bogus": 1.0}))
    with pytest.raises(DataError, match="no usable candidates"):
        select_candidates(x, y, lam, run, loss, SelectConfig(), keep=torch.zeros(len(x), dtype=torch.bool))
    with pytest.raises(DataError, match="run_loss"):
        select_candidates(x, y, lam, run, loss[:3], SelectConfig())
    with pytest.raises(DataError, match="selection"):
        load_selection("/nonexistent/run")
