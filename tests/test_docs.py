"""The README, the user guides in docs/, sweep files and SLURM scripts stay in step with the configs: every command
line they show composes, and every config key or option they name exists."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recon_lightning.config import CONFIG_DIR, check_values
from recon_lightning.fit import load_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
# the README and the guides in docs/ (results.md records past commands, some of keys since renamed: not a guide)
DOCS = "\n".join([README, *(p.read_text() for p in sorted((REPO / "docs").glob("*.md")) if p.name != "results.md")])
SCRIPTS = sorted((REPO / "sweeps" / "slurm").glob("*.sbatch"))
GROUPS = {p.name: {f.stem for f in p.glob("*.yaml")} for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
OPEN_SECTIONS = {"trainer"}  # passed to lightning.Trainer: any of its arguments


def known_keys() -> dict:
    """Every key of the composed config, with each group's options together (backbone.model exists for timm
    backbones, not for identity)."""
    known: dict = {}

    def union(into: dict, other: dict) -> None:
        for key, value in other.items():
            if isinstance(value, dict):
                union(into.setdefault(key, {}), value)
            else:
                into.setdefault(key, value)

    for group, options in GROUPS.items():
        for option in sorted(options):
            cfg = load_config([f"{group}={option}", "data.root=x"] if option == "imagefolder" else [f"{group}={option}"])
            union(known, OmegaConf.to_container(cfg, resolve=False))
    return known


def readme_commands() -> list[list[str]]:
    """``python -m recon_lightning.fit ...`` lines of the README's and the guides' code blocks, as override lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOCS, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0]
            if "python -m recon_lightning.fit" not in line:
                continue
            args = shlex.split(line.split("python -m recon_lightning.fit", 1)[1])
            if "-m" in args:  # a multirun: each job's config composes (the first value of each swept key)
                args = [a.split(",")[0] if "=" in a and "/" not in a.split("=")[0] else a for a in args if a != "-m"]
            commands.append([a for a in args if a not in ("--cfg", "job")])
    return commands


@pytest.mark.parametrize("overrides", readme_commands(), ids=lambda o: " ".join(o) or "default")
def test_readme_commands_compose(overrides):
    check_values(load_config(overrides))


def mentioned_overrides() -> set[str]:
    """``key=value`` words in the README and the guides (code), sweep files and SLURM scripts."""
    prose = re.sub(r"```.*?```", "", DOCS, flags=re.S)
    texts = ["\n".join(re.findall(r"`([^`\n]+)`", prose)), *re.findall(r"```bash\n(.*?)```", DOCS, flags=re.S)]
    texts += [p.read_text() for p in SCRIPTS] + [p.read_text() for p in (REPO / "sweeps").glob("*.yaml")]
    words = set()
    for text in texts:
        words |= set(re.findall(r"(?<![\w.$/-])([a-z_]+(?:\.[a-z_]+)*)=(?!=)", text))
    return words


@pytest.mark.slow
def test_every_key_and_option_named_in_the_docs_exists():
    known = known_keys()
    top = set(known) | {"stage", "run_dir"}
    checked = 0
    for key in sorted(mentioned_overrides()):
        head = key.split(".")[0]
        if head not in top or head in OPEN_SECTIONS:
            continue  # not a config key (e.g. a shell variable or an sbatch option)
        node = known
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"the docs name config key {key!r}, which does not exist"
            node = node[part]
        checked += 1
    for group, option in re.findall(r"\b(" + "|".join(GROUPS) + r")=([a-z0-9_]+)\b", DOCS):
        assert option in GROUPS[group], f"the docs name {group}={option}, but configs/{group}/{option}.yaml does not exist"
    assert checked > 20  # the scan found the README's keys


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_slurm_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def audit_examples(text: str) -> list[str]:
    """The ``from recon_lightning import audit`` examples of a document's python code blocks."""
    return [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "from recon_lightning import audit" in b]


@pytest.mark.slow
@pytest.mark.parametrize("doc", ["README.md", "docs/victims.md"])
def test_the_audit_example_runs(doc, tmp_path, monkeypatch):
    examples = audit_examples((REPO / doc).read_text())
    assert examples, f"{doc} shows no audit example"
    monkeypatch.chdir(tmp_path)
    for code in examples:
        exec(compile(code, doc, "exec"), {})
    assert (tmp_path / "runs/my_head/report.html").is_file() and (tmp_path / "runs/my_head/invert/DONE.json").is_file()
