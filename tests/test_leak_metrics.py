"""The leak rate and the literature's image metrics (NCC matching, reference SSIM, one-to-one variants) on
planted cases whose expected values are worked out by hand in the comments, not by the code under test."""

import math

import numpy as np
import pytest
import torch

from recon_lightning.config import shipped
from recon_lightning import evaluate as ev
from recon_lightning.matching import best_matches, pairwise_scores
from recon_lightning.storage import load_json, save_json

import ssim_direct

E = torch.eye(8)


# ----------------------------------------------------------------------------- leak rate (cosine)


def test_leak_rate_counts_training_copies_not_heldout_copies():
    train = E[:4]  # e0..e3
    heldout = torch.stack([E[4], E[0] + E[1]])
    cands = torch.stack([
        2 * E[0],            # a (scaled) training sample: cosine 1 to e0, beats the held-out 1/sqrt(2)
        E[0] + E[1],         # equal to a held-out sample: ties the baseline for e0/e1, must not count
        E[3] + 0.1 * E[5],   # near e3: cosine 1/sqrt(1.01) = 0.995 > held-out 0
        -E[2],               # opposite of e2: cosine -1
    ])
    out = ev.leak_figures(train, cands, heldout)
    per = out["per_sample"]
    # Baselines: e0 and e1 have e0+e1 at cosine 1/sqrt(2); e2, e3 are orthogonal to every held-out sample.
    assert [p["heldout_best_cosine"] for p in per] == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0])
    assert per[0]["heldout_best_index"] == 1 and per[1]["heldout_best_index"] == 1
    # e1's best candidate is the held-out copy (1/sqrt(2) = its baseline); e2's best is 0 (= baseline).
    assert [p["leaked"] for p in per] == [True, False, False, True]
    assert out["leak_rate"] == 0.5 and out["num_leaked"] == 2 and out["baseline_pool"] == 2
    # One-to-one maximises the total: e0 -> 2e0 (1), e3 -> e3+0.1e5 (0.995), and e1, e2 share e0+e1 and -e2:
    # e1 -> -e2, e2 -> e0+e1 totals 0 + 0, better than e1 -> e0+e1, e2 -> -e2 (1/sqrt(2) - 1).
    assert [p["one_to_one_candidate"] for p in per] == [0, 3, 1, 2]
    assert [p["one_to_one_cosine"] for p in per] == pytest.approx([1.0, 0.0, 0.0, 1 / math.sqrt(1.01)])
    assert [p["leaked_one_to_one"] for p in per] == [True, False, False, True]
    assert out["leak_rate_one_to_one"] == 0.5


@pytest.mark.parametrize("extra", [0, 2])
def test_class_prototype_counts_once_one_to_one(extra):
    # Four training samples e0 + 0.2 e_{i+1}: all at cosine 1/sqrt(1.04) = 0.981 to the class mean direction e0.
    train = torch.stack([E[0] + 0.2 * E[i + 1] for i in range(4)])
    heldout = E[5:6]  # orthogonal to all of them: baseline 0
    # The prototype e0, then candidates useless to every sample (cosine 0 or -1); extra = 2 adds -e1, -e2.
    cands = torch.cat([torch.stack([E[0], E[5], -E[0]]), -E[1 : 1 + extra]])
    out = ev.leak_figures(train, cands, heldout)
    assert out["leak_rate"] == 1.0  # many-to-one: the prototype beats the baseline for all four
    # One-to-one: only one sample may take e0; the others get cosine <= 0 (= or below the baseline) or,
    # with 3 candidates for 4 samples, nothing at all.
    assert out["leak_rate_one_to_one"] == 0.25 and out["num_leaked_one_to_one"] == 1
    assigned = [p["one_to_one_candidate"] for p in out["per_sample"]]
    assert assigned.count(0) == 1
    assert (-1 in assigned) == (extra == 0)


def test_one_to_one_is_optimal_not_greedy():
    a, b = E[0], E[1]
    c1 = 0.9 * E[0] + 0.3 * E[1] + math.sqrt(0.1) * E[2]     # cos(a) 0.9, cos(b) 0.3
    c2 = 0.85 * E[0] + math.sqrt(1 - 0.85 ** 2) * E[3]       # cos(a) 0.85, cos(b) 0
    m = best_matches("cosine", torch.stack([a, b]), torch.stack([c1, c2]), chunk=1, one_to_one=True)
    assert m["best_index"].tolist() == [0, 0]
    # Greedy (a takes its best c1) totals 0.9 + 0; the optimum a -> c2, b -> c1 totals 0.85 + 0.3.
    assert m["one_to_one_index"].tolist() == [1, 0]
    assert m["one_to_one_score"].tolist() == pytest.approx([0.85, 0.3])


