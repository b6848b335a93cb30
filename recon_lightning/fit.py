"""Entry point: ``python -m recon_lightning.fit [key=value ...]``.

Composes the YAML configs in ``configs/`` with Hydra onto the stages' schemas (so Hydra refuses unknown keys and
values of the wrong type), applies command-line overrides (plain ``key=value``, so W&B sweep agents can call it
directly), checks every value, then runs the stages selected by ``stage=`` in pipeline order, reusing finished
stages from ``run_dir``. Everything about a stage (its config schema, the keys that change its outputs, its
inputs and outputs, ...) is declared by its module as ``STAGE``; this module only lists them in order.
"""

from __future__ import annotations

if __name__ == "__main__":
    # The command line takes SIGUSR1 (SLURM's time-limit warning) from its first moment, not only once the imports
    # below (seconds) are done: the default action would kill the process (recon_lightning.preempt).
    from recon_lightning import preempt as _preempt

    _preempt.install()

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict

import hydra
import torch
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import distributed, embed, evaluate, invert, preempt, reconstruct, select, shadow, victim
from .config import CONFIG_DIR, Section, auto_or_int, check_values, config_error, register, root_schema, rule
from .errors import ConfigError, ReconError
from .stages import Stage, run_stages, stages_to_run, up_to_date
from .storage import atomic_path, remove_temp_files, run_dir_lock
from .threads import choose_threads
from .training import LoggerConfig

log = logging.getLogger("recon_lightning")

# The pipeline, top to bottom (each stage module imports its own heavy dependencies: torch, Lightning, faiss).
PIPELINE: list[Stage] = [embed.STAGE, victim.STAGE, reconstruct.STAGE, shadow.STAGE, select.STAGE, invert.STAGE,
                         evaluate.STAGE]


@dataclass
class RunConfig:
    """Schema of the top-level keys (values: configs/config.yaml); the stages' sections are added to it."""

    stage: Any = rule(test=lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                      what="a stage name, all, or a list of stage names")  # typed Any: a name or a list of names
    run_dir: str = MISSING
    seed: int = MISSING
    threads: Any = auto_or_int(ge=1)  # torch's CPU threads (recon_lightning.threads); typed Any: auto or an integer
    # Open: passed to every lightning.Trainer, which checks its own arguments.
    trainer: Dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


SECTIONS: list[Section] = [section for stage in PIPELINE for section in stage.sections]
Config = root_schema(RunConfig, SECTIONS)


def register_with_hydra() -> None:
    """What Hydra needs before it composes the config (by :func:`main` and :func:`load_config`): the schemas that
    configs/*.yaml name in their defaults lists, and the config's own interpolation (``hydra.run.dir`` uses
    ``recon_lightning.trial_run_dir``)."""
    register(Config, SECTIONS)
    if not OmegaConf.has_resolver("recon_lightning.trial_run_dir"):
        OmegaConf.register_new_resolver("recon_lightning.trial_run_dir", trial_run_dir)


def wanted_stages(cfg: DictConfig, stages: list[Stage]) -> list[str]:
    names = [s.name for s in stages]
    requested = cfg.stage
    requested = [requested] if isinstance(requested, str) else list(requested)
    if "all" in requested:
        return names
    unknown = [r for r in requested if r not in names]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; choose from {names + ['all']}")
    return requested


def check_config(cfg: DictConfig, stages: list[Stage], wanted: list[str]) -> None:
    """Check the whole config *before* the first stage starts, so a typo in ``invert.*`` fails in seconds, not
    after an hour of reconstruction: the schema's value rules everywhere, then the checks of the stages that will
    run (several keys together, files a key names)."""
    check_values(cfg)
    for stage in stages_to_run(cfg, stages, wanted):
        stage.check(cfg)


def trial_run_dir(run_dir: str | Path) -> str:
    """The run_dir a W&B sweep-agent trial works in: ``<run_dir>/sweeps/<sweep id>/<run id>`` when the agent set
    ``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` for the trial, else ``run_dir`` itself. The config's ``hydra.run.dir``
    uses it too (resolver ``recon_lightning.trial_run_dir``), so each trial's Hydra output (``.hydra/``, the job
    log) lands in the trial's own folder."""
    ids = _agent_trial()
    return str(run_dir) if ids is None else str(Path(run_dir).expanduser().resolve() / "sweeps" / ids[0] / ids[1])


