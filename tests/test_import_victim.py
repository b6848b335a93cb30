"""Importing heads trained elsewhere: each source format made here, imported, and the victim's logits compared with
the source model's own outputs on the same inputs (torch modules, scikit-learn's predict_proba, onnxruntime)."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from recon_lightning.errors import ConfigError, ModelMismatchError
from recon_lightning.import_victim import import_victim, main
from recon_lightning.victim import load_victim


def head(dims=(6, 10, 1), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def victim_logits(folder, x: torch.Tensor) -> torch.Tensor:
    victim, _ = load_victim(folder)
    with torch.no_grad():
        return victim(x)


def inputs(d=6, n=32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(5))


def test_safetensors_state_dict_with_input_mean(tmp_path):
    model, mu = head(), torch.linspace(-1, 1, 6)
    save_file(model.state_dict(), str(tmp_path / "head.safetensors"))
    np.save(tmp_path / "mu.npy", mu.numpy())
    out = import_victim(tmp_path / "head.safetensors", tmp_path / "victim", input_mean=tmp_path / "mu.npy")
    x = inputs()
    with torch.no_grad():
        want = model(x - mu).squeeze(-1)  # the head was trained on centred inputs
    assert torch.allclose(victim_logits(out, x), want, atol=1e-6)
    _, spec = load_victim(out)
    assert spec["center"] is True and spec["num_classes"] == 2 and spec["hidden"] == [10]


def test_pt_state_dict_multiclass_and_bias_free_layers(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 5, bias=False), nn.ReLU(), nn.Linear(5, 3))
    torch.save(model.state_dict(), tmp_path / "head.pt")
    out = import_victim(tmp_path / "head.pt", tmp_path / "victim")
    with torch.no_grad():
        assert torch.allclose(victim_logits(out, inputs()), model(inputs()), atol=1e-6)
    _, spec = load_victim(out)
    assert spec["bias"] == [False, False, True] and spec["num_classes"] == 3 and spec["loss"] == "ce"


def test_a_pickled_module_is_refused_with_the_reason(tmp_path):
    torch.save(head(), tmp_path / "model.pt")  # the module itself, not its state dict
    with pytest.raises(ModelMismatchError, match="without unpickling"):
        import_victim(tmp_path / "model.pt", tmp_path / "victim")


@pytest.mark.parametrize("model, words", [
    (nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)), "batch norm"),
    (nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), "2 output logits"),
    (nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Linear(4, 1)), "Linear layers"),
])
def test_layers_the_kkt_forms_do_not_cover_are_named(tmp_path, model, words):
    save_file(model.state_dict(), str(tmp_path / "head.safetensors"))
    with pytest.raises(ModelMismatchError, match=words):
        import_victim(tmp_path / "head.safetensors", tmp_path / "victim")


class Head(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters()
        self.model = head()
        self.loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0))  # a buffer outside the MLP

    def training_step(self, batch, _):
        x, y = batch
        return self.loss(self.model(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_checkpoint(tmp_path):
    x, y = inputs(), (torch.arange(32) % 2).float()
    module = Head()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    trainer.save_checkpoint(tmp_path / "head.ckpt")
    with pytest.raises(ModelMismatchError, match="prefix"):  # the MLP's keys and the loss's are told apart by name
        import_victim(tmp_path / "head.ckpt", tmp_path / "bad", prefix="net.")
    out = import_victim(tmp_path / "head.ckpt", tmp_path / "victim", prefix="model.")
    with torch.no_grad():
        assert torch.allclose(victim_logits(out, x), module.model(x).squeeze(-1), atol=1e-6)


def sklearn_model(classes: int, activation="relu", alpha=1e-2):
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 6))
    y = np.array(["cat", "dog", "emu"])[np.arange(60) % classes]
    return MLPClassifier((12, 7), activation=activation, alpha=alpha, max_iter=300, random_state=0).fit(x, y), x


@pytest.mark.parametrize("classes", [2, 3])
def test_sklearn_mlp_from_skops(tmp_path, classes):
    import skops.io as sio

    model, x = sklearn_model(classes)
    sio.dump(model, tmp_path / "head.skops")
    out = import_victim(tmp_path / "head.skops", tmp_path / "victim", n_train=60)
    logits = victim_logits(out, torch.from_numpy(x).float()).double()
    p = torch.from_numpy(model.predict_proba(x))
    if classes == 2:  # one logit: log(p1 / p0)
        assert torch.allclose(logits, torch.log(p[:, 1] / p[:, 0]), atol=1e-4)
    else:
        assert torch.allclose(torch.log_softmax(logits, 1), torch.log(p), atol=1e-4)
    _, spec = load_victim(out)
    # sklearn's penalty alpha / (2 n) ||W||^2 on the weights is an L2 decay alpha / n in the mean loss
    assert spec["regularization"] == {"kind": "l2", "coefficient": pytest.approx(1e-2 / 60), "params": "weights"}
    assert spec["class_names"] == ["cat", "dog", "emu"][:classes]


def test_sklearn_needs_relu_and_the_training_set_size(tmp_path):
    import skops.io as sio

    sio.dump(sklearn_model(2, activation="tanh")[0], tmp_path / "tanh.skops")
    with pytest.raises(ModelMismatchError, match="tanh"):
        import_victim(tmp_path / "tanh.skops", tmp_path / "victim")
    sio.dump(sklearn_model(2)[0], tmp_path / "relu.skops")
    with pytest.raises(ConfigError, match="n-train"):
        import_victim(tmp_path / "relu.skops", tmp_path / "victim")


def onnx_mlp(path, weights, biases, gemm: bool, last=None, activation="Relu"):
    """An ONNX graph of the MLP, written node by node (Gemm, or MatMul + Add; ``activation`` between layers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, current = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, biases)):
        inits += [numpy_helper.from_array(w if gemm else w.T.copy(), f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        if gemm:
            nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"z{i}"], transB=1))
        else:
            nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"])]
        current = f"z{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node(activation, [current], [f"h{i}"]))
            current = f"h{i}"
    if last:
        nodes.append(helper.make_node(last, [current], ["p"], **({"axis": 1} if last == "Softmax" else {})))
        current = "p"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weights[0].shape[1]])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [None, weights[-1].shape[0]])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("gemm", [True, False], ids=["gemm", "matmul_add"])
