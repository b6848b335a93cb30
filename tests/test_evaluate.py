"""Evaluation figures on hand-made cases, and the evaluate stage on a small synthetic run."""

import math

import pytest
import torch

from recon_lightning.config import shipped
from recon_lightning import evaluate as ev
from recon_lightning.errors import ConfigError, DataError
from recon_lightning.storage import load_json, save_json, save_tensors
from recon_lightning.victim import VictimMLP, save_victim

import ssim_direct


def make_run_dir(root, n_train=12, n_noise=60, copies=(0, 1, 2, 3), with_embed=True, seed=0):
    """A run directory in the documented formats: 8x8 pixel "embeddings" (identity backbone),
    a random victim, candidates = noisy copies (from 3 runs each) of some training images + noise,
    and a selection made by the real select stage."""
    from recon_lightning.select import select_candidates

    g = torch.Generator().manual_seed(seed)
    imgs = (torch.rand(n_train, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    imgs[:, :, 0, 0], imgs[:, :, 0, 1] = 0, 255  # full range, so min-max scaling is the identity
    train_x = imgs.flatten(1).float() / 255
    train_y = torch.arange(n_train) % 2
    xs, ys, runs = [], [], []
    for i in copies:
        for r in range(3):
            xs.append(train_x[i] * (1 + 0.5 * r))  # scaled exact copies: cosine 1
            ys.append(int(train_y[i]))
            runs.append(r)
    xs = torch.stack(xs)
    noise = torch.randn(n_noise, 64, generator=g)
    x = torch.cat([xs, noise])
    y = torch.cat([torch.tensor(ys), torch.randint(0, 2, (n_noise,), generator=g)])
    run = torch.cat([torch.tensor(runs), torch.randint(0, 3, (n_noise,), generator=g)])
    lam, loss = torch.rand(len(x), generator=g), run.float() * 0.1
    if with_embed:
        meta = {"modality": "image", "embed_dim": 64, "normalize": "none", "backbone": {"name": "identity", "kind": "identity"},
                "class_names": ["even", "odd"], "mean_norm": float(train_x.norm(dim=1).mean()), "input_size": [1, 8, 8]}
        save_tensors(root / "embed" / "embeddings.safetensors",
                     {"train_x": train_x, "train_y": train_y, "test_x": train_x[:2].clone(), "test_y": train_y[:2].clone()}, meta)
        save_tensors(root / "embed" / "images.safetensors", {"train": imgs, "test": imgs[:2].clone()})
        save_json(root / "embed" / "samples.json", {"train_ids": [f"t{i}" for i in range(n_train)], "test_ids": ["a", "b"]})
    torch.manual_seed(seed)
    save_victim(root / "classifier", VictimMLP(64, [16], 2))
    save_tensors(root / "reconstruct" / "candidates.safetensors",
                 {"x": x, "y": y, "lam": lam, "run": run, "run_loss": loss, "norm": x.norm(dim=1)},
                 {"runs": [{"run": r, "status": "ok", "final_loss": 0.1 * r} for r in range(3)]})
    sel, _ = select_candidates(x, y, lam, run, loss, ev_select_cfg(), progress=False)
    save_tensors(root / "select" / "selection.safetensors", sel, {"method": "knn", "num_candidates": len(x)})
    return {"train_x": train_x, "train_y": train_y, "imgs": imgs, "x": x, "copies": list(copies), "selection": sel}


def ev_select_cfg():
    from recon_lightning.select import SelectConfig

    return shipped(SelectConfig, "select/default", method="knn", num_representatives=8, knn={"min_cosine": 0.99})


def test_best_matches_known():
    from recon_lightning.matching import best_matches

    train = torch.eye(3)
    cands = torch.tensor([[2.0, 0, 0], [0, 0.6, 0.8], [0, -1, 0], [0, 0, 0.5]])
    m = best_matches("cosine", train, cands, chunk=2)
    assert m["best_score"].tolist() == pytest.approx([1.0, 0.6, 1.0])
    assert m["best_index"].tolist() == [0, 1, 3]
    # each candidate's nearest training sample: e0; e2 (0.8 > 0.6); e0 (cosine 0, the first of three ties); e2
    assert m["b_best_index"].tolist()[:2] == [0, 2] and m["b_best_index"][3] == 2
    assert m["b_best_score"].tolist() == pytest.approx([1.0, 0.8, 0.0, 1.0])
    with pytest.raises(DataError, match=r"shape \(3,\) with \(2,\)"):
        best_matches("cosine", train, torch.ones(2, 2))


def test_fraction_curve_and_precision():
    best = torch.tensor([0.2, 0.5, 0.95, 1.0])
    assert ev.fraction_curve(best, [0.0, 0.5, 0.9, 1.0]) == [1.0, 0.75, 0.5, 0.25]
    good = torch.tensor([True, False, True, True, False])
    assert ev.precision_at_k(good, [1, 2, 5]) == pytest.approx([1.0, 0.5, 0.6])
    assert ev.capped_ks([10, 50, 100], 30) == [10, 30]
    # Choosing by key with ties broken at random: groups {0: [1, 0]}, {1: [1, 1]}, {2: [0]}.
    key = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0])
    assert ev.expected_precision_by_key(good, key, [1, 2, 3, 5]) == pytest.approx([0.5, 0.5, 2 / 3, 0.6])


