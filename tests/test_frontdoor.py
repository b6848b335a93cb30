"""Reliability of the command line and the run files: what a refused job leaves alone, which checkpoints are read,
what the logs say, which threads are used, how stale outputs are listed and pruned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from recon_lightning.errors import DataError

REPO = Path(__file__).resolve().parents[1]
FIT = [sys.executable, "-m", "recon_lightning.fit", "trainer.accelerator=cpu", "logger.name=none"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_a_refused_job_leaves_the_recorded_config_of_the_running_one(tmp_path):
    from recon_lightning.storage import run_dir_lock

    run_dir = tmp_path / "run"
    first = subprocess.run([*FIT, f"run_dir={run_dir}", "stage=embed", "seed=1"], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    recorded = {name: (run_dir / ".hydra" / name).read_text() for name in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    assert yaml.safe_load(recorded["config.yaml"])["seed"] == 1
    assert "seed=1" in yaml.safe_load(recorded["overrides.yaml"])
    with run_dir_lock(run_dir):  # another job holds the run_dir
        refused = subprocess.run([*FIT, f"run_dir={run_dir}", "stage=embed", "seed=2"], env=ENV, capture_output=True,
                                 text=True, timeout=300)
    assert refused.returncode == 2 and "is in use by another job" in refused.stderr, refused.stderr[-2000:]
    assert {name: (run_dir / ".hydra" / name).read_text() for name in recorded} == recorded


class _Touch:
    """Pickled code: unpickling it (without weights_only) would create the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["zip_with_code", "raw_pickle", "truncated"])
