"""Stage 2: the victim classifier, an MLP trained on embeddings, and its on-disk format.

Saved model format (``run_dir/classifier/``, also what a user auditing a model trained
elsewhere provides):

* ``model.safetensors``: the MLP's state dict, keys ``layers.{i}.weight`` (out, in) and
  ``layers.{i}.bias`` for the layers that have a bias;
* ``victim.json``: ``{"format": "recon_lightning.victim/1", "input_dim", "hidden",
  "num_classes", "bias", "activation": "relu", "loss": "bce"|"ce", "weight_decay", ...}``
  plus the training config, final metrics and the embedding's backbone/normalisation.

The network has one logit for two classes (BCE, labels y in {0, 1}) and ``num_classes``
logits otherwise (CE).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError, ModelMismatchError
from .storage import load_json, load_tensors, save_json, save_tensors

VICTIM_FORMAT = "recon_lightning.victim/1"


class VictimMLP(nn.Module):
    """``input_dim -> hidden... -> out`` with ReLU; ``out`` = 1 for two classes, else ``num_classes``."""

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        num_classes: int,
        bias: Sequence[bool] | bool = True,
        init_scale: Sequence[float | None] | float | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.input_dim, self.hidden, self.num_classes = int(input_dim), [int(h) for h in hidden], int(num_classes)
        n_layers = len(self.hidden) + 1
        self.bias = _per_layer(bias, n_layers, "classifier.bias")
        scales = _per_layer(init_scale, n_layers, "classifier.init_scale")
        dims = [self.input_dim, *self.hidden, self.out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(dims[i], dims[i + 1], bias=bool(self.bias[i])) for i in range(n_layers)
        )
        # Small init matters: it is what drives training towards the max-margin KKT point.
        for layer, scale in zip(self.layers, scales):
            if scale is not None:
                nn.init.normal_(layer.weight, std=float(scale))
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    @property
    def out_dim(self) -> int:
        return 1 if self.num_classes == 2 else self.num_classes

    def forward(self, x: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; (B,) for two classes, (B, C) otherwise. ``activation`` replaces ReLU
        (the reconstruction stage passes a ReLU with a smooth backward pass)."""
        act = activation or torch.relu
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = act(x)
        return x.squeeze(-1) if self.out_dim == 1 else x

    def spec(self) -> dict:
        return {
            "format": VICTIM_FORMAT,
            "input_dim": self.input_dim,
            "hidden": self.hidden,
            "num_classes": self.num_classes,
            "bias": [bool(b) for b in self.bias],
            "activation": "relu",
        }


def _per_layer(value, n: int, name: str) -> list:
    if value is None or isinstance(value, (bool, int, float)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ConfigError(f"{name} needs one entry per layer ({n} = len(hidden) + 1), got {len(value)}: {value}")
    return value


def save_victim(directory: str | Path, model: VictimMLP, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` then ``victim.json`` (both atomically) into ``directory``."""
    directory = Path(directory)
    save_tensors(directory / "model.safetensors", model.state_dict(), {"format": VICTIM_FORMAT})
    save_json(directory / "victim.json", {**model.spec(), **(extra or {})})


def load_victim(directory: str | Path, expected_input_dim: int | None = None) -> tuple[VictimMLP, dict]:
    """Load a victim saved by :func:`save_victim` (no pickled code is executed).

    Raises :class:`ModelMismatchError` if the weights do not fit the declared architecture or
    the model's input size differs from ``expected_input_dim`` (the embedding size).
    """
    directory = Path(directory)
    spec = load_json(directory / "victim.json", what="victim description (victim.json)")
    if spec.get("format") != VICTIM_FORMAT:
        raise ModelMismatchError(f"{directory / 'victim.json'}: unknown format {spec.get('format')!r}, expected {VICTIM_FORMAT!r}")
    state, _ = load_tensors(directory / "model.safetensors", what="victim weights")
    model = VictimMLP(spec["input_dim"], spec["hidden"], spec["num_classes"], bias=spec["bias"])
    expected = model.state_dict()
    if set(state) != set(expected):
        raise ModelMismatchError(
            f"victim weights in {directory} do not match victim.json: "
            f"missing {sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelMismatchError(
                f"victim weight {key} has shape {tuple(tensor.shape)} but victim.json implies {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state)
    if expected_input_dim is not None and expected_input_dim != model.input_dim:
        raise ModelMismatchError(
            f"embedding size mismatch: the victim expects {model.input_dim}-d inputs but the embeddings are "
            f"{expected_input_dim}-d (was the victim trained on another backbone?)"
        )
    return model.eval(), spec
