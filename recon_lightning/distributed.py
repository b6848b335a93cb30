"""Rank helpers that work before, during and after Lightning sets up DDP (local, SLURM, torchrun)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist


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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> None:
    """Block until ``predicate()`` holds (for ranks that wait on rank 0 before a process group exists)."""
    start = time.time()
    while not predicate():
        if time.time() - start > timeout_s:
            raise TimeoutError(f"rank {global_rank()} timed out waiting for {what}")
        time.sleep(poll_s)


def rank_file(directory: Path, stem: str, suffix: str) -> Path:
    """A per-rank output path, so ranks never write the same file."""
    return Path(directory) / f"{stem}.rank{global_rank()}{suffix}"
