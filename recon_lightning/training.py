"""Lightning Trainer and logger construction shared by the optimisation stages.

Every stage builds its Trainer here so that ``trainer.*`` (accelerator, devices, num_nodes,
strategy, precision) and ``logger.*`` apply uniformly, and metrics always land in ``run_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

LOGGERS = ("csv", "wandb", "tensorboard", "none")


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; any other value is a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_logger(cfg: DictConfig, run_dir: Path, stage: str) -> Logger | bool:
    """The configured Lightning logger for one stage (CSV/TensorBoard files in ``run_dir/<stage>/logs``,
    so they move aside with the stage's outputs when its config changes). W&B defaults to offline mode (no account,
    no network); sync later with ``wandb sync <run_dir>/wandb/offline-run-*``."""
    name = cfg.logger.name
    if name == "csv":
        return CSVLogger(save_dir=str(run_dir / stage), name="logs", version="")
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        import wandb

        wb = cfg.logger.wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        if wandb.run is not None:  # one W&B run per stage, grouped by run_dir
            wandb.finish()
        return WandbLogger(
            project=wb.project,
            entity=wb.entity,
            group=wb.group or Path(cfg.run_dir).name,
            name=f"{Path(cfg.run_dir).name}-{stage}",
            save_dir=str(run_dir),
            offline=wb.mode == "offline",
            mode=wb.mode,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir / stage), name="logs", version="")
    if name == "none":
        return False
    raise ConfigError(f"unknown logger.name {name!r}; choose from {LOGGERS}")


def make_trainer(cfg: DictConfig, run_dir: Path, stage: str, **overrides: Any) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` (hardware/distribution) plus the stage's own ``overrides``
    (e.g. ``max_steps``); ``trainer.max_epochs`` is the victim's training length."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(
        default_root_dir=str(run_dir / stage),
        logger=build_logger(cfg, run_dir, stage),
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    try:
        return L.Trainer(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid trainer settings for stage {stage}: {err}") from None


def checkpointing(run_dir: Path, stage: str, every_n_steps: int) -> tuple[Any, str | None]:
    """A callback that keeps ``run_dir/<stage>/checkpoints/last.ckpt`` fresh, and the checkpoint to
    resume from if a previous attempt of this stage was killed (None otherwise).

    Resume with ``trainer.fit(..., ckpt_path=ckpt, weights_only=True)``: no pickled code is run.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    directory = run_dir / stage / "checkpoints"
    callback = ModelCheckpoint(dirpath=str(directory), save_last=True, save_top_k=0,
                               every_n_train_steps=max(1, int(every_n_steps)), save_on_train_epoch_end=False)
    last = directory / "last.ckpt"
    return callback, (str(last) if last.is_file() else None)