def test_a_checkpoint_holding_code_or_damaged_is_ignored_with_a_warning(tmp_path, caplog, kind):
    import pickle

    from recon_lightning.training import checkpointing

    marker = tmp_path / "executed"
    path = tmp_path / "run" / "classifier" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    if kind == "zip_with_code":
        torch.save({"global_step": 3, "payload": _Touch(marker)}, path)
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps({"payload": _Touch(marker)}))
    else:
        torch.save({"global_step": 3, "w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level("WARNING"):
        _, resume_from = checkpointing(tmp_path / "run", "classifier", every_n_steps=10)
    assert resume_from is None
    assert f"ignoring damaged checkpoint {path}" in caplog.text
    assert not marker.exists()  # nothing was executed


def test_a_checkpoint_of_tensors_is_resumed(tmp_path):
    from recon_lightning.training import checkpointing

    path = tmp_path / "run" / "classifier" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, path)
    assert checkpointing(tmp_path / "run", "classifier", every_n_steps=10)[1] == str(path)


def _pixel_victim(folder: Path, dim: int, input_size: list[int]) -> Path:
    from recon_lightning.victim import VictimMLP, save_victim

    torch.manual_seed(0)
    save_victim(folder, VictimMLP(dim, [16], 2, bias=[True, False]), {
        "loss": "bce", "weight_decay": 0.0, "n_train": 10, "class_names": ["a", "b"],
        "embedding": {"backbone_name": "identity", "modality": "image", "embed_dim": dim, "normalize": "none",
                      "input_size": input_size}})
    return folder


TINY_ATTACK = ["reconstruct.num_runs=1", "reconstruct.steps=20", "reconstruct.runs_per_batch=1", "invert.steps=5",
               "stage=invert"]


@pytest.mark.slow
def test_a_pixel_victim_without_its_data_is_inverted_at_its_recorded_size(make_cfg, tmp_path):
    from recon_lightning.fit import main_with_config
    from PIL import Image

    victim = _pixel_victim(tmp_path / "victim", 32, [1, 4, 8])
    main_with_config(make_cfg(f"reconstruct.victim_dir={victim}", *TINY_ATTACK))
    pngs = sorted((tmp_path / "run" / "invert" / "images").glob("*.png"))
    assert pngs and all(Image.open(p).size == (8, 4) for p in pngs)  # PIL: (width, height)


def test_a_pixel_victim_whose_input_size_disagrees_with_its_dimension_is_an_embedding_size_mismatch(make_cfg, tmp_path):
    from recon_lightning.errors import ModelMismatchError
    from recon_lightning.fit import main_with_config

    victim = _pixel_victim(tmp_path / "victim", 32, [1, 8, 8])
    with pytest.raises(ModelMismatchError, match="embedding size mismatch.*32-d inputs.*64-d embeddings"):
        main_with_config(make_cfg(f"reconstruct.victim_dir={victim}", *TINY_ATTACK))
    assert not (tmp_path / "run" / "reconstruct").exists()


TINY_VICTIM = ["classifier.hidden=[32]", "classifier.bias=[true,false]", "classifier.init_scale=[1e-3,1e-3]",
               "data.n_per_class=10", "data.n_test_per_class=5", "classifier.lr_schedule=constant", "classifier.lr=0.5"]


@pytest.mark.slow
def test_progress_bars_off_silences_every_stage_and_run_files_hold_no_run_dir_path(make_cfg, tmp_path, capfd):
    from recon_lightning.fit import main_with_config

    # make_cfg sets trainer.enable_progress_bar=false
    main_with_config(make_cfg(*TINY_VICTIM, "trainer.max_epochs=40", "reconstruct.num_runs=2", "reconstruct.steps=10",
                              "stage=select"))
    err = capfd.readouterr().err
    assert "embed train" not in err and "select: clustering" not in err and "it/s" not in err
    # A copied run_dir's files equal the original's: none records where the run_dir was (resume checkpoints aside).
    run_dir = tmp_path / "run"
    files = [p for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    assert [p for p in files if str(run_dir).encode() in p.read_bytes()] == []
    from recon_lightning.select import read_candidates

    assert read_candidates(run_dir)[1]["victim_dir"] == "classifier"


@pytest.mark.slow
def test_a_resumed_victim_does_not_warn_about_its_dataloader(make_cfg, recwarn):
    from recon_lightning.fit import main_with_config

    args = [*TINY_VICTIM, "classifier.checkpoint_every_n_epochs=20", "stage=classifier"]
    main_with_config(make_cfg(*args, "trainer.max_epochs=40"))
    recwarn.clear()
    main_with_config(make_cfg(*args, "trainer.max_epochs=60"))  # resumes at epoch 40 of 60, mid-way through a loader
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "resuming from a checkpoint" in m], messages


@pytest.mark.slow
def test_the_command_line_prints_no_lightning_noise(tmp_path):
    bin_dir = tmp_path / "bin"  # an srun on the PATH (as on a cluster's login node) but no SLURM job
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([*FIT, f"run_dir={tmp_path / 'run'}", "stage=classifier", "trainer.enable_progress_bar=false",
                           *TINY_VICTIM, "trainer.max_epochs=40", "classifier.checkpoint_every_n_epochs=20"],
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "stage classifier: running" in out  # the run's own log lines stay
    for noise in ("srun", "GPU available", "TPU available", "limit_val_batches", "val_check_interval",
                  "ModelCheckpoint", "Tip:"):
        assert noise not in out, noise


# ----------------------------------------------------------------------------- image folders


def _folder(root: Path, per_class: int, start: int = 0) -> Path:
    """root/<a|b>/<i>.png, 4x4 grey images whose value is the image number (a: i, b: 100 + i)."""
    from PIL import Image

    for name, base in (("a", 0), ("b", 100)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.fromarray(np.full((4, 4), base + i, dtype=np.uint8), "L").save(root / name / f"{i}.png")
    return root


def _folder_data(make_cfg, *overrides):
    from recon_lightning.data import load_dataset

    return load_dataset(make_cfg("data=imagefolder", *overrides).data)


def test_a_separate_held_out_folder_gives_the_held_out_samples(make_cfg, tmp_path):
    train_root, test_root = _folder(tmp_path / "train", 6), _folder(tmp_path / "test", 3, start=50)
    ds = _folder_data(make_cfg, f"data.root={train_root}", f"data.test_root={test_root}", "data.n_test_per_class=2")
    assert np.bincount(ds.train.labels).tolist() == [6, 6]  # n_per_class=auto: all of root, none kept back for testing
    assert np.bincount(ds.test.labels).tolist() == [2, 2]
    assert all(Path(i).is_relative_to(train_root) for i in ds.train.ids)
    assert all(Path(i).is_relative_to(test_root) for i in ds.test.ids)
    assert {int(img[0, 0]) % 100 for img in ds.test.samples} <= {50, 51, 52}
    with pytest.raises(DataError, match=r"class 'a' has 3 images in data.test_root=.*fewer than data.n_test_per_class=5"):
        _folder_data(make_cfg, f"data.root={train_root}", f"data.test_root={test_root}", "data.n_test_per_class=5")
    with pytest.raises(DataError, match="both in data.root and data.test_root"):
        _folder_data(make_cfg, f"data.root={train_root}", f"data.test_root={train_root}", "data.n_test_per_class=1")


def _rgba_folder(root: Path) -> tuple[Path, np.ndarray]:
    """Two classes of one 4x4 RGBA image: opaque red, fully transparent black, half-transparent blue columns."""
    from PIL import Image

    px = np.zeros((4, 4, 4), dtype=np.uint8)
    px[:, 0] = (255, 0, 0, 255)
    px[:, 1] = (0, 0, 0, 0)
    px[:, 2] = (0, 0, 255, 128)
    px[:, 3] = (0, 255, 0, 255)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(px, "RGBA").save(root / name / "0.png")
    return root, px


@pytest.mark.parametrize("background", [None, [0, 64, 128]])
def test_transparent_images_are_composited_onto_the_background(make_cfg, tmp_path, background):
    root, px = _rgba_folder(tmp_path / "imgs")
    extra = [] if background is None else [f"data.background=[{','.join(map(str, background))}]"]
    ds = _folder_data(make_cfg, f"data.root={root}", "data.n_test_per_class=0", *extra)
    bg = np.array(background or [255, 255, 255], dtype=np.float64)  # the default: white
    a = px[..., 3:] / 255.0
    expected = np.round(px[..., :3] * a + bg * (1 - a))
    got = ds.train.samples[0]
    assert got.shape == (4, 4, 3)
    np.testing.assert_allclose(got.astype(float), expected, atol=1)
    assert got[0, 1].tolist() == bg.tolist()  # a transparent pixel shows the background, not its stored black


# ----------------------------------------------------------------------------- stale outputs


def test_stale_outputs_are_listed_and_pruned_but_not_while_the_run_dir_is_in_use(tmp_path, capsys):
    from recon_lightning.stale import main
    from recon_lightning.storage import run_dir_lock

    run_dir = tmp_path / "run"
    (run_dir / "classifier").mkdir(parents=True)
    (run_dir / "classifier" / "model.safetensors").write_bytes(b"x" * 10)
    for name, size in (("classifier.stale-aaaa", 2048), ("reconstruct.stale-bbbb", 3 * 1024 * 1024)):
        (run_dir / name / "sub").mkdir(parents=True)
        (run_dir / name / "sub" / "f.bin").write_bytes(b"x" * size)
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "2.0 KiB" in out and "3.0 MiB" in out and "classifier.stale-aaaa" in out and "reconstruct.stale-bbbb" in out
    assert "found 2 stale output folder(s)" in out and "--prune" in out
    assert (run_dir / "classifier.stale-aaaa").is_dir()  # listing deletes nothing
    with run_dir_lock(run_dir):
        assert main([str(run_dir), "--prune"]) == 2
    assert "is in use by another job" in capsys.readouterr().err and (run_dir / "reconstruct.stale-bbbb").is_dir()
    assert main([str(run_dir), "--prune"]) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "classifier"]
    assert main([str(run_dir)]) == 0 and "no stale outputs" in capsys.readouterr().out


# ----------------------------------------------------------------------------- progress


@pytest.mark.slow
def test_victim_and_reconstruction_progress_count_their_own_units_with_an_eta(make_cfg, capfd):
    import re

    from recon_lightning.fit import main_with_config

    main_with_config(make_cfg(*TINY_VICTIM, "trainer.max_epochs=40", "classifier.log_every_n_epochs=10",
                              "reconstruct.num_runs=1", "reconstruct.steps=20", "reconstruct.log_every_n_steps=5",
                              "stage=reconstruct", "trainer.enable_progress_bar=true"))
    out = capfd.readouterr().out
    # 4 Lightning steps of 10 epochs; 4 of 5 optimisation steps; each update has a time left ([elapsed<remaining])
    assert re.search(r"classifier: 100%.*\b40/40 \[[\d:]+<[\d:]+, *[\d.]+ ?epoch/s", out), out[-2000:]
    assert re.search(r"classifier: +25%.*\b10/40 \[[\d:]+<[\d:]+,", out), out[-2000:]
    assert re.search(r"reconstruct runs 0..0 of 1: 100%.*\b20/20 \[[\d:]+<[\d:]+, *[\d.]+ ?step/s", out), out[-2000:]


# ----------------------------------------------------------------------------- threads


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("load, expected", [(0.0, 4), (1.4, 3), (2.6, 1), (7.5, 1), (30.0, 1)])
def test_auto_threads_use_the_idle_cores(monkeypatch, torch_threads, caplog, load, expected):
    from recon_lightning import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    torch.set_num_threads(4)  # torch's default on 4 cores
    with caplog.at_level("WARNING"):
        assert threads.choose_threads("auto") == expected == torch.get_num_threads()
    assert ("the CPU is busy" in caplog.text) == (expected < 4)
    if expected < 4:
        assert f"(load average {load:.1f} on 4 cores): torch uses {expected} thread(s), not 4" in caplog.text


def test_omp_num_threads_or_a_number_choose_the_threads(monkeypatch, torch_threads):
    from recon_lightning import threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads("auto") == 3  # the user's OMP_NUM_THREADS is kept, busy or not
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.choose_threads(2) == 2


def test_threads_key_is_checked(make_cfg):
    from recon_lightning.errors import ConfigError
    from recon_lightning.fit import check_values

    assert make_cfg().threads == "auto"
    with pytest.raises(ConfigError, match="threads"):
        check_values(make_cfg("threads=0"))


# ----------------------------------------------------------------------------- stationarity


@pytest.mark.slow
@pytest.mark.parametrize("recipe, far", [
    # no weight decay, default init, 3 epochs: fits its 20 samples, yet far from any KKT point
    (["trainer.max_epochs=3", "classifier.weight_decay=0", "classifier.init_scale=[null,null]",
      "classifier.lr_schedule=constant"], True),
    # the default recipe (weight decay, small init, cosine lr) for 1000 epochs: near one
    (["trainer.max_epochs=1000", "classifier.lr_schedule=cosine", "classifier.init_scale=[1e-3,1e-3]"], False)])
def test_a_victim_far_from_a_stationary_point_is_warned_about(make_cfg, tmp_path, caplog, recipe, far):
    from recon_lightning.fit import main_with_config
    from recon_lightning.victim import load_victim

    args = ["classifier.hidden=[32]", "classifier.bias=[true,false]", "data.n_per_class=10", "data.n_test_per_class=5",
            "classifier.lr=0.5", *recipe]
    main_with_config(make_cfg(*args, "stage=classifier"))
    assert load_victim(tmp_path / "run" / "classifier")[1]["metrics"]["train_acc"] == 1.0  # it fits its training set
    with caplog.at_level("INFO"):
        main_with_config(make_cfg(*args, "reconstruct.num_runs=1", "reconstruct.steps=5", "stage=reconstruct"))
    assert ("the victim is far from a stationary point" in caplog.text) == far
    assert "the victim's KKT residual at its training set" in caplog.text or far


def test_the_report_says_a_residual_near_one_means_nothing_can_be_reconstructed():
    from recon_lightning.evaluate import _notes

    def notes(residual):
        report = {"mode": "evaluation", "reconstruction": {"num_train": 10, "distinct_best_candidates": 10}, "leak": {},
                  "margin": {"available": True},
                  "victim_kkt": {"residual_at_train": residual, "explains_candidates_better": False}}
        return " ".join(_notes(report))

    assert "0.94: near 1 means it is far from a stationary point" in notes(0.94)
    assert "nothing can be reconstructed" in notes(0.94) and "nothing can be reconstructed" not in notes(0.006)


# ----------------------------------------------------------------------------- docs


def test_troubleshooting_commands_compose_and_name_existing_keys(make_cfg):
    import re
    import shlex

    from recon_lightning.fit import check_values

    text = (REPO / "docs" / "troubleshooting.md").read_text()
    lines = [line.split("#")[0] for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    fit_lines = [shlex.split(line.split("python -m recon_lightning.fit", 1)[1]) for line in lines
                 if "python -m recon_lightning.fit" in line]
    assert len(fit_lines) >= 3
    for overrides in fit_lines:
        check_values(make_cfg(*overrides))
    cfg = make_cfg("data=imagefolder", "data.root=x")
    for key in ("threads", "data.test_root", "data.background", "data.n_test_per_class", "trainer.enable_progress_bar"):
        assert key in text and OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert (REPO / "benchmarks" / "bench_threads.py").is_file()


@pytest.mark.slow
def test_a_resumed_victims_progress_starts_where_it_resumed(make_cfg, capfd):
    import re

    from recon_lightning.fit import main_with_config

    args = [*TINY_VICTIM, "classifier.checkpoint_every_n_epochs=20", "classifier.log_every_n_epochs=20",
            "stage=classifier", "trainer.enable_progress_bar=true"]
    main_with_config(make_cfg(*args, "trainer.max_epochs=40"))
    capfd.readouterr()
    main_with_config(make_cfg(*args, "trainer.max_epochs=60"))  # resumes at epoch 40
    out = capfd.readouterr().out
    # 3 Lightning steps of 20 epochs; the first this job runs ends at 60, and its speed is that of 20 epochs
    updates = re.findall(r"classifier: +\d+%\S* (\d+)/60 \[[\d:]+<[\d:]+, *([\d.]+) ?epoch/s", out)
    assert updates and {n for n, _ in updates} == {"60"}, out[-2000:]


def test_the_interrupted_and_error_lines_reach_stderr_in_one_write(monkeypatch):
    """The ranks of a DDP job share one stderr pipe: a line written in two parts (``print`` writes the text, then the
    newline) can interleave with another rank's. The stream here is built like Python's own non-interactive stderr."""
    import io

    from recon_lightning.fit import _say

    class Recording(io.RawIOBase):
        def __init__(self):
            self.writes = []

        def writable(self):
            return True

        def write(self, data):
            self.writes.append(bytes(data))
            return len(data)

    raw = Recording()
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, write_through=True))
    print("two parts", file=sys.stderr)
    assert raw.writes == [b"two parts", b"\n"]  # the reason for _say
    raw.writes.clear()
    _say("interrupted (rank 1): SIGUSR1 received")
    assert raw.writes == [b"interrupted (rank 1): SIGUSR1 received\n"]
