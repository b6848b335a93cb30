"""Entry point: ``python -m recon_lightning.fit [key=value ...]``.

Composes the YAML configs in ``configs/`` with Hydra, applies command-line overrides
(plain ``key=value``, so W&B sweep agents can call it directly) and runs the stages
selected by ``stage=`` in pipeline order, reusing finished stages from ``run_dir``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from . import distributed
from .errors import ConfigError, ReconError
from .stages import Stage, run_stages, stages_to_run
from .storage import remove_temp_files, run_dir_lock

log = logging.getLogger("recon_lightning")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _stage_fn(module: str):
    """Import a stage module only when its stage runs (keeps start-up fast)."""

    def run(cfg: DictConfig, run_dir: Path):
        return importlib.import_module(f"recon_lightning.{module}").run_stage(cfg, run_dir)

    return run


# The pipeline, top to bottom: (stage name, module, config sections that change its outputs, runs on every DDP rank).
PIPELINE = [
    ("embed", "embed", ["backbone", "data", "embed.normalize", "seed"], False),
    ("classifier", "victim", ["classifier", "trainer.max_epochs", "trainer.precision", "seed"], True),
    ("reconstruct", "reconstruct", ["reconstruct", "trainer.precision", "seed"], True),
    ("select", "select", ["select"], False),
    ("invert", "invert", ["invert", "trainer.precision"], True),
    ("evaluate", "evaluate", ["evaluate"], False),
]
# Keys that only set how often to log / checkpoint / poll: changing them reruns nothing.
CADENCE_KEYS = {
    "classifier": ["classifier.log_every_n_epochs", "classifier.checkpoint_every_n_epochs"],
    "reconstruct": ["reconstruct.log_every_n_steps", "reconstruct.checkpoint_every_n_steps", "reconstruct.wait_timeout_s"],
    "invert": ["invert.checkpoint_every_n_steps", "invert.log_every_n_steps"],
}
# Keys whose change keeps the finished part of the stage: reconstruction run r (and inversion
# target t) is the same whatever the total, so raising the count only adds the missing ones; a
# longer victim schedule continues from the victim's last checkpoint.
RESUMABLE_KEYS = {
    "classifier": ["trainer.max_epochs", "classifier.epochs"],
    "reconstruct": ["reconstruct.num_runs", "reconstruct.runs_per_batch"],
    "invert": ["invert.num_images"],
}

# The files each stage writes (globs relative to run_dir): DONE.json records their sizes and hashes, a stage whose
# outputs went missing or changed runs again, and the next stage's fingerprint includes them.
OUTPUTS = {
    "embed": ["embed/*.safetensors", "embed/samples.json"],
    "classifier": ["classifier/model.safetensors", "classifier/victim.json", "classifier/margins.png"],
    "reconstruct": ["reconstruct/candidates.safetensors", "reconstruct/runs/*.safetensors"],
    "select": ["select/selection.safetensors", "select/clusters.json"],
    "invert": ["invert/inversion.json", "invert/text_matches.json", "invert/images/*.png"],
    "evaluate": ["report.json", "report.html", "report/*.png"],
}


def _outside_inputs(cfg: DictConfig) -> list[Path]:
    """Files the reconstruct stage reads from outside run_dir: a victim trained elsewhere (and the training set it
    is scored with), hashed into the fingerprint so that files changed in place are not served stale results."""
    files = []
    rcfg = cfg.reconstruct
    if rcfg.get("victim_dir"):
        files += [Path(rcfg.victim_dir).expanduser() / name for name in ("model.safetensors", "victim.json")]
    if rcfg.get("embeddings_dir"):
        files.append(Path(rcfg.embeddings_dir).expanduser() / "embed" / "embeddings.safetensors")
    return files


def _own_victim(cfg: DictConfig) -> bool:
    """Auditing a victim trained elsewhere (reconstruct.victim_dir): no embed/classifier stages."""
    return bool(OmegaConf.select(cfg, "reconstruct.victim_dir", default=None))


def available_stages() -> list[Stage]:
    """The pipeline's stages whose modules exist, in order."""
    stages = []
    for name, module, keys, all_ranks in PIPELINE:
        if importlib.util.find_spec(f"recon_lightning.{module}") is None:
            continue
        enabled = (lambda cfg: not _own_victim(cfg)) if name in ("embed", "classifier") else (lambda cfg: True)
        stages.append(Stage(name=name, run=_stage_fn(module), config_keys=keys, all_ranks=all_ranks, enabled=enabled,
                            cadence_keys=CADENCE_KEYS.get(name, []), resumable_keys=RESUMABLE_KEYS.get(name, []),
                            outputs=OUTPUTS[name], inputs=_outside_inputs if name == "reconstruct" else (lambda cfg: [])))
    return stages


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


