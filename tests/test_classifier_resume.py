"""Resuming the victim: a training killed with SIGKILL resumes from its last Lightning checkpoint; damaged checkpoints are skipped."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from recon_lightning.storage import load_json


def fit_victim(run_dir, args, epochs) -> str:
    """``python -m recon_lightning.fit run_dir=... *args trainer.max_epochs=epochs``; its output (it must succeed)."""
    proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", f"run_dir={run_dir}", *args,
                           f"trainer.max_epochs={epochs}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
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
    # metrics.csv holds every logged epoch once: the killed attempt's rows, then the resumed training's
    with open(run_dir / "classifier/logs/metrics.csv", newline="") as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f) if r["train/loss"]]
    assert steps == list(range(50, 1001, 50))


@pytest.mark.slow
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


@pytest.mark.slow
def test_longer_schedule_continues_the_victim_and_equals_training_that_long(tmp_path):
    import torch

    from recon_lightning.embed import load_embeddings
    from recon_lightning.victim import load_victim

    args = ["stage=classifier", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger.name=none",
            "classifier.hidden=[32]", "classifier.bias=[true,false]", "classifier.init_scale=[1e-3,1e-3]",
            "classifier.checkpoint_every_n_epochs=20", "data.n_per_class=10", "data.n_test_per_class=5",
            # a constant lr (a cosine schedule of another length restarts: the next test), large enough for 40 epochs
            "classifier.lr_schedule=constant", "classifier.lr=0.5", "classifier.weight_decay=1e-3"]

    def fit(run_dir, epochs):
        return fit_victim(run_dir, args, epochs)

    run_dir = tmp_path / "run"
    fit(run_dir, 60)
    embed_done = (run_dir / "embed/DONE.json").stat().st_mtime_ns
    out = fit(run_dir, 100)  # "train the victim longer": continues from epoch 60
    assert "Restored all states from the checkpoint" in out
    assert (run_dir / "embed/DONE.json").stat().st_mtime_ns == embed_done
    assert not list(tmp_path.glob("run/classifier.stale-*"))
    fit(tmp_path / "fresh", 100)
    x = load_embeddings(run_dir).train_x
    continued, spec = load_victim(run_dir / "classifier")
    fresh, _ = load_victim(tmp_path / "fresh/classifier")
    assert spec["epochs"] == 100
    torch.testing.assert_close(continued(x), fresh(x), rtol=1e-4, atol=1e-6)
    # A shorter schedule cannot wind a checkpoint back: it trains from the start and equals a fresh 40-epoch run.
    out = fit(run_dir, 40)
    assert "Restored all states" not in out
    fit(tmp_path / "fresh40", 40)
    torch.testing.assert_close(load_victim(run_dir / "classifier")[0](x), load_victim(tmp_path / "fresh40/classifier")[0](x),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_cosine_lr_schedule_equals_torchs_and_restarts_when_its_length_changes(tmp_path):
    """classifier.lr_schedule=cosine: the stage's victim equals a plain full-batch loop under torch's
    CosineAnnealingLR (an independent implementation of the schedule); a longer schedule does not continue a cosine
    checkpoint (its steps took other learning rates) but trains from the start and equals a fresh run."""
    import torch

    from recon_lightning.embed import load_embeddings
    from plain_victim import train_plain_victim

    from recon_lightning.victim import VictimMLP, load_victim

    args = ["stage=classifier", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger.name=none",
            "classifier.hidden=[32]", "classifier.bias=[true,false]", "classifier.init_scale=[null,null]",
            "classifier.lr_schedule=cosine", "classifier.lr=0.3", "classifier.weight_decay=1e-2",
            "classifier.checkpoint_every_n_epochs=20", "classifier.log_every_n_epochs=10", "classifier.allow_unhealthy=true",
            "data.n_per_class=10", "data.n_test_per_class=5"]

    def fit(run_dir, epochs):
        return fit_victim(run_dir, args, epochs)

    run_dir = tmp_path / "run"
    fit(run_dir, 60)
    emb = load_embeddings(run_dir)
    x, y = emb.train_x.float(), emb.train_y.float()

    def plain(cosine: bool) -> VictimMLP:
        return train_plain_victim(x, y, hidden=32, lr=0.3, weight_decay=1e-2, epochs=60, cosine=cosine)

    stage, _ = load_victim(run_dir / "classifier")
    torch.testing.assert_close(stage(x), plain(cosine=True)(x), rtol=1e-4, atol=1e-6)
    with pytest.raises(AssertionError):  # the comparison tells the schedules apart
        torch.testing.assert_close(stage(x), plain(cosine=False)(x), rtol=1e-4, atol=1e-6)

    out = fit(run_dir, 100)
    assert "Restored all states" not in out and "training from the start" in out
    fit(tmp_path / "fresh", 100)
    torch.testing.assert_close(load_victim(run_dir / "classifier")[0](x), load_victim(tmp_path / "fresh/classifier")[0](x),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_resumed_victim_keeps_the_metrics_logged_before(make_cfg, tmp_path):
    """classifier/logs/metrics.csv keeps the rows of the epochs trained before a resume (Lightning's CSV logger
    deletes the file when it starts). A killed attempt's rows after its last checkpoint are dropped: the resumed
    training logs those epochs again."""
    from recon_lightning.fit import main_with_config

    args = ["stage=classifier", "trainer.accelerator=cpu", "classifier.hidden=[32]", "classifier.bias=[true,false]",
            "classifier.init_scale=[1e-3,1e-3]", "classifier.log_every_n_epochs=10",
            "classifier.checkpoint_every_n_epochs=20", "data.n_per_class=10", "data.n_test_per_class=5",
            "classifier.lr_schedule=constant"]  # a longer cosine schedule restarts instead of continuing
    metrics = tmp_path / "run/classifier/logs/metrics.csv"

    def rows():
        with open(metrics, newline="") as f:
            return list(csv.DictReader(f))

    def steps(kind):  # the epochs of the training rows (train/loss) or the test rows (test/loss)
        return [int(float(r["step"])) for r in rows() if r[f"{kind}/loss"]]

    main_with_config(make_cfg(*args, "trainer.max_epochs=60"))
    first = rows()
    assert steps("train") == steps("test") == [10, 20, 30, 40, 50, 60]  # the x axis counts epochs
    # As if the next attempt had logged epoch 70 and been killed before its next checkpoint.
    with open(metrics, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(first[0])).writerow({**first[-2], "step": "70", "train/loss": "-1"})
    main_with_config(make_cfg(*args, "trainer.max_epochs=100"))  # continues the victim from epoch 60
    assert rows()[:len(first)] == first  # the earlier epochs' rows are kept, unchanged
    assert steps("train") == steps("test") == list(range(10, 101, 10))  # each epoch once: the killed row is gone
    assert "-1" not in {r["train/loss"] for r in rows()}
