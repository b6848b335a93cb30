"""A new user's first hour and awkward inputs: small folders, grayscale,
16-bit PNGs, mixed image sizes, non-UTF-8 text, victim health, report content, log noise."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recon_lightning.config import shipped
from recon_lightning.data import load_dataset
from recon_lightning.embed import load_embeddings, load_images
from recon_lightning.errors import DataError
from recon_lightning.fit import main_with_config

REPO = Path(__file__).resolve().parent.parent
TINY_VICTIM = ["classifier.hidden=[64]", "classifier.bias=[true,false]", "classifier.init_scale=[1e-3,null]",
               "trainer.max_epochs=300"]


def image_folder(root: Path, per_class: int, size=(8, 8), mode="L", sizes=None) -> Path:
    """root/<a|b>/<i>.png: class a dark, class b bright, random texture (seeded)."""
    rng = np.random.default_rng(0)
    for c, (name, base) in enumerate((("a", 40), ("b", 200))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)] if sizes else size
            px = np.clip(base + rng.normal(0, 30, (h, w)), 0, 255).astype(np.uint8)
            img = Image.fromarray(px, "L") if mode == "L" else Image.fromarray(np.stack([px, px // 2, 255 - px], -1), "RGB")
            img.save(root / name / f"{i}.png")
    return root


def folder_cfg(make_cfg, root, *overrides):
    return make_cfg("data=imagefolder", f"data.root={root}", *overrides)


# ----------------------------------------------------------------------------- item 1 / 9: sizing a folder


def test_small_folder_n_per_class_auto_uses_what_the_folder_allows(make_cfg, tmp_path, caplog):
    root = image_folder(tmp_path / "imgs", per_class=12)
    with caplog.at_level(logging.INFO, logger="recon_lightning.data"):
        ds = load_dataset(folder_cfg(make_cfg, root, "data.n_test_per_class=4").data)
    assert np.bincount(ds.train.labels).tolist() == [8, 8] and np.bincount(ds.test.labels).tolist() == [4, 4]
    assert "using 8 training + 4 test samples per class" in caplog.text


def test_explicit_n_per_class_beyond_the_folder_is_a_clear_error(make_cfg, tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=12)
    with pytest.raises(DataError, match=r"class 'a' has 12 samples, fewer than .* = 250 \+ 50.*n_per_class=auto"):
        load_dataset(folder_cfg(make_cfg, root, "data.n_per_class=250").data)
    with pytest.raises(DataError, match="not enough for data.n_test_per_class=50"):
        load_dataset(folder_cfg(make_cfg, root).data)  # auto, but the test split alone is too large


@pytest.mark.slow
def test_cli_small_folder_prints_an_error_line(tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=5)
    proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", "stage=embed", "data=imagefolder",
                           f"data.root={root}", "data.n_per_class=5", f"run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: class 'a' has 5 samples, fewer than data.n_per_class + data.n_test_per_class" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_zero_test_split_is_supported_by_every_stage(make_cfg, tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=6)
    summary = main_with_config(folder_cfg(make_cfg, root, "data.n_test_per_class=0", *TINY_VICTIM, "reconstruct.num_runs=1",
                                          "reconstruct.steps=20", "select.num_representatives=4", "invert.num_images=2"))
    assert summary["embed"]["n_train"] == 12 and summary["embed"]["n_test"] == 0
    assert summary["classifier"]["train_acc"] == 1.0 and summary["classifier"]["test_acc"] is None
    images = load_images(tmp_path / "run")
    assert images["train"].shape == (12, 1, 8, 8) and images["test"].shape == (0, 1, 8, 8)
    assert summary["evaluate"]["mode"] == "evaluation" and "heldout_best_cosine_mean" not in summary["evaluate"]


# ----------------------------------------------------------------------------- item 3: grayscale


def test_grayscale_folder_keeps_one_channel_and_records_it(make_cfg, tmp_path):
    root = image_folder(tmp_path / "imgs", per_class=6)
    main_with_config(folder_cfg(make_cfg, root, "stage=embed", "data.n_test_per_class=2"))
    emb = load_embeddings(tmp_path / "run")
    assert emb.dim == 64 and emb.meta["data_channels"] == 1 and emb.meta["input_size"] == [1, 8, 8]
    # data.channels=3 gives the old RGB behaviour (3x the dimension for raw pixels)
    main_with_config(folder_cfg(make_cfg, root, "stage=embed", "data.n_test_per_class=2", "data.channels=3"))
    assert load_embeddings(tmp_path / "run").dim == 192


def test_colour_folder_stays_rgb(make_cfg, tmp_path):
    ds = load_dataset(folder_cfg(make_cfg, image_folder(tmp_path / "imgs", 4, mode="RGB"), "data.n_test_per_class=1").data)
    assert ds.native_size == (3, 8, 8) and ds.train.samples[0].shape == (8, 8, 3)


def test_16_bit_png_is_scaled_not_clipped(make_cfg, tmp_path):
    root = tmp_path / "imgs"
    for name, value in (("a", 1000), ("b", 40000)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4), value + i, dtype=np.uint16)).save(root / name / f"{i}.png")
    assert Image.open(root / "a" / "0.png").mode.startswith("I")
    ds = load_dataset(folder_cfg(make_cfg, root, "data.n_test_per_class=1").data)
    values = {int(img[0, 0]) for img in ds.train.samples}
    assert values == {round(1000 / 65535 * 255), round(40000 / 65535 * 255)}  # 4 and 156, not 255 and 255
    assert ds.native_size == (1, 4, 4)


def test_mixed_sizes_use_the_most_common_or_the_declared_size(make_cfg, tmp_path, caplog):
    root = image_folder(tmp_path / "imgs", per_class=6, sizes=[(8, 8), (8, 8), (12, 10)])
    with caplog.at_level(logging.WARNING, logger="recon_lightning.data"):
        ds = load_dataset(folder_cfg(make_cfg, root, "data.n_test_per_class=0").data)
    assert ds.native_size == (1, 8, 8)
    assert "2 different sizes" in caplog.text and "8x8" in caplog.text
    ds = load_dataset(folder_cfg(make_cfg, root, "data.n_test_per_class=0", "data.image_size=[6,5]").data)
    assert ds.native_size == (1, 6, 5)


def test_non_utf8_text_is_an_error_line(make_cfg, tmp_path):
    path = tmp_path / "mine.tsv"
    path.write_bytes("a\tfirst sentence\nb\tcaf\u00e9 in latin-1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"mine.tsv:2: not UTF-8 text .*save the file as UTF-8"):
        load_dataset(make_cfg("data=text", f"data.path={path}").data)


# ----------------------------------------------------------------------------- item 2: victim health


def collapsed_victim(folder: Path, dim: int) -> Path:
    """A victim whose first layer is dead: the same output (0) for every input, loss ln 2, margins 0."""
    from recon_lightning.victim import VictimMLP, save_victim

    model = VictimMLP(dim, [16], 2, bias=[True, False], init_scale=[1e-3, 1e-3])
    with torch.no_grad():
        model.layers[0].weight.zero_()
        model.layers[0].bias.fill_(-1.0)
    save_victim(folder, model, {"loss": "bce", "weight_decay": 0.0, "n_train": 100})
    return folder


def test_undertrained_victim_stops_with_the_fixes_unless_allowed(make_cfg, tmp_path):
    from recon_lightning.errors import UnhealthyVictimError
    from recon_lightning.storage import load_json

    args = ["stage=classifier", *TINY_VICTIM, "trainer.max_epochs=1"]
    with pytest.raises(UnhealthyVictimError, match=r"on the wrong side.*embed.normalize=l2.*classifier.allow_unhealthy=true"):
        main_with_config(make_cfg(*args))
    assert not (tmp_path / "run/classifier/DONE.json").exists()  # not a finished stage: a rerun trains again
    summary = main_with_config(make_cfg(*args, "classifier.allow_unhealthy=true"))
    assert summary["classifier"]["train_acc"] < 1.0
    assert load_json(tmp_path / "run/classifier/victim.json")["health"]["misclassified"] > 0


@pytest.mark.slow
def test_collapsed_victim_from_victim_dir_is_refused_at_the_start(make_cfg, tmp_path):
    main_with_config(make_cfg("stage=embed"))
    victim = collapsed_victim(tmp_path / "victim", 64)
    proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", "stage=reconstruct", f"reconstruct.victim_dir={victim}",
                           f"run_dir={tmp_path / 'run'}", "logger.name=none"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: the victim in" in proc.stderr and "collapsed to a constant output" in proc.stderr
    assert "embed.normalize=l2" in proc.stderr and not (tmp_path / "run/reconstruct").exists()

    from recon_lightning.victim import check_given_victim, load_victim

    cfg = make_cfg(f"reconstruct.victim_dir={victim}", "classifier.allow_unhealthy=true")
    health = check_given_victim(cfg, load_victim(victim)[0])  # the override: a warning, no error
    assert health["collapsed"] and health["train_acc"] == 0.5


# ----------------------------------------------------------------------------- item 8: log noise


@pytest.mark.slow
def test_faiss_import_logs_no_module_not_found(tmp_path):
    code = ("import logging; logging.basicConfig(level=logging.DEBUG)\n"
            "from recon_lightning.select import _faiss; _faiss()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "ModuleNotFoundError" not in proc.stderr and "AVX" not in proc.stderr


def test_folder_images_embed_without_numpy_not_writable_warning(make_cfg, tmp_path):
    import warnings

    from recon_lightning.backbones import IdentityBackbone

    ds = load_dataset(folder_cfg(make_cfg, image_folder(tmp_path / "imgs", 3, mode="RGB"), "data.n_test_per_class=1").data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        IdentityBackbone(ds.native_size).to_pixels(ds.train.samples)
    assert not [w for w in caught if "not writable" in str(w.message)]


# ----------------------------------------------------------------------------- items 2, 5, 6: the report


@pytest.mark.slow
def test_report_shows_victim_accuracy_first_and_who_matches_whom(tmp_path, monkeypatch):
    from test_evaluate import make_run_dir

    from recon_lightning import evaluate as ev
    from recon_lightning import report as rp
    from recon_lightning.victim import VictimMLP, save_victim

    run = make_run_dir(tmp_path)
    save_victim(tmp_path / "classifier", VictimMLP(64, [16], 2),
                {"n_train": 12, "metrics": {"train_acc": 1.0, "test_acc": 0.75, "train_margin_min": 0.5}})
    captions = {}
    real_grid = rp.image_pair_grid
    monkeypatch.setattr(rp, "image_pair_grid", lambda path, a, b, caps, title, **kw: captions.setdefault(path.stem, caps)
                        and real_grid(path, a, b, caps, title, **kw))
    report = ev.build_report(tmp_path, shipped(ev.EvalConfig, "evaluate/default", kkt_steps=0))
    assert report["victim"]["train_acc"] == 1.0 and report["summary"]["victim_test_acc"] == 0.75
    page = rp.render_html(report)
    assert page.index("Victim: train accuracy <b>1</b>, test accuracy <b>0.75</b>") < page.index("<h2>Summary</h2>")
    per = report["reconstruction"]["per_sample"]
    for i in run["copies"]:  # exact copies: a candidate of the same class
        assert per[i]["label_agrees"] and per[i]["best_cosine"] > 0.999
    for p in per:  # 'shared by' counts the training samples that have the same best candidate
        assert p["best_candidate_shared_by"] == sum(q["best_candidate"] == p["best_candidate"] for q in per)
    assert any(p["best_candidate_shared_by"] > 1 for p in per)  # the repetition the grid now points out
    assert report["reconstruction"]["distinct_best_candidates"] == len({p["best_candidate"] for p in per})
    first = per[int(torch.tensor([p["best_cosine"] for p in per]).argmax())]
    assert captions["best_matches"][0].startswith(
        f"train {first['train_index']} <- cand {first['best_candidate']}, best for {first['best_candidate_shared_by']}")
    assert all("label_agrees" in r for r in report["selection"]["representatives"])


def test_user_tsv_inverted_with_bundled_corpus_says_so_in_the_report(make_cfg, tmp_path, monkeypatch):
    import shutil

    from test_invert import TinyText, write_run

    from recon_lightning import evaluate as ev
    from recon_lightning import invert
    from recon_lightning import report as rp
    from recon_lightning.storage import load_json

    own = tmp_path / "my_corpus.txt"
    own.write_text("the cat sat on the mat\nmarkets fell on monday\n")
    run_dir = tmp_path / "run"
    write_run(run_dir, TinyText().embed(["the cat sat on the mat"]), {"modality": "text", "data": {"path": "/data/mine.tsv"}})
    monkeypatch.setattr(invert, "build_backbone", lambda cfg, input_size=None: TinyText())
    invert.run_stage(make_cfg(), run_dir)
    record = load_json(run_dir / "invert" / "text_corpus.json")
    assert record["bundled"] and "invert.text_corpus" in record["note"] and "/data/mine.tsv" in record["note"]
    invert.run_stage(make_cfg(f"invert.text_corpus={own}"), run_dir)
    assert load_json(run_dir / "invert" / "text_corpus.json") == {"path": str(own), "size": 2, "bundled": False}
    shutil.rmtree(run_dir / "embed")  # the attacker's view: the report still names the corpus
    page = rp.render_html(ev.build_report(run_dir, shipped(ev.EvalConfig, "evaluate/default")))
    assert f"Corpus searched: <code>{own}</code> (2 sentences)" in page