def test_onnx_mlp(tmp_path, gemm):
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    dims = [6, 9, 5, 4]
    weights = [rng.standard_normal((dims[i + 1], dims[i])).astype(np.float32) for i in range(3)]
    biases = [rng.standard_normal(dims[i + 1]).astype(np.float32) for i in range(3)]
    onnx_mlp(tmp_path / "head.onnx", weights, biases, gemm)
    out = import_victim(tmp_path / "head.onnx", tmp_path / "victim")
    x = inputs().numpy()
    want = ort.InferenceSession(str(tmp_path / "head.onnx")).run(None, {"x": x})[0]
    assert np.allclose(victim_logits(out, torch.from_numpy(x)).numpy(), want, atol=1e-5)
    onnx_mlp(tmp_path / "probs.onnx", weights, biases, gemm, last="Softmax")  # logits are what lies before it
    assert np.allclose(victim_logits(import_victim(tmp_path / "probs.onnx", tmp_path / "v2"), torch.from_numpy(x)).numpy(),
                       want, atol=1e-5)
    onnx_mlp(tmp_path / "tanh.onnx", weights, biases, gemm, activation="Tanh")
    with pytest.raises(ModelMismatchError, match="Tanh"):
        import_victim(tmp_path / "tanh.onnx", tmp_path / "v3")


def test_the_command_line_writes_the_folder_and_states_errors(tmp_path, capsys):
    save_file(head().state_dict(), str(tmp_path / "head.safetensors"))
    assert main([str(tmp_path / "head.safetensors"), "--out", str(tmp_path / "victim"), "--n-train", "100",
                 "--weight-decay", "0.01", "--backbone", "identity", "--input-size", "1", "2", "3"]) == 0
    _, spec = load_victim(tmp_path / "victim")
    assert spec["n_train"] == 100 and spec["embedding"]["input_size"] == [1, 2, 3]
    assert spec["regularization"] == {"kind": "l2", "coefficient": 0.01, "params": "all"}
    assert main([str(tmp_path / "head.safetensors"), "--out", str(tmp_path / "v2"), "--decay", "adamw"]) == 2
    assert "adam_eps" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point(tmp_path):
    save_file(head().state_dict(), str(tmp_path / "head.safetensors"))
    done = subprocess.run([sys.executable, "-m", "recon_lightning.import_victim", str(tmp_path / "head.safetensors"),
                           "--out", str(tmp_path / "victim")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "victim" / "victim.json").is_file()


def test_sklearn_alpha_becomes_the_stationarity_condition_its_training_reached(tmp_path):
    """A linear MLPClassifier (no hidden layer: a strictly convex loss, so lbfgs reaches its stationary point) is
    stationary under the recipe the import records (L2 alpha / n on the weights), with the multipliers its own loss
    gives, |sigmoid(phi) - y|; decaying the bias too, or alpha without the 1 / n, does not fit."""
    import skops.io as sio
    from sklearn.neural_network import MLPClassifier

    from recon_lightning.kkt import KKTObjective

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 4)) + 2.0, (rng.standard_normal(40) > 0).astype(int)
    model = MLPClassifier((), alpha=1.0, solver="lbfgs", tol=1e-14, max_iter=20000, random_state=0).fit(x, y)
    sio.dump(model, tmp_path / "linear.skops")
    victim, spec = load_victim(import_victim(tmp_path / "linear.skops", tmp_path / "victim", n_train=40))
    victim = victim.double()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        lam = (torch.sigmoid(victim(xt)) - yt).abs()

    def residual(regularization: dict) -> float:
        objective = KKTObjective(victim, {**spec, "regularization": regularization}, "binary_wd", "relu_sigmoid_grad",
                                 torch.float64)
        return objective.kkt(xt[None], lam[None], yt[None], torch.tensor([1e8], dtype=torch.float64),
                             create_graph=False)[1].item()

    assert residual(spec["regularization"]) < 1e-4
    assert residual({**spec["regularization"], "params": "all"}) > 0.1
    assert residual({**spec["regularization"], "coefficient": 1.0}) > 0.1


