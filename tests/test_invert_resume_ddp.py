"""The inversion stage as a long job: a batch killed with SIGKILL resumes from its Lightning
checkpoint (finished batches are not redone), and 2 CPU processes (DDP launcher, gloo) shard the
targets disjointly and give the same images as one process. The resume test runs the default augmentations
(their draws at step s are seeded by the step); the tests that batch targets differently turn them off (a
batch's draws depend on its targets)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # every test here starts python processes or runs whole stages

ARGS = ["backbone=dino_vits16", "backbone.model=test_vit", "backbone.pretrained=false", "data=skimage",
        "data.n_per_class=4", "data.n_test_per_class=2", "classifier.hidden=[16]", "classifier.bias=[true,false]",
        "classifier.init_scale=[1e-3,1e-3]", "classifier.center=false", "trainer.max_epochs=50", "reconstruct.num_runs=1",
        "reconstruct.runs_per_batch=1", "reconstruct.steps=5", "select.num_representatives=5", "invert.num_images=5",
        "invert.batch_size=2", "invert.param=fourier", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
        "logger.name=none", "classifier.allow_unhealthy=true"]  # a barely trained victim on purpose: these tests check resuming
NO_AUGMENT = ["invert.augment.copies=1", "invert.augment.crop_scale=[1,1]", "invert.augment.jitter=0",
              "invert.augment.flip=false", "invert.augment.rotate=0", "invert.augment.color=0", "invert.augment.noise=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fit_cmd(run_dir, *extra):
    return [sys.executable, "-m", "recon_lightning.fit", f"run_dir={run_dir}", *ARGS, *extra]


def fit(run_dir, *extra):
    proc = subprocess.run(fit_cmd(run_dir, *extra), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """A run_dir whose stages up to select are done (shared; each test works on a copy)."""
    run_dir = tmp_path_factory.mktemp("inv") / "run"
    fit(run_dir, "stage=select")
    return run_dir


def copy_of(selected, dest):
    shutil.copytree(selected, dest)
    return dest


def images(run_dir):
    rows = json.loads((run_dir / "invert/inversion.json").read_text())
    return rows, [np.asarray(Image.open(run_dir / r["path"])).astype(int) for r in rows]


def test_killed_inversion_resumes_its_batch_and_keeps_finished_ones(selected, tmp_path):
    run_dir = copy_of(selected, tmp_path / "run")
    extra = ["stage=invert", "invert.steps=150", "invert.checkpoint_every_n_steps=5"]
    ckpts, records = run_dir / "invert/checkpoints", run_dir / "invert/batches"
    proc = subprocess.Popen(fit_cmd(run_dir, *extra), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill once the first batch is finished and the second has a checkpoint
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(records.glob("*.json")) and any(ckpts.glob("targets_*/last.ckpt")):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = sorted(records.glob("*.json"))
    assert len(finished) == 1 and any(ckpts.glob("targets_*/last.ckpt")), "the kill came too early or too late"
    assert not (run_dir / "invert/inversion.json").exists()
    first = json.loads(finished[0].read_text())
    mtimes = {r["path"]: (run_dir / r["path"]).stat().st_mtime_ns for r in first}

    out = fit(run_dir, *extra)
    assert "Restored all states from the checkpoint" in out
    assert {p: (run_dir / p).stat().st_mtime_ns for p in mtimes} == mtimes  # the finished batch was not redone
    assert not list(ckpts.glob("targets_*")), "finished batches' checkpoints are removed"
    rows, imgs = images(run_dir)
    assert [r["rank"] for r in rows] == [0, 1, 2, 3, 4]
    # The same job, never interrupted, gives the same images (with the default augmentations).
    clean = copy_of(selected, tmp_path / "clean")
    fit(clean, *extra)
    rows_clean, imgs_clean = images(clean)
    for a, b in zip(imgs, imgs_clean):
        assert np.abs(a - b).max() <= 1
    assert [r["cosine"] for r in rows] == pytest.approx([r["cosine"] for r in rows_clean], abs=1e-3)


def test_more_images_keep_the_finished_ones(selected, tmp_path):
    # invert.num_images is "resumable": raising it optimises only the new targets.
    run_dir = copy_of(selected, tmp_path / "run")
    fit(run_dir, *NO_AUGMENT, "stage=invert", "invert.steps=10", "invert.num_images=3")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (run_dir / "invert/images").glob("*.png")}
    assert len(mtimes) == 3
    fit(run_dir, *NO_AUGMENT, "stage=invert", "invert.steps=10", "invert.num_images=5")
    assert {n: (run_dir / "invert/images" / n).stat().st_mtime_ns for n in mtimes} == mtimes
    assert not list(tmp_path.glob("run/invert.stale-*"))
    rows, imgs = images(run_dir)
    assert [r["rank"] for r in rows] == [0, 1, 2, 3, 4]
    # The same as inverting all five at once (batches differ; every image has its own parameters and seed; a
    # batch's augmentations depend on its targets, so they are off).
    clean = copy_of(selected, tmp_path / "clean")
    fit(clean, *NO_AUGMENT, "stage=invert", "invert.steps=10", "invert.num_images=5")
    rows_clean, imgs_clean = images(clean)
    for a, b in zip(imgs, imgs_clean):
        assert np.abs(a - b).max() <= 1
    # A key that changes the images (the steps) does not reuse them: the old outputs are moved aside.
    fit(run_dir, *NO_AUGMENT, "stage=invert", "invert.steps=12", "invert.num_images=5")
    assert len(list(tmp_path.glob("run/invert.stale-*"))) == 1


def test_ddp_inversion_shards_targets_and_equals_one_process(selected, tmp_path):
    ddp = copy_of(selected, tmp_path / "ddp")
    # Checkpoints every 2 steps: each rank writes (and then removes) its own batches' checkpoints.
    fit(ddp, "stage=invert", "invert.steps=6", "invert.checkpoint_every_n_steps=2", "trainer.devices=2", "trainer.strategy=ddp",
        *NO_AUGMENT)  # the ranks batch the targets differently
    assert not list((ddp / "invert/checkpoints").glob("targets_*"))
    rows, imgs = images(ddp)
    assert [r["rank"] for r in rows] == [0, 1, 2, 3, 4]  # every target exactly once
    assert [r["worker_rank"] for r in rows] == [0, 1, 0, 1, 0]  # target t on rank t % 2
    assert len(list((ddp / "invert/images").glob("*.png"))) == 5
    single = copy_of(selected, tmp_path / "single")
    fit(single, "stage=invert", "invert.steps=6", *NO_AUGMENT)
    rows1, imgs1 = images(single)
    assert {r["worker_rank"] for r in rows1} == {0}
    for a, b in zip(imgs, imgs1):  # batched differently ([0,2] vs [0,1]): same images
        assert np.abs(a - b).max() <= 1
    assert [r["cosine"] for r in rows] == pytest.approx([r["cosine"] for r in rows1], abs=1e-3)


def test_a_deleted_or_damaged_image_is_made_again_and_only_it(selected, tmp_path):
    run_dir = copy_of(selected, tmp_path / "run")
    extra = ["stage=invert", "invert.steps=10", "invert.batch_size=1", *NO_AUGMENT]
    fit(run_dir, *extra)
    _, before = images(run_dir)
    assert len(before) >= 2
    pngs = run_dir / "invert/images"
    for name, damage in [("rank_0000.png", lambda p: p.unlink()),  # deleted
                         ("rank_0001.png", lambda p: p.write_bytes(p.read_bytes()[:40]))]:  # truncated
        mtimes = {p.name: p.stat().st_mtime_ns for p in pngs.glob("*.png")}
        damage(pngs / name)
        fit(run_dir, *extra)
        rows, after = images(run_dir)
        assert [r["rank"] for r in rows] == list(range(len(before)))
        for a, b in zip(after, before):  # the remade image equals the lost one
            assert np.abs(a - b).max() <= 1
        assert {n for n in mtimes if (pngs / n).stat().st_mtime_ns != mtimes[n]} == {name}  # only it was made again
