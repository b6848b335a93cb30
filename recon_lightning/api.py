"""The Python API: audit a classifier head from a notebook or a script.

``audit`` runs the same Lightning stages as ``python -m recon_lightning.fit`` (reconstruct, select, invert, evaluate)
on a victim folder or an ``nn.Module``::

    from recon_lightning import audit
    result = audit(head, "runs/my_head", backbone="identity", input_size=(1, 8, 8), n_train=100)
    result["summary"], result["paths"]["report_html"]

The steps it composes are importable too: ``recon_lightning.import_victim.import_victim`` (a head to a victim
folder), :func:`load_config` (the composed config, as the command line composes it) and :func:`run_pipeline` (the
stages a config selects, checked first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from omegaconf import OmegaConf

from .errors import ConfigError
from .fit import load_config, main_with_config as run_pipeline
from .import_victim import import_victim
from .storage import load_json

__all__ = ["audit", "import_victim", "load_config", "run_pipeline"]

AUDIT_STAGES = ("reconstruct", "select", "invert", "evaluate")


def audit(victim: str | Path | torch.nn.Module, run_dir: str | Path, *, embeddings: str | Path | None = None,
          backbone: str | None = None, overrides: Sequence[str] | Mapping[str, object] = (),
          stages: Sequence[str] = AUDIT_STAGES, **import_options) -> dict:
    """Reconstruct the training data of ``victim`` and report how much leaks; returns ``{"summary", "stages",
    "paths"}``: report.json's summary, each stage's summary, and the files written.

    ``victim``: a victim folder (``model.safetensors`` + ``victim.json``), a file :func:`import_victim` reads, or an
    ``nn.Sequential`` of ``Linear`` / ``ReLU`` (imported into ``run_dir/victim``; ``import_options`` are
    :func:`import_victim`'s: ``n_train``, ``weight_decay``, ``input_mean``, ``input_size``, ...). ``embeddings``: a
    run folder whose ``embed/`` holds the victim's training embeddings (evaluation mode; without it the audit is the
    attacker's view). ``backbone``: the config name of the backbone that made the victim's inputs (``backbone=``;
    default: the one victim.json records). ``overrides``: more config, ``["key=value", ...]`` or ``{key: value}``."""
    run_dir = Path(run_dir).expanduser().resolve()
    if isinstance(victim, torch.nn.Module) or Path(victim).is_file():
        victim_dir = import_victim(victim, run_dir / "victim", **({"backbone": backbone} if backbone else {}),
                                   **import_options)
    else:
        if import_options:
            raise ConfigError(f"{sorted(import_options)} describe a head to import, but {victim} is a victim folder: "
                              f"its victim.json already says how it was trained")
        victim_dir = Path(victim).expanduser().resolve()
    spec = load_json(victim_dir / "victim.json", what="victim description (victim.json)")
    backbone = backbone or (spec.get("embedding") or {}).get("backbone_name")
    if isinstance(overrides, Mapping):
        overrides = [f"{key}={value}" for key, value in overrides.items()]
    args = [f"run_dir={run_dir}", f"reconstruct.victim_dir={victim_dir}", f"stage=[{','.join(stages)}]",
            *([f"backbone={backbone}"] if backbone else []),
            *([f"reconstruct.embeddings_dir={Path(embeddings).expanduser().resolve()}"] if embeddings else []),
            *overrides]
    os.environ.setdefault("WANDB_MODE", "offline")  # as the command line: no W&B server unless asked for
    cfg = load_config(args)
    summaries = run_pipeline(cfg)
    report = run_dir / "report.json"
    paths = {"run_dir": run_dir, "victim_dir": victim_dir, "report_json": report, "report_html": run_dir / "report.html",
             "candidates": run_dir / "reconstruct" / "candidates.safetensors",
             "selection": run_dir / "select" / "selection.safetensors", "inversions": run_dir / "invert" / "images"}
    summary = load_json(report, what="audit report")["summary"] if report.is_file() else {}
    return {"summary": summary, "stages": summaries, "paths": {k: p for k, p in paths.items() if p.exists()},
            "config": OmegaConf.to_container(cfg, resolve=True)}