def test_pruned_assignment_equals_full_assignment():
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, generator=g), torch.randn(50, 5, generator=g)
    m = best_matches("cosine", a, b, chunk=7, one_to_one=True)
    an = a.numpy() / np.linalg.norm(a.numpy(), axis=1, keepdims=True)
    bn = b.numpy() / np.linalg.norm(b.numpy(), axis=1, keepdims=True)
    full = an @ bn.T
    r, c = linear_sum_assignment(full, maximize=True)
    assert float(m["one_to_one_score"].sum()) == pytest.approx(float(full[r, c].sum()), abs=1e-5)
    assert len(set(m["one_to_one_index"].tolist())) == 6
    assert m["best_index"].tolist() == full.argmax(1).tolist()


def test_no_heldout_pool_gives_null_with_note():
    out = ev.leak_figures(E[:3], E[:3], None)
    assert out["leak_rate"] is None and out["leak_rate_one_to_one"] is None and out["baseline_pool"] == 0
    assert "no held-out samples" in out["note"]


# ----------------------------------------------------------------------------- SSIM and NCC


def test_ssim_reference_values():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 8, 8, generator=g)
    assert ev.ssim_reference(a, a.clone()).tolist() == pytest.approx([1.0] * 3, abs=1e-9)
    # Constant images 0.2 and 0.6: zero variances, so SSIM = (2*0.2*0.6 + C1) / (0.2^2 + 0.6^2 + C1), C1 = 1e-4.
    # (The 1e-12 in kornia's denominator changes this by ~3e-9 relative.)
    const = ev.ssim_reference(torch.full((1, 1, 5, 5), 0.2, dtype=torch.float64), torch.full((1, 1, 5, 5), 0.6, dtype=torch.float64))
    assert float(const) == pytest.approx(0.2401 / 0.4001, rel=1e-7)
    # Against the pixel-by-pixel formula. (torchmetrics cannot serve: with a Gaussian kernel it derives the window
    # from sigma, 2 * int(3.5 * 1.5 + 0.5) + 1 = 11, whatever kernel_size says.)
    x, y = torch.rand(2, 3, 5, 6, generator=g), torch.rand(2, 3, 5, 6, generator=g)
    ours = ev.ssim_reference(x, y)
    for i in range(2):
        assert float(ours[i]) == pytest.approx(ssim_direct.ssim(x[i].double().numpy(), y[i].double().numpy()), abs=1e-9)


def test_ssim_reference_equals_kornia_window_3():
    """The reference work's own call, kornia.metrics.ssim(a, b, window_size=3) averaged over pixels, on the same
    images: 8x8 digits and a noisy copy, and 3-channel 5x6 images."""
    kornia = pytest.importorskip("kornia", reason="kornia not installed (pip install 'recon_lightning[test]')")
    g = torch.Generator().manual_seed(5)
    a = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 1)
    x, y = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64), torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64)
    for p, q in ((a, b), (x, y)):
        expected = kornia.metrics.ssim(p, q, window_size=3).flatten(1).mean(1)
        torch.testing.assert_close(ev.ssim_reference(p, q), expected, rtol=0, atol=1e-12)


def _full_range_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(n, 1, 8, 8, generator=g)
    imgs[:, 0, 0, 0], imgs[:, 0, 0, 1] = 0.0, 1.0  # min 0, max 1: min-max scaling gives the image back
    return imgs


def test_ncc_finds_the_image_under_affine_intensity_change():
    a = _full_range_images(1)[0]
    flat = 0.5 + 0.02 * _full_range_images(1, seed=1)[0]        # nearly uniform grey
    train = torch.stack([a, flat])
    cand = (0.1 * a + 0.45)[None]                                # a, low contrast, shifted: an affine copy of a
    # The distractor works: in plain L2 the candidate is nearer the grey image.
    l2 = ((train - cand) ** 2).flatten(1).sum(1)
    assert int(l2.argmin()) == 1
    scores = pairwise_scores("ncc", cand, train)
    assert int(scores.argmax()) == 0
    # Exact affine copy: NCC distance 0. The negative -a: z -> -z, distance |2z|^2 / D = 4 (D - 1) / D
    # (unbiased std: |z|^2 = D - 1), D = 64.
    assert float(-scores[0, 0]) == pytest.approx(0.0, abs=1e-9)
    assert float(-pairwise_scores("ncc", -a[None], a[None])) == pytest.approx(4 * 63 / 64)


