"""The whole pipeline end to end on a tiny digits config: outputs, reuse, and partial recomputation."""

import json

import pytest

from recon_lightning.fit import main_with_config

pytestmark = pytest.mark.slow  # every test here starts python processes or runs whole stages

TINY = ["data.n_per_class=10", "data.n_test_per_class=5", "classifier.hidden=[32,32]", "classifier.bias=[true,false,false]",
        "classifier.init_scale=[1e-3,1e-3,1e-3]", "trainer.max_epochs=200",
        "reconstruct.num_runs=2", "reconstruct.runs_per_batch=2", "reconstruct.steps=20",
        "select.num_representatives=8", "invert.num_images=4",
        "classifier.allow_unhealthy=true"]  # a barely trained victim on purpose: these tests check the plumbing
STAGES = ["embed", "classifier", "reconstruct", "shadow", "select", "invert", "evaluate"]


def done_mtimes(run_dir):
    return {s: (run_dir / s / "DONE.json").stat().st_mtime_ns for s in STAGES}


def test_all_stages_then_reuse_then_partial_rerun(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summaries = main_with_config(make_cfg(*TINY))
    assert list(summaries) == STAGES
    report = json.loads((run_dir / "report.json").read_text())
    assert report["mode"] == "evaluation" and report["summary"]["num_train"] == 20
    # The held-out baseline: each training sample's nearest unseen test sample.
    import torch.nn.functional as F

    from recon_lightning.embed import load_embeddings

    emb = load_embeddings(run_dir)
    expected = float((F.normalize(emb.train_x.double(), dim=1) @ F.normalize(emb.test_x.double(), dim=1).T).max(1).values.mean())
    assert abs(report["summary"]["heldout_best_cosine_mean"] - expected) < 1e-6
    assert (run_dir / "report.html").is_file() and len(list((run_dir / "invert/images").glob("*.png"))) == 4
    first = done_mtimes(run_dir)

    main_with_config(make_cfg(*TINY))  # finished run_dir: nothing is redone
    assert done_mtimes(run_dir) == first

    main_with_config(make_cfg(*TINY, "select.method=kmeans"))  # only select and later stages rerun
    after = done_mtimes(run_dir)
    assert all(after[s] == first[s] for s in ["embed", "classifier", "reconstruct"])
    assert all(after[s] != first[s] for s in ["select", "invert", "evaluate"])
    assert json.loads((run_dir / "select/DONE.json").read_text())["summary"]


def test_cadence_keys_rerun_nothing_and_more_runs_keep_finished_ones(make_cfg, tmp_path):
    from recon_lightning.reconstruct import load_candidates, run_path

    run_dir = tmp_path / "run"
    main_with_config(make_cfg(*TINY))
    first = done_mtimes(run_dir)

    # How often to log or checkpoint changes no output: nothing reruns.
    main_with_config(make_cfg(*TINY, "reconstruct.log_every_n_steps=7", "reconstruct.checkpoint_every_n_steps=3",
                              "classifier.log_every_n_epochs=9", "invert.checkpoint_every_n_steps=5"))
    assert done_mtimes(run_dir) == first

    # More reconstruction runs: runs 0 and 1 are kept (not recomputed), run 2 is added; later stages rerun.
    run_files = {r: run_path(run_dir, r).stat().st_mtime_ns for r in (0, 1)}
    # (a checkpoint a killed batch of another runs_per_batch left behind: removed once every run is on disk)
    orphan = run_dir / "reconstruct/checkpoints/runs_00001-00002_0123456789abcdef/last.ckpt"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"")
    main_with_config(make_cfg(*TINY, "reconstruct.num_runs=3"))
    assert not (run_dir / "reconstruct/checkpoints").exists()
    assert {r: run_path(run_dir, r).stat().st_mtime_ns for r in (0, 1)} == run_files
    assert sorted(set(load_candidates(run_dir).run.tolist())) == [0, 1, 2]
    after = done_mtimes(run_dir)
    assert all(after[s] == first[s] for s in ["embed", "classifier"])
    assert all(after[s] != first[s] for s in ["reconstruct", "select", "invert", "evaluate"])
    assert not list(tmp_path.glob("run/reconstruct.stale-*"))  # its finished runs were not moved aside

    # A key that does change the runs (the candidates' learning rate) moves the old outputs aside.
    main_with_config(make_cfg(*TINY, "reconstruct.num_runs=3", "reconstruct.lr=0.02"))
    assert len(list(tmp_path.glob("run/reconstruct.stale-*"))) == 1
    assert run_path(run_dir, 0).stat().st_mtime_ns != run_files[0]
