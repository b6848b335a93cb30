"""The SLURM scripts as shipped, under a real Slurm (a single-node CPU cluster: sweeps/slurm/local_cluster.sh, which
.ci/run starts), submitted with only the command-line options and environment their headers document:

* run_ddp.sbatch: one job, 2 ranks (gloo), every stage. A SIGUSR1 in the middle of the victim's DDP training
  (scancel --signal=USR1, as SLURM's --signal sends it: to every rank) stops both ranks at the same step with one
  checkpoint, the script requeues the job within seconds, and the requeued job resumes and ends with the report and the
  victim of an uninterrupted run;
* run_ddp.sbatch hitting its time limit: once the victim trains, the test lowers the job's limit to a minute or two
  (scontrol update TimeLimit, as an administrator may), so SLURM sends the script's own SIGUSR1@90 at its next
  time-limit check; the job checkpoints, requeues, gets its limit back while it waits, and ends with the victim of an
  uninterrupted run;
* offline_sweep_array.sbatch as an array of 2 tasks after the first job (--dependency=afterok): each trial runs once, in
  the task of its shard; a diverged trial is a result, so both tasks end COMPLETED with exit code 0 and a job chained
  after the array (afterok) runs;
* Hydra's Slurm launcher (hydra/launcher=slurm): each job of a multirun in its own folder reusing the first job's
  victim, and a job that fails fails the multirun with its error instead of leaving the launcher waiting.

All jobs are submitted at once (the cluster's CPUs permitting) so that their waits overlap. Skipped, with the reason,
where no Slurm controller answers, or where it is not local_cluster.sh's (unless RECON_SLURM_TESTS=1: a real cluster
whose nodes share this machine's temporary folder); .ci/run starts one and sets RECON_EXPECT_SLURM=1, which turns the
skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from recon_lightning.fit import main_with_config
from recon_lightning.victim import load_victim

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "sweeps" / "slurm"


def slurm_reachable() -> str | None:
    """None when a Slurm controller answers, else why not."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "sbatch / scontrol are not installed"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines() or ["nothing"]
        return f"no Slurm controller answers (scontrol ping: {said[-1][:200]})"
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=15).stdout
    cluster = (re.findall(r"^ClusterName\s*=\s*(\S+)", config, flags=re.M) or ["?"])[0]
    if cluster != "recon-local" and os.environ.get("RECON_SLURM_TESTS") != "1":
        # A real cluster: its nodes may not share this machine's /tmp, and nobody asked to submit test jobs to it.
        return f"the Slurm here is cluster {cluster!r}, not local_cluster.sh's (set RECON_SLURM_TESTS=1 to use it)"
    return None


WHY_NOT = slurm_reachable()
if WHY_NOT and os.environ.get("RECON_EXPECT_SLURM") == "1":
    raise RuntimeError(f"RECON_EXPECT_SLURM=1 but {WHY_NOT}")  # CI started a cluster: these tests must run
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"{WHY_NOT}: start one with "
                                                           "`sudo sweeps/slurm/local_cluster.sh start` (.ci/run does)")

# A tiny run of every stage (as tests/test_pipeline.py shrinks it). The victim trains 2000 full-batch epochs in steps of
# 100 (logging and checkpoint cadence), long enough for a signal to land mid-training.
TINY = ["data.n_per_class=10", "data.n_test_per_class=5", "classifier.hidden=[32]", "classifier.bias=[true,false]",
        "classifier.init_scale=[1e-3,1e-3]", "trainer.max_epochs=2000", "classifier.log_every_n_epochs=100",
        "classifier.checkpoint_every_n_epochs=100", "reconstruct.num_runs=2", "reconstruct.runs_per_batch=1",
        "reconstruct.steps=20", "select.num_representatives=8", "invert.num_images=4", "evaluate.kkt_steps=0",
        "classifier.allow_unhealthy=true", "trainer.enable_progress_bar=false"]
# The time-limited job: the victim alone, 1 rank, training long enough that the warning lands while it trains
# (slurmctld checks time limits every 30 s: up to 30 s after the limit is lowered). A Lightning step per epoch, each
# with its validation and log row (~8 ms), makes that ~50 s of training; the uninterrupted reference trains the same
# victim with the default cadence in ~1 s (cadence keys change no output).
LONG = ["stage=classifier", "data.n_per_class=10", "data.n_test_per_class=5", "classifier.hidden=[32]",
        "classifier.bias=[true,false]", "classifier.init_scale=[1e-3,1e-3]", "trainer.max_epochs=6000",
        "classifier.allow_unhealthy=true", "trainer.enable_progress_bar=false"]
