"""What the objective explains (``reconstruct.target``): the victim's parameters, or their displacement from a known
initialisation (the model's owner auditing their own training run)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from ..victim import INIT_FILE  # the victim's initial parameters, beside model.safetensors, same keys

TARGETS = ("theta", "displacement")


def load_target(target: str, victim_dir: str | Path, victim) -> dict[str, torch.Tensor] | None:
    """None for ``theta`` (the objective's own default); for ``displacement``, theta_T - theta_0 by state-dict name,
    theta_0 read from ``<victim_dir>/init.safetensors``."""
    if target == "theta":
        return None
    if target != "displacement":
        raise ConfigError(f"reconstruct.target must be one of {TARGETS}, got {target!r}")
    from ..victim import load_initial_parameters

    init = load_initial_parameters(victim_dir)  # checked against model.safetensors (keys, shapes, finite)
    if init is None:
        raise DataError(f"reconstruct.target=displacement needs the victim's initial parameters ({INIT_FILE}), which "
                        f"are missing: {Path(victim_dir) / 'victim.json'} names none; train the victim with this "
                        "version, or import it with --init")
    # buffers such as the input mean are not trained: the displacement is over the layers only
    return {name: p.detach().double() - init[name].double()
            for name, p in victim.state_dict().items() if name.startswith("layers.")}
