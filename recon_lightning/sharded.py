"""The per-rank loop of the stages that shard independent work items over ranks (reconstruction runs,
inversion targets), written once.

Item ``i`` belongs to rank ``i % world_size``. Each rank works through its items that are not finished
(their results are on disk from an earlier attempt), a batch at a time: a batch's results are on disk
before the next batch starts, and a running batch keeps a Lightning checkpoint in
``run_dir/<stage>/checkpoints/<batch name>/`` (every ``checkpoint_every`` steps), from which a killed job
resumes it; the folder is removed once the batch's results are written. Rank 0 then waits until every
item of every rank is finished (shared filesystem, any launcher), merges them and removes the checkpoints
left by batches of another batch size or world size.

A stage says only what differs (:class:`ShardedWork`): which items are finished, how a batch is named, how
to run one batch and write its results, and how to merge.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from . import distributed
from .training import build_logger, checkpoint_dir, checkpointing, make_trainer

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One batch of a rank's items, handed to :attr:`ShardedWork.run_batch`."""

    ids: list[int]
    name: str  # its checkpoint folder's name
    rank: int
    logger: Any  # the stage's logger on rank 0 (one per stage: one W&B run), False elsewhere
    resume_from: str | None  # the checkpoint a killed attempt left, to pass to ``trainer.fit(ckpt_path=...)``
    _make_trainer: Callable[..., Any] = field(repr=False)
    _callbacks: list = field(repr=False, default_factory=list)  # the batch's checkpointing

    def trainer(self, callbacks: Sequence[Any] = (), **overrides: Any):
        """A Trainer for this batch on this rank's device, with the stage's logger and the batch's
        checkpointing (``overrides``: the stage's own Trainer settings, e.g. ``max_steps``)."""
        return self._make_trainer(callbacks=[*callbacks, *self._callbacks], **overrides)


@dataclass
class ShardedWork:
    """What a sharded stage tells the shared loop."""

    stage: str
    what: str  # the items' name in log lines: "runs", "targets"
    items: Sequence[int]  # every item of the stage, over all ranks
    batch_size: int
    checkpoint_every: int  # steps between Lightning checkpoints of a running batch; 0 = off
    finished: Callable[[list[int]], set[int]]  # which of these items have their results on disk
    batch_name: Callable[[list[int]], str]  # a batch's checkpoint folder: names its items (a resumed job finds it)
    run_batch: Callable[[Batch], None]  # fits one batch and writes its results before returning
    merge: Callable[[Any], Any]  # rank 0, once every item is finished: merge(logger) -> the stage's result
    wait_timeout_s: float = 24 * 3600  # how long rank 0 waits for the other ranks' items
    poll_s: float = 1.0
    on_start: Callable[[list[int]], None] = lambda pending: None  # this rank's pending items, before the first batch
    on_end: Callable[[], None] = lambda: None  # after this rank's last batch


def run_shard(work: ShardedWork, cfg: DictConfig, run_dir: Path, rank: int, world: int, device_kw: dict) -> Any:
    """One rank's share of ``work`` (see the module docstring); on rank 0 the merged result, elsewhere None.
    Called in each rank by :func:`recon_lightning.training.run_on_every_rank`, which gives ``device_kw``."""
    run_dir = Path(run_dir)
    mine = [i for i in work.items if i % world == rank]
    done = work.finished(mine)
    pending = [i for i in mine if i not in done]
    log.info("%s rank %d/%d: %d %s, %d finished earlier, %d to do", work.stage, rank, world, len(mine), work.what,
             len(mine) - len(pending), len(pending))
    logger = build_logger(cfg, run_dir, work.stage) if rank == 0 else False  # once per stage: one W&B run
    every = int(work.checkpoint_every)
    work.on_start(pending)
    size = max(1, int(work.batch_size))
    for start in range(0, len(pending), size):
        ids = pending[start : start + size]
        name = work.batch_name(ids)
        directory = checkpoint_dir(run_dir, work.stage, name)
        callbacks, resume_from = [], None
        if every > 0:
            callback, resume_from = checkpointing(run_dir, work.stage, every, name=name)
            callbacks.append(callback)
            if resume_from:
                log.info("%s %s: resuming from %s", work.what, ids, resume_from)
        trainer = partial(make_trainer, cfg, run_dir, work.stage, logger, enable_checkpointing=every > 0,
                          default_root_dir=str(directory), **device_kw)
        work.run_batch(Batch(ids=ids, name=name, rank=rank, logger=logger, resume_from=resume_from,
                             _make_trainer=trainer, _callbacks=callbacks))
        shutil.rmtree(directory, ignore_errors=True)  # the batch's results are on disk
    work.on_end()
    if rank != 0:
        return None
    remaining = list(work.items)

    def all_finished() -> bool:
        done = work.finished(remaining)
        remaining[:] = [i for i in remaining if i not in done]
        return not remaining

    distributed.wait_for(all_finished, f"the other ranks' {work.stage} {work.what}", timeout_s=float(work.wait_timeout_s),
                         poll_s=float(work.poll_s))
    result = work.merge(logger)
    # Every item is on disk now: checkpoints left by batches of another batch size or world size go too.
    shutil.rmtree(checkpoint_dir(run_dir, work.stage), ignore_errors=True)
    if logger:
        logger.finalize("success")
    return result