def test_spearman_monotone_margin():
    margin = torch.linspace(-2, 5, 30)
    assert ev.spearman(margin, torch.sigmoid(3 * margin))[0] == pytest.approx(1.0)
    assert ev.spearman(margin, torch.exp(-margin))[0] == pytest.approx(-1.0)
    assert ev.spearman(margin, torch.ones(30)) == (None, None)


def test_ssim_pairs_is_the_direct_formula_over_every_pixel_of_a_digit():
    """8x8 digits: window 7, sigma 1.5 * 7 / 11, the mean over all 64 pixels of the map, whatever torchmetrics is
    installed (its releases before the border-handling change average the central 2x2 only)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 8, 8, generator=g)
    b = (a + 0.3 * torch.randn(3, 1, 8, 8, generator=g)).clamp(0, 1)
    ours = ev.ssim_pairs(a, b)
    for i in range(3):
        full = ssim_direct.ssim_map(a[i].double().numpy(), b[i].double().numpy(), w=7, sigma=1.5 * 7 / 11)
        assert float(ours[i]) == pytest.approx(full.mean(), abs=1e-6)
        # The border matters here: the cropped mean is another number.
        assert abs(full.mean() - full[:, 3:5, 3:5].mean()) > 0.01
    assert ev.ssim_pairs(a, a.clone()).tolist() == pytest.approx([1.0] * 3, abs=1e-9)
    # Constant images 0.2 and 0.6: zero variances, SSIM = (2 * 0.2 * 0.6 + C1) / (0.2^2 + 0.6^2 + C1), C1 = 1e-4.
    const = ev.ssim_pairs(torch.full((1, 1, 8, 8), 0.2), torch.full((1, 1, 8, 8), 0.6))
    assert float(const) == pytest.approx(0.2401 / 0.4001, rel=1e-6)
    with pytest.raises(DataError, match="too small for SSIM"):
        ev.ssim_pairs(torch.rand(1, 1, 2, 8), torch.rand(1, 1, 2, 8))


def test_ssim_pairs_on_larger_images_is_the_standard_11x11_window():
    """From 11x11 pixels up: the standard window (11, sigma 1.5), the same numbers as kornia's SSIM with window
    11 and as the direct formula, on RGB images."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 12, 13, generator=g, dtype=torch.float64)
    b = (0.7 * a + 0.3 * torch.rand(2, 3, 12, 13, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ev.ssim_pairs(a, b)
    direct = [ssim_direct.ssim(a[i].numpy(), b[i].numpy(), w=11, sigma=1.5) for i in range(2)]
    assert ours.tolist() == pytest.approx(direct, abs=1e-9)
    kornia = pytest.importorskip("kornia", reason="kornia not installed (pip install 'recon_lightning[test]')")
    torch.testing.assert_close(ours, kornia.metrics.ssim(a, b, window_size=11).flatten(1).mean(1), rtol=0, atol=1e-12)


def test_pixels_detection_and_scaling():
    imgs = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    x = imgs.flatten(1).float() / 255
    assert ev.embeddings_are_pixels(x, imgs)
    assert not ev.embeddings_are_pixels(torch.rand(1, 4), imgs)
    assert not ev.embeddings_are_pixels(x, None)
    img = ev.as_images(3 * x - 1, (1, 2, 2), "minmax")
    assert torch.allclose(img.flatten(), x.flatten(), atol=1e-6)
    assert ev.as_images(3 * x - 1, (1, 2, 2), "clip").min() == 0


def test_lpips_is_available_exactly_when_alexnets_weights_are_in_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    weights = tmp_path / "hub" / "checkpoints" / torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    available, note = ev.lpips_status()
    assert not available and str(weights) in note and "not available offline" in note
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    available, note = ev.lpips_status()
    assert available and note == f"LPIPS (AlexNet) with cached weights {weights}"


@pytest.mark.slow
def test_evaluate_on_synthetic_run(tmp_path):
    d = make_run_dir(tmp_path)
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default", precision_ks=[1, 4, 100]), progress=False)
    assert report["mode"] == "evaluation" and report["modality"] == "image"
    rec = report["reconstruction"]
    best = torch.tensor([s["best_cosine"] for s in rec["per_sample"]], dtype=torch.float64)  # as computed (float64)
    # Copied training samples are matched exactly (cosine 1) by one of their copies (candidates 3i..3i+2).
    for j, i in enumerate(d["copies"]):
        assert best[i] == pytest.approx(1.0, abs=1e-5)
        assert rec["per_sample"][i]["best_candidate"] in {3 * j, 3 * j + 1, 3 * j + 2}
    # Independent recomputation of the fraction above 0.9.
    assert rec["fraction_above"]["0.9"] == pytest.approx(float((best >= 0.9).float().mean()))
    assert rec["fraction_above"]["0.9"] >= len(d["copies"]) / 12
    q = report["selection_quality"]
    assert q["k"] == [1, 4, 8]  # capped at the 8 representatives
    # The copies form tight 3-run clusters: the selection's top 4 are all good, above the base rate.
    assert q["precision_selected"][:2] == [1.0, 1.0]
    assert q["distinct_train_at_k"][1] == 4
    assert q["base_rate"] == pytest.approx(12 / 72)
    assert q["precision_selected"][0] > q["precision_random"][0]
    # Margin: y * phi(x) per training sample, and rho is scipy's Spearman over them.
    from scipy.stats import spearmanr

    from recon_lightning.victim import load_victim

    model, _ = load_victim(tmp_path / "classifier", 64)
    m = ((2 * d["train_y"] - 1) * model(d["train_x"])).detach()  # one logit: y * phi(x), y in {-1, +1}
    assert [s["margin"] for s in rec["per_sample"]] == pytest.approx(m.tolist(), abs=1e-5)
    assert report["margin"]["spearman_rho"] == pytest.approx(spearmanr(m.numpy(), best.numpy()).statistic)
    # KKT diagnostic: a random victim is not explained by its "training set" (a residual near 1), and the report says
    # that nothing can then be reconstructed; two held-out samples are fewer than the twelve training samples, so
    # there is no equal-count comparison (test_kkt_diagnostic_... below plants victims where the answer is known).
    kkt = report["victim_kkt"]
    assert kkt["residual_at_train"] > 0.5 and kkt["residual_at_heldout"] is None and kkt["num_points"] == 12
    assert report["summary"]["kkt_residual_at_train"] == kkt["residual_at_train"]
    assert any("far from a stationary point of its training loss" in n for n in report["notes"])
    # Images: exact copies reconstruct to SSIM 1.
    imgs = report["images"]
    assert imgs["source"] == "reshape"
    for i in d["copies"]:
        assert imgs["ssim_best_matches"][i] == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / report["grids"]["best_matches"]).is_file()
    assert (tmp_path / report["grids"]["selection"]).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("planted_on", ["train", "heldout"])
def test_kkt_diagnostic_compares_the_training_set_with_as_many_heldout_samples(tmp_path, planted_on):
    """A linear victim w = sum_i y_i x_i (y = -1/+1) is an exact KKT point of the points x_i (all multipliers 1).
    With a held-out pool of 12 samples (as many as the training set, 6 per class): planted on the training set, the
    residual is ~0 there and large at the held-out samples, no note; planted on the held-out samples, the reverse,
    and the note says the victim is far from a KKT point of its training set."""
    from recon_lightning.storage import load_tensors

    d = make_run_dir(tmp_path)
    path = tmp_path / "embed" / "embeddings.safetensors"
    tensors, meta = load_tensors(path)
    held, held_y = torch.rand(12, 64, generator=torch.Generator().manual_seed(7)), torch.arange(12) % 2
    tensors["test_x"], tensors["test_y"] = held, held_y
    save_tensors(path, tensors, meta)
    pts, labels = (d["train_x"], d["train_y"]) if planted_on == "train" else (held, held_y)
    victim = VictimMLP(64, [], 2, bias=False)
    with torch.no_grad():
        victim.layers[0].weight.copy_(((2 * labels - 1).float()[:, None] * pts).sum(0, keepdim=True))
    save_victim(tmp_path / "classifier", victim)
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False)
    kkt = report["victim_kkt"]
    assert kkt["form"] == "binary" and kkt["num_points"] == 12
    planted, other = ("residual_at_train", "residual_at_heldout")[:: 1 if planted_on == "train" else -1]
    assert kkt[planted] < 1e-6 and kkt[other] > 0.05, kkt
    noted = any("far from a stationary point of its training loss" in n for n in report["notes"])
    assert noted == (kkt["residual_at_train"] > 0.5) and noted == (planted_on == "heldout")


