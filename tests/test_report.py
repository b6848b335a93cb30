"""The report files: JSON keys, every image the HTML references exists, logger output, and
the page actually shows its plots in a headless browser."""

import html
import html.parser
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from recon_lightning import evaluate as ev
from recon_lightning.config import shipped
from recon_lightning.report import REPORT_FORMAT, render_html
from recon_lightning.storage import load_json
from test_evaluate import make_run_dir


class _ImgSrc(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def img_srcs(page: str) -> list[str]:
    p = _ImgSrc()
    p.feed(page)
    return p.srcs


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """One evaluated synthetic run shared by this module's tests (the stage takes a few seconds)."""
    from recon_lightning.fit import load_config

    run = tmp_path_factory.mktemp("report") / "run"
    planted = make_run_dir(run)
    cfg = load_config([f"run_dir={run}", "logger.name=csv", "trainer.enable_progress_bar=false"])
    summary = ev.run_stage(cfg, run)
    return run, summary, planted


def plain_figures(planted: dict) -> dict:
    """The mean best cosine, the leak rate and the membership AUC of make_run_dir's run from a plain cosine matrix
    (numpy): each training sample's best candidate against its best held-out sample (copies of training samples 0
    and 1)."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    train, cands = unit(planted["train_x"].double().numpy()), unit(planted["x"].double().numpy())
    best, heldout = (train @ cands.T).max(1), (train @ train[:2].T).max(1)
    # membership: every member's and non-member's (the two held-out copies) best candidate, all pairs compared
    members, nonmembers = best.round(6), (train[:2] @ cands.T).max(1).round(6)  # cosines tie to 6 decimals
    pairs = members[:, None] - nonmembers[None, :]
    auc = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    return {"best_cosine_mean": best.mean(), "leak_rate": (best > heldout + ev.LEAK_TOLERANCE).mean(), "membership_auc": auc}


@pytest.mark.slow
def test_report_files_and_html_references(evaluated_run):
    run, summary, planted = evaluated_run
    report = load_json(run / "report.json")
    assert report["format"] == REPORT_FORMAT and report["mode"] == "evaluation"
    for key in ("summary", "selection", "reconstruction", "selection_quality", "margin", "images", "figures", "grids"):
        assert key in report
    assert set(report["figures"]) == {"selection_scores", "fraction_curve", "precision_at_k", "margin_scatter",
                                      "hyperplane_membership", "membership_roc"}
    expected = plain_figures(planted)["best_cosine_mean"]
    assert summary["best_cosine_mean"] == report["summary"]["best_cosine_mean"] == pytest.approx(expected, abs=1e-6)
    srcs = img_srcs((run / "report.html").read_text())
    assert len(srcs) == len(report["figures"]) + len(report["grids"])
    for src in srcs:
        assert not Path(src).is_absolute()
        assert (run / src).is_file(), f"report.html references missing {src}"
        assert (run / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # CSV logger got the same scalars (wherever training.build_logger puts the evaluate stage's CSV).
    from recon_lightning.fit import load_config
    from recon_lightning.training import build_logger

    log_dir = Path(build_logger(load_config([f"run_dir={run}", "logger.name=csv"]), run, "evaluate").log_dir)
    metrics = (log_dir / "metrics.csv").read_text()
    assert "evaluate/best_cosine_mean" in metrics and "evaluate/precision_random" in metrics


@pytest.mark.slow
def test_attacker_report_lists_selection_and_inverted_images(tmp_path):
    from PIL import Image

    make_run_dir(tmp_path, with_embed=False)
    (tmp_path / "invert" / "images").mkdir(parents=True)
    entries = []
    for r in range(3):
        path = f"invert/images/rank_{r:03d}.png"
        Image.fromarray((np.random.default_rng(r).random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / path)
        entries.append({"rank": r, "candidate_index": r, "cosine": 0.9, "path": path})
    from recon_lightning.storage import save_json

    save_json(tmp_path / "invert" / "inversion.json", entries)
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False)
    page = render_html(report)
    srcs = img_srcs(page)
    for e in entries:
        assert e["path"] in srcs
    assert "inverted" in report["grids"]
    for src in srcs:
        assert (tmp_path / src).is_file()
    assert "Ranked selection" in page and "attacker" in page


@pytest.mark.slow
def test_failed_runs_are_listed_in_report_json_and_html(tmp_path):
    """A run that failed (here: diverged) is listed with its reason, not dropped silently."""
    from recon_lightning.report import write_report
    from recon_lightning.storage import load_tensors, save_tensors

    make_run_dir(tmp_path, with_embed=False)
    path = tmp_path / "reconstruct" / "candidates.safetensors"
    tensors, meta = load_tensors(path)
    why = "relative KKT loss 2.3e+10 ended at or above 1, the trivial solution's (all multipliers zero): diverged"
    save_tensors(path, tensors, {**meta, "runs": [*meta["runs"], {"run": 3, "status": "failed", "final_loss": 2.3e10,
                                                                  "error": why}]})
    write_report(tmp_path, ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default"), progress=False))
    report = load_json(tmp_path / "report.json")
    assert report["runs"] == {"total": 4, "ok": 3, "failed": [{"run": 3, "final_loss": 2.3e10, "error": why}]}
    assert report["summary"]["runs_ok"] == 3 and report["summary"]["runs_failed"] == 1
    assert any("1 of 4 reconstruction runs failed" in note and why in note for note in report["notes"])
    page = (tmp_path / "report.html").read_text()
    assert "Failed reconstruction runs" in page and html.escape(why) in page


def _pixel_counts(png: Path) -> tuple[int, int]:
    """(pixels of matplotlib's default colour C0 #1f77b4, i.e. drawn plot data; non-white pixels)."""
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(a - np.array([31, 119, 180])).sum(-1) < 40).sum()), int((a.min(-1) < 200).sum())


