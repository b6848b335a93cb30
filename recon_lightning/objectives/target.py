"""What the objective explains (``reconstruct.target``): the victim's parameters, or their displacement from a known
initialisation (the model's owner auditing their own training run)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, DataError

TARGETS = ("theta", "displacement")
INIT_FILE = "init.safetensors"  # the victim's initial parameters, beside model.safetensors, same keys


def load_target(target: str, victim_dir: str | Path, victim) -> dict[str, torch.Tensor] | None:
    """None for ``theta`` (the objective's own default); for ``displacement``, theta_T - theta_0 by state-dict name,
    theta_0 read from ``<victim_dir>/init.safetensors``."""
    if target == "theta":
        return None
    if target != "displacement":
        raise ConfigError(f"reconstruct.target must be one of {TARGETS}, got {target!r}")
    path = Path(victim_dir) / INIT_FILE
    if not path.is_file():
        raise DataError(f"reconstruct.target=displacement needs the victim's initial parameters, {path}, which is "
                        "missing: train the victim with this version, or import it with --init")
    from safetensors.torch import load_file

    try:
        init = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any read failure means a corrupt file
        raise DataError(f"the victim's initial parameters are unreadable: {path}: {err}") from None
    out = {}
    for name, p in victim.state_dict().items():
        if not name.startswith("layers."):
            continue  # buffers such as the input mean are not trained
        if name not in init:
            raise DataError(f"{path} lacks {name!r}: it must hold the same keys as model.safetensors")
        if init[name].shape != p.shape:
            raise DataError(f"{path}: {name!r} is {tuple(init[name].shape)}, the victim's {tuple(p.shape)}")
        out[name] = p.detach().double() - init[name].double()
    return out
