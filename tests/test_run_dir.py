"""The run_dir as shared state: one writer at a time (a lock the OS frees when its holder dies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIT = [sys.executable, "-m", "recon_lightning.fit", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
       "logger.name=none", "data.n_per_class=10", "data.n_test_per_class=5", "classifier.hidden=[32]",
       "classifier.bias=[true,false]", "classifier.init_scale=[1e-3,1e-3]"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def wait_for_lock_holder(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    lock = run_dir / ".lock"
    start = time.time()
    while time.time() - start < timeout:
        assert proc.poll() is None, "the first job ended before it was seen holding the lock"
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return proc.pid
        time.sleep(0.2)
    raise AssertionError("the first job never took the lock")


@pytest.mark.slow
def test_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    # A: a long victim training; B starts on the same run_dir while A runs.
    a = subprocess.Popen([*FIT, f"run_dir={run_dir}", "stage=classifier", "trainer.max_epochs=1000000"], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock_holder(run_dir, a)
        b = subprocess.run([*FIT, f"run_dir={run_dir}", "stage=embed"], env=ENV, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2, b.stderr[-2000:]
        assert f"error: run_dir {run_dir} is in use by another job (pid {a.pid})" in b.stderr
        assert "Traceback" not in b.stderr
        assert a.poll() is None  # A was not disturbed
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    # A crashed (SIGKILL): its lock went with it, the next job runs.
    c = subprocess.run([*FIT, f"run_dir={run_dir}", "stage=embed"], env=ENV, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr[-2000:]
    assert (run_dir / "embed/DONE.json").is_file()


# ----------------------------------------------------------------------------- damaged or changed outputs


def _counting_stages(tmp_path: Path):
    """Two fake stages: ``a`` writes a new value each time it runs (as a nondeterministic stage would), ``b`` copies it."""
    from recon_lightning.stages import Stage

    calls = {"a": 0, "b": 0}

    def run_a(cfg, run_dir):
        calls["a"] += 1
        (run_dir / "a").mkdir(exist_ok=True)
        (run_dir / "a" / "out.txt").write_text(f"value {calls['a']}")
        return {}

    def run_b(cfg, run_dir):
        calls["b"] += 1
        (run_dir / "b").mkdir(exist_ok=True)
        (run_dir / "b" / "out.txt").write_text((run_dir / "a" / "out.txt").read_text())
        return {}

    stages = [Stage("a", run_a, ["x"], outputs=["a/out.txt"]), Stage("b", run_b, ["y"], outputs=["b/out.txt"])]
    return stages, calls


def test_a_stage_with_missing_or_damaged_outputs_runs_again_and_so_do_its_dependents(tmp_path):
    from omegaconf import OmegaConf

    from recon_lightning.stages import run_stages

    cfg = OmegaConf.create({"x": 1, "y": 2})
    stages, calls = _counting_stages(tmp_path)
    run_dir = tmp_path / "run"
    run_stages(cfg, stages, ["b"], run_dir)
    run_stages(cfg, stages, ["b"], run_dir)
    assert calls == {"a": 1, "b": 1}  # finished: nothing reruns
    (run_dir / "b" / "out.txt").unlink()  # a deleted output of the last stage: only it reruns
    run_stages(cfg, stages, ["b"], run_dir)
    assert calls == {"a": 1, "b": 2} and (run_dir / "b" / "out.txt").read_text() == "value 1"
    (run_dir / "a" / "out.txt").write_text("value 1 damaged")  # same size, other content
    run_stages(cfg, stages, ["b"], run_dir)
    # a ran again and made a different output, so b (which read the old one) ran again too
    assert calls == {"a": 2, "b": 3} and (run_dir / "b" / "out.txt").read_text() == "value 2"
    (run_dir / "a" / "out.txt").unlink()
    run_stages(cfg, stages, ["a"], run_dir)  # stage=a alone notices its own output is gone
    assert calls["a"] == 3 and (run_dir / "a" / "out.txt").is_file()


TINY = ["data.n_per_class=10", "data.n_test_per_class=5", "classifier.hidden=[32]", "trainer.max_epochs=200",
        "reconstruct.num_runs=2", "reconstruct.runs_per_batch=2", "reconstruct.steps=20",
        "select.num_representatives=8", "invert.num_images=4"]
STAGES = ["embed", "classifier", "reconstruct", "shadow", "select", "invert", "evaluate"]


def done_mtimes(run_dir):
    return {s: (run_dir / s / "DONE.json").stat().st_mtime_ns for s in STAGES}


@pytest.mark.slow
def test_truncated_victim_deleted_report_and_deleted_image_are_made_again(make_cfg, tmp_path):
    from recon_lightning.fit import main_with_config
    from recon_lightning.victim import load_victim

    run_dir = tmp_path / "run"
    main_with_config(make_cfg(*TINY))
    first = done_mtimes(run_dir)
    report = (run_dir / "report.json").read_text()
    png = run_dir / "invert/images/rank_0002.png"
    png_bytes = png.read_bytes()

    # A truncated victim: stage=classifier retrains it instead of calling it up to date.
    model = run_dir / "classifier/model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    main_with_config(make_cfg(*TINY, "stage=classifier"))
    load_victim(run_dir / "classifier")  # whole again
    after = done_mtimes(run_dir)
    assert after["classifier"] != first["classifier"] and after["embed"] == first["embed"]

    # A deleted report and a deleted inverted image come back; the stages before them are not redone
    # (the retrained victim is the same victim: full-batch training is deterministic).
    (run_dir / "report.json").unlink()
    png.unlink()
    main_with_config(make_cfg(*TINY))
    assert (run_dir / "report.json").read_text() == report
    assert png.read_bytes() == png_bytes
    final = done_mtimes(run_dir)
    assert all(final[s] == after[s] for s in ["embed", "classifier", "reconstruct", "select"])
    assert final["invert"] != after["invert"] and final["evaluate"] != after["evaluate"]


@pytest.mark.slow
def test_victim_dir_changed_in_place_reruns_reconstruction(make_cfg, tmp_path):
    import torch

    from recon_lightning.fit import main_with_config
    from recon_lightning.reconstruct import load_candidates
    from recon_lightning.victim import VictimMLP, save_victim

    victim_dir = tmp_path / "victim"

    def victim(seed):
        torch.manual_seed(seed)
        save_victim(victim_dir, VictimMLP(8, [16], 2, bias=[True, False]),
                    {"loss": "bce", "weight_decay": 0.0, "n_train": 4, "embedding": {"normalize": "l2", "mean_norm": 1.0}})

    args = ["stage=reconstruct", f"reconstruct.victim_dir={victim_dir}", "reconstruct.num_runs=1",
            "reconstruct.runs_per_batch=1", "reconstruct.steps=3", "backbone=identity"]
    victim(0)
    main_with_config(make_cfg(*args))
    done = tmp_path / "run/reconstruct/DONE.json"
    first, x0 = done.stat().st_mtime_ns, load_candidates(tmp_path / "run").x
    main_with_config(make_cfg(*args))
    assert done.stat().st_mtime_ns == first  # same victim: up to date
    victim(1)  # other weights, same path
    main_with_config(make_cfg(*args))
    assert done.stat().st_mtime_ns != first and not torch.equal(load_candidates(tmp_path / "run").x, x0)


# ----------------------------------------------------------------------------- small things


def test_temp_files_of_a_killed_job_are_removed_on_start_but_not_a_sweep_trials(make_cfg, tmp_path):
    from recon_lightning.fit import main_with_config

    run_dir = tmp_path / "run"
    left = [run_dir / ".report.json.abc123.tmp", run_dir / "classifier/.model.safetensors.k2j3.tmp",
            run_dir / "invert/images/.rank_0001.png.tmp"]
    trial = run_dir / "sweeps/s/trial_000/reconstruct/.candidates.safetensors.x1.tmp"  # another job's run_dir
    for path in [*left, trial]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    main_with_config(make_cfg("stage=embed", "data.n_per_class=5", "data.n_test_per_class=2"))
    assert [p for p in left if p.exists()] == [] and trial.exists()


def test_trainer_precision_is_part_of_the_victims_and_inversions_fingerprints(make_cfg):
    from recon_lightning.fit import PIPELINE
    from recon_lightning.stages import stage_fingerprint

    stages = {s.name: s for s in PIPELINE}
    base, other = make_cfg(), make_cfg("trainer.precision=64-true")
    for name, changes in [("embed", False), ("classifier", True), ("select", False), ("invert", True)]:
        assert (stage_fingerprint(base, stages[name], "") != stage_fingerprint(other, stages[name], "")) is changes, name


def test_outputs_follow_the_umask(tmp_path):
    import torch

    from recon_lightning.storage import save_json, save_tensors

    old = os.umask(0o027)
    try:
        save_json(tmp_path / "a.json", {"a": 1})
        save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    # 0666 & ~0027 = 0640 (mkstemp alone would give 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a.json": 0o640, "t.safetensors": 0o640}


def test_multi_node_ranks_from_the_launchers_node_rank(monkeypatch):
    from recon_lightning import distributed

    for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.global_rank() == 0
    # Lightning's launcher on the second of two nodes, 2 processes each: node 1's local rank 0 is not rank 0.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not distributed.is_rank_zero()
    ranks = set()
    for node in (0, 1):
        for local in (0, 1):
            monkeypatch.setenv("NODE_RANK", str(node))
            monkeypatch.setenv("LOCAL_RANK", str(local))
            ranks.add(distributed.global_rank())
    assert len(ranks) == 4 and [r for r in ranks if r == 0] == [0]  # unique, one rank 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun-style: exact numbering
    assert distributed.global_rank() == 3
    monkeypatch.setenv("RANK", "2")  # a launcher's own global rank wins
    assert distributed.global_rank() == 2


@pytest.mark.slow
def test_importing_the_library_sets_no_process_wide_environment():
    code = ("import os, recon_lightning.fit, recon_lightning.training, recon_lightning.backbones; "
            "print(os.environ.get('WANDB_MODE'), os.environ.get('HF_HUB_OFFLINE'))")
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "HF_HUB_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]


def test_one_png_reader_and_writer_round_trip_grey_and_rgb(tmp_path):
    import numpy as np
    import pytest
    import torch
    from PIL import Image

    from recon_lightning.errors import DataError
    from recon_lightning.storage import load_png, save_png

    rgb = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_png(rgb, tmp_path / "rgb.png")
    save_png(rgb[:1], tmp_path / "grey.png")
    # independent reading with PIL: what was written is what is read back
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rgb.png")), rgb.permute(1, 2, 0).numpy())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grey.png")), rgb[0].numpy())
    assert torch.equal(load_png(tmp_path / "rgb.png"), rgb) and torch.equal(load_png(tmp_path / "grey.png", 1), rgb[:1])
    assert load_png(tmp_path / "grey.png").shape == (3, 5, 7)  # grey to RGB for the report grids
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(DataError, match="image not found"):
        load_png(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="corrupt or unreadable image"):
        load_png(tmp_path / "bad.png")