def test_reference_ssim_recovers_affine_copies():
    train = _full_range_images(4)
    perm = [2, 0, 3, 1]
    cands = torch.cat([3 * train[perm] - 1, torch.randn(5, 1, 8, 8)])  # rescaled copies, shuffled, + noise
    out = ev.reference_ssim_figures(train, cands, chunk=3)
    # Training image i is candidate perm.index(i); min-max scaling undoes 3x - 1, so SSIM is 1.
    assert [p["ncc_candidate"] for p in out["per_sample"]] == [perm.index(i) for i in range(4)]
    assert [p["ssim"] for p in out["per_sample"]] == pytest.approx([1.0] * 4, abs=1e-9)
    assert out["ssim_reference_mean"] == pytest.approx(1.0, abs=1e-9)
    assert out["frac_train_ssim_gt_0.4"] == 1.0 and out["frac_train_ssim_gt_0.4_one_to_one"] == 1.0


def test_reference_ssim_one_to_one_counts_a_prototype_once():
    p = _full_range_images(1)[0]
    train = p.expand(3, 1, 8, 8).clone()                   # three identical training images
    cands = torch.stack([p, 1 - p, 1 - p])                 # the image once, its negative twice
    out = ev.reference_ssim_figures(train, cands)
    # Many-to-one: every training image takes p (SSIM 1). One-to-one: one takes p, two take 1 - p,
    # whose SSIM with p is negative (structure term -1), so 1 of 3 is reconstructed.
    assert out["frac_train_ssim_gt_0.4"] == 1.0
    assert out["frac_train_ssim_gt_0.4_one_to_one"] == pytest.approx(1 / 3)
    assert sorted(q["ssim_one_to_one"] < 0 for q in out["per_sample"]) == [False, True, True]


# ----------------------------------------------------------------------------- the evaluate stage


