"""W&B logging (offline) in every stage: one W&B run per stage carrying that stage's metrics, also when a
rank runs several reconstruction / inversion batches; sweep-agent trials each get their own run_dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wandb_records import logged_keys, offline_runs

ARGS = ["backbone=dino_vits16", "backbone.model=test_vit", "backbone.pretrained=false", "data=skimage",
        "data.n_per_class=4", "data.n_test_per_class=2", "classifier.hidden=[16]", "classifier.bias=[true,false]",
        "classifier.init_scale=[1e-3,1e-3]", "trainer.max_epochs=20", "reconstruct.steps=5", "reconstruct.log_every_n_steps=1",
        "select.num_representatives=3", "invert.num_images=2", "invert.steps=3", "invert.log_every_n_steps=1", "+trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger.name=wandb", "classifier.allow_unhealthy=true"]


def env(tmp_path: Path, **extra: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**clean, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), **extra}


def fit(run_dir: Path, *extra: str, environ: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recon_lightning.fit", f"run_dir={run_dir}", *extra],
                          capture_output=True, text=True, timeout=600, env=environ)


@pytest.mark.slow
def test_every_stage_logs_one_wandb_run_with_several_batches_per_rank(tmp_path):
    run_dir = tmp_path / "run"
    # Two reconstruction batches and two inversion batches on one rank: the stage's W&B run must survive both.
    proc = fit(run_dir, *ARGS, "reconstruct.num_runs=2", "reconstruct.runs_per_batch=1", "invert.batch_size=1",
               environ=env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = offline_runs(run_dir / "wandb")
    # embed and select log nothing; each other stage has exactly one run, grouped by run_dir
    assert sorted(runs) == ["run-classifier", "run-evaluate", "run-invert", "run-reconstruct"]
    assert {r["group"] for r in runs.values()} == {"run"}
    assert {"train/loss", "train/acc", "trainer/global_step"} <= logged_keys(runs["run-classifier"])  # x axis: epochs
    rec = runs["run-reconstruct"]
    assert {"kkt_rel_median", "run_final_loss", "run_recon_score", "recon_score", "runs_ok"} <= logged_keys(rec)
    assert sorted(row["run"] for row in rec["history"] if "run_final_loss" in row) == [0, 1]  # both batches
    assert [row["runs_ok"] for row in rec["history"] if "runs_ok" in row] == [2]
    inv = runs["run-invert"]
    assert "cos" in logged_keys(inv)
    # 3 steps per batch, logged every step, in both batches
    assert len([row for row in inv["history"] if "cos" in row]) == 6
    ev = runs["run-evaluate"]
    assert {"evaluate/num_representatives", "evaluate/best_cosine_mean"} <= logged_keys(ev)
    assert any(name.startswith("selection_table") for name in ev["media"])
    assert any(name.endswith(".png") for name in ev["media"])


def test_wandb_mode_auto_is_offline_except_under_a_sweep_agent(monkeypatch):
    from recon_lightning.fit import load_config
    from recon_lightning.training import wandb_mode

    cfg = load_config(["logger.name=wandb"])
    for var in ("WANDB_SWEEP_ID", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")  # a trial started by `wandb agent`: it reports to the server
    assert wandb_mode(cfg) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # ... unless the agent's environment says otherwise
    assert wandb_mode(cfg) == "offline"
    assert wandb_mode(load_config(["logger.wandb.mode=online"])) == "online"  # an explicit mode always wins