SLOW = ["classifier.log_every_n_epochs=1", "classifier.checkpoint_every_n_epochs=500"]
CPU_TASKS = ["--nodes=1", "--cpus-per-task=1", "--gres=none"]  # run_ddp.sbatch's header: a CPU-only partition
TIMEOUT = 900  # seconds any one wait may take before the test fails (instead of hanging)


def sbatch(*args: str, env: dict | None = None) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict]:
    """``scontrol show job`` of a job (of each task, for an array), as dicts."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]


def active(job_id: str) -> bool:
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return bool(proc.stdout.strip())


def wait_until(condition, what: str, timeout: float = TIMEOUT, poll: float = 0.2) -> float:
    """Poll ``condition`` until it holds; the seconds it took."""
    start = time.time()
    while not condition():
        assert time.time() - start < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(poll)
    return time.time() - start


def wait_done(job_id: str) -> list[dict]:
    wait_until(lambda: not active(job_id), f"job {job_id} to end", poll=1.0)
    return job_records(job_id)


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


class Jobs:
    """The jobs of this module, submitted together; what the tests do to them while they run (send a signal, lower a
    time limit) happens in background threads, so the jobs need not wait for the tests before them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.env = {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
        self.a_dir, self.c_dir = tmp / "ddp", tmp / "time_limit"
        self.a_out, self.c_out = tmp / "ddp.out", tmp / "time_limit.out"
        # The 2-rank job, end to end; SIGUSR1 once its victim trains.
        self.a = sbatch(*CPU_TASKS, "--ntasks-per-node=2", f"--output={self.a_out}", "sweeps/slurm/run_ddp.sbatch",
                        *TINY, env={**self.env, "RUN_DIR": str(self.a_dir)})
        # The job that will hit its time limit (lowered once its victim trains); the script's own --signal=SIGUSR1@90.
        self.c = sbatch(*CPU_TASKS, "--ntasks-per-node=1", "--time=10", f"--output={self.c_out}",
                        "sweeps/slurm/run_ddp.sbatch", *LONG, *SLOW, env={**self.env, "RUN_DIR": str(self.c_dir)})
        # The offline sweep as an array of 2 tasks on the first job's victim, once that job is done; a grid whose
        # first trial diverges (lr 1e30), the others are ordinary.
        sweep = yaml.safe_load((REPO / "sweeps" / "reconstruct.yaml").read_text())
        sweep["method"] = "grid"
        sweep["parameters"] = {"reconstruct.lr": {"values": [1.0e30, 0.01, 0.02, 0.005]},
                               **{k: {"value": v} for k, v in {"reconstruct.num_runs": 1, "reconstruct.runs_per_batch": 1,
                                                               "reconstruct.steps": 20, "logger.name": "none"}.items()}}
        self.sweep_file = tmp / "grid.yaml"
        self.sweep_file.write_text(yaml.safe_dump(sweep))
        self.b = sbatch("--array=0-1", "--gres=none", "--cpus-per-task=1", f"--dependency=afterok:{self.a}",
                        f"--output={tmp}/sweep-%a.out", "sweeps/slurm/offline_sweep_array.sbatch", "4",
                        env={**self.env, "RUN_DIR": str(self.a_dir), "SWEEP": str(self.sweep_file)})
        # A job chained after the array: it runs only if every task exited 0.
        self.chained = sbatch(f"--dependency=afterok:{self.b}", "--kill-on-invalid-dep=yes", f"--output={tmp}/chained.out",
                              "--wrap=echo chained")
        self.multirun: subprocess.Popen | None = None
        self.seen: dict = {}  # what the threads saw: {"a_requeue_s": ..., "c_limit": ...} or {"<name>_error": ...}
        self.threads = [threading.Thread(target=self._guard, args=(name, step), daemon=True)
                        for name, step in (("a", self._signal_a), ("c", self._limit_c))]
        for thread in self.threads:
            thread.start()

    def _guard(self, name: str, step) -> None:
        try:
            step()
        except BaseException as err:  # noqa: BLE001  (reported by the test that needs it)
            self.seen[f"{name}_error"] = err

    def _signal_a(self) -> None:
        """SIGUSR1 to every rank of the 2-rank job once its victim trains (as SLURM's --signal sends it); then, once it
        is done, the Hydra multirun on its victim."""
        first = self.a_dir / "classifier" / "checkpoints" / "last.ckpt"
        wait_until(lambda: first.is_file() or not active(self.a), "the 2-rank job's first victim checkpoint", poll=0.05)
        assert active(self.a), "the job ended before its victim's training could be interrupted"
        subprocess.run(["scancel", "--signal=USR1", self.a], check=True, timeout=60)
        self.seen["a_requeue_s"] = wait_until(lambda: "requeueing job" in text(self.a_out) or not active(self.a),
                                              "the ranks to stop and the job to requeue", timeout=300)
        self.start_multirun()

    def _limit_c(self) -> None:
        """Once the victim trains, lower the job's time limit to end 1-2 minutes from now (within the script's 90 s
        warning, which slurmctld then sends at its next check); once the job requeued, give it its limit back."""
        first = self.c_dir / "classifier" / "checkpoints" / "last.ckpt"
        wait_until(lambda: first.is_file() or not active(self.c), "the time-limited job's first victim checkpoint")
        assert active(self.c), "the job ended before its time limit could be lowered"
        (record,) = job_records(self.c)
        limit = seconds(record["RunTime"]) // 60 + 2
        subprocess.run(["scontrol", "update", f"JobId={self.c}", f"TimeLimit={limit}"], check=True, timeout=60)
        self.seen["c_limit"] = limit
        wait_until(lambda: "requeueing job" in text(self.c_out) or not active(self.c), "the warning and the requeue",
                   timeout=limit * 60 + 60)
        # (a requeued job waits ~10 s before it starts again: time to give it its limit back)
        subprocess.run(["scontrol", "update", f"JobId={self.c}", "TimeLimit=10"], check=True, timeout=60)

    def check(self, name: str) -> None:
        """Wait for thread ``name`` and re-raise what went wrong in it."""
        dict(a=self.threads[0], c=self.threads[1])[name].join(TIMEOUT)
        if f"{name}_error" in self.seen:
            raise self.seen[f"{name}_error"]

    def start_multirun(self) -> subprocess.Popen:
        """Hydra's Slurm launcher on the first job's run dir (its victim done): 2 reconstruct jobs, the second
        diverging (lr 1e30), the same data and victim config as the first job, so both reuse its victim."""
        if self.multirun is None:
            wait_done(self.a)
            cmd = [sys.executable, "-m", "recon_lightning.fit", "-m", "hydra/launcher=slurm", f"run_dir={self.a_dir}",
                   "stage=reconstruct", *TINY, "reconstruct.num_runs=1", "logger.name=none", "reconstruct.lr=0.01,1e30",
                   "hydra.launcher.timeout_min=10"]
            self.multirun = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **self.env}, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)
        return self.multirun

    def cancel(self) -> None:
        subprocess.run(["scancel", self.a, self.b, self.c, self.chained], capture_output=True, timeout=60)
        if self.multirun is not None and self.multirun.poll() is None:
            self.multirun.kill()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    submitted = Jobs(tmp_path_factory.mktemp("slurm"))
    yield submitted
    submitted.cancel()  # whatever a failed test left running


