"""Reliability of the command line and the run files: what a refused job leaves alone, which checkpoints are read,
what the logs say, which threads are used, how stale outputs are listed and pruned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
FIT = [sys.executable, "-m", "recon_lightning.fit", "trainer.accelerator=cpu", "logger.name=none"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_a_refused_job_leaves_the_recorded_config_of_the_running_one(tmp_path):
    from recon_lightning.storage import run_dir_lock

    run_dir = tmp_path / "run"
    first = subprocess.run([*FIT, f"run_dir={run_dir}", "stage=embed", "seed=1"], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    recorded = {name: (run_dir / ".hydra" / name).read_text() for name in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    assert yaml.safe_load(recorded["config.yaml"])["seed"] == 1
    assert "seed=1" in yaml.safe_load(recorded["overrides.yaml"])
    with run_dir_lock(run_dir):  # another job holds the run_dir
        refused = subprocess.run([*FIT, f"run_dir={run_dir}", "stage=embed", "seed=2"], env=ENV, capture_output=True,
                                 text=True, timeout=300)
    assert refused.returncode == 2 and "is in use by another job" in refused.stderr, refused.stderr[-2000:]
    assert {name: (run_dir / ".hydra" / name).read_text() for name in recorded} == recorded


class _Touch:
    """Pickled code: unpickling it (without weights_only) would create the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["zip_with_code", "raw_pickle", "truncated"])
def test_a_checkpoint_holding_code_or_damaged_is_ignored_with_a_warning(tmp_path, caplog, kind):
    import pickle

    from recon_lightning.training import checkpointing

    marker = tmp_path / "executed"
    path = tmp_path / "run" / "classifier" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    if kind == "zip_with_code":
        torch.save({"global_step": 3, "payload": _Touch(marker)}, path)
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps({"payload": _Touch(marker)}))
    else:
        torch.save({"global_step": 3, "w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level("WARNING"):
        _, resume_from = checkpointing(tmp_path / "run", "classifier", every_n_steps=10)
    assert resume_from is None
    assert f"ignoring damaged checkpoint {path}" in caplog.text
    assert not marker.exists()  # nothing was executed


def test_a_checkpoint_of_tensors_is_resumed(tmp_path):
    from recon_lightning.training import checkpointing

    path = tmp_path / "run" / "classifier" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, path)
    assert checkpointing(tmp_path / "run", "classifier", every_n_steps=10)[1] == str(path)