@pytest.mark.slow
def test_stage_reports_leak_rate_and_reference_ssim(tmp_path):
    from test_evaluate import make_run_dir

    d = make_run_dir(tmp_path)  # held-out pool = training images 0 and 1 (copies); candidates copy 0..3
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False)
    s, per = report["summary"], report["reconstruction"]["per_sample"]
    # Independent figures from plain numpy: cosine matrices, the best of each row, scipy's assignment.
    from scipy.optimize import linear_sum_assignment

    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    t, c = unit(d["train_x"].double().numpy()), unit(d["x"].double().numpy())
    heldout, cos = (t @ t[:2].T).max(1), t @ c.T
    assert [p["heldout_best_cosine"] for p in per] == pytest.approx(heldout.tolist(), abs=1e-6)
    # (Candidates 3-5 are float32 multiples of held-out image 1: 1.6e-9 above its baseline for images 4 and 7, more
    # than the 1e-9 tolerance, so they count.)
    leaked = cos.max(1) > heldout + ev.LEAK_TOLERANCE
    # Images 0 and 1 are in the held-out pool (baseline 1): their exact copies do not count; 2 and 3 do.
    assert leaked[:4].tolist() == [False, False, True, True]
    assert [p["leaked"] for p in per] == leaked.tolist()
    leak = report["leak"]  # against the whole held-out pool: not a summary figure (its null grows with the candidates)
    assert leak["leak_rate"] == pytest.approx(leaked.mean())
    rows, cols = linear_sum_assignment(cos, maximize=True)
    assert sum(p["one_to_one_cosine"] for p in per) == pytest.approx(cos[rows, cols].sum(), abs=1e-5)
    assert leak["leak_rate_one_to_one"] == pytest.approx((cos[rows, cols] > heldout[rows] + ev.LEAK_TOLERANCE).mean())
    assert leak["baseline_pool"] == 2
    assert not {"leak_rate", "leak_rate_one_to_one", "frac_train_ssim_gt_0.4"} & set(s)
    assert leak["pool_matched"]["pool_size"] == 2 and s["leak_rate_pool_matched_chance"] == 0.5
    # One-to-one candidates are distinct indices among all candidates.
    o2o = [p["one_to_one_candidate"] for p in per]
    assert len(set(o2o)) == 12 and all(0 <= c < len(d["x"]) for c in o2o)
    # Reference SSIM: each training image's candidate at the smallest NCC distance (z-scored with the unbiased
    # std, squared distance over D), min-max scaled, against the image with the pixel-by-pixel SSIM (window 3).
    ref = report["images"]["reference_ssim"]
    assert ref["source"] == "reshape"
    z = lambda a: (a - a.mean(1, keepdims=True)) / a.std(1, ddof=1, keepdims=True)  # noqa: E731
    zt, zc = z(d["train_x"].double().numpy()), z(d["x"].double().numpy())
    dist = ((zt[:, None, :] - zc[None]) ** 2).mean(2)
    nearest = [q["ncc_candidate"] for q in ref["per_sample"]]  # one of the nearest (copies of an image tie)
    assert dist[range(12), nearest] == pytest.approx(dist.min(1), abs=1e-6)
    assert [q["ncc_distance"] for q in ref["per_sample"]] == pytest.approx(dist.min(1).tolist(), abs=1e-5)
    ssim = []
    for i, j in enumerate(nearest):
        cand = d["x"][j].double().numpy()
        cand = (cand - cand.min()) / (cand.max() - cand.min())
        ssim.append(ssim_direct.ssim(d["train_x"][i].double().numpy().reshape(1, 8, 8), cand.reshape(1, 8, 8)))
    assert [q["ssim"] for q in ref["per_sample"]] == pytest.approx(ssim, abs=1e-6)
    # The copies (0..3) are matched to one of their own copies, at SSIM 1.
    assert [nearest[i] // 3 for i in d["copies"]] == [0, 1, 2, 3] and ssim[:4] == pytest.approx([1.0] * 4, abs=1e-6)
    assert ref["frac_train_ssim_gt_0.4"] == pytest.approx(np.mean(np.array(ssim) > 0.4))
    assert ref["frac_train_ssim_gt_0.4_one_to_one"] >= 4 / 12
    # The null beside it: the held-out images (copies of training images 0 and 1) as the candidates, matched the
    # same way (NCC-nearest held-out image, pixel-by-pixel SSIM).
    zh = zt[:2]
    held_nearest = ((zt[:, None, :] - zh[None]) ** 2).mean(2).argmin(1)
    held_ssim = [ssim_direct.ssim(d["train_x"][i].double().numpy().reshape(1, 8, 8),
                                  d["train_x"][j].double().numpy().reshape(1, 8, 8)) for i, j in enumerate(held_nearest)]
    assert held_nearest[:2].tolist() == [0, 1] and held_ssim[:2] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert s["frac_train_ssim_gt_0.4_heldout"] == pytest.approx(np.mean(np.array(held_ssim) > 0.4))


@pytest.mark.slow
def test_stage_without_heldout_pool(tmp_path):
    from recon_lightning.storage import load_tensors, save_tensors
    from test_evaluate import make_run_dir

    make_run_dir(tmp_path)
    path = tmp_path / "embed" / "embeddings.safetensors"
    tensors, meta = load_tensors(path)
    tensors["test_x"], tensors["test_y"] = tensors["test_x"][:0].contiguous(), tensors["test_y"][:0].contiguous()
    save_tensors(path, tensors, meta)
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False)
    assert report["leak"]["leak_rate"] is None and report["leak"]["baseline_pool"] == 0
    assert report["membership"]["available"] is False and "membership_auc" not in report["summary"]
    assert "leak_rate_pool_matched" not in report["summary"]
    assert any("no held-out samples" in n for n in report["notes"])


@pytest.mark.slow
def test_inverted_images_get_reference_ssim(tmp_path, monkeypatch):
    from PIL import Image
    from test_evaluate import make_run_dir

    d = make_run_dir(tmp_path)
    # Pretend the embeddings are not pixels; the inverted PNGs of ranks 0..2 are training images 5, 7, 9.
    monkeypatch.setattr(ev, "embeddings_are_pixels", lambda *a, **k: False)
    (tmp_path / "invert" / "images").mkdir(parents=True)
    entries, planted = [], [5, 7, 9]
    for r, i in enumerate(planted):
        path = f"invert/images/rank_{r:03d}.png"
        Image.fromarray(d["imgs"][i, 0].numpy()).convert("RGB").save(tmp_path / path)
        entries.append({"rank": r, "candidate_index": r, "cosine": 0.9, "path": path})
    save_json(tmp_path / "invert" / "inversion.json", entries)
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False)
    ref = report["images"]["reference_ssim"]
    assert ref["source"] == "inversion" and "inverted representatives only" in ref["note"]
    reps = report["selection"]["representatives"]
    assert [reps[r]["ncc_nearest_train_index"] for r in range(3)] == planted
    assert [reps[r]["ssim_reference"] for r in range(3)] == pytest.approx([1.0] * 3, abs=1e-6)
    for i in planted:
        assert ref["per_sample"][i]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert ref["frac_train_ssim_gt_0.4"] >= 3 / 12
    assert "frac_train_ssim_gt_0.4_pool_matched" not in report["summary"]  # inverted representatives: no pool to match
