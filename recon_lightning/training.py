"""Lightning Trainer and logger construction shared by the optimisation stages.

Every stage builds its Trainer here so that ``trainer.*`` (accelerator, devices, num_nodes,
strategy, precision) and ``logger.*`` apply uniformly, and metrics always land in ``run_dir``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import MISSING, DictConfig, OmegaConf

from . import distributed, preempt
from .config import rule, section
from .errors import ConfigError

log = logging.getLogger(__name__)

LOGGERS = ("csv", "wandb", "tensorboard", "none")


@dataclass
class WandbConfig:
    """Schema of ``logger.wandb`` (values: configs/config.yaml)."""

    project: str = MISSING
    entity: Optional[str] = MISSING
    group: Optional[str] = MISSING
    mode: str = rule(choices=("auto", "offline", "online"))


@dataclass
class LoggerConfig:
    """Schema of ``logger`` (values: configs/config.yaml)."""

    name: str = rule(choices=LOGGERS)
    wandb: WandbConfig = section(WandbConfig)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU; any other value is a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def progress_enabled(cfg: DictConfig) -> bool:
    """``trainer.enable_progress_bar``: the Trainers' bars and every stage's own (embedding, selection) follow it."""
    return bool(cfg.trainer.get("enable_progress_bar", True))


def wandb_mode(cfg: DictConfig) -> str:
    """``logger.wandb.mode``; ``auto`` = the agent's ``WANDB_MODE`` (else online) under a W&B sweep agent,
    offline otherwise (no account, no network)."""
    mode = str(cfg.logger.wandb.mode)
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_SWEEP_ID"):
        return os.environ.get("WANDB_MODE") or "online"
    return "offline"


def build_logger(cfg: DictConfig, run_dir: Path, stage: str, resume_step: int | None = None) -> Logger | bool:
    """The configured Lightning logger for one stage (CSV/TensorBoard files in ``run_dir/<stage>/logs``,
    so they move aside with the stage's outputs when its config changes). Build it once per stage and pass it to
    every Trainer of the stage: with W&B, each call starts a new W&B run (and finishes the previous stage's).
    W&B runs offline unless ``logger.wandb.mode`` or a sweep agent says otherwise; sync later with
    ``wandb sync <run_dir>/wandb/offline-run-*``.

    ``resume_step``: a stage whose fit resumes at that step (its logged ``step``) keeps the rows of ``metrics.csv``
    logged up to it; the CSV logger then writes every row as it is logged, so a killed fit's rows are on disk.
    None: a new ``metrics.csv`` (Lightning's CSV logger deletes the old one when it starts)."""
    name = cfg.logger.name
    if name == "csv":
        if resume_step is None:
            return CSVLogger(save_dir=str(run_dir / stage), name="logs", version="")
        return _resumed_csv_logger(run_dir / stage, int(resume_step))
    if name == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        import wandb

        wb = cfg.logger.wandb
        mode = wandb_mode(cfg)
        os.environ.setdefault("WANDB_SILENT", "true")
        if wandb.run is not None:  # one W&B run per stage, grouped by run_dir: the previous stage's run ends here
            wandb.finish()
        return WandbLogger(
            project=wb.project,
            entity=wb.entity,
            group=wb.group or Path(cfg.run_dir).name,
            name=f"{Path(cfg.run_dir).name}-{stage}",
            save_dir=str(run_dir),
            offline=mode == "offline",
            mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    if name == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir / stage), name="logs", version="")
    return False  # logger.name=none


def _resumed_csv_logger(save_dir: Path, resume_step: int) -> CSVLogger:
    """A CSV logger that writes each row as it is logged, its ``metrics.csv`` starting with the earlier rows whose
    ``step`` is at most ``resume_step`` (those after it are logged again by the resumed fit)."""
    logger = CSVLogger(save_dir=str(save_dir), name="logs", version="", flush_logs_every_n_steps=1)
    path = Path(logger.log_dir) / "metrics.csv"
    if not distributed.is_rank_zero() or not path.is_file():
        return logger
    with open(path, newline="") as f:
        kept = [row for row in csv.DictReader(f) if row.get("step") and float(row["step"]) <= resume_step]
    writer = logger.experiment  # Lightning's writer deletes the old metrics.csv here: write the kept rows again
    for row in kept:
        writer.log_metrics({k: float(v) for k, v in row.items() if k != "step" and v != ""}, step=int(float(row["step"])))
    writer.save()
    return logger


class StopOnSignal(Callback):
    """Stops a fit cleanly on SIGUSR1 (:mod:`recon_lightning.preempt`): at the end of every Lightning step, if any
    rank received it (under DDP the ranks agree with one all-reduce, at the same step on every rank), every rank
    saves the fit's checkpoint together (``hpc_ckpt_N.ckpt`` in its folder, when the fit checkpoints at all) and
    raises :class:`recon_lightning.preempt.Interrupted`. :func:`make_trainer` gives it to every Trainer."""

    def setup(self, trainer, pl_module, stage) -> None:
        preempt.forward_to(getattr(trainer.strategy.launcher, "procs", None) or [])  # rank 0 of Lightning's launcher

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(preempt.requested(), all=False):
            return
        where = f"at step {trainer.global_step}"
        if trainer.checkpoint_callbacks:
            path = trainer.strategy.broadcast(preempt.hpc_checkpoint_path(trainer.default_root_dir))  # rank 0's name
            trainer.save_checkpoint(str(path), weights_only=False)  # every rank: rank 0 writes, then a barrier
            where += f", its checkpoint saved to {path}"
        else:
            where += " (checkpoints are off: the running fit starts over)"
        raise preempt.interrupted(where)


QUIET_OVERRIDES = ("max_epochs", "precision", "logger", "default_root_dir", "accelerator", "devices", "strategy", "num_nodes")


def stage_progress_bar(title: str, per_step: int, unit: str):
    """Lightning's tqdm progress bar counted in the stage's own units: each Lightning step runs ``per_step`` of them
    (the victim's epochs, reconstruction's optimisation steps), so the bar reads "1500/20000 epoch [02:10<26:40,
    10.6 epoch/s]". Its ETA comes from the average speed since the start. (Lightning's default bar when rich is
    installed estimates the speed over the last 30 s only: a stage whose Lightning steps take longer, such as a
    large victim's 500 epochs per step, shows no ETA at all.)"""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class StageProgressBar(TQDMProgressBar):
        def init_train_tqdm(self):
            bar = super().init_train_tqdm()
            bar.unit = unit
            return bar

        def on_train_start(self, trainer, *args) -> None:
            super().on_train_start(trainer, *args)
            self._count_in_units()  # a fit resumed mid-epoch gets no on_train_epoch_start

        def on_train_epoch_start(self, trainer, *args) -> None:
            super().on_train_epoch_start(trainer, *args)
            self._count_in_units()

        def _count_in_units(self) -> None:
            bar = self.train_progress_bar
            bar.set_description(title)
            total = self.total_train_batches
            bar.total = total * per_step if total and math.isfinite(total) else None
            self.first_update = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            bar = self.train_progress_bar
            if bar is None or bar.disable:
                return
            if self.first_update:  # a resumed fit starts at batch_idx: the speed counts only what this job ran
                bar.initial, self.first_update = batch_idx * per_step, False
            # a schedule whose length is not a multiple of per_step ends with a shorter step
            bar.n = min((batch_idx + 1) * per_step, bar.total or (batch_idx + 1) * per_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    return StageProgressBar()


def make_trainer(cfg: DictConfig, run_dir: Path, stage: str, logger: Logger | bool, progress: tuple[int, str] = (1, "step"),
                 progress_title: str | None = None, **overrides: Any) -> L.Trainer:
    """A Trainer from ``cfg.trainer`` (hardware/distribution) plus the stage's own ``overrides``
    (e.g. ``max_steps``); ``trainer.max_epochs`` is the victim's training length. ``logger`` is the
    stage's logger from :func:`build_logger` (built once per stage, shared by its Trainers) or False. ``progress``:
    (units per Lightning step, unit name) of its progress bar (:func:`stage_progress_bar`), titled ``progress_title``
    (default: the stage's name). Every Trainer stops cleanly on SIGUSR1 (:class:`StopOnSignal`)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(default_root_dir=str(run_dir / stage), logger=logger, enable_model_summary=False)
    for key, value in overrides.items():
        # A Trainer setting the stage owns (its length, its logging cadence from <stage>.log_every_n_*, ...)
        # replaces the user's trainer.<key>; say so rather than ignore it silently. trainer.max_epochs is the
        # victim's length by design, and trainer.precision is checked by the stages that constrain it. The device keys
        # are the sharded stages' per-rank single-device Trainers resolved from the user's own trainer.* (not replaced).
        if key in kwargs and key not in QUIET_OVERRIDES and kwargs[key] != value:
            log.warning("stage %s sets the Trainer's %s=%r (from its own config), not trainer.%s=%r", stage, key, value,
                        key, kwargs[key])
    kwargs.update(overrides)
    callbacks = [*(kwargs.get("callbacks") or []), StopOnSignal()]
    if kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(stage_progress_bar(progress_title or stage, *progress))
    kwargs["callbacks"] = callbacks
    if "plugins" not in kwargs and SLURMEnvironment.detect():
        # SIGUSR1 is StopOnSignal's: Lightning's own SLURM requeue handler (a checkpoint saved inside the signal
        # handler, which can deadlock DDP) stays off, and the SLURM script requeues the job.
        kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    # Every stage's training loader yields the same item at every position (steps_loader, the victim's full batch),
    # so a fit resumed mid-epoch is exact; Lightning cannot know that and would warn on every resume.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended",
                            category=PossibleUserWarning)
    # Every stage optimises manually and checkpoints the state after step N with global_step N, which is what
    # resuming needs (Lightning's warning says the state is the one after the optimiser step, with a code example).
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    try:
        return L.Trainer(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid trainer settings for stage {stage}: {err}") from None


def checkpointing(run_dir: Path, stage: str, every_n_steps: int, name: str | None = None) -> tuple[Any, str | None]:
    """A callback that keeps ``run_dir/<stage>/checkpoints[/<name>]/last.ckpt`` fresh, and the checkpoint
    to resume from if a previous attempt was killed (None otherwise). ``name`` separates the fits of
    a stage that runs several (one per batch of reconstruction runs or inversion targets).

    Build the Trainer with ``default_root_dir=checkpoint_dir(...)``: SLURM pre-emption checkpoints
    (``hpc_ckpt_N.ckpt``, written on ``--signal=SIGUSR1@90``) then land beside ``last.ckpt``, and the
    newer of the two is resumed. Resume with ``trainer.fit(..., ckpt_path=ckpt, weights_only=True)``:
    no pickled code is run.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    directory = checkpoint_dir(run_dir, stage, name)
    callback = ModelCheckpoint(dirpath=str(directory), save_last=True, save_top_k=0,
                               every_n_train_steps=max(1, int(every_n_steps)), save_on_train_epoch_end=False)
    found = [p for p in [directory / "last.ckpt", *directory.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    for path in sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        # Lightning writes checkpoints in place: a kill during the write leaves a truncated file
        # (torch.save's zip archive then lacks its end record). Skip it rather than fail to resume.
        problem = unreadable_checkpoint(path)
        if problem is None:
            return callback, str(path)
        log.warning("ignoring damaged checkpoint %s (%s)", path, problem)
    return callback, None


def unreadable_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it can: it must be a complete torch.save zip archive whose
    pickle holds only tensors and plain containers (read with ``weights_only=True``: pickled code is refused, never
    run; memory-mapped, so the tensors are not read twice)."""
    if not zipfile.is_zipfile(path):
        return "not a complete checkpoint archive: the job was probably killed while writing it"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        return f"it holds more than tensors and plain values, which are not loaded: {str(err).splitlines()[0]}"
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        return f"unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return None


def steps_loader(steps: int):
    """One (ignored) item per Lightning step, for stages that optimise parameters without data: its
    length gives the progress bar a total and an ETA."""
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.zeros(max(1, int(steps)))), batch_size=1)


class InnerSteps:
    """Optimiser steps of an inner loop inside one manual-optimisation ``training_step`` (many optimisation steps per
    Lightning step). Use ``opt = InnerSteps(module)`` once per training_step, then per inner step
    ``opt.zero_grad(); opt.backward(loss); opt.step(last=...)``.

    Every step counts in ``global_step`` (so ``max_steps``, checkpoint cadences and resume stay in optimisation
    steps). The last step of the call goes through Lightning (``manual_backward``, ``LightningOptimizer.step``: its
    callbacks' ``on_before_backward`` / ``on_after_backward`` / ``on_before_optimizer_step`` hooks run once per
    Lightning step). The others skip those hooks (~0.1 ms of Python each, 10-15 % of a small victim's epoch) when
    that changes nothing: one process on one device, and a precision plugin that neither scales the loss nor
    wraps the optimiser step (32-true, 64-true, bf16-mixed). Under DDP (the backward must prepare the reducer),
    16-mixed (loss scaling) or any other strategy, every step goes through Lightning.
    """

    def __init__(self, module: L.LightningModule):
        self.module = module
        self.opt = module.optimizers()
        self.fast = self._plain(module) and hasattr(self.opt, "_on_before_step") and hasattr(self.opt, "optimizer")

    @staticmethod
    def _plain(module: L.LightningModule) -> bool:
        from lightning.pytorch.plugins.precision import DoublePrecision, MixedPrecision, Precision
        from lightning.pytorch.strategies import SingleDeviceStrategy

        trainer = module.trainer
        precision = trainer.strategy.precision_plugin
        plain_precision = type(precision) in (Precision, DoublePrecision) or (
            type(precision) is MixedPrecision and precision.scaler is None)
        return type(trainer.strategy) is SingleDeviceStrategy and trainer.world_size == 1 and plain_precision

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.fast and not last:
            loss.backward()
        else:
            self.module.manual_backward(loss)

    def step(self, last: bool) -> None:
        if self.fast and not last:
            # LightningOptimizer.step without the strategy / precision plugin round trip (plain for these
            # plugins): the same progress counting, so global_step advances by one.
            self.opt._on_before_step()
            try:
                self.opt.optimizer.step()
            finally:
                self.opt._on_after_step()
        else:
            self.opt.step()


def checkpoint_dir(run_dir: Path, stage: str, name: str | None = None) -> Path:
    directory = Path(run_dir) / stage / "checkpoints"
    return directory / name if name else directory


def run_on_every_rank(cfg: DictConfig, run_dir: Path, stage: str, work: Callable[..., Any], *args: Any) -> Any:
    """Start the processes that ``trainer.*`` asks for and run ``work(rank, world, device_kw, *args)`` in each.

    For stages whose ranks share no gradients (reconstruction runs and inversion targets are
    independent): the user's Trainer only launches the world (DDP subprocesses, or the processes
    SLURM / torchrun started), then each rank fits its own shard with single-device Trainers built
    with ``device_kw``. DDP would only all-reduce unrelated parameters and make every rank run the
    same number of fits; this way each rank also checkpoints and resumes its own fits.
    """
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    outer = make_trainer(cfg, run_dir, stage, False, enable_checkpointing=False)
    launcher = outer.strategy.launcher
    if launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher):
        raise ConfigError(f"stage {stage} supports trainer.strategy=ddp (or auto / torchrun / SLURM), "
                          f"not {type(outer.strategy).__name__} with {type(launcher).__name__}")

    def on_rank() -> Any:
        preempt.forward_to(getattr(launcher, "procs", None) or [])  # the ranks this one started, if any
        strategy = outer.strategy
        if hasattr(strategy, "set_world_ranks"):
            strategy.set_world_ranks()  # reads LOCAL_RANK / NODE_RANK set by the launcher
        root = strategy.root_device
        device_kw = {"accelerator": root.type, "devices": [root.index] if root.type == "cuda" else 1,
                     "num_nodes": 1, "strategy": "auto"}
        return work(int(strategy.global_rank), int(strategy.world_size), device_kw, *args)

    return launcher.launch(on_rank) if launcher is not None else on_rank()
