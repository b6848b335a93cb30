"""The owner's audit, victim side: the initial parameters saved with the victim (and imported with it), the MSE
loss of lazy-regime victims, and the relative displacement recorded in victim.json."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from recon_lightning.embed import load_embeddings
from recon_lightning.errors import DataError
from recon_lightning.fit import main_with_config
from recon_lightning.storage import load_json
from recon_lightning.victim import VictimMLP, load_initial_parameters, load_victim, loss_fn, save_victim

SMALL = ["stage=classifier", "trainer.accelerator=cpu", "classifier.hidden=[32]", "classifier.bias=[true,false]",
         "classifier.init_scale=[null,null]", "data.n_per_class=10", "data.n_test_per_class=5",
         "classifier.lr_schedule=constant", "classifier.checkpoint_every_n_epochs=20", "classifier.log_every_n_epochs=10"]


def fresh_model(emb, seed=0) -> VictimMLP:
    """The victim the classifier stage starts from, built here from the seed and the config above."""
    L.seed_everything(seed, verbose=False)
    model = VictimMLP(emb.dim, [32], emb.num_classes, bias=[True, False], init_scale=[None, None], center=True)
    model.input_mean.copy_(emb.train_x.float().mean(0))
    return model


def test_the_initial_parameters_are_the_seeds_and_differ_from_the_trained_ones(make_cfg, tmp_path):
    main_with_config(make_cfg(*SMALL, "trainer.max_epochs=40"))
    out = tmp_path / "run/classifier"
    init = load_initial_parameters(out)
    expected = fresh_model(load_embeddings(tmp_path / "run")).state_dict()
    assert set(init) == set(expected) == set(load_file(str(out / "model.safetensors")))
    for key in expected:
        torch.testing.assert_close(init[key], expected[key], rtol=0, atol=0)
    trained = load_file(str(out / "model.safetensors"))
    assert not torch.equal(init["layers.0.weight"], trained["layers.0.weight"])
    spec = load_json(out / "victim.json")
    assert spec["init"] == "init.safetensors"
    # ||W_T - W_0|| / ||W_0||, computed here from the two files
    assert set(spec["relative_displacement"]) == {"layers.0.weight", "layers.0.bias", "layers.1.weight"}
    for key, value in spec["relative_displacement"].items():
        w0, wt = init[key].double(), trained[key].double()
        assert value == pytest.approx(float((wt - w0).norm() / w0.norm()), rel=1e-6)
    assert spec["metrics"]["first_layer_displacement"] == spec["relative_displacement"]["layers.0.weight"]


@pytest.mark.slow
def test_a_resumed_training_keeps_the_initial_parameters(make_cfg, tmp_path):
    main_with_config(make_cfg(*SMALL, "trainer.max_epochs=40"))
    path = tmp_path / "run/classifier/init.safetensors"
    before, stamp = path.read_bytes(), path.stat().st_mtime_ns
    main_with_config(make_cfg(*SMALL, "trainer.max_epochs=60"))  # continues from the checkpoint at epoch 40
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    assert load_json(tmp_path / "run/classifier/victim.json")["epochs"] == 60
    # Other tensors under the same name are refused, not overwritten.
    init = load_file(str(path))
    init["layers.0.weight"] = init["layers.0.weight"] + 1
    save_file(init, str(path))
    with pytest.raises(DataError, match=r"other initial parameters.*layers\.0\.weight"):
        main_with_config(make_cfg(*SMALL, "trainer.max_epochs=80"))


def test_load_initial_parameters_checks_them_against_the_model(tmp_path):
    model = VictimMLP(4, [3], 2, bias=[True, False])
    save_victim(tmp_path, model)
    assert load_initial_parameters(tmp_path) is None  # none saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "init.safetensors"))
    assert load_initial_parameters(tmp_path) is None  # a file victim.json does not name is not read
    save_victim(tmp_path, model, {"init": "init.safetensors"})
    save_file({**state, "layers.0.weight": torch.zeros(3, 5)}, str(tmp_path / "init.safetensors"))
    with pytest.raises(DataError, match=r"layers\.0\.weight has shape \(3, 5\), the model's \(3, 4\)"):
        load_initial_parameters(tmp_path)
    save_file({k: v for k, v in state.items() if k != "layers.1.weight"}, str(tmp_path / "init.safetensors"))
    with pytest.raises(DataError, match=r"missing \['layers\.1\.weight'\]"):
        load_initial_parameters(tmp_path)
    save_file(state, str(tmp_path / "init.safetensors"))
    assert all(torch.equal(load_initial_parameters(tmp_path)[k], state[k]) for k in state)
    (tmp_path / "init.safetensors").unlink()
    with pytest.raises(DataError, match="names the initial parameters"):
        load_initial_parameters(tmp_path)


def test_relative_displacement_of_a_zero_start_is_none():
    from recon_lightning.victim import relative_displacement

    init = {"w": torch.tensor([3.0, 4.0]), "b": torch.zeros(2), "input_mean": torch.ones(2)}
    moved = relative_displacement(init, {"w": torch.tensor([3.0, 4.5]), "b": torch.ones(2), "input_mean": torch.ones(2)})
    assert moved == {"w": pytest.approx(0.5 / 5), "b": None}


def test_mse_loss_targets():
    logits = torch.tensor([0.5, -2.0, 1.0])
    y = torch.tensor([1, 0, 0])
    # binary: targets +1, -1, -1
    assert float(loss_fn(logits, y, "mse")) == pytest.approx(((0.5 - 1) ** 2 + (-2 + 1) ** 2 + (1 + 1) ** 2) / 3)
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    onehot = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    assert float(loss_fn(logits, y, "mse")) == pytest.approx(float(((logits - onehot) ** 2).mean()))


@pytest.mark.parametrize("classes", [None, "[0,1,7]"])
def test_an_mse_victim_trains_as_a_plain_loop_does(make_cfg, tmp_path, classes):
    """classifier.loss=mse: the stage's victim equals full-batch SGD on the squared error to +-1 targets (two classes)
    or one-hot targets (three) written here; its accuracy, margins and health are the usual ones."""
    args = [*SMALL, "classifier.loss=mse", "classifier.lr=0.05", "classifier.weight_decay=0", "trainer.max_epochs=30"]
    main_with_config(make_cfg(*args, *([f"data.classes={classes}"] if classes else [])))
    emb = load_embeddings(tmp_path / "run")
    model = fresh_model(emb)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    y = emb.train_y
    target = 2 * y.float() - 1 if emb.num_classes == 2 else torch.eye(emb.num_classes)[y]
    for _ in range(30):
        opt.zero_grad()
        ((model(emb.train_x) - target) ** 2).mean().backward()
        opt.step()
    victim, spec = load_victim(tmp_path / "run/classifier")
    assert spec["loss"] == "mse" and victim.out_dim == (1 if emb.num_classes == 2 else emb.num_classes)
    with torch.no_grad():
        want = model(emb.train_x)
        torch.testing.assert_close(victim(emb.train_x), want, rtol=1e-4, atol=1e-5)
    assert spec["metrics"]["train_loss"] == pytest.approx(float(((want - target) ** 2).mean()), rel=1e-4)
    if emb.num_classes == 2:
        pred, margin = (want > 0).long(), (2 * y - 1) * want
    else:
        pred = want.argmax(1)
        others = want.clone().scatter_(1, y[:, None], float("-inf")).max(1).values
        margin = want.gather(1, y[:, None]).squeeze(1) - others
    assert spec["metrics"]["train_acc"] == pytest.approx(float((pred == y).float().mean()))
    assert spec["metrics"]["train_margin_min"] == pytest.approx(float(margin.min()), rel=1e-4, abs=1e-6)
    assert spec["health"]["misclassified"] == int((margin <= 0).sum())


def test_the_lazy_owner_audit_benchmark_recovers_its_training_points(tmp_path):
    """benchmarks/owner_audit_lazy.py end to end on a small lazy victim: the victim folder it writes is one the
    reconstruction reads as an owner's (init.safetensors named in victim.json), the displacement singles out the
    training points, and the projection objective recovers them."""
    from benchmark_scripts import load_benchmark

    out = load_benchmark("owner_audit_lazy").main(["--width", "500", "--lr", "0.3", "--runs", "2", "--steps", "1000",
                                                   "--out", str(tmp_path)])
    residual = out["projection_residual"]
    assert residual["train"] < 0.1 < 0.5 < residual["random"], residual
    assert min(out["best_cosines"][0.3]) > 0.95, out["best_cosines"]  # every run finds every training point
