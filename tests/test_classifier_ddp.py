"""The victim trained with DDP on 2 CPU processes (gloo) equals the single-process victim: every rank
takes the whole (full) batch, so the averaged gradient is the full-batch gradient, also for an odd number
of training samples (a DistributedSampler would split the batch and pad it with a duplicate).

And a SIGUSR1 in the middle of DDP training (SLURM's warning before a time limit) never deadlocks the ranks: here it
reaches only rank 1, while both ranks step through their gradient all-reduces; they agree at the next step, save one
checkpoint together and stop, and the resumed job ends with the victim of an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recon_lightning.embed import load_embeddings
from recon_lightning.victim import load_victim

pytestmark = pytest.mark.slow  # every test here starts python processes or runs whole stages

# 3 classes x 7 = 21 training samples: not divisible by the 2 ranks. 1500 epochs in Lightning steps of 100 (the logging
# and checkpoint cadence): long enough for a signal to land mid-training.
ARGS = ["stage=classifier", "trainer.max_epochs=1500", "classifier.lr=0.5",  # (cosine-decayed: DDP sets the lr per step too)
        "classifier.hidden=[64]", "classifier.bias=[true,false]", "classifier.log_every_n_epochs=100",
        "classifier.checkpoint_every_n_epochs=100",
        "classifier.init_scale=[1e-3,1e-3]", "data.classes=[3,5,8]", "data.n_per_class=7", "data.n_test_per_class=5",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger.name=none"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a thread per process: OpenMP threads that spin on shared cores are 30x slower


def fit_cmd(run_dir, *extra):
    return [sys.executable, "-m", "recon_lightning.fit", f"run_dir={run_dir}", *ARGS, *extra]


def fit(run_dir, *extra):
    proc = subprocess.run(fit_cmd(run_dir, *extra), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def victims(tmp_path_factory):
    """The single-process and the uninterrupted DDP victim (their run dirs)."""
    base = tmp_path_factory.mktemp("victims")
    fit(base / "single")
    out = fit(base / "ddp", *DDP)
    # two processes really ran (Lightning's DDP set-up message names both members)
    assert "MEMBER: 1/2" in out and "MEMBER: 2/2" in out, out[-3000:]
    return base / "single", base / "ddp"


def test_ddp_two_processes_matches_single_process_with_odd_n(victims):
    single_dir, ddp_dir = victims
    single, _ = load_victim(single_dir / "classifier")
    ddp, spec = load_victim(ddp_dir / "classifier")
    x = load_embeddings(single_dir).train_x
    assert len(x) == 21 and spec["n_train"] == 21
    torch.testing.assert_close(ddp(x), single(x), rtol=1e-3, atol=1e-4)
    # and they are not trivially equal: the victim moved away from its initialisation
    assert spec["metrics"]["train_acc"] > 0.9
    # the initial parameters, written by rank 0 alone, are the single process's
    from recon_lightning.victim import load_initial_parameters

    ddp_init, single_init = load_initial_parameters(ddp_dir / "classifier"), load_initial_parameters(single_dir / "classifier")
    assert set(ddp_init) == set(single_init) and all(torch.equal(ddp_init[k], single_init[k]) for k in single_init)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_sigusr1_to_one_rank_mid_training_stops_both_at_one_step_and_the_job_resumes(victims, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(fit_cmd(run_dir, *DDP), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.time() + 300  # until the first checkpoint (epoch 100): both ranks are training
        while time.time() < deadline and proc.poll() is None and not (run_dir / "classifier/checkpoints/last.ckpt").is_file():
            time.sleep(0.05)
        (rank1,) = children(proc.pid)  # Lightning's launcher started rank 1 from rank 0
        sent = time.time()
        os.kill(rank1, signal.SIGUSR1)  # rank 1 only: rank 0 learns it at the next step's agreement
        out = proc.communicate(timeout=120)[0]
        stopped_after = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out[-3000:]  # stopped with its work saved: run it again to resume
    assert stopped_after < 60, stopped_after
    ckpt = run_dir / "classifier/checkpoints/hpc_ckpt_1.ckpt"
    rank_lines = [[line for line in out.splitlines() if line.startswith(f"interrupted (rank {rank})")] for rank in (0, 1)]
    assert [len(lines) for lines in rank_lines] == [1, 1], out[-3000:]  # each rank's line whole, on a line of its own
    (rank0_line,), (rank1_line,) = rank_lines
    assert "another rank received SIGUSR1" in rank0_line and "SIGUSR1 received" in rank1_line
    step = int(rank0_line.split("stopped at step ")[1].split(",")[0])
    assert f"stopped at step {step}, its checkpoint saved to {ckpt}" in rank1_line  # the same step on both ranks
    assert 0 < step < 1500 and ckpt.is_file()
    assert not (run_dir / "classifier/DONE.json").exists()

    out = fit(run_dir, *DDP)  # the same command again
    assert f"Restored all states from the checkpoint at {ckpt}" in out
    resumed, _ = load_victim(run_dir / "classifier")
    uninterrupted, _ = load_victim(victims[1] / "classifier")
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-7)