def _agent_trial() -> tuple[str, str] | None:
    """(sweep id, run id) of the W&B sweep-agent trial this process is, or None."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return (sweep_id, run_id) if sweep_id and run_id else None


def multirun_job() -> tuple[int, Path] | None:
    """(job number, job folder) when this is a job of a Hydra multirun (``-m``, any launcher: in this process,
    ``hydra/launcher=local`` or ``hydra/launcher=slurm``), else None. The folder is ``hydra.sweep.dir/subdir``:
    ``<run_dir>/multirun/<date>_<time>/<job number>`` (configs/config.yaml)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return int(hydra_cfg.job.num), Path(hydra_cfg.runtime.output_dir).resolve()


def sweep_trial(cfg: DictConfig) -> DictConfig:
    """Give each trial of a sweep its own run_dir, so concurrent trials never share a folder; elsewhere ``cfg`` is
    returned unchanged.

    * A W&B sweep-agent trial works in :func:`trial_run_dir` and reuses the base run_dir's victim and training
      embeddings (the sweep file's command runs ``stage=reconstruct``).
    * A job of a Hydra multirun works in its own folder (:func:`multirun_job`) and reuses the base run_dir's
      embeddings and victim when they are up to date for the job's own config (the same check that makes a rerun
      skip them), so a multirun over ``reconstruct.*`` keys trains no victim, and one over ``classifier.*`` keys
      trains each job's own victim in its folder."""
    ids, job = _agent_trial(), None
    if ids is None:
        job = multirun_job()
        if job is None:
            return cfg
    base = Path(cfg.run_dir).expanduser().resolve()
    cfg = cfg.copy()
    with open_dict(cfg):
        if ids is not None:
            cfg.run_dir, share = trial_run_dir(cfg.run_dir), True
            log.info("W&B sweep %s, run %s: run_dir %s", *ids, cfg.run_dir)
        else:
            cfg.run_dir = str(job[1])
            share = not cfg.reconstruct.get("victim_dir") and up_to_date(cfg, PIPELINE[:2], base)
            log.info("multirun job %d: run_dir %s, %s", job[0], cfg.run_dir,
                     f"reusing the victim and embeddings of {base}" if share else
                     f"its own victim (none in {base} is up to date for this job's config)")
        if share and not cfg.reconstruct.get("victim_dir"):
            cfg.reconstruct.victim_dir = str(base / "classifier")
        if share and not cfg.reconstruct.get("embeddings_dir"):
            cfg.reconstruct.embeddings_dir = str(base)
    return cfg