def reference_victim(make_cfg, tmp: Path, overrides: list[str]):
    """The same victim trained in this process, uninterrupted, without DDP (one process, one thread: the jobs share
    the cores, where OpenMP threads spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main_with_config(make_cfg("stage=classifier", *overrides, "trainer.accelerator=cpu", run_dir=tmp))
    finally:
        torch.set_num_threads(threads)
    return load_victim(tmp / "classifier")[0]


def seconds(duration: str) -> int:
    """SLURM's [days-]hours:minutes:seconds in seconds."""
    days, _, rest = duration.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def rank_lines(out: str, rank: int) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"interrupted (rank {rank})")]


def test_ddp_job_with_two_ranks_stops_on_sigusr1_mid_training_requeues_and_ends(jobs, make_cfg, tmp_path):
    reference = reference_victim(make_cfg, tmp_path / "reference", TINY)  # while the job runs
    jobs.check("a")
    assert jobs.seen["a_requeue_s"] < 60, f"{jobs.seen['a_requeue_s']:.0f} s from the signal to the requeue"
    (record,) = wait_done(jobs.a)
    out = text(jobs.a_out)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0" and record["Restarts"] == "1", (record, out[-3000:])
    # Both ranks stopped at the same step of the victim's training, with one checkpoint, seconds after the signal.
    (line0,), (line1,) = rank_lines(out, 0), rank_lines(out, 1)
    step = re.search(r"stopped at step (\d+), its checkpoint saved to (\S+?)\.", line0)
    assert step and f"stopped at step {step[1]}, its checkpoint saved to {step[2]}." in line1, (line0, line1)
    assert 0 < int(step[1]) < 2000 and Path(step[2]).parent == jobs.a_dir / "classifier" / "checkpoints"
    assert all(float(re.search(r"received ([\d.]+) s ago", line)[1]) < 30 for line in (line0, line1))
    assert "exit code 75" in out and f"requeueing job {jobs.a}" in out
    assert f"Restored all states from the checkpoint at {step[2]}" in out  # the requeued job resumed it
    assert f"job {jobs.a} (restart 1): 1 node(s) x 2 task(s)" in out
    # Every stage ran, and the report is there.
    report = json.loads((jobs.a_dir / "report.json").read_text())
    assert report["summary"]["num_train"] == 20
    for stage in ("embed", "classifier", "reconstruct", "select", "invert", "evaluate"):
        assert (jobs.a_dir / stage / "DONE.json").is_file(), stage
    # The victim is the one an uninterrupted single process trains (DDP over 2 ranks: the same full-batch gradient).
    victim, _ = load_victim(jobs.a_dir / "classifier")
    x = torch.randn(16, victim.input_dim)
    torch.testing.assert_close(victim(x), reference(x), rtol=1e-3, atol=1e-4)


