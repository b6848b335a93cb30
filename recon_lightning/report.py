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
``summary.leak_rate``                              eval, the headline: fraction of training samples whose best candidate
                                                   is closer (cosine) than the nearest held-out sample (``emb.test_x``);
                                                   null when there is no held-out sample
``summary.leak_rate_one_to_one``                   eval: the same with candidates assigned one-to-one (Hungarian)
``summary.leak_rate_baseline_pool``                eval: number of held-out samples in the baseline
``summary.frac_train_ssim_gt_0.4`` (``_one_to_one``)  eval, images: fraction of training images whose NCC-nearest
                                                   reconstruction has reference SSIM > 0.4 (one-to-one: Hungarian on NCC)
``summary.ssim_reference_mean``                    eval, images: mean reference SSIM (window 3) of those pairs
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
                                                   when there is no held-out pool)
``images.reference_ssim``                          eval, images: ``source`` (``reshape``: all candidates; ``inversion``:
                                                   the inverted PNGs only), the summary's SSIM keys, ``per_sample[]``
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
    return html.escape(str(v))


def _img(src: str, alt: str, width: str = "") -> str:
    style = f' style="max-width:{width}"' if width else ""
    return f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(alt, quote=True)}"{style}>'


HEADLINE_KEYS = ("leak_rate", "leak_rate_baseline_pool", "leak_rate_one_to_one", "frac_train_ssim_gt_0.4",
                 "frac_train_ssim_gt_0.4_one_to_one")


def headline_html(report: dict) -> str:
    """The summary's first line: the leak rate against the held-out pool, with the SSIM > 0.4 fraction beside it."""
    s, leak = report.get("summary", {}), report.get("leak") or {}
    if "leak_rate" not in s:
        return ""
    if s["leak_rate"] is None:
        text = "<b>Leak rate: not computed</b> (no held-out samples to compare with)"
    else:
        text = (f"<b>Leak rate {_fmt(s['leak_rate'])}</b>: {_fmt(leak.get('num_leaked'))} of {_fmt(leak.get('num_train'))} "
                f"training samples have a candidate closer (cosine) than the nearest of "
                f"<b>{_fmt(s.get('leak_rate_baseline_pool'))} held-out samples</b>; one-to-one {_fmt(s.get('leak_rate_one_to_one'))}")
    if s.get("frac_train_ssim_gt_0.4") is not None:
        text += (f" &nbsp;|&nbsp; <b>SSIM &gt; 0.4: {_fmt(s['frac_train_ssim_gt_0.4'])}</b> of training images"
                 f" (one-to-one {_fmt(s.get('frac_train_ssim_gt_0.4_one_to_one'))})")
    if s.get("hyperplane_membership_auc") is not None:
        text += (f"<br>Membership from the weights alone: <b>{_fmt(s['frac_train_on_victim_hyperplane'])}</b> of training "
                 f"samples lie on one of the victim's ReLU hyperplanes, against {_fmt(s['frac_heldout_on_victim_hyperplane'])} "
                 f"of held-out samples (AUC {_fmt(s['hyperplane_membership_auc'])})")
    return f"<p class='headline' style='font-size:16px'>{text}</p>"


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
    if "leak_rate" in summary:  # the headline, also in the console / log file
        log.info("leak_rate=%s (held-out pool %s, one-to-one %s), frac_train_ssim_gt_0.4=%s (one-to-one %s)",
                 *(_fmt(summary.get(k)) for k in ("leak_rate", "leak_rate_baseline_pool", "leak_rate_one_to_one",
                                                  "frac_train_ssim_gt_0.4", "frac_train_ssim_gt_0.4_one_to_one")))
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
