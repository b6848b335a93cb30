"""The audit report: ``run_dir/report.json``, ``run_dir/report/*.png`` and ``run_dir/report.html``.

Written by the evaluate stage (:mod:`recon_lightning.evaluate` computes the numbers; this module
draws, writes and logs them). ``report.html`` references its images by paths relative to
``run_dir``, so the folder can be copied or opened from disk without a server.

``report.json`` keys (stable; "eval" = only when the training set is known):

=================================================  ===========================================================
key                                                meaning
=================================================  ===========================================================
``format``                                         ``"recon_lightning.report/1"``
``mode``                                           ``"evaluation"`` (training set known) or ``"attacker"``
``modality``                                       ``"image"`` / ``"text"`` (eval), ``null`` in attacker mode
``summary``                                        flat ``{name: number}``: what is logged to the logger
``summary.num_representatives``                    representatives in the selection
``summary.membership_auc`` (``_ci95``)             eval, the headline: ROC AUC of training samples (members) against held-out
                                                   samples (non-members), each scored by its highest cosine to any
                                                   candidate in the victim's frame (inputs minus the victim's input mean);
                                                   chance 0.5 whatever the number of candidates; bootstrap 95 % interval
``summary.membership_tpr_at_1pct_fpr`` / ``5pct``  eval: TPR of that test at 1 % / 5 % FPR (chance: 0.01 / 0.05), ``_ci95``
``summary.membership_raw_*``                       eval: the same with raw cosines (secondary)
``summary.control_membership_*``                   eval, with a public split: the same test with *public* samples (never seen
                                                   by the victim) as the candidates: the null, at chance by construction
``summary.selection_attribution_at_<k>``           eval: fraction of the top-k representatives whose nearest neighbour in
                                                   training ∪ held-out (victim's frame) is a training sample; ``k`` in
                                                   ``evaluate.precision_ks`` and 24 (the grid)
``summary.selection_distinct_train_at_<k>``        eval: distinct training samples those attributed representatives show
``summary.selection_attribution_p_at_<k>``         eval: one-sided binomial p-value of that attribution against chance
``summary.selection_attribution_chance``           eval: chance attribution, n_train / (n_train + n_heldout)
``summary.baseline_selection_*``                   eval: the same for the cluster-score ranking, when a learned score chose
``summary.leak_rate_pool_matched``                 eval: fraction of training samples whose best candidate beats their best
                                                   held-out sample, candidates subsampled to the held-out pool's size
                                                   (``leak_rate_pool_size``), averaged over draws; chance 0.5
                                                   (``leak_rate_pool_matched_chance``)
``summary.frac_train_ssim_gt_0.4_pool_matched``    eval, pixel embeddings: fraction of training images whose NCC-nearest
                                                   candidate has reference SSIM > 0.4, candidates subsampled to the held-out
                                                   pool's size; ``frac_train_ssim_gt_0.4_heldout``: the same with the
                                                   held-out images as the candidates (its null)
``summary.kkt_residual_at_train`` / ``_heldout``   eval: the victim's KKT residual at its training set and at as many held-out
                                                   samples (``victim_kkt``), against the run's ``reconstruct.target``
``summary.projection_residual_at_train`` / ``_heldout``  eval, objective=projection: the projection objective's residual at
                                                   the same points (compare the candidates' ``final_loss``)
``summary.frac_train_cos_ge_<t>``                  eval: fraction of training samples with a candidate at cosine >= t
``summary.best_cosine_mean`` / ``_median``         eval: over training samples, cosine of their best candidate
``summary.precision_selected_at_<k>``              eval: precision@k of the ranked representatives
``summary.precision_by_run_loss_at_<k>``           eval: expected precision@k choosing candidates by run loss
``summary.precision_random``                       eval: expected precision of a random candidate (base rate)
``summary.spearman_margin_rho``                    eval: Spearman(margin, best cosine) over training samples
``summary.ssim_best_matches_mean``                 eval, pixel embeddings: mean SSIM(training, best candidate)
``summary.ssim_selection_mean``                    eval, images: mean SSIM(nearest training, representative)
``selection.method/num_candidates/num_clusters``   from the select stage
``selection.representatives[]``                    best first: ``rank, candidate_index, score, cluster_size, y``;
                                                   eval adds ``nearest_train_index, nearest_train_cosine, good``
                                                   (and ``ssim`` for those in the grid); ``image`` = inverted PNG
``reconstruction.best_cosine``                     eval: ``{mean, median, min, max}``
``reconstruction.heldout_baseline``                eval: the same figures for the nearest *held-out* sample
                                                   (``best_cosine_mean, fraction_above, fraction_curve``): a
                                                   candidate must beat unseen data to show leakage
``summary.heldout_best_cosine_mean``               eval: baseline of ``best_cosine_mean`` from held-out samples
``reconstruction.fraction_curve``                  eval: ``{thresholds: [...], fraction: [...]}``
``reconstruction.fraction_above``                  eval: ``{"<t>": fraction}`` for ``evaluate.thresholds``
``reconstruction.per_sample[]``                    eval: ``train_index, y, best_candidate, best_cosine, margin``;
                                                   ``best_candidate_y, label_agrees, best_candidate_shared_by``;
                                                   ``heldout_best_cosine, heldout_best_index, leaked, one_to_one_candidate,
                                                   one_to_one_cosine, leaked_one_to_one``
``leak``                                           eval: ``leak_rate, leak_rate_one_to_one, baseline_pool, num_leaked,
                                                   num_leaked_one_to_one, num_train, num_candidates, tolerance`` (``note``
                                                   when there is no held-out pool): the best of *all* candidates against
                                                   the best held-out sample, whose chance level grows with the number of
                                                   candidates (not a headline figure); ``pool_matched`` (the summary's)
``membership``                                     eval: ``victim_frame``, ``raw``, ``control_public``: each ``auc, auc_ci95,
                                                   tpr_at_fpr{"0.01","0.05": {tpr, ci95, chance}}, curve{fpr, tpr},
                                                   num_members, num_nonmembers, num_candidates``
``attribution``                                    eval: ``score`` (the selection's), ``chance``, ``selection`` / ``baseline``:
                                                   ``at_k{k: {attributed, distinct_train, chance, p_value}}``; each
                                                   representative gets ``attributed_to_train``, ``nearest_member_or_heldout``
``victim_kkt``                                     eval: ``residual_at_train, residual_at_heldout`` (as many held-out samples,
                                                   class-balanced like the training set), ``num_points, form, steps``
``images.reference_ssim``                          eval, images: ``source`` (``reshape``: all candidates; ``inversion``:
                                                   the inverted PNGs only), ``ssim_reference_mean``,
                                                   ``frac_train_ssim_gt_0.4`` (``_one_to_one``) over all of them (pool-
                                                   dependent), ``per_sample[]``
                                                   ``ncc_candidate, ncc_distance, ssim, one_to_one_candidate,
                                                   ssim_one_to_one``
``selection_quality``                              eval: ``good_threshold, k, precision_selected, precision_random,
                                                   precision_by_run_loss, distinct_train_at_k, base_rate``
``margin``                                         eval: ``{available, spearman_rho, spearman_p, n}``
``hyperplane_membership``                          eval: ``available, num_hyperplanes, radius, train_median, train_frac_on_any,
                                                   heldout_median, heldout_frac_on_any, auc``: how many of the victim's
                                                   first-layer ReLU hyperplanes pass within ``radius`` of each sample
                                                   (``reconstruction.per_sample[].victim_hyperplanes_through``); also
                                                   ``summary.frac_train_on_victim_hyperplane``,
                                                   ``frac_heldout_on_victim_hyperplane``, ``hyperplane_membership_auc``
``images.pool_matched_ssim``                        eval, pixel embeddings: the summary's pool-matched SSIM keys, ``pool_size``
``images``                                         eval, images: ``source`` (``reshape``/``inversion``/null),
                                                   ``ssim_best_matches[_mean]``, ``ssim_selection_mean``,
                                                   ``lpips_available``, ``lpips_note`` (why LPIPS is absent)
``text.nearest_train_texts[]``                     eval, text: ``rank, candidate_index, matches[{train_index, text, cosine}]``
``inversion``                                      contents of ``invert/inversion.json`` when present
``text_matches_attacker``                          contents of ``invert/text_matches.json`` when present
``victim``                                         ``train_acc, test_acc, n_train, margin_min, problems`` from
                                                   ``classifier/victim.json`` (also ``summary.victim_train_acc`` /
                                                   ``victim_test_acc``); shown on the report's first lines
``reconstruction.distinct_best_candidates``        eval: how many different candidates are best matches
``reconstruction.label_agreement``                 eval: fraction of training samples whose best candidate has their class
``text_corpus``                                    ``path, size, bundled`` of the corpus searched to invert text
``runs``                                           the reconstruction runs: ``total, ok, failed[]`` (``run, final_loss,
                                                   error``: why it failed; its candidates are left out of every figure);
                                                   also ``summary.runs_ok`` / ``runs_failed``
``figures`` / ``grids``                            ``{name: PNG path relative to run_dir}``
``notes``                                          human-readable remarks (what was omitted and why)
=================================================  ===========================================================
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .storage import atomic_path, save_json

log = logging.getLogger(__name__)

REPORT_FORMAT = "recon_lightning.report/1"


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)
    return path


# ----------------------------------------------------------------------------- plots


def plot_fraction_curve(path: Path, thresholds: Sequence[float], fraction: Sequence[float], good_threshold: float | None = None,
                        heldout: Sequence[float] | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(thresholds, fraction, lw=2, color="C0", label="reconstruction candidates")
    if heldout is not None:
        # Baseline: how close unseen samples of the same distribution come; leakage means beating it.
        ax.plot(thresholds, heldout, lw=1.5, ls="-.", color="C3", label="baseline: nearest held-out sample")
    if good_threshold is not None:
        ax.axvline(good_threshold, color="k", ls="--", lw=1, label=f"good threshold {good_threshold:g}")
    ax.legend()
    ax.set_xlabel("cosine threshold")
    ax.set_ylabel("fraction of training set reconstructed")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Training samples with a candidate at cosine >= threshold")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_precision(path: Path, ks: Sequence[int], selected: Sequence[float], random: Sequence[float],
                   by_loss: Sequence[float], good_threshold: float) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, selected, "o-", lw=2, color="C0", label="selection (cluster score)")
    ax.plot(ks, by_loss, "s--", color="C1", label="by run loss alone")
    ax.plot(ks, random, ":", color="C2", label="random candidate")
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel(f"precision@k (cosine >= {good_threshold:g})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Selection quality")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_margin_scatter(path: Path, margin: torch.Tensor, best_cos: torch.Tensor, rho: float | None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(margin.numpy(), best_cos.numpy(), s=14, alpha=0.7, color="C0")
    ax.set_xlabel("victim margin on the training sample")
    ax.set_ylabel("cosine of its best candidate")
    ax.set_title("Reconstructability vs margin" + (f" (Spearman rho = {rho:.3f})" if rho is not None else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_hyperplane_membership(path: Path, train_counts: list[int], heldout_counts: list[int] | None,
                               auc: float | None) -> Path:
    """Histogram of how many of the victim's ReLU hyperplanes pass through each training / held-out sample."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max(train_counts + (heldout_counts or []) + [1])
    width = max(1, (top + 1) // 30)
    bins = np.concatenate([[-0.5, 0.5], np.arange(0.5 + width, top + width + 0.5, width)])  # "on none" alone first
    for counts, color, label in ((train_counts, "C3", "training samples"), (heldout_counts, "C0", "held-out samples")):
        if counts:
            ax.hist(counts, bins=bins, alpha=0.6, color=color, label=label, weights=np.full(len(counts), 1.0 / len(counts)))
    ax.set_xlabel("victim hyperplanes through the sample")
    ax.set_ylabel("fraction of samples")
    ax.set_title("Membership from the weights" + (f" (AUC = {auc:.3f})" if auc is not None else ""))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_membership_roc(path: Path, main: dict, raw: dict | None = None, control: dict | None = None) -> Path:
    """ROC of members against non-members on a log-scale FPR axis (the membership-inference convention), with the
    chance diagonal; ``raw`` and the public-sample ``control`` drawn beside the victim-frame curve."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    floor = 1.0 / max(main["num_nonmembers"], 1) / 2
    for figs, label, style in ((main, "victim frame", "-"), (raw, "raw cosine", "--"),
                               (control, "control: public samples as candidates", ":")):
        if figs is None:
            continue
        fpr = np.maximum(np.asarray(figs["curve"]["fpr"]), floor)
        ax.plot(fpr, figs["curve"]["tpr"], style, drawstyle="steps-post",
                label=f"{label} (AUC {figs['auc']:.2f}, TPR@1% {figs['tpr_at_fpr']['0.01']['tpr']:.2f})")
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, color="gray", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate (held-out samples called members)")
    ax.set_ylabel("true positive rate (training samples found)")
    ax.set_title("Membership from the reconstruction")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_scores(path: Path, scores: torch.Tensor) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(len(scores)), scores.numpy(), "o-", ms=3, color="C0")
    ax.set_xlabel("rank")
    ax.set_ylabel("cluster score")
    ax.set_title("Selection: representatives' scores")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _show(ax, img: torch.Tensor) -> None:
    img = img.detach().float().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def image_pair_grid(path: Path, left: torch.Tensor, right: torch.Tensor, captions: Sequence[str], title: str, cols: int = 4) -> Path:
    """Pairs (left | right) of float images (N, C, H, W) in [0, 1], ``cols`` pairs per row."""
    plt = _plt()
    n = len(left)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.3, rows * 1.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        a, b = axes[r, 2 * c], axes[r, 2 * c + 1]
        a.axis("on"), b.axis("on")
        _show(a, left[i])
        _show(b, right[i])
        a.set_title(captions[i], fontsize=6, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def image_grid(path: Path, images: torch.Tensor, captions: Sequence[str], title: str, cols: int = 8) -> Path:
    plt = _plt()
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        ax = axes.ravel()[i]
        ax.axis("on")
        _show(ax, images[i])
        ax.set_title(captions[i], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- HTML


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):  # e.g. a 95 % interval
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return html.escape(str(v))


def _img(src: str, alt: str, width: str = "") -> str:
    style = f' style="max-width:{width}"' if width else ""
    return f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(alt, quote=True)}"{style}>'


HEADLINE_KEYS = ("membership_auc", "membership_auc_ci95", "membership_tpr_at_1pct_fpr", "membership_tpr_at_1pct_fpr_ci95",
                 "membership_tpr_at_5pct_fpr", "control_membership_auc", "control_membership_tpr_at_1pct_fpr",
                 "selection_attribution_at_24", "selection_distinct_train_at_24", "selection_attribution_chance",
                 "selection_attribution_p_at_24", "leak_rate_pool_matched", "leak_rate_pool_matched_chance",
                 "frac_train_ssim_gt_0.4_pool_matched", "frac_train_ssim_gt_0.4_heldout")


GRID_K = 24  # representatives in the report's grid: the headline's attribution is at this k


def _ci(s: dict, key: str) -> str:
    ci = s.get(f"{key}_ci95")
    return f" [95 % CI {_fmt(ci[0])}–{_fmt(ci[1])}]" if ci else ""


def headline_html(report: dict) -> str:
    """The summary's first lines: membership from the reconstruction (members against non-members through the same
    candidates, chance beside every figure), what the selection shows, and the pool-matched leak figures."""
    s = report.get("summary", {})
    if "membership_auc" not in s:
        note = (report.get("membership") or {}).get("note")
        return f"<p class='headline'><b>Membership figures: not computed</b> ({html.escape(note)})</p>" if note else ""
    lines = [f"<b>Membership AUC {_fmt(s['membership_auc'])}</b>{_ci(s, 'membership_auc')} (chance 0.5); "
             f"<b>TPR at 1 % FPR {_fmt(s['membership_tpr_at_1pct_fpr'])}</b>{_ci(s, 'membership_tpr_at_1pct_fpr')} "
             f"(chance 0.01), at 5 % FPR {_fmt(s.get('membership_tpr_at_5pct_fpr'))} (chance 0.05): training samples "
             f"against held-out samples, each scored by its closest candidate"]
    if "control_membership_auc" in s:
        lines.append(f"Control, public samples the victim never saw as the candidates: AUC "
                     f"{_fmt(s['control_membership_auc'])}, TPR at 1 % FPR {_fmt(s['control_membership_tpr_at_1pct_fpr'])}")
    k = min(GRID_K, int(s.get("num_representatives", GRID_K)))
    if f"selection_attribution_at_{k}" in s:
        lines.append(f"<b>Selection: {_fmt(s[f'selection_attribution_at_{k}'])} of the top {k}</b> representatives are "
                     f"nearest to a training sample (chance {_fmt(s['selection_attribution_chance'])}, p = "
                     f"{_fmt(s.get(f'selection_attribution_p_at_{k}'))}), showing "
                     f"<b>{_fmt(s.get(f'selection_distinct_train_at_{k}'))} distinct training samples</b>")
        if f"baseline_selection_attribution_at_{k}" in s:
            lines[-1] += (f"; the cluster score's top {k}: {_fmt(s[f'baseline_selection_attribution_at_{k}'])}, "
                          f"{_fmt(s.get(f'baseline_selection_distinct_train_at_{k}'))} distinct")
    if s.get("leak_rate_pool_matched") is not None:
        text = (f"Pool-matched leak rate {_fmt(s['leak_rate_pool_matched'])} (chance 0.5; candidates subsampled to the "
                f"{_fmt(s.get('leak_rate_pool_size'))} held-out samples)")
        if s.get("frac_train_ssim_gt_0.4_pool_matched") is not None:
            text += (f"; SSIM &gt; 0.4 for {_fmt(s['frac_train_ssim_gt_0.4_pool_matched'])} of training images, against "
                     f"{_fmt(s.get('frac_train_ssim_gt_0.4_heldout'))} with held-out images as the candidates")
        lines.append(text)
    if s.get("hyperplane_membership_auc") is not None:
        lines.append(f"Membership from the weights alone: {_fmt(s['frac_train_on_victim_hyperplane'])} of training "
                     f"samples lie on one of the victim's ReLU hyperplanes, against {_fmt(s['frac_heldout_on_victim_hyperplane'])} "
                     f"of held-out samples (AUC {_fmt(s['hyperplane_membership_auc'])})")
    return "<p class='headline' style='font-size:16px'>" + "<br>".join(lines) + "</p>"


def _headline_first(summary: dict) -> dict:
    return {**{k: summary[k] for k in HEADLINE_KEYS if k in summary}, **summary}


def render_html(report: dict) -> str:
    """A self-contained page (inline CSS, images by relative path) showing everything in ``report``."""
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>recon_lightning audit report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}"
        "img{max-width:100%;border:1px solid #ddd;margin:4px}.figs img{max-width:580px;vertical-align:top}.note{color:#a50}"
        ".thumb{height:48px;image-rendering:pixelated}</style></head><body>",
        "<h1>Training-data reconstruction audit</h1>",
        f"<p>Mode: <b>{e(report['mode'])}</b>"
        + (" (the true training set is known: reconstruction is measured)" if report["mode"] == "evaluation"
           else " (training set unknown: only the ranked candidates are shown)")
        + (f"; modality: {e(str(report.get('modality')))}" if report.get("modality") else "") + "</p>",
    ]
    victim = report.get("victim")
    if victim:
        parts.append(f"<p>Victim: train accuracy <b>{_fmt(victim.get('train_acc'))}</b>, test accuracy "
                     f"<b>{_fmt(victim.get('test_acc'))}</b> ({_fmt(victim.get('n_train'))} training samples, "
                     f"smallest training margin {_fmt(victim.get('margin_min'))})</p>")
    for note in report.get("notes", []):
        parts.append(f"<p class='note'>{e(note)}</p>")
    summary = report.get("summary", {})
    if summary:
        parts.append("<h2>Summary</h2>" + headline_html(report) + "<table><tr><th>metric</th><th>value</th></tr>")
        parts += [f"<tr><td style='text-align:left'>{e(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in _headline_first(summary).items()]
        parts.append("</table>")
    imgs = report.get("images") or {}
    if imgs.get("lpips_note"):
        parts.append(f"<p class='note'>{e(imgs['lpips_note'])}</p>")
    if report.get("figures"):
        parts.append("<h2>Figures</h2><div class='figs'>")
        parts += [_img(src, name) for name, src in report["figures"].items()]
        parts.append("</div>")
    if report.get("grids"):
        parts.append("<h2>Images</h2>")
        for name, src in report["grids"].items():
            parts.append(f"<h3>{e(name.replace('_', ' '))}</h3>{_img(src, name)}")
    text = (report.get("text") or {}).get("nearest_train_texts")
    if text:
        parts.append("<h2>Nearest training sentences to the top representatives</h2><table>"
                     "<tr><th>rank</th><th>cosine</th><th style='text-align:left'>training text</th></tr>")
        for row in text:
            for m in row["matches"]:
                parts.append(f"<tr><td>{row['rank']}</td><td>{m['cosine']:.3f}</td><td style='text-align:left'>{e(m['text'])}</td></tr>")
        parts.append("</table>")
    att = report.get("text_matches_attacker")
    if att:
        corpus = report.get("text_corpus") or {}
        parts.append("<h2>Inverted text (nearest sentences in the attacker's corpus)</h2>"
                     + (f"<p>Corpus searched: <code>{e(str(corpus.get('path')))}</code> ({_fmt(corpus.get('size'))} sentences"
                        + (", the bundled example corpus" if corpus.get("bundled") else "") + ")</p>" if corpus else "")
                     + "<table>"
                     "<tr><th>rank</th><th>cosine</th><th style='text-align:left'>text</th></tr>")
        for row in att:
            for m in row.get("matches", []):
                parts.append(f"<tr><td>{row.get('rank')}</td><td>{_fmt(m.get('cosine'))}</td><td style='text-align:left'>{e(str(m.get('text')))}</td></tr>")
        parts.append("</table>")
    failed = (report.get("runs") or {}).get("failed")
    if failed:
        parts.append(f"<h2>Failed reconstruction runs</h2><p>{len(failed)} of {report['runs']['total']} runs failed; "
                     "their candidates are left out of everything above and below.</p><table><tr><th>run</th>"
                     "<th>relative KKT loss</th><th style='text-align:left'>why it failed</th></tr>")
        parts += [f"<tr><td>{_fmt(r.get('run'))}</td><td>{_fmt(r.get('final_loss'))}</td>"
                  f"<td style='text-align:left'>{e(str(r.get('error')))}</td></tr>" for r in failed]
        parts.append("</table>")
    reps = (report.get("selection") or {}).get("representatives", [])
    if reps:
        cols = ["rank", "candidate_index", "score", "cluster_size", "y", "nearest_train_index", "nearest_train_cosine", "good", "ssim"]
        cols = [c for c in cols if any(c in r for r in reps)]
        has_img = any("image" in r for r in reps)
        sel = report.get("selection", {})
        parts.append(f"<h2>Ranked selection</h2><p>method {e(str(sel.get('method')))}, {_fmt(sel.get('num_candidates'))} candidates, "
                     f"{_fmt(sel.get('num_clusters'))} clusters</p><table><tr>"
                     + "".join(f"<th>{e(c)}</th>" for c in cols) + ("<th>inverted</th>" if has_img else "") + "</tr>")
        for r in reps:
            cells = "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols)
            if has_img:
                cells += f"<td>{_img(r['image'], 'inverted') .replace('<img ', '<img class=thumb ') if 'image' in r else ''}</td>"
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    parts.append("<p style='color:#888'>Full numbers: <a href='report.json'>report.json</a></p></body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path, report: dict) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    save_json(run_dir / "report.json", report)
    html_path = run_dir / "report.html"
    with atomic_path(html_path) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")
    return run_dir / "report.json", html_path


# ----------------------------------------------------------------------------- logger


def log_report(cfg, run_dir: Path, report: dict) -> None:
    """Send the report's scalars (all loggers) and images/tables (W&B) to the configured logger."""
    summary = report.get("summary", {})
    if "membership_auc" in summary:  # the headline, also in the console / log file
        log.info("membership_auc=%s (chance 0.5), tpr_at_1pct_fpr=%s (chance 0.01), selection_attribution_at_24=%s "
                 "(chance %s, %s distinct training samples), leak_rate_pool_matched=%s (chance 0.5)",
                 *(_fmt(summary.get(k)) for k in ("membership_auc", "membership_tpr_at_1pct_fpr", "selection_attribution_at_24",
                                                  "selection_attribution_chance", "selection_distinct_train_at_24",
                                                  "leak_rate_pool_matched")))
    from .training import build_logger

    logger = build_logger(cfg, Path(run_dir), "evaluate")
    if not logger:
        return
    scalars = {f"evaluate/{k}": float(v) for k, v in report.get("summary", {}).items() if isinstance(v, (int, float)) and v is not None}
    if scalars:
        logger.log_metrics(scalars, step=0)
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        run = logger.experiment
        media = {f"evaluate/{name}": wandb.Image(str(Path(run_dir) / src), caption=name)
                 for name, src in {**report.get("figures", {}), **report.get("grids", {})}.items()}
        reps = report.get("selection", {}).get("representatives", [])
        if reps:
            cols = list(dict.fromkeys(k for r in reps for k in r if k != "image"))  # ordered union
            media["evaluate/selection_table"] = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in reps])
        run.log(media)
        run.finish()
    else:
        logger.save()
        logger.finalize("success")
