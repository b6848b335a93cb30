"""Auditing heads trained elsewhere: the Python API end to end without a training set (a raw-pixel head and an
embedding head), and training embeddings that are not the victim's named as such."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from recon_lightning import audit
from recon_lightning.errors import DataError
from recon_lightning.fit import main_with_config
from recon_lightning.import_victim import import_victim
from recon_lightning.victim import check_given_victim, load_victim

FAST = ["reconstruct.num_runs=2", "reconstruct.runs_per_batch=2", "reconstruct.steps=20", "select.num_representatives=6",
        "invert.num_images=3", "logger.name=csv", "trainer.enable_progress_bar=false"]
TINY_VIT = ["backbone.model=test_vit", "backbone.pretrained=false", "invert.steps=3", "invert.batch_size=3",
            "invert.augment.copies=1", "trainer.accelerator=cpu"]


def mlp(d_in: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, 1))


def finished(run_dir, stages=("reconstruct", "select", "invert", "evaluate")) -> bool:
    return all((run_dir / s / "DONE.json").is_file() for s in stages)


@pytest.mark.slow
def test_a_raw_pixel_head_runs_every_stage_without_a_training_set(tmp_path):
    result = audit(mlp(64), tmp_path / "run", backbone="identity", input_size=(1, 8, 8), n_train=20, overrides=FAST)
    run_dir = tmp_path / "run"
    assert finished(run_dir) and not (run_dir / "embed").exists()
    assert result["summary"] == json.loads((run_dir / "report.json").read_text())["summary"]
    assert result["summary"]["num_representatives"] == 6 and "leak_rate" not in result["summary"]  # the attacker's view
    assert len(list(result["paths"]["inversions"].glob("*.png"))) == 3
    assert result["stages"]["reconstruct"]["prior"] == "box"  # raw pixels, from the recorded embedding space


@pytest.mark.slow
def test_an_imported_embedding_head_runs_every_stage_without_a_training_set(tmp_path):
    save_file(mlp(64, seed=1).state_dict(), str(tmp_path / "head.safetensors"))  # on the 64-d test ViT's embeddings
    victim = import_victim(tmp_path / "head.safetensors", tmp_path / "victim", n_train=12, backbone="dino_vits16",
                           normalize="l2")
    result = audit(victim, tmp_path / "run", overrides=[*FAST, *TINY_VIT])
    assert finished(tmp_path / "run")
    assert result["config"]["backbone"]["name"] == "dino_vits16"  # the backbone victim.json records
    assert result["stages"]["reconstruct"]["prior"] == "sphere"  # l2-normalised embeddings, from victim.json
    assert result["stages"]["invert"]["n"] == 3


@pytest.fixture
def digits_run(make_cfg, tmp_path):
    """A run folder whose embed/ holds 20 training digits (raw pixels)."""
    main_with_config(make_cfg("stage=embed", "backbone=identity", "data.n_per_class=10", "data.n_test_per_class=2"))
    return tmp_path / "run"


def check_with_digits(make_cfg, tmp_path, head: nn.Module, n_train: int, digits_run) -> None:
    """Import the raw-pixel ``head`` and check it against the digits of ``digits_run`` as its training set."""
    victim = import_victim(head, tmp_path / "victim", n_train=n_train, backbone="identity", input_size=(1, 8, 8))
    cfg = make_cfg(f"reconstruct.victim_dir={victim}", f"reconstruct.embeddings_dir={digits_run}")
    check_given_victim(cfg, load_victim(victim)[0])


def test_embeddings_of_another_size_of_training_set_are_named_not_the_victim(make_cfg, tmp_path, digits_run):
    with pytest.raises(DataError, match=r"training embeddings in .* are not the training set of this victim: they hold "
                                        r"20 training samples, the victim was trained on 100"):
        check_with_digits(make_cfg, tmp_path, mlp(64), 100, digits_run)


def test_samples_on_the_victims_wrong_side_are_named_as_the_wrong_training_set(make_cfg, tmp_path, digits_run):
    from recon_lightning.embed import load_embeddings

    emb = load_embeddings(digits_run)
    head = mlp(64)  # trained on these digits, then its output negated: a head of the same shape for other data
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(head(emb.train_x).squeeze(-1), emb.train_y.float()).backward()
        opt.step()
    with torch.no_grad():
        head[2].weight.neg_()
        head[2].bias.neg_()
        wrong = int(((head(emb.train_x).squeeze(-1) > 0).long() != emb.train_y).sum())
    assert wrong > 10
    with pytest.raises(DataError, match=rf"do not look like the training set of the victim.*{wrong} of 20 "
                                        r"training samples are on the wrong side"):
        check_with_digits(make_cfg, tmp_path, head, 20, digits_run)


def test_an_embed_folder_given_as_embeddings_dir_names_the_run_folder(make_cfg, tmp_path, digits_run):
    from recon_lightning.reconstruct import check_config

    victim = import_victim(mlp(64), tmp_path / "victim", n_train=20, backbone="identity", input_size=(1, 8, 8))
    cfg = make_cfg(f"reconstruct.victim_dir={victim}", f"reconstruct.embeddings_dir={digits_run / 'embed'}")
    with pytest.raises(DataError, match=rf"is an embed/ folder itself: give the run folder that holds it, {digits_run}\)"):
        check_config(cfg)


def test_the_console_script_is_the_command_line():
    import tomllib
    from importlib import import_module
    from pathlib import Path

    from recon_lightning import fit

    scripts = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    module, name = scripts["recon-lightning"].split(":")
    assert getattr(import_module(module), name) is fit.main


@pytest.mark.slow
def test_a_given_training_set_makes_the_report_evaluate_the_imported_head(make_cfg, tmp_path, digits_run):
    """reconstruct.victim_dir + reconstruct.embeddings_dir: the evaluation reads the victim and the training set from
    those folders (run_dir has neither classifier/ nor embed/) and reports the null-controlled figures."""
    from recon_lightning.embed import load_embeddings

    emb = load_embeddings(digits_run)
    head = mlp(64, seed=2)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):  # fit the 20 digits: every one on the right side
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(head(emb.train_x).squeeze(1), emb.train_y.float()).backward()
        opt.step()
    victim = import_victim(head, tmp_path / "victim", n_train=20, backbone="identity", input_size=(1, 8, 8))
    out = tmp_path / "audit"
    main_with_config(make_cfg(f"reconstruct.victim_dir={victim}", f"reconstruct.embeddings_dir={digits_run}",
                              "stage=[reconstruct,select,evaluate]", "select.score=cluster", *FAST, run_dir=out))
    report = json.loads((out / "report.json").read_text())
    assert not (out / "embed").exists() and not (out / "classifier").exists()
    assert report["mode"] == "evaluation" and report["reconstruction"]["num_train"] == 20
    assert report["membership"]["victim_frame"]["num_members"] == 20 and report["victim"]["n_train"] == 20
    assert report["margin"]["available"] and "membership_auc" in report["summary"]