def _screenshot(chromium: str, page: Path, out: Path) -> None:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--allow-file-access-from-files", f"--screenshot={out}", "--window-size=1300,6000",
           "--virtual-time-budget=5000", page.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert out.is_file(), f"chromium wrote no screenshot: {' '.join(cmd)}"


@pytest.mark.slow
def test_html_renders_plots_in_headless_chromium(evaluated_run, tmp_path):
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if chromium is None:
        pytest.skip("no chromium binary found")
    run = evaluated_run[0]
    shot = tmp_path / "shot.png"
    _screenshot(chromium, run / "report.html", shot)
    # Control: the same page with its images missing (a broken report).
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(run / "report.html", broken / "report.html")
    shot_broken = tmp_path / "shot_broken.png"
    _screenshot(chromium, broken / "report.html", shot_broken)
    (blue, ink), (blue_broken, ink_broken) = _pixel_counts(shot), _pixel_counts(shot_broken)
    # Plot lines/markers are drawn (the broken page has none) and the image grids fill the page.
    assert blue > 300 and blue_broken < 50, f"plots not visible: {blue} plot-coloured pixels (broken page: {blue_broken})"
    assert ink > 5 * ink_broken, f"page with images has {ink} non-white pixels, without images {ink_broken}"


@pytest.mark.slow
def test_wandb_offline_gets_images_and_table(evaluated_run, monkeypatch):
    from recon_lightning.fit import load_config
    from recon_lightning.report import log_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = evaluated_run[0]
    report = load_json(run / "report.json")
    log_report(load_config([f"run_dir={run}", "logger.name=wandb"]), run, report)
    media = next((run / "wandb").glob("offline-run-*/files/media"))
    logged = {p.name.split("_1_")[0] for p in media.rglob("*.png")}
    assert logged == set(report["figures"]) | set(report["grids"])
    assert list(media.rglob("selection_table*.table.json"))


@pytest.mark.slow
def test_membership_figures_are_the_summary_headline_and_are_logged(evaluated_run, caplog):
    import logging
    import re

    from recon_lightning.fit import load_config
    from recon_lightning.report import log_report
    from recon_lightning.training import build_logger

    run, summary, planted = evaluated_run
    report = load_json(run / "report.json")
    s = report["summary"]
    page = (run / "report.html").read_text()
    section = page.split("<h2>Summary</h2>", 1)[1]
    # The first lines: membership AUC and TPR at 1 % FPR with their chance levels, the selection's attribution at the
    # grid's k (8 representatives here) against its chance, then the pool-matched leak rate.
    headline = section.split("<table>", 1)[0]
    assert f"Membership AUC {s['membership_auc']:.4g}</b>" in headline and "(chance 0.5)" in headline
    assert f"TPR at 1 % FPR {s['membership_tpr_at_1pct_fpr']:.4g}</b>" in headline and "(chance 0.01)" in headline
    assert f"Selection: {s['selection_attribution_at_8']:.4g} of the top 8</b>" in headline
    assert f"chance {12 / 14:.4g}" in headline  # 12 training and 2 held-out samples
    assert f"Pool-matched leak rate {s['leak_rate_pool_matched']:.4g} (chance 0.5" in headline
    rows = re.findall(r"<tr><td style='text-align:left'>([^<]+)</td>", section)
    assert rows[:2] == ["membership_auc", "membership_auc_ci95"]
    # The stage's return value and report.json carry the membership AUC and the (whole-pool) leak rate of a plain
    # cosine matrix (the victim here does not centre its inputs: its frame is the raw one).
    plain = plain_figures(planted)
    assert summary["membership_auc"] == s["membership_auc"] == pytest.approx(plain["membership_auc"])
    assert report["leak"]["leak_rate"] == pytest.approx(plain["leak_rate"])
    # The stage's logger got the new scalars; the console log has the headline.
    log_dir = Path(build_logger(load_config([f"run_dir={run}", "logger.name=csv"]), run, "evaluate").log_dir)
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("membership_auc", "membership_tpr_at_1pct_fpr", "membership_tpr_at_5pct_fpr", "selection_attribution_at_8",
                "selection_distinct_train_at_8", "leak_rate_pool_matched", "frac_train_ssim_gt_0.4_pool_matched"):
        assert f"evaluate/{key}" in header
    with caplog.at_level(logging.INFO, logger="recon_lightning.report"):
        log_report(load_config([f"run_dir={run}", "logger.name=none"]), run, report)
    assert f"membership_auc={s['membership_auc']:.4g} (chance 0.5)" in caplog.text


def test_headline_without_heldout_pool():
    page = render_html({"mode": "evaluation", "summary": {"num_representatives": 3},
                        "membership": {"available": False, "note": "no held-out samples: no membership figures"}})
    assert "Membership figures: not computed" in page and "no held-out samples" in page


