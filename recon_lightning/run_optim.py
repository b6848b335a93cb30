"""Optimisers for K independent runs stacked along the first dimension of each parameter.

The reconstruction stage optimises K runs at once as one (K, m, D) tensor program, and each run has its
own learning rate. With one parameter (and optimiser group) per run, every optimiser step is 2K small
updates (2K x ~10 kernel launches on a GPU); here a group holds one stacked tensor and a per-run learning
rate tensor, so a step is ~10 element-wise passes whatever K is. The update of each run is exactly
``torch.optim.Adam`` / ``torch.optim.SGD(momentum=...)``'s (default betas, eps, no weight decay, no
dampening), up to rounding.

Runs for which ``active()`` is False are left unchanged (their update is masked, NaN-safe), as if the
optimiser skipped them; deciding that needs no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

KINDS = ("adam", "sgd")


class RunwiseOptimizer(torch.optim.Optimizer):
    """Adam or SGD with momentum over stacked runs. Each param group holds parameters whose first dimension is
    the run, and ``lr``: a (K,) tensor (or a number, the same for every run)."""

    def __init__(self, params: Iterable, kind: str = "adam", betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 momentum: float = 0.9, active: Callable[[], torch.Tensor] | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        super().__init__(params, {"kind": kind, "betas": tuple(betas), "eps": float(eps), "momentum": float(momentum),
                                  "lr": 1e-3})
        self._active = active

    @staticmethod
    def _lr(group: dict, p: torch.Tensor) -> torch.Tensor:
        lr = group["lr"]
        if not torch.is_tensor(lr) or lr.device != p.device or lr.dtype != p.dtype:
            # Once (after construction, or after a checkpoint restored the groups on the CPU): no copy per step.
            lr = torch.as_tensor(lr, dtype=p.dtype).to(p.device).expand(p.shape[0]).clone()
            group["lr"] = lr
        return lr.view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = self._active() if self._active is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                lr = self._lr(group, p)
                grad, state = p.grad, self.state[p]
                if group["kind"] == "adam":
                    beta1, beta2 = group["betas"]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] += 1
                    step = int(state["step"])
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
                    update = (exp_avg / denom).mul_(lr / (1 - beta1**step))
                else:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(group["momentum"]).add_(grad)
                    update = buf * lr
                if active is not None:
                    update.masked_fill_(~active.view(-1, *([1] * (p.dim() - 1))), 0)
                p.sub_(update)
        return loss
