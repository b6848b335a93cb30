"""Run pipeline stages in order, skipping those whose outputs are already complete.

Each stage owns ``run_dir/<stage>/``. A stage's *fingerprint* hashes the config sections it
reads, the files it reads from outside ``run_dir`` (a victim in ``reconstruct.victim_dir``), and the
fingerprint and output hashes of the stage before it, so changing e.g. ``classifier.*`` reruns
the classifier and everything after it, but not ``embed``, and a rerun stage whose outputs came
out different reruns the stages after it. A stage is complete when ``run_dir/<stage>/DONE.json``
holds its current fingerprint (written last, atomically) and its outputs (size and SHA-256
recorded in DONE.json) are all there, unchanged; a missing or damaged output reruns the stage.
Keys that only set a cadence (logging, checkpoint intervals) are left out of the fingerprint.
An interrupted stage keeps its partial outputs (for stages that resume, such as
reconstruction), and so does a change of a *resumable* key (``reconstruct.num_runs``: run r is
the same run whatever the total, so raising it adds runs and keeps the finished ones).
Any other change moves the old outputs aside to ``run_dir/<stage>.stale-<old fingerprint>``
rather than deleting them (``python -m recon_lightning.stale RUN_DIR [--prune]`` lists and deletes them).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from . import distributed, preempt
from .config import Section
from .storage import file_hash, fingerprint, load_json, save_json

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """A pipeline stage as its module declares it (``STAGE`` at the end of each stage module); the runner
    (:func:`run_stages`, and ``fit``) reads nothing else about it."""

    name: str
    run: Callable[[DictConfig, Path], dict | None]
    config_keys: list[str]  # config sections / keys whose values change this stage's outputs
    all_ranks: bool = False  # True for Lightning stages that run under DDP on every rank
    enabled: Callable[[DictConfig], bool] = field(default=lambda cfg: True)
    cadence_keys: list[str] = field(default_factory=list)  # inside config_keys, but change no output
    resumable_keys: list[str] = field(default_factory=list)  # change the outputs, yet finished parts stay valid
    # Globs of the files it reads: relative to run_dir (earlier stages' outputs, which reach the fingerprint through
    # the chain of stages), or ``{config.key}/glob`` in a folder a config key names (hashed into the fingerprint;
    # skipped while the key is null).
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # globs relative to run_dir: the files DONE.json vouches for
    sections: list[Section] = field(default_factory=list)  # the config sections it owns, with their schemas
    check: Callable[[DictConfig], None] = field(default=lambda cfg: None)  # checks the schema's rules cannot
    # express (several keys together, files a key names), run by ``fit`` before the first stage starts


def outside_inputs(cfg: DictConfig, patterns: list[str]) -> list[Path]:
    """The files matching the ``{config.key}/glob`` entries of ``patterns`` (a null key contributes none); a
    pattern without wildcards gives its path even when the file is missing (its appearing changes the fingerprint)."""
    files = []
    for pattern in patterns:
        match = re.fullmatch(r"\{([\w.]+)\}/(.+)", pattern)
        folder = OmegaConf.select(cfg, match.group(1), default=None) if match else None
        if not folder:
            continue
        base = Path(str(folder)).expanduser()
        rest = match.group(2)
        files += sorted(base.glob(rest)) if any(c in rest for c in "*?[") else [base / rest]
    return files


def _drop(tree: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest and isinstance(tree.get(head), dict):
        _drop(tree[head], rest)
    elif not rest:
        tree.pop(head, None)


def stage_fingerprint(cfg: DictConfig, stage: Stage, upstream: str, leave_out: list[str] = ()) -> str:
    """Hash of the stage's config (minus its cadence keys and ``leave_out``), its outside inputs' contents and
    ``upstream`` (the previous stage's fingerprint and output hashes)."""
    parts: dict = {}
    for key in stage.config_keys:
        value = OmegaConf.select(cfg, key, default=None)
        parts[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    for dotted in [*stage.cadence_keys, *leave_out]:
        for key in stage.config_keys:
            if dotted == key:
                parts.pop(key)
            elif dotted.startswith(key + ".") and isinstance(parts[key], dict):
                _drop(parts[key], dotted[len(key) + 1:])
    inputs = {str(path): file_hash(path) if path.is_file() else None for path in outside_inputs(cfg, stage.inputs)}
    return fingerprint(stage.name, upstream, parts, *([inputs] if inputs else []))


def output_files(run_dir: Path, patterns: list[str]) -> dict[str, dict]:
    """``{path relative to run_dir: {"size", "sha256"}}`` of the files matching ``patterns`` (temp files left out)."""
    files = {}
    for pattern in patterns:
        for path in sorted(Path(run_dir).glob(pattern)):
            if path.is_file() and not path.name.startswith("."):
                files[path.relative_to(run_dir).as_posix()] = {"size": path.stat().st_size, "sha256": file_hash(path)}
    return files


def damaged_outputs(run_dir: Path, recorded: dict[str, dict]) -> list[str]:
    """The recorded outputs that are missing or differ from what DONE.json recorded."""
    bad = []
    for rel, info in recorded.items():
        path = Path(run_dir) / rel
        if not path.is_file() or path.stat().st_size != info["size"] or file_hash(path) != info["sha256"]:
            bad.append(rel)
    return bad


def is_done(stage_dir: Path, fp: str, verify: bool = True) -> bool:
    """DONE.json holds ``fp`` and (``verify``) every output it lists is there, unchanged."""
    done = stage_dir / "DONE.json"
    if not done.is_file():
        return False
    try:
        record = load_json(done)
    except Exception:
        return False
    if record.get("fingerprint") != fp or not isinstance(record.get("outputs"), dict):
        return False
    if verify:
        bad = damaged_outputs(stage_dir.parent, record["outputs"])
        if bad:
            log.warning("stage %s: output(s) missing or damaged since it finished, running it again: %s",
                        stage_dir.name, ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
            return False
    return True


def _finish(run_dir: Path, stage: Stage, fp: str, summary: dict) -> None:
    save_json(run_dir / stage.name / "DONE.json", {"stage": stage.name, "fingerprint": fp, "summary": summary,
                                                   "outputs": output_files(run_dir, stage.outputs)})


def _chain(fp: str, stage_dir: Path) -> str:
    """What the next stage's fingerprint builds on: this stage's fingerprint and its outputs' hashes."""
    outputs = load_json(stage_dir / "DONE.json").get("outputs", {})
    return fingerprint(fp, {rel: info["sha256"] for rel, info in outputs.items()})


def _prepare_dir(stage_dir: Path, fp: str) -> None:
    """Keep partial outputs of the same config (resume); move aside outputs of another config."""
    marker = stage_dir / "FINGERPRINT"
    if stage_dir.exists() and any(stage_dir.iterdir()):
        old = marker.read_text().strip() if marker.is_file() else "unknown"
        if old != fp:
            stale = stage_dir.with_name(f"{stage_dir.name}.stale-{old}")
            if stale.exists():
                shutil.rmtree(stale)
            stage_dir.rename(stale)
            log.info("config changed for stage %s: previous outputs moved to %s (list or delete such folders with: "
                     "python -m recon_lightning.stale %s [--prune])", stage_dir.name, stale, stage_dir.parent)
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fp + "\n")


def stages_to_run(cfg: DictConfig, stages: list[Stage], wanted: list[str]) -> list[Stage]:
    """The enabled stages up to the last wanted one: like ``make``, a wanted stage brings the
    earlier stages it depends on (each skipped later if already up to date)."""
    enabled = [s for s in stages if s.enabled(cfg)]
    names = [s.name for s in enabled]
    last = max((names.index(w) for w in wanted if w in names), default=-1)
    return enabled[: last + 1]


def up_to_date(cfg: DictConfig, stages: list[Stage], run_dir: Path) -> bool:
    """Whether ``stages`` (the first stages of the pipeline, in order) are all finished in ``run_dir`` for ``cfg``:
    what :func:`run_stages` would skip."""
    upstream = ""
    for stage in stages:
        fp = stage_fingerprint(cfg, stage, upstream)
        if not is_done(Path(run_dir) / stage.name, fp):
            return False
        upstream = _chain(fp, Path(run_dir) / stage.name)
    return True


def run_stages(cfg: DictConfig, stages: list[Stage], wanted: list[str], run_dir: Path) -> dict[str, dict]:
    """Run the ``wanted`` stages in pipeline order; return their summaries.

    Like ``make``: earlier stages they depend on run too, unless already up to date.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    upstream = ""
    todo = stages_to_run(cfg, stages, wanted)
    for i, stage in enumerate(todo):
        fp = stage_fingerprint(cfg, stage, upstream)
        # Partial or finished outputs made under the same "resume fingerprint" are kept and reused.
        resume_fp = stage_fingerprint(cfg, stage, upstream, leave_out=stage.resumable_keys)
        stage_dir = run_dir / stage.name
        last = i == len(todo) - 1
        if is_done(stage_dir, fp):
            log.info("stage %s: up to date (fingerprint %s), skipping", stage.name, fp)
            summaries[stage.name] = load_json(stage_dir / "DONE.json").get("summary", {})
            upstream = _chain(fp, stage_dir)
            continue
        rank0 = distributed.is_rank_zero()
        if stage.all_ranks:
            # Lightning stages: every rank runs (DDP shards the work); rank 0 owns the directory.
            if rank0:
                _prepare_dir(stage_dir, resume_fp)
            distributed.barrier()
            log.info("stage %s: running (fingerprint %s)", stage.name, fp)
            summary = stage.run(cfg, run_dir) or {}
            if distributed.is_rank_zero():
                _finish(run_dir, stage, fp, summary)
            distributed.barrier()
            if not distributed.is_rank_zero() and not last:
                # The next stage's fingerprint needs this stage's output hashes (no process group under some launchers).
                distributed.wait_for(lambda: is_done(stage_dir, fp, verify=False), f"stage {stage.name} on rank 0")
        else:
            # A SIGUSR1 (recon_lightning.preempt) that came during an earlier single-process stage stops the job here.
            # Not before a Lightning stage: its ranks may be about to meet in DDP's set-up, which a rank that left would
            # block; inside the fit they agree at the first step.
            preempt.check(f"before stage {stage.name}")
            # Single-process stages: rank 0 works, the other ranks wait for its DONE file
            # (polling too, for launchers such as SLURM that start ranks before any process group).
            if rank0:
                _prepare_dir(stage_dir, resume_fp)
                log.info("stage %s: running (fingerprint %s)", stage.name, fp)
                summary = stage.run(cfg, run_dir) or {}
                _finish(run_dir, stage, fp, summary)
            distributed.barrier()
            if not rank0:
                distributed.wait_for(lambda: is_done(stage_dir, fp, verify=False), f"stage {stage.name} on rank 0")
                summary = load_json(stage_dir / "DONE.json").get("summary", {})
        summaries[stage.name] = summary
        if not last:
            upstream = _chain(fp, stage_dir)
    return summaries
