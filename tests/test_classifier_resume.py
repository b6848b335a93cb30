"""Resuming the victim: a training killed with SIGKILL resumes from its last Lightning checkpoint; damaged checkpoints are skipped."""

import os
import signal
import subprocess
import sys
import time

from recon_lightning.storage import load_json


def test_killed_classifier_resumes_from_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "recon_lightning.fit", "stage=classifier", f"run_dir={run_dir}",
           "trainer.max_epochs=1000", "classifier.checkpoint_every_n_epochs=50", "trainer.enable_progress_bar=false",
           "classifier.hidden=[64]", "classifier.bias=[true,false]", "classifier.init_scale=[1e-3,null]",
           "data.n_per_class=20", "data.n_test_per_class=10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = run_dir / "classifier/checkpoints/last.ckpt"
    deadline = time.time() + 240
    while not ckpt.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert ckpt.is_file(), "no checkpoint was written"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "classifier/DONE.json").exists()

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    assert load_json(run_dir / "classifier/DONE.json")["summary"]["train_acc"] == 1.0


def test_damaged_checkpoint_is_skipped_for_the_newest_valid_one(tmp_path):
    """A kill while Lightning writes last.ckpt leaves a truncated file: resume from the next valid
    checkpoint (here a SLURM pre-emption checkpoint), or start over, never crash on it."""
    import torch

    from recon_lightning.training import checkpoint_dir, checkpointing

    folder = checkpoint_dir(tmp_path, "reconstruct", "runs_00000-00001_abc")
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "hpc_ckpt_1.ckpt")
    good = (folder / "hpc_ckpt_1.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(good[: len(good) // 2])  # newer, but cut off mid-write
    assert checkpointing(tmp_path, "reconstruct", 10, name="runs_00000-00001_abc")[1] == str(folder / "hpc_ckpt_1.ckpt")
    (folder / "hpc_ckpt_1.ckpt").unlink()
    assert checkpointing(tmp_path, "reconstruct", 10, name="runs_00000-00001_abc")[1] is None
    (folder / "last.ckpt").write_bytes(good)
    assert checkpointing(tmp_path, "reconstruct", 10, name="runs_00000-00001_abc")[1] == str(folder / "last.ckpt")