@pytest.mark.slow
def test_the_report_matches_each_pair_of_sets_once(tmp_path, monkeypatch):
    # The candidates are scanned once per report (best candidate per training sample, nearest training sample per
    # candidate and the one-to-one assignment of the leak rate all come from that pass), the held-out pool once.
    from recon_lightning import matching

    d = make_run_dir(tmp_path)
    calls = []

    def counted(kind, a, b, *args, **kwargs):
        calls.append((kind, len(a), len(b)))
        return matching.best_matches(kind, a, b, *args, **kwargs)

    monkeypatch.setattr(ev, "best_matches", counted)
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False)
    n_cands, n_sel = len(d["x"]), len(d["selection"]["x"])
    assert sorted(c for c in calls if c[0] == "cosine") == sorted([("cosine", 12, n_cands), ("cosine", 12, 2),
                                                                  ("cosine", n_sel, 12)])
    # What the one pass gives, checked against a plain cosine matrix: every sample's best, and the leak per sample.
    unit = torch.nn.functional.normalize(d["train_x"].double(), dim=1)
    best = (unit @ torch.nn.functional.normalize(d["x"].double(), dim=1).T).max(1).values
    heldout = (unit @ unit[:2].T).max(1).values  # the held-out pool is a copy of the first two training samples
    rows = report["reconstruction"]["per_sample"]
    assert [r["best_cosine"] for r in rows] == pytest.approx(best.tolist(), abs=1e-9)
    assert [r["heldout_best_cosine"] for r in rows] == pytest.approx(heldout.tolist(), abs=1e-9)
    assert [r["leaked"] for r in rows] == (best > heldout + ev.LEAK_TOLERANCE).tolist()


