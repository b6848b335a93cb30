"""The per-rank batch loop that the reconstruct and invert stages share (recon_lightning.sharded), driven by a
stand-in stage that writes one small file per item: which rank does which items in which batches, what a
resumed rank skips, the batch checkpoints it resumes from and removes, and that rank 0 merges only once every
rank's items are on disk. (The stages themselves are killed and resumed in test_reconstruct.py and
test_invert_resume_ddp.py.)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from recon_lightning.sharded import ShardedWork, run_shard


def stand_in(run_dir: Path, ran: list, items=range(7), batch_size=2, every=0, **kw) -> ShardedWork:
    results = run_dir / "fake" / "items"

    def run_batch(batch):
        ran.append((batch.rank, list(batch.ids)))
        (run_dir / "fake" / "checkpoints" / batch.name).mkdir(parents=True, exist_ok=True)  # as Lightning would
        results.mkdir(parents=True, exist_ok=True)
        for i in batch.ids:
            (results / f"{i}.txt").write_text(f"rank {batch.rank}")

    return ShardedWork(stage="fake", what="items", items=list(items), batch_size=batch_size, checkpoint_every=every,
                       finished=lambda ids: {i for i in ids if (results / f"{i}.txt").is_file()},
                       batch_name=lambda ids: f"items_{ids[0]}-{ids[-1]}", run_batch=run_batch,
                       merge=lambda logger: {int(p.stem): p.read_text() for p in sorted(results.glob("*.txt"))},
                       poll_s=0.05, **kw)


def test_each_rank_runs_its_items_in_batches_and_rank0_merges(make_cfg, tmp_path):
    cfg = make_cfg("logger.name=none")
    stale = tmp_path / "fake" / "checkpoints" / "items_0-9_of_another_batch_size"
    stale.mkdir(parents=True)
    ran: list = []
    assert run_shard(stand_in(tmp_path, ran), cfg, tmp_path, rank=1, world=2, device_kw={}) is None
    assert ran == [(1, [1, 3]), (1, [5])]  # item i on rank i % 2, two a batch
    assert sorted(p.name for p in (tmp_path / "fake" / "checkpoints").iterdir()) == [stale.name]  # its own batches' went
    merged = run_shard(stand_in(tmp_path, ran), cfg, tmp_path, rank=0, world=2, device_kw={})
    assert ran[2:] == [(0, [0, 2]), (0, [4, 6])]
    assert merged == {i: f"rank {i % 2}" for i in range(7)}
    assert not (tmp_path / "fake" / "checkpoints").exists()  # rank 0 removes what other batch sizes left


def test_a_resumed_rank_skips_finished_items(make_cfg, tmp_path):
    cfg = make_cfg("logger.name=none")
    (tmp_path / "fake" / "items").mkdir(parents=True)
    for i in (0, 2, 5):
        (tmp_path / "fake" / "items" / f"{i}.txt").write_text("earlier")
    ran: list = []
    merged = run_shard(stand_in(tmp_path, ran, batch_size=3), cfg, tmp_path, rank=0, world=1, device_kw={})
    assert ran == [(0, [1, 3, 4]), (0, [6])]  # batches of the pending items only
    assert [merged[i] for i in (0, 2, 5)] == ["earlier"] * 3 and len(merged) == 7


def test_rank0_waits_for_the_other_ranks_before_merging(make_cfg, tmp_path):
    cfg = make_cfg("logger.name=none")
    with pytest.raises(TimeoutError, match="the other ranks' fake items"):
        run_shard(stand_in(tmp_path, [], wait_timeout_s=0.3), cfg, tmp_path, rank=0, world=2, device_kw={})
    # Rank 0 started first (its items are done now) and polls; rank 1 finishes later: rank 0 then merges all.
    out: dict = {}
    rank0 = threading.Thread(target=lambda: out.update(merged=run_shard(
        stand_in(tmp_path, [], wait_timeout_s=60), cfg, tmp_path, rank=0, world=2, device_kw={})))
    rank0.start()
    rank0.join(0.3)
    assert rank0.is_alive() and "merged" not in out
    run_shard(stand_in(tmp_path, []), cfg, tmp_path, rank=1, world=2, device_kw={})
    rank0.join(30)
    assert out["merged"] == {i: f"rank {i % 2}" for i in range(7)}


def test_a_batch_resumes_from_its_checkpoint_and_its_trainer_checkpoints_there(make_cfg, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = make_cfg("logger.name=none", "trainer.accelerator=cpu")
    folder = tmp_path / "fake" / "checkpoints" / "items_2-3"
    folder.mkdir(parents=True)
    torch.save({"global_step": 2}, folder / "last.ckpt")  # what a killed attempt left (a readable checkpoint)
    seen = []

    def run_batch(batch):
        trainer = batch.trainer(max_steps=3)
        ckpt = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        seen.append((batch.ids, batch.resume_from, Path(trainer.default_root_dir), [Path(c.dirpath) for c in ckpt]))

    work = stand_in(tmp_path, [], items=range(4), every=5)
    work.run_batch = run_batch
    work.finished = lambda ids: set()
    with pytest.raises(TimeoutError):  # nothing is ever written: rank 0 cannot merge
        run_shard(ShardedWork(**{**work.__dict__, "wait_timeout_s": 0.1}), cfg, tmp_path, rank=0, world=1,
                  device_kw={"accelerator": "cpu", "devices": 1})
    assert [s[0] for s in seen] == [[0, 1], [2, 3]]
    assert seen[0][1] is None and seen[1][1] == str(folder / "last.ckpt")
    for ids, _, root, dirs in seen:
        expected = tmp_path / "fake" / "checkpoints" / f"items_{ids[0]}-{ids[-1]}"
        assert root == expected and dirs == [expected]
    assert not folder.exists()  # removed once the batch returned
