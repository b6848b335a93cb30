"""Import a classifier head trained elsewhere as a victim folder: ``python -m recon_lightning.import_victim SOURCE --out DIR``.

Reads, without executing pickled code:

* a PyTorch state dict of an ``nn.Sequential`` of ``Linear`` / ``ReLU`` (``.safetensors``, or ``.pt`` / ``.pth`` read
  with ``torch.load(weights_only=True)``): keys ``{prefix}{i}.weight`` / ``{prefix}{i}.bias``;
* a Lightning checkpoint (``.ckpt``, ``torch.load(weights_only=True)``): the MLP's keys in its ``state_dict`` under
  ``--prefix`` (found when exactly one prefix holds such keys);
* a scikit-learn ``MLPClassifier`` saved with skops (``.skops``; only scikit-learn's and numpy's own types are
  trusted), ReLU only; its ``alpha`` is recorded as the equivalent L2 decay on the weights, alpha / n_train;
* an ONNX graph (``.onnx``) of ``Gemm`` or ``MatMul`` + ``Add`` layers with ``Relu`` between them (a final
  ``Sigmoid`` / ``Softmax`` is dropped: the victim's outputs are logits).

A state dict holds no activations: the layers are taken to have ReLU between them. ``--init`` adds the head's
parameters before training, in any of these formats, as ``init.safetensors`` (the owner's audit). Anything the KKT
forms do not cover (another activation, batch norm, a layer that is not affine, a two-class head with two logits) is
refused with a message naming it. The written folder is loaded back with :func:`recon_lightning.victim.load_victim` and its
logits compared with the source's before the import returns.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import ConfigError, DataError, ModelMismatchError, ReconError
from .storage import save_tensors
from .victim import INIT_FILE, VICTIM_FORMAT, VictimMLP, load_initial_parameters, load_victim, save_victim

KINDS = ("state_dict", "lightning", "sklearn", "onnx")
SUFFIXES = {".safetensors": "state_dict", ".pt": "state_dict", ".pth": "state_dict", ".bin": "state_dict",
            ".ckpt": "lightning", ".skops": "sklearn", ".onnx": "onnx"}
_LAYER_KEY = re.compile(r"^(.*?)(\d+)\.(weight|bias)$")


class ImportRefused(ModelMismatchError):
    """The source is not an MLP the reconstruction can audit (or not in a format read without unpickling)."""


# ----------------------------------------------------------------------------- layers from each source


def layers_from_state_dict(state: dict, prefix: str | None = None, strict: bool = True) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(weight (out, in), bias or None) per ``Linear`` of a ``nn.Sequential`` state dict, in order. Keys
    ``{prefix}{i}.weight`` / ``.bias``; ``prefix=None`` finds it (exactly one prefix must hold such keys).
    ``strict``: every key must belong to the MLP (a plain state dict); otherwise keys outside the prefix are ignored
    (a Lightning checkpoint also holds, e.g., a loss's buffers)."""
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match and isinstance(value, torch.Tensor):
            found.setdefault(match.group(1), {}).setdefault(int(match.group(2)), {})[match.group(3)] = value
    if prefix is None:
        if len(found) != 1:
            what = f"several: {sorted(found)}" if found else "none"
            raise ImportRefused(f"cannot tell which keys are the MLP's: prefixes with '<i>.weight' keys: {what}; "
                                f"name one with --prefix (e.g. --prefix model.)")
        prefix = next(iter(found))
    if prefix not in found:
        raise ImportRefused(f"no '{prefix}<i>.weight' keys in the state dict; its prefixes with such keys: {sorted(found)}")
    ours = {f"{prefix}{i}.{k}" for i, p in found[prefix].items() for k in p}
    mine = [k for k in state if k.startswith(prefix)] if not strict else list(state)
    other = sorted(k for k in mine if k not in ours)
    if other:
        norm = [k for k in other if re.search(r"running_(mean|var)|num_batches_tracked", k)]
        if norm:
            raise ImportRefused(f"batch norm is not covered by the KKT forms (keys {norm[:4]}); fold it into the "
                                f"neighbouring Linear layer or retrain without it")
        raise ImportRefused(f"the state dict holds keys that are not Linear layers of an nn.Sequential: {other[:6]}")
    layers = []
    for i in sorted(found[prefix]):
        params = found[prefix][i]
        if "weight" not in params:
            raise ImportRefused(f"layer {prefix}{i} has a bias but no weight")
        w = params["weight"]
        if w.ndim != 2:
            raise ImportRefused(f"layer {prefix}{i}.weight has shape {tuple(w.shape)}: only Linear layers (2-d weights) "
                                f"are covered, not convolutions or other layers")
        b = params.get("bias")
        layers.append((w.detach().double().numpy(), None if b is None else b.detach().double().numpy()))
    return layers


