"""Rank helpers that work before, during and after Lightning sets up DDP (local, SLURM, torchrun)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from . import preempt


def global_rank() -> int:
    """This process's rank: from the process group once it exists, else from the launcher's env.

    ``RANK`` (torchrun) or ``SLURM_PROCID``; otherwise (Lightning's own launcher, one command per node with
    ``NODE_RANK``) only node 0's local rank 0 is rank 0: ranks on node k > 0 are numbered
    ``k * LOCAL_WORLD_SIZE + LOCAL_RANK`` when the launcher says how many ranks a node has, else
    ``k * WORLD_SIZE + LOCAL_RANK`` (unique and non-zero, though not contiguous)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            # SLURM_PROCID is set for every srun task, including non-distributed single-task jobs.
            return int(os.environ[var])
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if node == 0:
        return local
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(int(os.environ.get("WORLD_SIZE", 1)), local + 1)
    return node * per_node + local


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_rank_zero() -> bool:
    return global_rank() == 0


def started_by_rank_zero() -> bool:
    """Whether Lightning's own DDP launcher started this process from rank 0's (``trainer.strategy=ddp`` with no
    SLURM, torchrun, MPI or LSF to start the ranks, the environments Lightning detects): rank 0 then watches it, and
    stands for the job."""
    if int(os.environ.get("LOCAL_RANK", 0) or 0) == 0:
        return False
    from lightning.fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    return not any(env.detect() for env in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment, MPIEnvironment))


def barrier(what: str = "the other ranks") -> None:
    """All ranks meet here (when a process group exists). A SIGUSR1 while waiting ends the wait with
    :class:`recon_lightning.preempt.Interrupted` (the barrier is polled, not blocked in), so a rank whose peer stopped
    on the signal stops too instead of waiting for it forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    work = dist.barrier(async_op=True)
    while not work.is_completed():
        preempt.check(f"while waiting for {what}")
        time.sleep(0.01)
    work.wait()


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> None:
    """Block until ``predicate()`` holds (for ranks that wait on rank 0 before a process group exists); a SIGUSR1
    ends the wait (:class:`recon_lightning.preempt.Interrupted`)."""
    start = time.time()
    while not predicate():
        preempt.check(f"while waiting for {what}")
        if time.time() - start > timeout_s:
            raise TimeoutError(f"rank {global_rank()} timed out waiting for {what}")
        time.sleep(poll_s)


def rank_file(directory: Path, stem: str, suffix: str) -> Path:
    """A per-rank output path, so ranks never write the same file."""
    return Path(directory) / f"{stem}.rank{global_rank()}{suffix}"
