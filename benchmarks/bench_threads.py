"""Victim training speed against torch's thread count on this machine, as the classifier stage trains it:
full-batch SGD epochs of a D-1000-1 MLP (default D = 784, 500 training samples, a user's 28x28 raw-pixel set).

    OMP_NUM_THREADS=1 python benchmarks/bench_threads.py [--dim 784] [--n 500] [--seconds 10]

Prints epochs/s for 1 thread up to the number of cores this process may use, and the load average: on a machine
whose cores are busy with other work, more threads than idle cores wait on each other at every matmul.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def epochs_per_second(threads: int, dim: int, n: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y = torch.randn(n, dim), (torch.rand(n) > 0.5).float()
    model = torch.nn.Sequential(torch.nn.Linear(dim, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=1e-2)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=784)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, load average {os.getloadavg()[0]:.2f}")
    for threads in range(1, cores + 1):
        print(f"{threads} thread(s): {epochs_per_second(threads, args.dim, args.n, args.seconds):.1f} epochs/s")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
