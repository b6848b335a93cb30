"""Hydra multirun through the shipped local launcher (hydra/launcher=local: submitit, one process per job), no cluster
needed: each job works in its own folder under the run dir, reusing the run dir's victim when it is up to date for the
job's config and training its own otherwise. (tests/test_slurm.py runs hydra/launcher=slurm, and a failing job.)"""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from recon_lightning.fit import main_with_config

REPO = Path(__file__).resolve().parent.parent
TINY = ["data.n_per_class=6", "data.n_test_per_class=2", "classifier.hidden=[16]", "classifier.bias=[true,false]",
        "classifier.init_scale=[1e-3,1e-3]", "trainer.max_epochs=200", "classifier.lr=0.15", "reconstruct.num_runs=1",
        "reconstruct.runs_per_batch=1", "reconstruct.steps=10", "classifier.allow_unhealthy=true", "logger.name=none",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def test_local_launcher_jobs_get_their_own_folders_and_share_the_victim_when_it_fits(make_cfg, tmp_path):
    base = tmp_path / "run"
    main_with_config(make_cfg("stage=classifier", *TINY, run_dir=base))  # the shared victim
    victim = (base / "classifier" / "model.safetensors").read_bytes()
    # Job 0 keeps the victim's config (reuses it), job 1 changes the victim's learning rate (trains its own).
    cmd = [sys.executable, "-m", "recon_lightning.fit", "-m", "hydra/launcher=local", f"run_dir={base}",
           "stage=reconstruct", *TINY, "classifier.lr=0.15,0.3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (base / "multirun").iterdir()
    first, second = sweep_dir / "0", sweep_dir / "1"
    for job, lr in ((first, 0.15), (second, 0.3)):
        assert (job / "reconstruct" / "DONE.json").is_file()
        assert f"classifier.lr={lr}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    assert not (first / "classifier").exists() and not (first / "embed").exists()
    assert f"multirun job 0: run_dir {first}, reusing the victim and embeddings of {base}" in (first / "fit.log").read_text()
    assert (second / "classifier" / "model.safetensors").read_bytes() != victim  # its own victim, in its folder
    assert "its own victim" in (second / "fit.log").read_text()
    assert (base / "classifier" / "model.safetensors").read_bytes() == victim  # the base run dir is untouched
    assert not (base / "reconstruct").exists()
