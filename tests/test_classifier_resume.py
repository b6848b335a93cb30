"""A victim training killed with SIGKILL resumes from its last Lightning checkpoint."""

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