@pytest.mark.slow
def test_text_report_names_each_representatives_nearest_training_sentences(tmp_path):
    """A text run (make_run_dir's vectors as sentence embeddings): each shown representative lists its text_k
    nearest training sentences by a plain cosine ranking; the selection's tight clusters are copies of training
    samples 0..3, which name those samples' own sentences at cosine 1. No image figures."""
    d = make_run_dir(tmp_path, with_embed=False)
    texts = [f"sentence number {i}" for i in range(12)]
    meta = {"modality": "text", "embed_dim": 64, "normalize": "none", "class_names": ["even", "odd"],
            "backbone": {"name": "all-MiniLM-L6-v2", "kind": "sentence_transformers"}}
    save_tensors(tmp_path / "embed" / "embeddings.safetensors",
                 {"train_x": d["train_x"], "train_y": d["train_y"], "test_x": d["train_x"][:2].clone(),
                  "test_y": d["train_y"][:2].clone()}, meta)
    save_json(tmp_path / "embed" / "samples.json", {"train_ids": [f"t{i}" for i in range(12)], "test_ids": ["a", "b"],
                                                    "train_texts": texts, "test_texts": texts[:2]})
    ecfg = shipped(ev.EvalConfig, "evaluate/default")
    report = ev.build_report(tmp_path, ecfg, progress=False)
    assert report["mode"] == "evaluation" and report["modality"] == "text"
    assert "images" not in report and set(report["grids"]) == set()
    shown = report["text"]["nearest_train_texts"]
    assert len(shown) == min(ecfg.text_top, 8)
    unit = torch.nn.functional.normalize
    cos = unit(d["selection"]["x"].double(), dim=1) @ unit(d["train_x"].double(), dim=1).T
    for entry in shown:
        order = cos[entry["rank"]].argsort(descending=True)[: ecfg.text_k].tolist()
        assert [m["train_index"] for m in entry["matches"]] == order
        assert [m["text"] for m in entry["matches"]] == [texts[j] for j in order]
        assert [m["cosine"] for m in entry["matches"]] == pytest.approx(cos[entry["rank"], order].tolist(), abs=1e-6)
    copied = {e["matches"][0]["train_index"] for e in shown if e["matches"][0]["cosine"] > 1 - 1e-6}
    assert copied == set(d["copies"])
    # The leak rate is computed for text too: copies 2 and 3 beat the held-out pool (copies of 0 and 1).
    assert [p["leaked"] for p in report["reconstruction"]["per_sample"][:4]] == [False, False, True, True]


@pytest.mark.slow
def test_attacker_mode_without_training_set(tmp_path):
    make_run_dir(tmp_path, with_embed=False)
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False)
    assert report["mode"] == "attacker"
    assert "reconstruction" not in report and "selection_quality" not in report
    assert len(report["selection"]["representatives"]) == 8
    assert any("attacker mode" in n for n in report["notes"])


def test_config_errors():
    with pytest.raises(ConfigError, match=r"config key 'evaluate.good_threshold' must be <= 1, got 2.0"):
        shipped(ev.EvalConfig, "evaluate/default", good_threshold=2)
    with pytest.raises(ConfigError, match=r"config key 'evaluate.image_scaling' must be one of \['minmax', 'clip'\]"):
        shipped(ev.EvalConfig, "evaluate/default", image_scaling="sigmoid")
