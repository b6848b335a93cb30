"""Offline sweep runner: sampling from the W&B sweep file and running the sweep's command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from recon_lightning import sweep as S
from recon_lightning.reconstruct import run_path
from recon_lightning.storage import load_tensors, save_tensors
from recon_lightning.victim import VictimMLP, save_victim

REPO = Path(__file__).resolve().parent.parent


def test_sweep_file_samples_reference_ranges():
    spec = yaml.safe_load((REPO / "sweeps" / "reconstruct.yaml").read_text())
    assert spec["metric"] == {"name": "recon_score", "goal": "maximize"} and spec["method"] == "random"
    confs = S.configurations(spec, 200, seed=0)
    lr = [c["reconstruct.lr"] for c in confs]
    assert 1e-5 <= min(lr) < 1e-3 < 1e-2 < max(lr) <= 1.0  # log-uniform over the whole range
    assert all(0.01 <= c["reconstruct.lambda_min"] <= 0.5 and 10 <= c["reconstruct.alpha"] <= 500 for c in confs)
    assert all(c["reconstruct.num_runs"] == 1 for c in confs)
    assert S.configurations(spec, 3, seed=0) == confs[:3]  # reproducible
    cmd = S.expand_command(spec, confs[0])
    assert cmd[1:4] == [__import__("sys").executable, "-m", "recon_lightning.fit"] and "stage=reconstruct" in cmd
    assert f"reconstruct.lr={confs[0]['reconstruct.lr']}" in cmd


def _tiny_victim(base: Path) -> None:
    torch.manual_seed(0)
    save_victim(base / "classifier", VictimMLP(8, [16], 2, bias=[True, False]),
                {"loss": "bce", "weight_decay": 0.0, "n_train": 4, "embedding": {"normalize": "l2", "mean_norm": 1.0}})
    x = F.normalize(torch.randn(4, 8), dim=1)
    save_tensors(base / "embed" / "embeddings.safetensors",
                 {"train_x": x, "train_y": torch.tensor([0, 1, 0, 1]), "test_x": x.clone(), "test_y": torch.tensor([0, 1, 0, 1])},
                 {"normalize": "l2", "class_names": ["a", "b"], "mean_norm": 1.0})


def _small_sweep(tmp_path: Path, name: str, logger: str, method: str = "random", **parameters) -> tuple[Path, Path]:
    """A tiny victim in ``tmp_path/base`` and the reference sweep file (5 steps, ``parameters`` replaced;
    a parameter given as None is removed, i.e. left at its config default)."""
    base = tmp_path / "base"
    _tiny_victim(base)
    spec = yaml.safe_load((REPO / "sweeps" / "reconstruct.yaml").read_text())
    spec["method"] = method
    spec["parameters"].update({"logger.name": {"value": logger}, "reconstruct.steps": {"value": 5},
                               "classifier.allow_unhealthy": {"value": True},  # the random tiny victim is not healthy
                               **parameters})
    spec["parameters"] = {k: v for k, v in spec["parameters"].items() if v is not None}
    sweep_file = tmp_path / f"{name}.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    return base, sweep_file


def _results(base: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (base / "sweeps" / name / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_offline_sweep_runs_configurations(tmp_path):
    base, sweep_file = _small_sweep(tmp_path, "small", "csv")
    rc = S.main([str(sweep_file), "--count", "2", "--run-dir", str(base), "--", "trainer.enable_progress_bar=false",
                 "trainer.accelerator=cpu"])
    assert rc == 0
    rows = _results(base, "small")
    assert [r["trial"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 < r["metric"] <= 1 and r["summary"]["runs_ok"] == 1
        assert r["summary"]["recon_score"] == r["metric"]
    assert rows[0]["params"]["reconstruct.lr"] != rows[1]["params"]["reconstruct.lr"]
    # the sampled values were used: the run file records them
    from recon_lightning.reconstruct import load_candidates

    c = load_candidates(base / "sweeps" / "small" / "trial_001")
    assert c.runs[0]["hparams"]["lr"] == rows[1]["params"]["reconstruct.lr"]
    logged = [f.read_text() for f in (base / "sweeps" / "small" / "trial_001").rglob("metrics.csv")]
    assert logged and "recon_score" in logged[0].splitlines()[0]  # the logger saw the sweep metric

    # Resuming the sweep (e.g. after a kill) keeps finished trials and runs only the new one.
    rc = S.main([str(sweep_file), "--count", "3", "--run-dir", str(base), "--", "trainer.enable_progress_bar=false",
                 "trainer.accelerator=cpu"])
    assert rc == 0
    rows = _results(base, "small")
    assert [r["trial"] for r in rows] == [0, 1, 2]
    assert (base / "sweeps" / "small" / "trial_002" / "reconstruct" / "DONE.json").is_file()


def test_missing_victim_is_a_clear_error(tmp_path, capsys):
    assert S.main([str(REPO / "sweeps" / "reconstruct.yaml"), "--run-dir", str(tmp_path)]) == 2
    assert "stage=classifier" in capsys.readouterr().err


@pytest.mark.slow
def test_a_diverged_trial_is_a_result_and_the_sweep_goes_on(tmp_path, capsys):
    # A grid over the learning rate only (the other sampled parameters at their config defaults):
    # the first trial's only run diverges.
    sampled = {k: None for k in ("reconstruct.init_scale", "reconstruct.lambda_min", "reconstruct.alpha")}
    base, sweep_file = _small_sweep(tmp_path, "grid", "none", method="grid", **sampled,
                                    **{"reconstruct.lr": {"values": [1.0e30, 0.01]}})
    args = [str(sweep_file), "--count", "2", "--run-dir", str(base), "--", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu"]
    assert S.main(args) == 0  # the sweep did its work: a diverged trial is one of its results
    rows = _results(base, "grid")
    assert [(r["trial"], r["params"]["reconstruct.lr"]) for r in rows] == [(0, 1.0e30), (1, 0.01)]
    # recorded diverged, with its hyperparameters and its runs' reason
    assert rows[0]["returncode"] == 2 and rows[0]["metric"] is None and rows[0]["status"] == "diverged"
    assert "all 1 run(s) failed" in rows[0]["reason"] and "non-finite" in rows[0]["reason"]
    assert rows[1]["returncode"] == 0 and rows[1]["metric"] > 0 and rows[1]["status"] == "ok"  # the next trial still ran
    _, meta = load_tensors(run_path(base / "sweeps" / "grid" / "trial_000", 0))
    assert meta["status"] == "failed" and "non-finite" in meta["error"] and meta["hparams"]["lr"] == 1.0e30
    out = capsys.readouterr().out
    assert f"best recon_score = {rows[1]['metric']:.4f} (trial 1)" in out
    assert "2 trial(s): 1 ok, 1 diverged, 0 failed" in out
    # Resuming keeps the diverged trial (a result, not work left to do).
    assert S.main(args) == 0
    assert "[1/2] finished earlier (diverged)" in capsys.readouterr().out


def test_a_trial_that_cannot_run_fails_the_sweep(tmp_path, capsys):
    # An override every trial refuses (a key that does not exist): the sweep could not do its work.
    base, sweep_file = _small_sweep(tmp_path, "bad", "none")
    rc = S.main([str(sweep_file), "--count", "1", "--run-dir", str(base), "--", "reconstruct.stpes=5"])
    assert rc == 1
    (row,) = _results(base, "bad")
    assert row["status"] == "failed" and row["returncode"] == 2 and "exit code 2" in row["reason"]
    assert "1 trial(s): 0 ok, 0 diverged, 1 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_shards_split_one_sweep_between_processes(tmp_path):
    # What a SLURM job array without a W&B server does: N processes, one sweep, every trial once.
    import subprocess
    import sys

    base, sweep_file = _small_sweep(tmp_path, "array", "none")

    def shard(i):
        return subprocess.Popen([sys.executable, "-m", "recon_lightning.sweep", str(sweep_file), "--count", "4",
                                 "--shard", f"{i}/2", "--run-dir", str(base), "--", "trainer.enable_progress_bar=false",
                                 "trainer.accelerator=cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [shard(0), shard(1)]  # at the same time, as array tasks would be
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    out_dir = base / "sweeps" / "array"
    for i in range(4):  # each trial ran once, in the process of its shard
        assert (out_dir / f"trial_{i:03d}" / "reconstruct" / "DONE.json").is_file()
        assert f"[{i + 1}/4] " in outs[i % 2] and f"[{i + 1}/4] " not in outs[1 - i % 2]
    # results.jsonl, as the shards left it, lists all four trials once, whichever shard finished last.
    rows = _results(base, "array")
    assert [r["trial"] for r in rows] == [0, 1, 2, 3] and all(r["returncode"] == 0 and r["status"] == "ok" for r in rows)
    assert [r["params"] for r in rows] == S.configurations(yaml.safe_load(sweep_file.read_text()), 4, 0)


def test_bad_shard_is_a_clear_error(tmp_path, capsys):
    base = tmp_path / "base"
    _tiny_victim(base)
    assert S.main([str(REPO / "sweeps" / "reconstruct.yaml"), "--run-dir", str(base), "--shard", "2/2"]) == 2
    assert "--shard 2/2: need 0 <= I < N" in capsys.readouterr().err


@pytest.mark.slow
def test_two_wandb_agent_trials_at_once_each_get_their_own_run_dir_and_run(tmp_path):
    # What `wandb agent` does for each trial: run the sweep's command in the agent's directory, with the trial's
    # WANDB_SWEEP_ID / WANDB_RUN_ID in the environment (here offline, as no server is reachable in tests).
    import os
    import subprocess

    from recon_lightning.reconstruct import load_candidates
    from wandb_records import logged_keys, offline_runs

    base = tmp_path / "runs" / "digits-identity"  # the config's default run_dir, relative to the agent's directory
    _tiny_victim(base)
    spec = yaml.safe_load((REPO / "sweeps" / "reconstruct.yaml").read_text())
    spec["parameters"]["reconstruct.steps"] = {"value": 5}
    # the default's lr range: the sweep's reaches 1, whose 5-step run ends above its start (failed: diverged)
    spec["parameters"]["reconstruct.lr"] = {"distribution": "log_uniform_values", "min": 1e-3, "max": 3e-2}
    confs = S.configurations(spec, 2, seed=1)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    procs = []
    for trial, params in zip(("trial-a", "trial-b"), confs):
        env = {**clean, "OMP_NUM_THREADS": "1", "WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": trial, "WANDB_MODE": "offline",
               "WANDB_DIR": str(tmp_path / "wandb_dir")}
        cmd = S.expand_command(spec, params) + ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                                                "classifier.allow_unhealthy=true"]  # a random tiny victim
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert not (base / "reconstruct").exists()  # the base run_dir only lends its victim and training set
    # Hydra's own output (.hydra/ and the job log) is each trial's, in its run_dir, not shared in the base run_dir.
    assert not (base / ".hydra").exists() and not (base / "fit.log").exists()
    for trial, params, other in zip(("trial-a", "trial-b"), confs, confs[::-1]):
        trial_dir = base / "sweeps" / "sw1" / trial
        overrides = yaml.safe_load((trial_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"reconstruct.lr={params['reconstruct.lr']}" in overrides
        assert f"reconstruct.lr={other['reconstruct.lr']}" not in overrides
        assert yaml.safe_load((trial_dir / ".hydra" / "config.yaml").read_text())["reconstruct"]["lr"] == params["reconstruct.lr"]
        assert f"run {trial}: run_dir {trial_dir.resolve()}" in (trial_dir / "fit.log").read_text()
        cands = load_candidates(trial_dir)
        assert [r["hparams"]["lr"] for r in cands.runs] == [params["reconstruct.lr"]]  # its own run, nobody else's
        assert not list(trial_dir.parent.glob(f"{trial}.stale-*")) and not list(trial_dir.glob("*.stale-*"))
        runs = offline_runs(trial_dir / "wandb")
        assert list(runs) == [f"{trial}-reconstruct"] and runs[f"{trial}-reconstruct"]["id"] == trial
        assert {"recon_score", "run_final_loss"} <= logged_keys(runs[f"{trial}-reconstruct"])
        summary = json.loads((trial_dir / "reconstruct" / "DONE.json").read_text())["summary"]
        assert [row["recon_score"] for row in runs[f"{trial}-reconstruct"]["history"] if "recon_score" in row] == \
            [summary["recon_score"]]