def clean_temp_files(run_dir: Path, stage_names: list[str]) -> None:
    """Remove the temporary files a killed job left behind (in run_dir itself and its stages' folders; not in
    ``sweeps/``, whose trials are run_dirs of their own with their own locks). Called under the run_dir lock."""
    removed = remove_temp_files(run_dir, recursive=False) + sum(
        remove_temp_files(run_dir / name) for name in [*stage_names, "report"] if (run_dir / name).is_dir())
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted job in %s", removed, run_dir)


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the same config ``python -m recon_lightning.fit`` would (for the Python API and tests); what Hydra
    refuses (an unknown key, a value of the wrong type, an unknown option) is a :class:`ConfigError`."""
    from hydra import compose, initialize_config_dir

    register_with_hydra()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        try:
            return compose(config_name="config", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as err:
            raise config_error(err) from None


def main_with_config(cfg: DictConfig, on_lock: Callable[[Path], None] | None = None) -> dict:
    """Run the pipeline for an already-composed config (used by ``main`` and by tests). ``on_lock(run_dir)`` runs
    once the run_dir lock is held, before the first stage (``main`` records the composed config there)."""
    stages = list(PIPELINE)
    cfg = sweep_trial(cfg)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    wanted = wanted_stages(cfg, stages)
    check_config(cfg, stages, wanted)
    # One writer per run_dir: the process that starts the job (rank 0) holds the lock until it exits;
    # the other DDP ranks of the same job work under it.
    with run_dir_lock(run_dir) if distributed.is_rank_zero() else contextlib.nullcontext():
        if distributed.is_rank_zero():
            clean_temp_files(run_dir, [s.name for s in stages])
            if on_lock is not None:
                on_lock(run_dir)
        summaries = run_stages(cfg, stages, wanted, run_dir)
    for name, summary in summaries.items():
        log.info("%s: %s", name, summary)
    return summaries


# Lightning's lines that say nothing about this run: which accelerators exist (the log names the device used where
# it matters), the validation settings every stage makes itself, and how to use SLURM when it is not in use.
LIGHTNING_NOISE = ("GPU available:", "TPU available:", "HPU available:", "IPU available:", "`Trainer(limit_val_batches=",
                   "`Trainer(val_check_interval=", "`Trainer(limit_train_batches=", "Tip:")


def _quiet_library_logs() -> None:
    """Lightning prints to its own console handler *and* propagates to Hydra's: keep one copy, and drop the lines of
    :data:`LIGHTNING_NOISE`, its SLURM hint (``srun`` is on the PATH but not in use) and a deprecation warning
    from its internals."""
    import lightning.pytorch  # noqa: F401  (it installs its console handler on import)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                lg.removeHandler(handler)
        lg.propagate = True
    for handler in logging.getLogger().handlers:  # Hydra's console and file handlers
        handler.addFilter(lambda record: not any(noise in record.getMessage() for noise in LIGHTNING_NOISE))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")


def record_hydra_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write ``run_dir/.hydra/{config,hydra,overrides}.yaml`` as Hydra would, but under the run_dir lock: Hydra itself
    writes them before the job starts (``hydra.output_subdir`` is null in configs/config.yaml), so a job refused
    because another one holds the run_dir would overwrite the record of the job whose outputs are there."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    files = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
             "overrides.yaml": OmegaConf.create(list(hydra_cfg.overrides.task))}
    for name, content in files.items():
        with atomic_path(run_dir / ".hydra" / name) as tmp:
            tmp.write_text(OmegaConf.to_yaml(content))


@hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
def _run(cfg: DictConfig) -> dict:
    # Every run works offline unless the user opts in: no W&B server needed (a sweep agent's trials follow the
    # agent's environment, see training.wandb_mode).
    if not os.environ.get("WANDB_SWEEP_ID"):
        os.environ.setdefault("WANDB_MODE", "offline")
    _quiet_library_logs()
    # SIGUSR1 (SLURM's warning before the time limit) stops the job at a safe point with its work saved; installed
    # before any Trainer, so Lightning's own SLURM handler (which can deadlock DDP) is never installed.
    preempt.install()
    # Small-init and weight-decayed weights reach denormal floats, which are ~10x slower on CPUs.
    torch.set_flush_denormal(True)
    choose_threads(cfg.threads)
    try:
        return main_with_config(cfg, on_lock=lambda run_dir: record_hydra_config(cfg, run_dir))
    except (ReconError, preempt.Interrupted) as err:
        if multirun_job() is not None:
            # A job of a Hydra multirun raises, so its launcher reports it as failed (an exit would leave the
            # submitit launcher without a result, waiting for ever on a cluster without accounting).
            log.error("%s: %s", "interrupted" if isinstance(err, preempt.Interrupted) else "error", err)
            raise
        if isinstance(err, preempt.Interrupted):
            # Stopped on request with its work saved: the same command resumes (run_ddp.sbatch requeues the job).
            # A rank that Lightning's launcher started from rank 0 ends with 0: rank 0 reports the job's code, and
            # its launcher would kill it, mid-exit, on seeing a rank end with another.
            code = 0 if distributed.started_by_rank_zero() else preempt.EXIT_CODE
            _say(f"interrupted (rank {distributed.global_rank()}): {err}. Run the same command again to resume"
                 + (f" (exit code {code})" if code else ""))
            sys.exit(code)
        # A problem the user can fix: say what it is, without a traceback from deep inside a library.
        _say(f"error: {err}")
        sys.exit(2)


def _say(line: str) -> None:
    """Print ``line`` to stderr in one write: the ranks of a DDP job share it, and ``print`` writes the text and its
    newline separately, so two ranks' lines could interleave into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main() -> None:
    """The command line. What Hydra refuses while composing (an unknown key, a wrong type, an unknown option) is
    printed as an ``error:`` line with exit code 2, like every problem the user can fix."""
    register_with_hydra()
    # Hydra would print its own multi-line message and exit 1; with HYDRA_FULL_ERROR it raises instead (and a
    # crash inside a stage shows Python's full traceback rather than Hydra's trimmed one).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _run()
    except HydraException as err:  # composition only: the stages raise ReconError, handled in _run
        print(f"error: {config_error(err)}", file=sys.stderr)
        sys.exit(2)
    except (ReconError, preempt.Interrupted) as err:  # a multirun job's (in this process), re-raised by Hydra
        print(f"error: a multirun job failed: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        if not type(err).__module__.startswith("submitit"):
            raise
        # A job of hydra/launcher=slurm|local failed: submitit's report quotes the job's own error and log.
        print(f"error: a multirun job failed: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
