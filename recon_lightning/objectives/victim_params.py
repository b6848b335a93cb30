"""The victim's fixed parameters as buffers of an objective, and what it is asked to explain of them."""

from __future__ import annotations

import torch

from ..errors import DataError
from .base import Objective


class VictimObjective(Objective):
    """An objective holding the victim MLP's layers as buffers ``w{i}`` / ``b{i}`` (not saved with checkpoints)."""

    def register_victim(self, victim, dtype: torch.dtype) -> None:
        self.has_bias = [layer.bias is not None for layer in victim.layers]
        self.n_layers = len(victim.layers)
        for i, layer in enumerate(victim.layers):
            self.register_buffer(f"w{i}", layer.weight.detach().to(dtype).clone(), persistent=False)
            if layer.bias is not None:
                self.register_buffer(f"b{i}", layer.bias.detach().to(dtype).clone(), persistent=False)

    def param_names(self) -> list[str]:
        """``w{i}`` / ``b{i}``, in :meth:`victim_params` order."""
        return [name for i in range(self.n_layers) for name in (f"w{i}", f"b{i}")[: 1 + self.has_bias[i]]]

    def state_names(self) -> list[str]:
        """The victim's state-dict names (``layers.{i}.weight`` / ``layers.{i}.bias``), in :meth:`victim_params` order."""
        return [f"layers.{name[1:]}.{'weight' if name[0] == 'w' else 'bias'}" for name in self.param_names()]

    def victim_params(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.param_names()]

    def displacement(self, target: dict[str, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """``target`` (state-dict name -> tensor) in :meth:`victim_params` order, its names and shapes checked."""
        out = []
        for name, p in zip(self.state_names(), self.victim_params()):
            if name not in target:
                raise DataError(f"the target displacement has no {name!r} (it has {sorted(target)})")
            t = target[name].to(p.device, dtype)
            if t.shape != p.shape:
                raise DataError(f"the target displacement's {name!r} is {tuple(t.shape)}, the victim's {tuple(p.shape)}")
            out.append(t)
        return out

    def first_layer(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The first layer's weight and bias, and the next layer's weight (None without a hidden layer)."""
        return self.w0, getattr(self, "b0", None), getattr(self, "w1", None)
