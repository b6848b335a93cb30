"""Inversion under DDP (2 CPU processes, gloo): the ranks' shards merge into outputs that hold
every target exactly once, like a single-process run (the per-rank shard files are removed
after the merge, so disjointness itself was checked by hand, not here)."""

import json
import subprocess
import sys

ARGS = ["backbone=dino_vits16", "backbone.model=test_vit", "backbone.pretrained=false", "data=skimage",
        "data.n_per_class=4", "data.n_test_per_class=2", "classifier.hidden=[16]", "classifier.bias=[true,false]",
        "classifier.init_scale=[1e-3,1e-3]", "trainer.max_epochs=50", "reconstruct.num_runs=1",
        "reconstruct.runs_per_batch=1", "reconstruct.steps=5", "select.num_representatives=5", "invert.num_images=5",
        "invert.steps=4", "invert.batch_size=2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def fit(run_dir, *extra):
    proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", f"run_dir={run_dir}", *ARGS, *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_inversion_merges_every_target_once(tmp_path):
    run_dir = tmp_path / "run"
    fit(run_dir, "stage=select")  # earlier stages in one process
    fit(run_dir, "stage=invert", "trainer.devices=2", "trainer.strategy=ddp")
    rows = json.loads((run_dir / "invert/inversion.json").read_text())
    assert sorted(r["rank"] for r in rows) == [0, 1, 2, 3, 4]  # every target once
    assert all((run_dir / r["path"]).is_file() and -1 <= r["cosine"] <= 1 for r in rows)
    assert len(list((run_dir / "invert/images").glob("*.png"))) == 5
