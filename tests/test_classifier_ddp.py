"""The victim trained with DDP on 2 CPU processes (gloo) equals the single-process victim: every rank
takes the whole (full) batch, so the averaged gradient is the full-batch gradient, also for an odd number
of training samples (a DistributedSampler would split the batch and pad it with a duplicate)."""

import subprocess
import sys

import pytest
import torch

from recon_lightning.embed import load_embeddings
from recon_lightning.victim import load_victim

pytestmark = pytest.mark.slow  # every test here starts python processes or runs whole stages

# 3 classes x 7 = 21 training samples: not divisible by the 2 ranks.
ARGS = ["stage=classifier", "trainer.max_epochs=100", "classifier.lr=0.5",  # (cosine-decayed: DDP sets the lr per step too)
        "classifier.hidden=[64]", "classifier.bias=[true,false]",
        "classifier.init_scale=[1e-3,1e-3]", "data.classes=[3,5,8]", "data.n_per_class=7", "data.n_test_per_class=5",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger.name=none"]


def fit(run_dir, *extra):
    proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", f"run_dir={run_dir}", *ARGS, *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_ddp_two_processes_matches_single_process_with_odd_n(tmp_path):
    fit(tmp_path / "single")
    out = fit(tmp_path / "ddp", "trainer.devices=2", "trainer.strategy=ddp")
    # two processes really ran (Lightning's DDP set-up message names both members)
    assert "MEMBER: 1/2" in out and "MEMBER: 2/2" in out, out[-3000:]
    single, _ = load_victim(tmp_path / "single/classifier")
    ddp, spec = load_victim(tmp_path / "ddp/classifier")
    x = load_embeddings(tmp_path / "single").train_x
    assert len(x) == 21 and spec["n_train"] == 21
    torch.testing.assert_close(ddp(x), single(x), rtol=1e-3, atol=1e-4)
    # and they are not trivially equal: the victim moved away from its initialisation
    assert spec["metrics"]["train_acc"] > 0.9