def check_configs(cfg: DictConfig, stages: list[Stage], wanted: list[str]) -> None:
    """Validate the config of every stage that may run *before* the first starts, so a typo in
    ``invert.*`` fails in seconds, not after an hour of reconstruction."""
    modules = {name: module for name, module, _, _ in PIPELINE}
    for stage in stages_to_run(cfg, stages, wanted):
        module = importlib.import_module(f"recon_lightning.{modules[stage.name]}")
        if hasattr(module, "check_config"):
            try:
                module.check_config(cfg)
            except (ValueError, TypeError) as err:  # e.g. int('abc') on a value check_types let through
                raise ConfigError(f"invalid value in the {stage.name} config: {err}") from None


# Sections passed through to a library that validates its own arguments (lightning.Trainer).
OPEN_SECTIONS = {"trainer"}


def known_keys() -> dict:
    """Every key the shipped configs define: config.yaml, plus for each config group the union of
    its options' keys (e.g. ``backbone.model`` exists for timm backbones, not for identity)."""
    root = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "config.yaml"), resolve=False)
    root.pop("defaults", None)
    root.pop("hydra", None)

    def union(into: dict, other: dict) -> None:
        for key, value in other.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                union(into[key], value)
            elif key not in into or isinstance(value, dict):
                into[key] = value

    for group in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir()):
        merged: dict = {}
        for option in sorted(group.glob("*.yaml")):
            union(merged, OmegaConf.to_container(OmegaConf.load(option), resolve=False) or {})
        union(root.setdefault(group.name, {}), merged)
    return root


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys no stage reads (a typo in a user's YAML file or a ``+key=value`` override would
    otherwise be ignored silently and the run would use the default)."""
    known = known_keys()
    given = OmegaConf.to_container(cfg, resolve=False)

    def walk(node: dict, schema: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in OPEN_SECTIONS:
                continue
            if key not in schema:
                close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
                hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys here: {sorted(schema)}"
                raise ConfigError(f"unknown config key '{path}'{hint}")
            if isinstance(value, dict) and isinstance(schema[key], dict):
                walk(value, schema[key], f"{path}.")

    walk(given, known, "")


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "list"
    return "dict" if isinstance(value, dict) else "str"


def known_types() -> dict[str, set[str]]:
    """For every dotted key of the shipped configs, the kinds of its defaults over all options of its group
    (a list contributes its elements' kinds too: ``lr: 0.01`` and ``alpha: [50, 300]`` both hold numbers)."""
    kinds: dict[str, set[str]] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            kinds.setdefault(path, set()).add(_kind(value))
            if isinstance(value, dict):
                walk(value, f"{path}.")
            elif isinstance(value, list):
                kinds[path] |= {_kind(v) for v in value}

    root = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "config.yaml"), resolve=False)
    root.pop("defaults", None)
    root.pop("hydra", None)
    walk(root, "")
    for group in sorted(p for p in Path(CONFIG_DIR).iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            walk(OmegaConf.to_container(OmegaConf.load(option), resolve=False) or {}, f"{group.name}.")
    return kinds


def check_types(cfg: DictConfig) -> None:
    """Refuse a value of the wrong kind for keys whose shipped defaults are all numbers or all booleans
    (``reconstruct.steps=abc``, ``seed=abc``, ``classifier.lr=abc``), before any stage starts. Keys that may be
    null or a string somewhere (``auto``) are left to the stages' own checks."""
    kinds = known_types()
    given = OmegaConf.to_container(cfg, resolve=True)

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if path in OPEN_SECTIONS:
                continue
            if isinstance(value, dict):
                walk(value, f"{path}.")
                continue
            allowed = kinds.get(path, set()) - {"list"}
            if not allowed or not allowed <= {"number", "bool"}:
                continue
            # in a list, null is an entry's default (classifier.init_scale=[1e-3,null])
            values = [v for v in value if v is not None] if isinstance(value, list) else [value]
            bad = [v for v in values if _kind(v) not in allowed]
            if bad:
                what = " or ".join("a number" if k == "number" else "true/false" for k in sorted(allowed))
                raise ConfigError(f"config key '{path}' must be {what}, got {bad[0]!r}")

    walk(given, "")


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


def sweep_trial(cfg: DictConfig) -> DictConfig:
    """Under a W&B sweep agent, give each trial its own run_dir (:func:`trial_run_dir`) that reuses the base
    run_dir's victim and training embeddings, so concurrent trials never share a folder. Elsewhere ``cfg`` is
    returned unchanged."""
    ids = _agent_trial()
    if ids is None:
        return cfg
    base = Path(cfg.run_dir).expanduser().resolve()
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.run_dir = trial_run_dir(cfg.run_dir)
        if not cfg.reconstruct.get("victim_dir"):
            cfg.reconstruct.victim_dir = str(base / "classifier")
        if not cfg.reconstruct.get("embeddings_dir"):
            cfg.reconstruct.embeddings_dir = str(base)
    log.info("W&B sweep %s, run %s: run_dir %s", *ids, cfg.run_dir)
    return cfg


def clean_temp_files(run_dir: Path, stage_names: list[str]) -> None:
    """Remove the temporary files a killed job left behind (in run_dir itself and its stages' folders; not in
    ``sweeps/``, whose trials are run_dirs of their own with their own locks). Called under the run_dir lock."""
    removed = remove_temp_files(run_dir, recursive=False) + sum(
        remove_temp_files(run_dir / name) for name in [*stage_names, "report"] if (run_dir / name).is_dir())
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted job in %s", removed, run_dir)


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the same config ``python -m recon_lightning.fit`` would (for the Python API and tests)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def main_with_config(cfg: DictConfig) -> dict:
    """Run the pipeline for an already-composed config (used by ``main`` and by tests)."""
    stages = available_stages()
    cfg = sweep_trial(cfg)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    check_known_keys(cfg)
    check_types(cfg)
    wanted = wanted_stages(cfg, stages)
    check_configs(cfg, stages, wanted)
    # One writer per run_dir: the process that starts the job (rank 0) holds the lock until it exits;
    # the other DDP ranks of the same job work under it.
    with run_dir_lock(run_dir) if distributed.is_rank_zero() else contextlib.nullcontext():
        if distributed.is_rank_zero():
            clean_temp_files(run_dir, [s.name for s in stages])
        summaries = run_stages(cfg, stages, wanted, run_dir)
    for name, summary in summaries.items():
        log.info("%s: %s", name, summary)
    return summaries


def _quiet_library_logs() -> None:
    """Lightning prints to its own console handler *and* propagates to Hydra's: keep one copy,
    and drop its advertising tips and a deprecation warning from its internals."""
    import lightning.pytorch  # noqa: F401  (it installs its console handler on import)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                lg.removeHandler(handler)
        lg.propagate = True
    for handler in logging.getLogger().handlers:  # Hydra's console and file handlers
        handler.addFilter(lambda record: "Tip:" not in record.getMessage())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def register_resolvers() -> None:
    """The config's own interpolations (``hydra.run.dir`` uses ``recon_lightning.trial_run_dir``); registered by
    :func:`main` before Hydra composes the config, and by :func:`load_config`."""
    if not OmegaConf.has_resolver("recon_lightning.trial_run_dir"):
        OmegaConf.register_new_resolver("recon_lightning.trial_run_dir", trial_run_dir)


def main() -> None:
    """``python -m recon_lightning.fit [key=value ...]`` (Hydra's command line)."""
    register_resolvers()
    _main()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    # Every run works offline unless the user opts in: no W&B server needed (a sweep agent's trials follow the
    # agent's environment, see training.wandb_mode).
    if not os.environ.get("WANDB_SWEEP_ID"):
        os.environ.setdefault("WANDB_MODE", "offline")
    _quiet_library_logs()
    # Small-init and weight-decayed weights reach denormal floats, which are ~10x slower on CPUs.
    torch.set_flush_denormal(True)
    try:
        main_with_config(cfg)
    except ReconError as err:
        # A problem the user can fix: say what it is, without a traceback from deep inside a library.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