def test_a_job_that_hits_its_time_limit_checkpoints_requeues_and_ends_as_uninterrupted(jobs, make_cfg, tmp_path):
    reference = reference_victim(make_cfg, tmp_path / "reference", LONG[1:])  # while the job runs
    jobs.check("c")
    (record,) = wait_done(jobs.c)
    out = text(jobs.c_out)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0" and record["Restarts"] == "1", (record, out[-3000:])
    (line,) = rank_lines(out, 0)
    stop = re.search(r"SIGUSR1 received [\d.]+ s ago; stopped at step (\d+), its checkpoint saved to (\S+?)\.", line)
    assert stop and 0 < int(stop[1]) < 6000 and Path(stop[2]).parent == jobs.c_dir / "classifier" / "checkpoints", line
    assert f"Restored all states from the checkpoint at {stop[2]}" in out and "DUE TO TIME LIMIT" not in out
    victim, _ = load_victim(jobs.c_dir / "classifier")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(victim.state_dict()[key], value, rtol=1e-5, atol=1e-7)


def test_offline_sweep_array_shares_the_trials_and_a_diverged_trial_is_a_result(jobs):
    tasks = wait_done(jobs.b)
    outs = [text(jobs.tmp / f"sweep-{i}.out") for i in range(2)]
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    for task in tasks:
        assert task["JobState"] == "COMPLETED" and task["ExitCode"] == "0:0", (task, outs)
    results = jobs.a_dir / "sweeps" / "grid"
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]  # each trial once
    assert [r["status"] for r in rows] == ["diverged", "ok", "ok", "ok"], rows
    assert "all 1 run(s) failed" in rows[0]["reason"] and all(r["metric"] > 0 for r in rows[1:])
    for i in range(4):  # trial i ran in array task i % 2 only
        assert f"[{i + 1}/4] " in outs[i % 2] and f"[{i + 1}/4] " not in outs[1 - i % 2]
    assert "2 trial(s): 1 ok, 1 diverged, 0 failed" in outs[0] and "2 trial(s): 2 ok, 0 diverged, 0 failed" in outs[1]
    # The job chained after the array (--dependency=afterok) ran: the array counted as a success.
    (chained,) = wait_done(jobs.chained)
    assert chained["JobState"] == "COMPLETED" and text(jobs.tmp / "chained.out").strip() == "chained"


def test_hydra_slurm_launcher_runs_each_job_in_its_own_folder_and_reports_a_failed_one(jobs):
    jobs.check("a")  # (it starts the multirun once the first job is done)
    proc = jobs.start_multirun()
    out, err = proc.communicate(timeout=TIMEOUT)  # a failed job must not leave the launcher waiting
    assert proc.returncode == 2, (out[-2000:], err[-3000:])
    assert "error: a multirun job failed" in err and "all 1 reconstruction runs failed" in err, err[-3000:]
    (sweep_dir,) = (jobs.a_dir / "multirun").iterdir()
    first, second = sweep_dir / "0", sweep_dir / "1"
    # Job 0 worked in its own folder, on the first job's victim and embeddings (no victim of its own).
    assert (first / "reconstruct" / "DONE.json").is_file()
    assert not (first / "classifier").exists() and not (first / "embed").exists()
    assert f"reusing the victim and embeddings of {jobs.a_dir}" in text(first / "fit.log")
    assert "reconstruct.lr=0.01" in yaml.safe_load((first / ".hydra" / "overrides.yaml").read_text())
    # Job 1 diverged: its run is recorded failed, the stage not done; the base run dir's own results are untouched.
    assert not (second / "reconstruct" / "DONE.json").exists() and (second / "reconstruct" / "runs").is_dir()
    assert "reconstruct.lr=1e+30" in yaml.safe_load((second / ".hydra" / "overrides.yaml").read_text())
    assert json.loads((jobs.a_dir / "reconstruct" / "DONE.json").read_text())["summary"]["runs_ok"] == 2
