"""Config, data, embedding cache, victim training and error messages (the foundation issue)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recon_lightning.data import load_dataset
from recon_lightning.embed import load_embeddings
from recon_lightning.errors import ConfigError, DataError, ModelMismatchError
from recon_lightning.fit import main_with_config
from recon_lightning.victim import VictimMLP, load_victim, save_victim

SMALL_VICTIM = ["classifier.hidden=[64]", "classifier.bias=[true,false]", "classifier.init_scale=[1e-3,null]",
                "trainer.max_epochs=300", "data.n_per_class=20", "data.n_test_per_class=10"]


def test_overrides_reach_the_config(make_cfg):
    cfg = make_cfg("classifier.hidden=[1000,1000]", "trainer.max_epochs=7", "backbone=efficientnet_lite0", "data=skimage")
    assert list(cfg.classifier.hidden) == [1000, 1000]
    assert cfg.trainer.max_epochs == 7
    assert cfg.backbone.kind == "efficientnet_lite" and cfg.data.kind == "skimage"


def test_digits_split_is_balanced_and_seeded(make_cfg):
    cfg = make_cfg()
    a, b = load_dataset(cfg.data, seed=0), load_dataset(cfg.data, seed=0)
    assert a.train.ids == b.train.ids and not set(a.train.ids) & set(a.test.ids)
    assert np.bincount(a.train.labels).tolist() == [cfg.data.n_per_class] * 2
    assert load_dataset(cfg.data, seed=1).train.ids != a.train.ids


@pytest.mark.slow
def test_embed_cache_reused_and_invalidated(make_cfg, tmp_path):
    cfg = make_cfg("stage=embed")
    main_with_config(cfg)
    emb_file = tmp_path / "run/embed/embeddings.safetensors"
    first_mtime = emb_file.stat().st_mtime_ns
    emb = load_embeddings(tmp_path / "run")
    assert emb.train_x.shape == (100, 64) and emb.meta["normalize"] == "none"
    main_with_config(cfg)  # same config: reused, not rewritten
    assert emb_file.stat().st_mtime_ns == first_mtime
    main_with_config(make_cfg("stage=embed", "embed.normalize=l2"))  # changed config: recomputed
    emb2 = load_embeddings(tmp_path / "run")
    assert emb2.meta["normalize"] == "l2"
    assert torch.allclose(emb2.train_x.norm(dim=1), torch.ones(100), atol=1e-5)
    assert any((tmp_path / "run").glob("embed.stale-*"))  # old outputs kept aside, not deleted


@pytest.mark.slow
def test_classifier_separates_digits_and_reloads_identically(make_cfg, tmp_path, monkeypatch):
    # After training, the stage computes the victim's training logits once, for its metrics and its health alike.
    n_train = 2 * 20
    calls_on_train_set = []
    forward = VictimMLP.forward

    def counted(self, x, *args, **kwargs):
        if not torch.is_grad_enabled() and len(x) == n_train:
            calls_on_train_set.append(len(x))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(VictimMLP, "forward", counted)
    summary = main_with_config(make_cfg("stage=classifier", *SMALL_VICTIM))
    assert len(calls_on_train_set) == 1
    monkeypatch.setattr(VictimMLP, "forward", forward)
    assert summary["classifier"]["train_acc"] == 1.0
    emb = load_embeddings(tmp_path / "run")
    model, spec = load_victim(tmp_path / "run/classifier", expected_input_dim=emb.dim)
    assert spec["hidden"] == [64] and spec["loss"] == "bce" and spec["embedding"]["normalize"] == "none"
    logits = model(emb.train_x)
    assert ((logits > 0).long() == emb.train_y).all()
    signed = (2 * emb.train_y - 1) * logits  # the margins y * phi(x), y in {-1, 1}
    assert spec["metrics"]["train_margin_min"] == pytest.approx(float(signed.min()), rel=1e-5)
    assert spec["metrics"]["train_margin_mean"] == pytest.approx(float(signed.mean()), rel=1e-5)
    assert spec["health"] == {"collapsed": False, "misclassified": 0, "problems": []}
    model2, _ = load_victim(tmp_path / "run/classifier")
    assert torch.equal(model2(emb.train_x), logits)
    assert (tmp_path / "run/classifier/margins.png").is_file()
    assert (tmp_path / "run/classifier/logs/metrics.csv").is_file()


def test_victim_health_from_the_victims_logits():
    from recon_lightning.victim import victim_health

    # binary: margins y * phi with y in {-1, 1}: 2, 1, -0.5 -> one sample on the wrong side, accuracy 2/3
    h = victim_health(torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1, 0, 0]))
    assert h["train_acc"] == pytest.approx(2 / 3) and h["margin_min"] == -0.5 and h["margin_mean"] == pytest.approx(2.5 / 3)
    assert h["misclassified"] == 1 and not h["collapsed"] and h["problems"][0].startswith("1 of 3 training samples")
    # multiclass: margin to the runner-up class, 3 - 1 and 2 - 0
    h = victim_health(torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]]), torch.tensor([0, 2]))
    assert (h["train_acc"], h["margin_min"], h["margin_mean"], h["problems"]) == (1.0, 2.0, 2.0, [])
    # the same output for every sample: collapsed
    h = victim_health(torch.tensor([0.3, 0.3, 0.3, 0.3]), torch.tensor([1, 0, 1, 0]))
    assert h["collapsed"] and "collapsed to a constant output" in h["problems"][0]


@pytest.mark.slow
def test_multiclass_uses_cross_entropy(make_cfg, tmp_path):
    main_with_config(make_cfg("stage=classifier", "data.classes=[0,1,7]", *SMALL_VICTIM))
    model, spec = load_victim(tmp_path / "run/classifier")
    assert spec["loss"] == "ce" and model.out_dim == 3 and spec["metrics"]["train_acc"] == 1.0


def test_victim_size_mismatch_is_a_clear_error(tmp_path):
    save_victim(tmp_path, VictimMLP(64, [8], 2))
    with pytest.raises(ModelMismatchError, match="victim expects 64-d inputs but the embeddings are 1280-d"):
        load_victim(tmp_path, expected_input_dim=1280)


def test_corrupt_victim_file_is_a_clear_error(tmp_path):
    save_victim(tmp_path, VictimMLP(16, [8], 2))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="corrupt"):
        load_victim(tmp_path)


def test_victim_with_nan_weights_is_a_clear_error_naming_the_file(make_cfg, tmp_path):
    victim = VictimMLP(16, [8], 2)
    with torch.no_grad():
        victim.layers[1].weight[0, 3] = float("nan")
    save_victim(tmp_path / "victim", victim, {"loss": "bce", "n_train": 4})
    with pytest.raises(DataError, match=r"victim weights .*victim/model\.safetensors hold NaN/inf \(1 value in layers\.1\.weight\)"):
        load_victim(tmp_path / "victim")
    # auditing it: refused before any stage runs, not blamed on reconstruct.lr after the reconstruction
    with pytest.raises(DataError, match="NaN/inf"):
        main_with_config(make_cfg("stage=reconstruct", f"reconstruct.victim_dir={tmp_path / 'victim'}"))
    assert not (tmp_path / "run" / "reconstruct").exists()


@pytest.mark.slow
def test_bad_data_inputs(make_cfg, tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_dataset(make_cfg("data=imagefolder", f"data.root={tmp_path}/nope").data)
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cats/a.png")
    with pytest.raises(DataError, match="class 'dogs' has no images"):
        load_dataset(make_cfg("data=imagefolder", f"data.root={root}").data)
    (root / "dogs/b.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"corrupt or unreadable image: .*b\.png"):
        load_dataset(make_cfg("data=imagefolder", f"data.root={root}", "data.n_test_per_class=0").data)
    with pytest.raises(ConfigError, match=r"config key 'backbone.kind' must be one of \[.*'timm'\], got 'nope'"):
        main_with_config(make_cfg("stage=embed", "backbone.kind=nope"))


def test_imagefolder_embeds(make_cfg, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / f"imgs/{cls}/{i}.png")
    main_with_config(make_cfg("stage=embed", "data=imagefolder", f"data.root={tmp_path / 'imgs'}",
                              "data.n_per_class=2", "data.n_test_per_class=1"))
    emb = load_embeddings(tmp_path / "run")
    assert emb.train_x.shape == (4, 3 * 12 * 10) and emb.meta["class_names"] == ["a", "b"]


@pytest.mark.slow
def test_cli_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "recon_lightning.fit", "stage=embed", f"run_dir={tmp_path}", "data=imagefolder",
         f"data.root={tmp_path}/missing"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: image folder not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", "backbone=nonexistent", f"run_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "backbone/nonexistent" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_late_stage_config_fails_before_any_work(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'invert.param' must be one of \['dip', 'fourier', 'pixels'\], got 'nope'"):
        main_with_config(make_cfg("invert.param=nope"))
    with pytest.raises(ConfigError, match=r"config key 'reconstruct.lr' must be .* with 0 < low <= high, got \[1, 0.1\]"):
        main_with_config(make_cfg("reconstruct.lr=[1,0.1]"))
    assert not (tmp_path / "run/embed").exists()  # nothing ran


def test_unknown_config_keys_are_refused_with_a_suggestion(make_cfg, tmp_path):
    # Hydra refuses an unknown key while composing (the schema has no such field) ...
    with pytest.raises(ConfigError, match=r"unknown config key 'reconstruct.stpes'; did you mean 'reconstruct.steps'"):
        make_cfg("reconstruct.stpes=5")
    # ... but adds one given with "+key=value" even to a schema: refused before any work.
    with pytest.raises(ConfigError, match=r"unknown config key 'reconstruct.lamda_min'; did you mean 'reconstruct.lambda_min'"):
        main_with_config(make_cfg("+reconstruct.lamda_min=0.1"))
    with pytest.raises(ConfigError, match=r"unknown config key 'select.knn.kk'"):
        main_with_config(make_cfg("+select.knn.kk=3"))
    assert not (tmp_path / "run/embed").exists()  # refused before any work
    # A key of another option of the same group needs that option (backbone.model exists for timm backbones) ...
    with pytest.raises(ConfigError, match=r"unknown config key 'backbone.model'"):
        make_cfg("backbone.model=vit_tiny_patch16_224")
    assert make_cfg("backbone=dino_vits16", "backbone.model=vit_tiny_patch16_224").backbone.model == "vit_tiny_patch16_224"
    # ... and trainer.* goes to lightning.Trainer, which checks its own arguments.
    assert make_cfg("+trainer.gradient_clip_val=1.0").trainer.gradient_clip_val == 1.0


@pytest.mark.slow
def test_typo_in_a_users_config_file_is_refused_on_the_cli(tmp_path):
    # The realistic case: a user's own option file next to the shipped ones (--config-dir).
    (tmp_path / "conf/reconstruct").mkdir(parents=True)
    (tmp_path / "conf/reconstruct/mine.yaml").write_text("defaults:\n  - default\n  - _self_\nnum_runs: 8\nlambda_mn: 0.2\n")
    proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", "--config-dir", str(tmp_path / "conf"),
                           "reconstruct=mine", f"run_dir={tmp_path}/run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "error: unknown config key 'reconstruct.lambda_mn'; did you mean 'reconstruct.lambda_min'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run/embed").exists()


@pytest.mark.parametrize("override, message", [
    # wrong types: refused by Hydra / OmegaConf while composing the config
    ("reconstruct.steps=abc", "config key 'reconstruct.steps': Value 'abc' of type 'str' could not be converted to Integer"),
    ("classifier.lr=abc", "config key 'classifier.lr': Value 'abc' of type 'str' could not be converted to Float"),
    ("seed=abc", "config key 'seed': Value 'abc' of type 'str' could not be converted to Integer"),
    ("reconstruct.score_with_train=maybe", "config key 'reconstruct.score_with_train': Value 'maybe' is not a valid bool"),
    ("reconstruct.num_runs=1.5", "config key 'reconstruct.num_runs': Value '1.5' of type 'float' could not be converted"),
    # values a type cannot describe: the schema's rules, checked before any stage
    ("reconstruct.alpha=[abc,5]", r"config key 'reconstruct.alpha' must be a number > 0 or a range .*, got \['abc', 5\]"),
    ("reconstruct.alpha=-5", r"config key 'reconstruct.alpha' must be a number > 0 .*got -5"),
    ("reconstruct.alpha=[0,10]", r"config key 'reconstruct.alpha' must be a number > 0 .*got \[0, 10\]"),
    ("select.num_representatives=0", "config key 'select.num_representatives' must be >= 1, got 0"),
    ("evaluate.good_threshold=2", r"config key 'evaluate.good_threshold' must be <= 1, got 2.0"),
    ("data.n_per_class=lots", "config key 'data.n_per_class' must be auto or an integer >= 1, got 'lots'"),
    ("trainer.max_epochs=abc", r"trainer.max_epochs \(the victim's training length\) must be an integer >= 1, got 'abc'"),
])
def test_bad_values_are_refused_before_any_stage(make_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        main_with_config(make_cfg(override))
    assert not (tmp_path / "run/embed").exists()  # nothing ran


@pytest.mark.slow
def test_non_numeric_value_on_the_cli_is_an_error_line_not_a_traceback(tmp_path):
    for override in ("reconstruct.steps=abc", "seed=abc"):
        proc = subprocess.run([sys.executable, "-m", "recon_lightning.fit", override, f"run_dir={tmp_path}/run"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        key = override.split("=")[0]
        assert f"error: config key '{key}': Value 'abc' of type 'str' could not be converted to Integer" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "run/embed").exists()


def test_values_of_the_right_kind_pass_the_checks(make_cfg):
    from recon_lightning.config import check_values

    # numbers or [low, high], null entries, auto, a single bool for every layer
    cfg = make_cfg("classifier.init_scale=[1e-3,null]", "reconstruct.lr=0.01", "reconstruct.alpha=[1e-4,1e-2]",
                   "seed=3", "reconstruct.lambda_lr=null", "select.num_clusters=auto", "classifier.bias=true",
                   "data.n_per_class=auto", "stage=[embed,select]")
    check_values(cfg)
    assert cfg.reconstruct.lr == 0.01 and cfg.classifier.bias is True and cfg.seed == 3

