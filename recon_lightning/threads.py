"""How many CPU threads torch uses (top-level key ``threads``).

torch starts one thread per core. On a machine whose cores are busy with other work that is slower, not faster:
every matmul waits for its slowest thread, and a thread waits whenever another process holds its core. Measured
with ``benchmarks/bench_threads.py`` on 2 cores at load average 7.5 (a shared machine), a 784-1000-1 victim on 500
samples trained at 20.5 epochs/s with 1 thread and 5.4 with 2. ``threads=auto`` therefore uses the cores that are
idle when the job starts (cores minus the 1-minute load average, at least 1), and says so when that is fewer than
torch's default; ``OMP_NUM_THREADS`` (which torch reads itself) or ``threads=N`` choose instead.
"""

from __future__ import annotations

import logging
import math
import os

import torch

log = logging.getLogger(__name__)


def cpu_load() -> tuple[int, float]:
    """(cores this process may use, the 1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, os.getloadavg()[0]


def choose_threads(setting: str | int) -> int:
    """Set torch's intra-op thread count from ``threads`` (``auto`` or a number) and return it."""
    if setting != "auto":
        torch.set_num_threads(int(setting))
    elif not os.environ.get("OMP_NUM_THREADS"):  # with it, torch already follows the user's choice
        default, (cores, load) = torch.get_num_threads(), cpu_load()
        idle = max(1, math.floor(cores - load + 0.5))
        if idle < default:
            torch.set_num_threads(idle)
            log.warning("the CPU is busy (load average %.1f on %d cores): torch uses %d thread(s), not %d; on a busy "
                        "machine more threads than idle cores are slower (docs/troubleshooting.md). Set threads=N or "
                        "OMP_NUM_THREADS=N to choose", load, cores, idle, default)
    return torch.get_num_threads()