def expected_init(start: nn.Sequential) -> dict:
    """The victim's keys for an nn.Sequential of Linear/ReLU: its i-th Linear is layers.{i}."""
    linears = [m for m in start if isinstance(m, nn.Linear)]
    out = {}
    for i, m in enumerate(linears):
        out[f"layers.{i}.weight"] = m.weight.detach()
        if m.bias is not None:
            out[f"layers.{i}.bias"] = m.bias.detach()
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_initial_parameters_are_imported_with_the_head(tmp_path, suffix):
    from recon_lightning.victim import load_initial_parameters

    start, trained, mu = head(seed=1), head(seed=2), torch.linspace(-1, 1, 6)
    for model, name in ((start, "init"), (trained, "head")):
        if suffix == ".pt":
            torch.save(model.state_dict(), tmp_path / f"{name}{suffix}")
        else:
            save_file(model.state_dict(), str(tmp_path / f"{name}{suffix}"))
    np.save(tmp_path / "mu.npy", mu.numpy())
    assert main([str(tmp_path / f"head{suffix}"), "--out", str(tmp_path / "victim"), "--init", str(tmp_path / f"init{suffix}"),
                 "--input-mean", str(tmp_path / "mu.npy")]) == 0
    init = load_initial_parameters(tmp_path / "victim")
    want = {**expected_init(start), "input_mean": mu}  # the centring mean is the trained head's
    assert set(init) == set(want)
    for key in want:
        torch.testing.assert_close(init[key], want[key].float(), rtol=0, atol=0)
    _, spec = load_victim(tmp_path / "victim")
    assert spec["init"] == "init.safetensors"
    # without --init, victim.json names none
    import_victim(tmp_path / f"head{suffix}", tmp_path / "plain")
    assert load_initial_parameters(tmp_path / "plain") is None


def test_initial_parameters_from_a_checkpoint_and_a_module_and_mismatches(tmp_path):
    from recon_lightning.victim import load_initial_parameters

    start = Head()
    torch.save({"state_dict": start.state_dict()}, tmp_path / "init.ckpt")
    trained = Head()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "head.ckpt")
    out = import_victim(tmp_path / "head.ckpt", tmp_path / "victim", prefix="model.", init=tmp_path / "init.ckpt")
    init = load_initial_parameters(out)
    assert all(torch.equal(init[k], v) for k, v in expected_init(start.model).items())
    out = import_victim(trained.model, tmp_path / "from_module", init=start.model)  # in memory
    assert all(torch.equal(load_initial_parameters(out)[k], v) for k, v in expected_init(start.model).items())
    with pytest.raises(ModelMismatchError, match=r"layer 0's initial weight has shape \(12, 6\), the trained one \(10, 6\)"):
        import_victim(trained.model, tmp_path / "bad", init=head(dims=(6, 12, 1)))
    with pytest.raises(ModelMismatchError, match="initial parameters have 3 layers"):
        import_victim(trained.model, tmp_path / "bad", init=head(dims=(6, 10, 4, 1)))
    no_bias = nn.Sequential(nn.Linear(6, 10, bias=False), nn.ReLU(), nn.Linear(10, 1))
    with pytest.raises(ModelMismatchError, match="layer 0's initial bias is None"):
        import_victim(trained.model, tmp_path / "bad", init=no_bias)


def test_the_training_loss_is_recorded_and_checked(tmp_path):
    save_file(head().state_dict(), str(tmp_path / "head.safetensors"))
    assert main([str(tmp_path / "head.safetensors"), "--out", str(tmp_path / "mse"), "--loss", "mse"]) == 0
    assert load_victim(tmp_path / "mse")[1]["loss"] == "mse"
    assert load_victim(import_victim(head(), tmp_path / "default"))[1]["loss"] == "bce"
    with pytest.raises(ConfigError, match="trained by bce, not ce"):
        import_victim(head(), tmp_path / "bad", loss="ce")
    assert load_victim(import_victim(head(dims=(6, 4, 3)), tmp_path / "three", loss="mse"))[1]["loss"] == "mse"
