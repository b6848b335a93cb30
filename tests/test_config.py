"""Stages that declare themselves: each section's schema makes Hydra refuse unknown keys and wrong types while
composing, the rules refuse the rest before any stage runs, and the runner reads what each stage declares."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recon_lightning.config import CONFIG_DIR, check_values
from recon_lightning.errors import ConfigError
from recon_lightning.fit import PIPELINE, load_config, main_with_config
from recon_lightning.stages import Stage, run_stages, stage_fingerprint

OPTIONS = sorted((p.parent.name, p.stem) for p in Path(CONFIG_DIR).glob("*/*.yaml"))


@pytest.mark.parametrize("group, option", OPTIONS, ids=lambda v: v if isinstance(v, str) else None)
def test_every_shipped_option_composes_and_passes_its_rules(group, option):
    extra = ["data.root=/some/images"] if (group, option) == ("data", "imagefolder") else []
    cfg = load_config([f"{group}={option}", *extra])
    check_values(cfg)  # also: every key of the schema has a value in the YAML
    assert OmegaConf.get_type(cfg[group]).__name__.endswith("Config")


# One misspelt key and one wrong-typed value per section: Hydra refuses both while composing.
UNKNOWN = ["sede=1", "embed.batchsize=8", "backbone.nmae=x", "data.n_per_klass=3", "classifier.lrr=0.1",
           "reconstruct.stpes=5", "select.knn.kk=3", "invert.augment.copis=2", "evaluate.chunks=8",
           "logger.wandb.projekt=x"]
WRONG_TYPE = ["seed=abc", "embed.batch_size=abc", "backbone=dino_vits16 backbone.init_seed=abc",
              "data.n_test_per_class=abc", "classifier.epochs=abc", "reconstruct.steps=abc", "select.knn.k=abc",
              "invert.augment.flip=sometimes", "evaluate.chunk=1.5", "logger.wandb.entity=[a,b]"]


@pytest.mark.parametrize("override", UNKNOWN)
def test_an_unknown_key_in_each_section_is_refused_while_composing(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^unknown config key '{re.escape(key)}'; did you mean '"):
        load_config([override])


@pytest.mark.parametrize("overrides", WRONG_TYPE)
def test_a_wrong_type_in_each_section_is_refused_while_composing(overrides):
    *_, last = overrides.split()
    key = last.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}': "):
        load_config(overrides.split())


@pytest.mark.parametrize("override", ["+embed.workers=2", "+data.root=/x", "+invert.unclip.scheduler=ddim", "+sede=1"])
def test_a_key_added_with_plus_is_refused_before_any_stage(make_cfg, tmp_path, override):
    # Hydra adds "+key=value" even to a structured config; the check before the first stage refuses it.
    key = override[1:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"^unknown config key '{re.escape(key)}'"):
        main_with_config(make_cfg(override))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, key", [
    ("data=imagefolder", "data.root"),  # ??? in the YAML: the user must give it
    ("reconstruct.dtype=float16", "reconstruct.dtype"),  # a choice
    ("invert.scales=[0.5,2]", "invert.scales"),  # a range, for each entry of a list
    ("classifier.bias=[true,maybe]", "classifier.bias"),  # a bool or a list of them (typed Any)
])
def test_values_a_type_cannot_describe_are_refused_before_any_stage(make_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}'"):
        main_with_config(make_cfg(override))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the runner reads the declarations


def test_the_runner_reads_cadence_and_resumable_keys_from_a_stage_declaration(tmp_path):
    """A cadence key reruns nothing; a resumable key reruns the stage in its own folder (its finished parts stay);
    any other key moves the old outputs aside."""
    calls = []

    def run(cfg, run_dir):
        calls.append(dict(cfg.a))
        (run_dir / "a" / f"part_{len(list((run_dir / 'a').glob('part_*')))}").write_text("done")
        return {}

    stage = Stage("a", run, ["a"], cadence_keys=["a.every"], resumable_keys=["a.count"], outputs=["a/part_*"])
    run_dir = tmp_path / "run"

    def fit(**a):
        run_stages(OmegaConf.create({"a": {"value": 1, "every": 10, "count": 2, **a}}), [stage], ["a"], run_dir)

    fit()
    fit(every=99)
    assert len(calls) == 1  # the cadence changed: nothing reran
    fit(every=99, count=3)
    assert len(calls) == 2 and len(list((run_dir / "a").glob("part_*"))) == 2  # resumed in place
    assert not list(tmp_path.glob("run/a.stale-*"))
    fit(every=99, count=3, value=2)
    assert len(calls) == 3 and len(list(tmp_path.glob("run/a.stale-*"))) == 1  # another config: moved aside


@pytest.mark.slow
def test_the_shipped_declarations_leave_cadence_out_of_and_resume_over_their_keys(make_cfg):
    stages = {s.name: s for s in PIPELINE}
    base = make_cfg()
    for stage in PIPELINE:
        for key in stage.cadence_keys:
            value = OmegaConf.select(base, key)
            changed = make_cfg(f"{key}={value + 1 if isinstance(value, int) else value * 2}")
            assert stage_fingerprint(changed, stage, "") == stage_fingerprint(base, stage, ""), key
    more_runs = make_cfg("reconstruct.num_runs=99")
    rec = stages["reconstruct"]
    assert stage_fingerprint(more_runs, rec, "") != stage_fingerprint(base, rec, "")
    resume = dict(leave_out=rec.resumable_keys)
    assert stage_fingerprint(more_runs, rec, "", **resume) == stage_fingerprint(base, rec, "", **resume)


def test_each_stage_reads_only_what_an_earlier_stage_writes():
    """The declared inputs inside run_dir are outputs of earlier stages (``{key}/...`` inputs live elsewhere)."""
    written: list[str] = []
    for stage in PIPELINE:
        for pattern in stage.inputs:
            if pattern.startswith("{"):
                continue
            assert any(fnmatch(out, pattern) or fnmatch(pattern, out) for out in written), (stage.name, pattern)
        written += stage.outputs


def test_every_section_is_declared_by_one_stage():
    sections = [s.name for stage in PIPELINE for s in stage.sections]
    assert len(sections) == len(set(sections))
    top = set(OmegaConf.to_container(load_config([]), resolve=False))
    assert top - set(sections) == {"stage", "run_dir", "seed", "threads", "trainer", "logger"}  # the runner's own keys
