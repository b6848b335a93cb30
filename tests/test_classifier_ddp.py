"""The victim trained with DDP on 2 CPU processes (gloo) equals the single-process victim:
full-batch gradients averaged over two equal halves are the full-batch gradient."""

import subprocess
import sys

import torch

from recon_lightning.embed import load_embeddings
from recon_lightning.victim import load_victim

ARGS = ["stage=classifier", "trainer.max_epochs=100", "classifier.hidden=[64]", "classifier.bias=[true,false]",
        "classifier.init_scale=[1e-3,1e-3]", "data.n_per_class=20", "data.n_test_per_class=10",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def fit(run_dir, *extra):
    proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", f"run_dir={run_dir}", *ARGS, *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_processes_matches_single_process(tmp_path):
    fit(tmp_path / "single")
    fit(tmp_path / "ddp", "trainer.devices=2", "trainer.strategy=ddp")
    single, _ = load_victim(tmp_path / "single/classifier")
    ddp, spec = load_victim(tmp_path / "ddp/classifier")
    x = load_embeddings(tmp_path / "single").train_x
    assert spec["metrics"]["train_acc"] == 1.0
    torch.testing.assert_close(ddp(x), single(x), rtol=1e-3, atol=1e-4)