def layers_from_module(module: torch.nn.Module) -> tuple[list, np.ndarray | None]:
    """Layers (and the input mean of a centred :class:`VictimMLP`) of an ``nn.Sequential`` of ``Linear`` / ``ReLU``, or
    of a :class:`VictimMLP`; other modules are refused by name."""
    if isinstance(module, VictimMLP):
        state = {k: v for k, v in module.state_dict().items() if k != "input_mean"}
        mean = module.input_mean.detach().double().numpy() if module.center else None
        return layers_from_state_dict(state, "layers."), mean
    if not isinstance(module, torch.nn.Sequential):
        raise ImportRefused(f"a {type(module).__name__} is not an nn.Sequential of Linear and ReLU layers; pass the MLP "
                            f"head itself (or import its state dict with a --prefix)")
    kinds = []
    for name, child in module.named_children():
        if not isinstance(child, (torch.nn.Linear, torch.nn.ReLU)):
            raise ImportRefused(f"layer {name} is a {type(child).__name__}; the KKT forms cover Linear layers with ReLU "
                                f"between them")
        kinds.append("linear" if isinstance(child, torch.nn.Linear) else "relu")
    n_linear = kinds.count("linear")
    if kinds != ["linear", "relu"] * (n_linear - 1) + ["linear"]:
        raise ImportRefused(f"the layers are {kinds}; a victim alternates Linear and ReLU, ending in Linear")
    return layers_from_state_dict(module.state_dict()), None


def read_state_dict(path: Path) -> dict:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = _torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        raise ImportRefused(f"{path} is a checkpoint (it has a 'state_dict' entry), not a state dict: name it .ckpt or "
                            f"save checkpoint['state_dict'] alone")
    if not isinstance(state, dict):
        raise ImportRefused(f"{path} holds a {type(state).__name__}, not a state dict: save model.state_dict(), not the "
                            f"model")
    return state


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - weights_only refuses anything beyond tensors and plain containers
        raise ImportRefused(f"{path} cannot be read without unpickling code (torch.load(weights_only=True) refused it: "
                            f"{str(err).splitlines()[0]}); save the model's state_dict (torch.save(model.state_dict()) "
                            f"or safetensors) and import that") from None


def read_lightning(path: Path, prefix: str | None) -> list:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ImportRefused(f"{path} is not a Lightning checkpoint: it has no 'state_dict' entry")
    return layers_from_state_dict(ckpt["state_dict"], prefix, strict=False)


def read_sklearn(path: Path) -> tuple[list, dict]:
    """Layers and what victim.json needs from a skops file of an ``MLPClassifier``."""
    try:
        import skops.io as sio
    except ImportError:
        raise ConfigError("importing a scikit-learn model needs the PyPI package 'skops': "
                          "pip install 'recon_lightning[importers]'") from None
    untrusted = sio.get_untrusted_types(file=path)
    unexpected = [t for t in untrusted if not t.startswith(("sklearn.", "numpy."))]
    if unexpected:
        raise ImportRefused(f"{path} holds types other than scikit-learn's and numpy's: {unexpected}; not loaded")
    model = sio.load(path, trusted=untrusted)
    from sklearn.neural_network import MLPClassifier

    if not isinstance(model, MLPClassifier):
        raise ImportRefused(f"{path} holds a {type(model).__name__}; only sklearn.neural_network.MLPClassifier is covered")
    if model.activation != "relu":
        raise ImportRefused(f"the MLPClassifier's activation is {model.activation!r}; the KKT forms cover relu only")
    if model.out_activation_ not in ("logistic", "softmax") or (model.out_activation_ == "logistic" and model.n_outputs_ != 1):
        raise ImportRefused(f"the MLPClassifier's output is {model.out_activation_!r} with {model.n_outputs_} outputs "
                            f"(multi-label?); only a single-label classifier is covered")
    layers = [(np.asarray(w, dtype=np.float64).T, np.asarray(b, dtype=np.float64))
              for w, b in zip(model.coefs_, model.intercepts_)]
    return layers, {"alpha": float(model.alpha), "class_names": [str(c) for c in model.classes_]}


