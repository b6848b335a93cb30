"""Stopping a job cleanly on SIGUSR1: SLURM's warning before a time limit (``#SBATCH --signal=SIGUSR1@90``), a
pre-emption notice, or ``scancel --signal=USR1``.

The signal handler only sets a flag. The flag is acted on where that is safe:

* in a Lightning fit, at the end of a Lightning step (:class:`recon_lightning.training.StopOnSignal`, which every
  Trainer of the stages gets). Under DDP the ranks first agree (an all-reduce of their flags, at the same step on
  every rank), so a signal that reaches the ranks at different moments, or only some of them, never leaves one rank
  saving a checkpoint (a barrier) while another waits in the gradient all-reduce: Lightning's own SLURM handler saves inside the signal handler, which deadlocks a DDP job
  whose ranks are mid-step (Lightning issue #21406). Every rank then calls ``save_checkpoint`` together (the
  fit's ``hpc_ckpt_N.ckpt`` beside its ``last.ckpt``; the newer is resumed) and raises :class:`Interrupted`;
* before a single-process stage, and while a rank waits for the others (:func:`recon_lightning.distributed.barrier`,
  :func:`recon_lightning.distributed.wait_for`): :func:`check` raises :class:`Interrupted`; nothing is lost, as
  finished stages, runs and images are on disk.

A process that started the other ranks itself (Lightning's own DDP launcher, no SLURM) passes the signal on to them
(:func:`forward_to`), as SLURM signals every rank.

``python -m recon_lightning.fit`` installs the handler (:func:`install`, before any Trainer, so Lightning's own
SIGUSR1 handler is never installed) and exits with :data:`EXIT_CODE` on :class:`Interrupted`: running the same
command again resumes. The SLURM script ``sweeps/slurm/run_ddp.sbatch`` requeues the job when its ``srun`` ends
with that code, once every rank has saved and exited.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

SIGNAL = signal.SIGUSR1
EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped on request with its work saved; run the same command again

_requested_at: float | None = None
_children: list = []  # processes this one started as the other ranks (Lightning's own DDP launcher): told too


class Interrupted(Exception):
    """The job was asked to stop (SIGUSR1) and stopped at a safe point with its work saved."""


def _handler(signum, frame) -> None:  # noqa: ARG001  (signal handler signature)
    global _requested_at
    if _requested_at is None:
        _requested_at = time.time()
        for proc in _children:  # a signal to the command one started reaches every rank, as SLURM's does
            if proc.poll() is None:
                proc.send_signal(SIGNAL)


def forward_to(processes: list) -> None:
    """Pass SIGUSR1 on to ``processes`` (``subprocess.Popen``: the ranks Lightning's launcher started from this one)."""
    _children.extend(p for p in processes if p not in _children)


def install() -> None:
    """Route SIGUSR1 to the flag (main thread only: Python delivers signals there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(SIGNAL, _handler)


def requested() -> bool:
    """Whether this process received SIGUSR1."""
    return _requested_at is not None


def reset() -> None:
    """Forget a received signal and the processes to pass it on to (tests)."""
    global _requested_at
    _requested_at = None
    _children.clear()


def interrupted(where: str) -> Interrupted:
    """The :class:`Interrupted` to raise when stopping ``where`` (for the message: since when, and why)."""
    why = f"SIGUSR1 received {time.time() - _requested_at:.1f} s ago" if requested() else "another rank received SIGUSR1"
    return Interrupted(f"{why}; stopped {where}")


def check(where: str) -> None:
    """Raise :class:`Interrupted` if this process received SIGUSR1 (``where``: what it was about to do, for the
    message). For places where stopping loses nothing: between stages, while waiting for other ranks."""
    if requested():
        raise interrupted(where)


def hpc_checkpoint_path(directory: str | Path) -> Path:
    """``hpc_ckpt_N.ckpt`` in ``directory``, N one above the highest there (the name Lightning's SLURM support uses,
    which :func:`recon_lightning.training.checkpointing` resumes from when it is newer than ``last.ckpt``)."""
    directory = Path(directory)
    numbers = [int(p.stem.rsplit("_", 1)[1]) for p in directory.glob("hpc_ckpt_*.ckpt") if p.stem.rsplit("_", 1)[1].isdigit()]
    return directory / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"