def read_onnx(path: Path) -> list:
    """Layers of an ONNX graph that is a chain Gemm | MatMul[+Add], Relu, ..., optionally ending in Sigmoid/Softmax."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ConfigError("importing an ONNX graph needs the PyPI package 'onnx': "
                          "pip install 'recon_lightning[importers]'") from None
    graph = onnx.load(str(path)).graph
    consts = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t).astype(np.float64)
    if len(graph.input) - sum(i.name in consts for i in graph.input) != 1:
        raise ImportRefused(f"{path}: the graph must have one data input")
    current = next(i.name for i in graph.input if i.name not in consts)
    layers: list = []
    pending: np.ndarray | None = None  # a MatMul's weight waiting for its Add
    ended = False
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        if ended:
            raise ImportRefused(f"{path}: node {node.op_type} after the output activation")
        data = [x for x in node.input if x and x not in consts]
        if data != [current]:
            raise ImportRefused(f"{path}: node {node.name or node.op_type} ({node.op_type}) does not continue a single "
                                f"chain of layers (inputs {list(node.input)}); only a plain MLP is covered")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        params = [consts[x] for x in node.input if x in consts]
        if node.op_type == "Gemm":
            _close(layers, pending)
            pending = None
            if attrs.get("transA", 0):
                raise ImportRefused(f"{path}: Gemm with transA=1 is not a layer applied to the input")
            w = params[0] if attrs.get("transB", 0) else params[0].T
            b = params[1].reshape(-1) if len(params) > 1 else None
            layers.append((float(attrs.get("alpha", 1.0)) * w, None if b is None else float(attrs.get("beta", 1.0)) * b))
        elif node.op_type == "MatMul":
            _close(layers, pending)
            pending = params[0].T
        elif node.op_type == "Add" and pending is not None:
            layers.append((pending, params[0].reshape(-1)))
            pending = None
        elif node.op_type == "Relu":
            _close(layers, pending)
            pending = None
            layers.append("relu")
        elif node.op_type in ("Sigmoid", "Softmax") and layers:
            ended = True
        elif node.op_type in ("Identity", "Flatten") and not layers:
            pass
        else:
            raise ImportRefused(f"{path}: ONNX operator {node.op_type} is not covered (a plain ReLU MLP has Gemm or "
                                f"MatMul + Add, and Relu)")
        current = node.output[0]
    _close(layers, pending)
    # Linear, relu, Linear, relu, ..., Linear
    kinds = ["relu" if x == "relu" else "linear" for x in layers]
    expected = ["linear", "relu"] * (len([k for k in kinds if k == "linear"]) - 1) + ["linear"]
    if kinds != expected:
        raise ImportRefused(f"{path}: the layers are {kinds}; a victim alternates linear and relu, ending in linear")
    return [x for x in layers if x != "relu"]


def _close(layers: list, pending: np.ndarray | None) -> None:
    if pending is not None:
        layers.append((pending, None))


# ----------------------------------------------------------------------------- the victim folder


def victim_from_layers(layers: Sequence[tuple[np.ndarray, np.ndarray | None]], input_mean: np.ndarray | None = None) -> VictimMLP:
    """A :class:`VictimMLP` with these (weight (out, in), bias) layers and ReLU between them."""
    if not layers:
        raise ImportRefused("no Linear layers found")
    for i in range(1, len(layers)):
        if layers[i][0].shape[1] != layers[i - 1][0].shape[0]:
            raise ImportRefused(f"layer {i} takes {layers[i][0].shape[1]} inputs but layer {i - 1} gives "
                                f"{layers[i - 1][0].shape[0]}: not a chain of Linear layers")
    out = layers[-1][0].shape[0]
    if out == 2:
        raise ImportRefused("the head has 2 output logits for 2 classes; the victim format (and its KKT form) has one "
                            "logit for two classes (BCE); retrain with a single output, or import a 3+-class head")
    num_classes = 2 if out == 1 else out
    model = VictimMLP(layers[0][0].shape[1], [w.shape[0] for w, _ in layers[:-1]], num_classes,
                      bias=[b is not None for _, b in layers], center=input_mean is not None)
    with torch.no_grad():
        for layer, (w, b) in zip(model.layers, layers):
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            if b is not None:
                layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(b)))
        if input_mean is not None:
            if input_mean.shape != (model.input_dim,):
                raise ConfigError(f"--input-mean has shape {input_mean.shape}, the head takes {model.input_dim} inputs")
            model.input_mean.copy_(torch.from_numpy(input_mean))
    return model


def source_kind(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; known: {sorted(SUFFIXES)} "
                          f"(or pass kind=/--kind {'|'.join(KINDS)})")
    return kind


def read_input_mean(value) -> np.ndarray | None:
    """``--input-mean``: None, an array, or a ``.npy`` / ``.safetensors`` (tensor ``input_mean``) file."""
    if value is None or isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().double().numpy()
    path = Path(value)
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float64).reshape(-1)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if "input_mean" not in tensors:
            raise DataError(f"{path} has no tensor 'input_mean' (it has {sorted(tensors)})")
        return tensors["input_mean"].astype(np.float64).reshape(-1)
    raise ConfigError(f"--input-mean must be a .npy or .safetensors file, got {path}")


def import_victim(source: str | Path | torch.nn.Module, out: str | Path, *, kind: str | None = None, prefix: str | None = None,
                  input_mean=None, n_train: int | None = None, weight_decay: float = 0.0, decay: str = "l2",
                  decay_params: str = "all", adam_eps: float | None = None, loss_reduction: str = "mean",
                  class_names: Sequence[str] | None = None, backbone: str | None = None, normalize: str | None = None,
                  input_size: Sequence[int] | None = None, mean_norm: float | None = None, init=None,
                  loss: str | None = None) -> Path:
    """Write the victim folder ``out`` (``model.safetensors`` + ``victim.json``) from ``source``, a file (see the
    module's docstring for the formats) or an ``nn.Sequential`` of ``Linear`` / ``ReLU`` in memory, and check it: loaded back, it gives the source's logits. Returns ``out``.

    The training recipe (``weight_decay``, ``decay`` l2|adamw, ``decay_params`` all|weights, ``adam_eps``,
    ``loss_reduction`` mean|sum, ``n_train``) is recorded for the reconstruction's stationarity form; a scikit-learn
    model's own ``alpha`` sets it (L2 on the weights, coefficient alpha / n_train, mean loss). The embedding space
    (``backbone`` name, ``normalize``, the images' ``input_size`` (C, H, W) for raw-pixel heads, ``mean_norm``) is
    recorded for the reconstruction's prior and the inversion. ``init``: the head's parameters before training (a file
    the importer reads, or an ``nn.Module``), written as ``init.safetensors`` for the owner's audit."""
    out = Path(out).expanduser()
    if isinstance(source, torch.nn.Module):
        kind = "module"
        extra: dict = {"source": {"kind": kind, "class": type(source).__name__}}
    else:
        source = Path(source).expanduser()
        if not source.is_file():
            raise DataError(f"no such file: {source}")
        kind = kind or source_kind(source)
        extra = {"source": {"path": str(source), "kind": kind}}
    layers, own_mean, info = read_layers(source, kind, prefix)
    if own_mean is not None:
        if input_mean is not None:
            raise ConfigError("the VictimMLP carries its own input_mean: do not pass input_mean")
        input_mean = own_mean
    input_mean = read_input_mean(input_mean)  # a file is read once
    if kind == "sklearn":
        if weight_decay or decay != "l2" or decay_params != "all" or loss_reduction != "mean":
            raise ConfigError("a scikit-learn model's training recipe is its own (alpha on the weights, mean loss): "
                              "do not pass weight_decay / decay / decay_params / loss_reduction")
        class_names = class_names or info["class_names"]
        extra["source"]["sklearn_alpha"] = info["alpha"]
        if info["alpha"] > 0:
            if not n_train:
                raise ConfigError(f"the MLPClassifier was trained with alpha={info['alpha']}: its decay per sample, alpha "
                                  f"/ n_train, needs the number of training samples (--n-train)")
            weight_decay, decay_params = info["alpha"] / int(n_train), "weights"
    model = victim_from_layers(layers, input_mean)
    if class_names is not None and len(class_names) != model.num_classes:
        raise ConfigError(f"{len(class_names)} class names for a head with {model.num_classes} classes")
    regularization = {"kind": decay, "coefficient": float(weight_decay), "params": decay_params}
    if decay == "adamw":
        regularization["adam_eps"] = adam_eps
    extra.update({
        "loss": training_loss(loss, model.num_classes, kind),
        "weight_decay": float(weight_decay),
        "regularization": regularization,
        "loss_reduction": loss_reduction,
        "n_train": int(n_train) if n_train else None,
        "class_names": list(class_names) if class_names is not None else [str(c) for c in range(model.num_classes)],
        "embedding": {"backbone_name": backbone, "normalize": normalize or "none", "mean_norm": mean_norm,
                      "input_size": list(input_size) if input_size else None},
    })
    from .kkt import training_recipe

    training_recipe(extra)  # a recipe the stationarity forms cannot express is refused now, not at reconstruction
    if input_size is not None and int(np.prod(input_size)) != model.input_dim:
        raise ConfigError(f"input_size {list(input_size)} has {int(np.prod(input_size))} values but the head takes "
                          f"{model.input_dim} inputs")
    if init is not None:
        # victim.json names the initial parameters: they are written first
        write_initial_parameters(out, init, layers, input_mean, prefix)
        extra["init"] = INIT_FILE
    save_victim(out, model.float(), extra)
    check_import(out, layers, input_mean)
    if init is not None:
        load_initial_parameters(out)  # read back as the reconstruction reads them
    return out


def training_loss(loss: str | None, num_classes: int, kind: str) -> str:
    """The loss recorded in victim.json: ``loss``, checked against the head, or the default for its output."""
    default = "bce" if num_classes == 2 else "ce"
    if loss is None:
        return default
    if loss not in ("bce", "ce", "mse"):
        raise ConfigError(f"loss must be bce, ce or mse, got {loss!r}")
    if kind == "sklearn" and loss != default:
        raise ConfigError(f"an MLPClassifier is trained by its log-loss ({default}), not {loss}")
    if loss in ("bce", "ce") and loss != default:
        raise ConfigError(f"a head with {num_classes} classes is trained by {default}, not {loss}: bce has one logit, ce "
                          f"one per class (3 or more)")
    return loss


def read_layers(source, kind: str, prefix: str | None) -> tuple[list, np.ndarray | None, dict]:
    """The (weight, bias) layers of ``source`` read as ``kind``, the input mean a :class:`VictimMLP` carries (else None)
    and what a scikit-learn model adds (its ``alpha`` and classes; else empty)."""
    if kind == "module":
        layers, own_mean = layers_from_module(source)
        return layers, own_mean, {}
    if kind == "state_dict":
        return layers_from_state_dict(read_state_dict(source), prefix), None, {}
    if kind == "lightning":
        return read_lightning(source, prefix), None, {}
    if kind == "sklearn":
        layers, info = read_sklearn(source)
        return layers, None, info
    if kind == "onnx":
        return read_onnx(source), None, {}
    raise ConfigError(f"unknown source kind {kind!r}; choose from {KINDS}")


def write_initial_parameters(out: Path, init, layers, input_mean: np.ndarray | None, prefix: str | None) -> Path:
    """``out/init.safetensors`` from ``init``, the head's parameters before training (a file in any format the importer
    reads, told by its suffix, or an ``nn.Module``), converted with the same key mapping as the trained head, whose
    ``layers`` it must match layer by layer (weight shapes, which layers have a bias)."""
    if isinstance(init, torch.nn.Module):
        kind = "module"
    else:
        init = Path(init).expanduser()
        if not init.is_file():
            raise DataError(f"no such file (the initial parameters): {init}")
        kind = source_kind(init)
    start, _, _ = read_layers(init, kind, prefix)
    if len(start) != len(layers):
        raise ModelMismatchError(f"the initial parameters have {len(start)} layers, the trained head {len(layers)}")
    for i, ((w0, b0), (w, b)) in enumerate(zip(start, layers)):
        if w0.shape != w.shape:
            raise ModelMismatchError(f"layer {i}'s initial weight has shape {w0.shape}, the trained one {w.shape}")
        if (b0 is None) != (b is None) or (b is not None and b0.shape != b.shape):
            raise ModelMismatchError(f"layer {i}'s initial bias is {None if b0 is None else b0.shape}, the trained one "
                                     f"{None if b is None else b.shape}")
    # the centring mean is the trained head's: it is not a parameter
    state = victim_from_layers(start, input_mean).float().state_dict()
    save_tensors(out / INIT_FILE, state, {"format": VICTIM_FORMAT, "kind": "initial parameters"})
    return out / INIT_FILE


def reference_logits(layers: Sequence[tuple[np.ndarray, np.ndarray | None]], x: np.ndarray,
                     input_mean: np.ndarray | None = None) -> np.ndarray:
    """The source MLP's logits on ``x`` (float64 numpy, ReLU between the layers)."""
    h = x - input_mean if input_mean is not None else x
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + (b if b is not None else 0.0)
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def check_import(out: Path, layers, input_mean: np.ndarray | None) -> None:
    """The written victim, loaded as the pipeline loads it, gives the source's logits (float32 tolerance)."""
    victim, _ = load_victim(out)
    x = np.random.default_rng(0).standard_normal((16, victim.input_dim))
    if input_mean is not None:
        x = x + input_mean
    want = reference_logits(layers, x, input_mean)
    with torch.no_grad():
        got = victim(torch.from_numpy(x).float()).double().numpy().reshape(want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
        raise ModelMismatchError(f"the imported victim in {out} does not reproduce the source's logits "
                                 f"(largest difference {float(np.abs(got - want).max()):.3g})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recon_lightning.import_victim", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a .safetensors/.pt/.pth state dict, a Lightning .ckpt, a .skops MLPClassifier "
                                       "or an .onnx graph")
    parser.add_argument("--out", required=True, help="the victim folder to write (reconstruct.victim_dir=)")
    parser.add_argument("--kind", choices=KINDS, help="the source's format (default: from its suffix)")
    parser.add_argument("--prefix", help="the MLP's key prefix in a state dict or checkpoint, e.g. 'model.' "
                                         "(default: the one prefix with '<i>.weight' keys)")
    parser.add_argument("--input-mean", help="a .npy or .safetensors (tensor input_mean) file: the head was trained on "
                                             "inputs minus this mean")
    parser.add_argument("--n-train", type=int, help="the number of training samples")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="the decay coefficient it was trained with")
    parser.add_argument("--decay", choices=("l2", "adamw"), default="l2",
                        help="l2: (wd/2)||theta||^2 in the loss (SGD/Adam weight_decay); adamw: torch.optim.AdamW")
    parser.add_argument("--decay-params", choices=("all", "weights"), default="all", help="which parameters were decayed")
    parser.add_argument("--adam-eps", type=float, help="AdamW's eps (with --decay adamw)")
    parser.add_argument("--loss-reduction", choices=("mean", "sum"), default="mean")
    parser.add_argument("--class-names", nargs="+")
    parser.add_argument("--backbone", help="the backbone config that made the head's inputs (backbone=...)")
    parser.add_argument("--normalize", choices=("none", "l2"), help="embed.normalize of the head's inputs")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="a raw-pixel head (backbone=identity): the images' size")
    parser.add_argument("--mean-norm", type=float, help="the training inputs' mean norm (the reconstruction's norm prior)")
    parser.add_argument("--loss", choices=("bce", "ce", "mse"),
                        help="the training loss (default: bce for one logit, ce for several; mse: squared error to "
                             "+-1 or one-hot targets)")
    parser.add_argument("--init", help="the head's parameters before training, in any format SOURCE may have (written as "
                                       "init.safetensors: the owner's audit, reconstruct.target=displacement)")
    args = parser.parse_args(argv)
    try:
        out = import_victim(args.source, args.out, kind=args.kind, prefix=args.prefix, input_mean=args.input_mean,
                            n_train=args.n_train, weight_decay=args.weight_decay, decay=args.decay,
                            decay_params=args.decay_params, adam_eps=args.adam_eps, loss_reduction=args.loss_reduction,
                            class_names=args.class_names, backbone=args.backbone, normalize=args.normalize,
                            input_size=args.input_size, mean_norm=args.mean_norm, init=args.init,
                            loss=args.loss)
    except ReconError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"victim written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
