"""Stage 2: the victim classifier, an MLP trained on embeddings, and its on-disk format.

Saved model format (``run_dir/classifier/``, also what a user auditing a model trained
elsewhere provides):

* ``model.safetensors``: the MLP's state dict, keys ``layers.{i}.weight`` (out, in) and
  ``layers.{i}.bias`` for the layers that have a bias;
* ``victim.json``: ``{"format": "recon_lightning.victim/1", "input_dim", "hidden",
  "num_classes", "bias", "center", "activation": "relu", "loss": "bce"|"ce"|"mse", "weight_decay",
  "regularization", "loss_reduction", "n_train", "embedding", "init", ...}`` plus the training config and
  final metrics (docs/victims.md lists every key and which stage reads it; heads trained elsewhere are
  written by :mod:`recon_lightning.import_victim`);
* ``init.safetensors`` (optional): the parameters before training, the same keys and shapes as
  ``model.safetensors`` (what the model's owner knows and an outside auditor does not).

The network has one logit for two classes (BCE, labels y in {0, 1}; MSE, targets y in {-1, +1}) and ``num_classes``
logits otherwise (CE; MSE, one-hot targets).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from omegaconf import MISSING, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from . import distributed
from .config import Section, is_number, rule
from .errors import ConfigError, DataError, DivergedError, ModelMismatchError, UnhealthyVictimError
from .stages import Stage
from .storage import load_json, load_tensors, save_json, save_tensors

log = logging.getLogger(__name__)

VICTIM_FORMAT = "recon_lightning.victim/1"


def _per_layer_values(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """One value for every layer, or a list of them (one per layer: checked against classifier.hidden by check_config)."""
    return lambda v: ok(v) or (isinstance(v, list) and all(ok(x) for x in v))


@dataclass
class ClassifierConfig:
    """Schema of ``classifier`` (values: configs/classifier/*.yaml)."""

    hidden: List[int] = rule(ge=1, test=lambda v: len(v) > 0, what="a non-empty list of layer widths")
    # bias, init_scale: one value or a list with one per layer (typed Any: OmegaConf has no Union of a value and a list)
    bias: Any = rule(test=_per_layer_values(lambda x: isinstance(x, bool)), what="true/false or a list of them, one per layer")
    init_scale: Any = rule(gt=0, test=_per_layer_values(lambda x: x is None or is_number(x)),
                           what="null, a number or a list of them, one per layer")
    optimizer: str = rule(choices=("sgd", "adam"))
    lr: float = rule(gt=0)
    lr_schedule: str = rule(choices=("constant", "cosine"))
    momentum: float = rule(ge=0)
    weight_decay: float = rule(ge=0)
    center: bool = MISSING
    epochs: int = rule(ge=1)
    loss: str = rule(choices=("auto", "bce", "ce", "mse"))
    log_every_n_epochs: int = rule(ge=1)
    checkpoint_every_n_epochs: int = rule(ge=0)
    allow_unhealthy: bool = MISSING


class VictimMLP(nn.Module):
    """``input_dim -> hidden... -> out`` with ReLU; ``out`` = 1 for two classes, else ``num_classes``."""

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        num_classes: int,
        bias: Sequence[bool] | bool = True,
        init_scale: Sequence[float | None] | float | None = None,
        center: bool = False,
    ):
        super().__init__()
        self.center = bool(center)
        if self.center:  # phi(x - mu): mu, the training embeddings' mean, is saved with the weights
            self.register_buffer("input_mean", torch.zeros(int(input_dim)))
        if num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.input_dim, self.hidden, self.num_classes = int(input_dim), [int(h) for h in hidden], int(num_classes)
        n_layers = len(self.hidden) + 1
        self.bias = _per_layer(bias, n_layers, "classifier.bias")
        scales = _per_layer(init_scale, n_layers, "classifier.init_scale")
        dims = [self.input_dim, *self.hidden, self.out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(dims[i], dims[i + 1], bias=bool(self.bias[i])) for i in range(n_layers)
        )
        # Small init matters: it is what drives training towards the max-margin KKT point.
        for layer, scale in zip(self.layers, scales):
            if scale is not None:
                nn.init.normal_(layer.weight, std=float(scale))
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def input_offset(self) -> torch.Tensor:
        """The mean subtracted from the inputs (zeros for a victim trained on raw embeddings)."""
        return self.input_mean if self.center else torch.zeros(self.input_dim, device=self.layers[0].weight.device)

    @property
    def out_dim(self) -> int:
        return 1 if self.num_classes == 2 else self.num_classes

    def forward(self, x: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; (B,) for two classes, (B, C) otherwise. ``activation`` replaces ReLU
        (the reconstruction stage passes a ReLU with a smooth backward pass)."""
        act = activation or torch.relu
        if self.center:
            x = x - self.input_mean
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = act(x)
        return x.squeeze(-1) if self.out_dim == 1 else x

    def spec(self) -> dict:
        return {
            "format": VICTIM_FORMAT,
            "input_dim": self.input_dim,
            "hidden": self.hidden,
            "num_classes": self.num_classes,
            "bias": [bool(b) for b in self.bias],
            "activation": "relu",
            "center": self.center,
        }


def _per_layer(value, n: int, name: str) -> list:
    if value is None or isinstance(value, (bool, int, float)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ConfigError(f"{name} needs one entry per layer ({n} = len(hidden) + 1), got {len(value)}: {value}")
    return value


def save_victim(directory: str | Path, model: VictimMLP, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` then ``victim.json`` (both atomically) into ``directory``."""
    directory = Path(directory)
    save_tensors(directory / "model.safetensors", model.state_dict(), {"format": VICTIM_FORMAT})
    save_json(directory / "victim.json", {**model.spec(), **(extra or {})})


INIT_FILE = "init.safetensors"


def save_initial_parameters(directory: str | Path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state``, a victim's parameters before training, to ``directory/init.safetensors``, once: a file already
    there (a resumed training) must hold the same tensors, which it keeps, since the initialisation comes from the seed;
    other tensors there are refused (:class:`DataError`) rather than overwritten."""
    path = Path(directory) / INIT_FILE
    if path.is_file():
        saved, _ = load_tensors(path, what="the victim's initial parameters")
        differ = sorted(k for k in set(saved) | set(state)
                        if k not in saved or k not in state or not torch.equal(saved[k], state[k].detach().cpu()))
        if differ:
            raise DataError(f"{path} holds other initial parameters than this victim's seed gives (differing: {differ}); "
                            f"it belongs to another training: move it away and train again")
        return path
    save_tensors(path, state, {"format": VICTIM_FORMAT, "kind": "initial parameters"})
    return path


def load_initial_parameters(victim_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The victim's parameters before training, from the file victim.json's ``init`` names (``init.safetensors``); None
    when victim.json names none. Raises :class:`DataError` when the file is missing, does not fit ``model.safetensors``
    (keys or shapes, named) or holds NaN/inf."""
    directory = Path(victim_dir)
    spec = load_json(directory / "victim.json", what="victim description (victim.json)")
    if not spec.get("init"):
        return None
    path = directory / spec["init"]
    if not path.is_file():
        raise DataError(f"victim.json names the initial parameters {spec['init']!r}, but {path} is missing")
    init, _ = load_tensors(path, what="the victim's initial parameters")
    trained, _ = load_tensors(directory / "model.safetensors", what="victim weights")
    problems = []
    if set(init) != set(trained):
        problems.append(f"missing {sorted(set(trained) - set(init))}, unexpected {sorted(set(init) - set(trained))}")
    problems += [f"{k} has shape {tuple(init[k].shape)}, the model's {tuple(trained[k].shape)}"
                 for k in sorted(set(init) & set(trained)) if init[k].shape != trained[k].shape]
    problems += [f"{k} holds NaN/inf" for k, t in sorted(init.items()) if t.is_floating_point() and not torch.isfinite(t).all()]
    if problems:
        raise DataError(f"the initial parameters {path} do not fit the victim's weights {directory / 'model.safetensors'}: "
                        f"{'; '.join(problems)}")
    return init


def relative_displacement(init: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """``||theta_T - theta_0|| / ||theta_0||`` per parameter tensor (Frobenius norms; None where ``theta_0`` is 0, e.g.
    zero-initialised biases); the centring mean ``input_mean`` is not a parameter."""
    out: dict[str, float | None] = {}
    for key, start in init.items():
        if key == "input_mean":
            continue
        start, end = start.double(), trained[key].detach().double().cpu()
        size = float(start.norm())
        out[key] = float((end - start).norm()) / size if size > 0 else None
    return out


def load_victim(directory: str | Path, expected_input_dim: int | None = None) -> tuple[VictimMLP, dict]:
    """Load a victim saved by :func:`save_victim` (no pickled code is executed).

    Raises :class:`ModelMismatchError` if the weights do not fit the declared architecture or
    the model's input size differs from ``expected_input_dim`` (the embedding size), and :class:`DataError` if
    they hold NaN/inf.
    """
    directory = Path(directory)
    spec = load_json(directory / "victim.json", what="victim description (victim.json)")
    if spec.get("format") != VICTIM_FORMAT:
        raise ModelMismatchError(f"{directory / 'victim.json'}: unknown format {spec.get('format')!r}, expected {VICTIM_FORMAT!r}")
    state, _ = load_tensors(directory / "model.safetensors", what="victim weights")
    model = VictimMLP(spec["input_dim"], spec["hidden"], spec["num_classes"], bias=spec["bias"], center=bool(spec.get("center")))
    expected = model.state_dict()
    if set(state) != set(expected):
        raise ModelMismatchError(
            f"victim weights in {directory} do not match victim.json: "
            f"missing {sorted(set(expected) - set(state))}, unexpected {sorted(set(state) - set(expected))}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelMismatchError(
                f"victim weight {key} has shape {tuple(tensor.shape)} but victim.json implies {tuple(expected[key].shape)}"
            )
    bad = {key: int((~torch.isfinite(t)).sum()) for key, t in state.items() if t.is_floating_point()}
    bad = {key: n for key, n in bad.items() if n}
    if bad:
        where = ", ".join(f"{n} value{'s' if n > 1 else ''} in {key}" for key, n in bad.items())
        raise DataError(f"victim weights in {directory / 'model.safetensors'} hold NaN/inf ({where}): the victim's training "
                        f"diverged or the file is damaged; retrain it (a lower classifier.lr) or replace the file")
    model.load_state_dict(state)
    if expected_input_dim is not None and expected_input_dim != model.input_dim:
        raise ModelMismatchError(
            f"embedding size mismatch: the victim expects {model.input_dim}-d inputs but the embeddings are "
            f"{expected_input_dim}-d (was the victim trained on another backbone?)"
        )
    return model.eval(), spec


# --------------------------------------------------------------------------------------
# Training (the classifier stage)
# --------------------------------------------------------------------------------------



def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance-like margin per sample: y*phi(x) (y in {-1, 1}) for one logit,
    phi_y(x) - max_{c != y} phi_c(x) for several. Positive = correctly classified."""
    if logits.ndim == 1:
        return (2 * y.to(logits.dtype) - 1) * logits
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    return true - others.max(dim=1).values


def loss_fn(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean training loss: ``bce`` (labels y in {0, 1}), ``ce``, or ``mse`` (the squared error, averaged over
    samples and outputs, to y in {-1, +1} on a single logit, to the one-hot labels on several)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    if kind == "mse":
        target = 2 * y.to(logits.dtype) - 1 if logits.ndim == 1 else F.one_hot(y, logits.shape[1]).to(logits.dtype)
        return F.mse_loss(logits, target)
    return F.cross_entropy(logits, y)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred = (logits > 0).long() if logits.ndim == 1 else logits.argmax(1)
    return (pred == y).float().mean()


# --------------------------------------------------------------------------------------
# Health: can this victim be a reconstruction target at all?

HEALTH_FIXES = ("usually fixed by embed.normalize=l2 (unnormalised CNN features, e.g. EfficientNet's), a lower "
                "classifier.lr, or a longer trainer.max_epochs")


@torch.no_grad()
def victim_health(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Training accuracy, margins and collapse of a victim from its ``logits`` on its training set (labels ``y``),
    with ``problems``: why it cannot be a reconstruction target (the KKT conditions describe a network that
    separates its training set; a constant output or misclassified samples mean it does not)."""
    n = len(logits)  # one row per training sample
    m = margins(logits, y)
    flat = logits.reshape(n, -1)
    spread = float((flat.max(0).values - flat.min(0).values).max())
    collapsed = spread <= 1e-6 * max(1.0, float(flat.abs().max()))
    wrong = int((m <= 0).sum())
    problems = []
    if collapsed:
        problems.append(f"it collapsed to a constant output (the same logits for all {n} training samples, "
                        f"margins {float(m.min()):.3g}..{float(m.max()):.3g})")
    elif wrong:
        problems.append(f"{wrong} of {n} training samples are on the wrong side of it or on its boundary (margin <= 0; train accuracy "
                        f"{float(accuracy(logits, y)):.3f}, smallest margin {float(m.min()):.3g})")
    return {"train_acc": float(accuracy(logits, y)), "margin_min": float(m.min()), "margin_mean": float(m.mean()),
            "collapsed": collapsed, "misclassified": wrong, "problems": problems}


def check_health(health: dict, allow: bool, where: str) -> None:
    """Stop with :class:`UnhealthyVictimError` when ``health`` lists problems (a warning if ``allow``)."""
    if not health["problems"]:
        return
    msg = f"the victim {where} cannot be a reconstruction target: {'; '.join(health['problems'])}; {HEALTH_FIXES}"
    if allow:
        log.warning("%s (going on: classifier.allow_unhealthy=true)", msg)
        return
    raise UnhealthyVictimError(f"{msg}. To reconstruct it anyway, set classifier.allow_unhealthy=true")


def check_given_victim(cfg, victim: VictimMLP) -> dict | None:
    """Health of a victim given with ``reconstruct.victim_dir``, on the training embeddings of
    ``reconstruct.embeddings_dir`` (or ``run_dir/embed``); None when no training set is known."""
    from .embed import load_embeddings

    base = cfg.reconstruct.get("embeddings_dir") or cfg.run_dir
    if not (Path(base).expanduser() / "embed" / "embeddings.safetensors").is_file():
        log.info("victim health not checked: no training embeddings in %s (reconstruct.embeddings_dir)", base)
        return None
    emb = load_embeddings(Path(base).expanduser())
    if emb.dim != victim.input_dim:
        return None  # the size mismatch is reported by the reconstruct stage's own check
    spec = load_json(Path(cfg.reconstruct.victim_dir) / "victim.json", what="victim description (victim.json)")
    where = Path(base).expanduser() / "embed" / "embeddings.safetensors"
    check_training_set(spec, emb, where)
    with torch.no_grad():
        health = victim_health(victim(emb.train_x.float()), emb.train_y)
    allow = bool(cfg.classifier.get("allow_unhealthy", False))
    if health["misclassified"] and not health["collapsed"]:
        # A victim is audited on the samples it was trained on, which it separates: samples on its wrong side are first
        # of all a sign that these are not them.
        msg = (f"the training embeddings in {where} do not look like the training set of the victim in "
               f"{cfg.reconstruct.victim_dir}: {'; '.join(health['problems'])}. Point reconstruct.embeddings_dir at the "
               f"run whose embed/ trained this victim, or audit it without a training set (no reconstruct.embeddings_dir, "
               f"no embed/ in run_dir; if these are its training samples, it does not separate them and cannot be a "
               f"reconstruction target)")
        if not allow:
            raise DataError(f"{msg}; classifier.allow_unhealthy=true goes on anyway")
        log.warning("%s (going on: classifier.allow_unhealthy=true)", msg)
        return health
    check_health(health, allow, f"in {cfg.reconstruct.victim_dir}")
    return health


def check_training_set(spec: dict, emb, where: Path) -> None:
    """Stop with :class:`DataError` when the embeddings ``emb`` (from ``where``) cannot be the training set of the
    victim described by ``spec`` (victim.json): another number of samples or classes, or another embedding space
    (backbone, normalisation) than the victim records."""
    problems = []
    n, n_train = len(emb.train_x), spec.get("n_train")
    if n_train and int(n_train) != n:
        problems.append(f"they hold {n} training samples, the victim was trained on {n_train} (victim.json n_train)")
    if emb.num_classes != int(spec["num_classes"]):
        problems.append(f"they have {emb.num_classes} classes, the victim {spec['num_classes']}")
    recorded = spec.get("embedding") or {}
    for key in ("backbone_name", "normalize"):
        if recorded.get(key) is not None and emb.meta.get(key) is not None and recorded[key] != emb.meta[key]:
            problems.append(f"they were made with {key}={emb.meta[key]!r}, the victim's inputs with {recorded[key]!r}")
    if problems:
        raise DataError(f"the training embeddings in {where} are not the training set of this victim: "
                        f"{'; '.join(problems)}. Point reconstruct.embeddings_dir at the run whose embed/ trained it, or "
                        f"audit it without a training set (no reconstruct.embeddings_dir, no embed/ in run_dir)")


class VictimModule(L.LightningModule):
    """Full-batch training of the victim MLP (the data loader yields the whole training set).

    ``epochs_per_step`` full-batch epochs run inside one Lightning training step (manual optimisation:
    each is one optimiser step, so ``global_step`` still counts epochs), and the host is touched only
    once per call (metrics, the divergence check): Lightning's per-step overhead would otherwise
    dominate a small victim's epoch. The result is the same as one epoch per step.

    ``lr_schedule="cosine"`` decays the learning rate to 0 over ``total_epochs`` (epoch t uses
    lr * (1 + cos(pi t / total_epochs)) / 2, torch's CosineAnnealingLR), computed from ``global_step`` so that a
    resumed fit continues the same schedule; the checkpoint records its length.
    """

    def __init__(self, model: VictimMLP, loss: str, optimizer: str, lr: float, momentum: float, weight_decay: float,
                 epochs_per_step: int = 1, lr_schedule: str = "constant", total_epochs: int | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.model, self.loss_kind = model, loss
        self.optimizer_name, self.lr, self.momentum, self.weight_decay = optimizer, lr, momentum, weight_decay
        self.epochs_per_step = max(1, int(epochs_per_step))
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"classifier.lr_schedule must be constant or cosine, got {lr_schedule!r}")
        if lr_schedule == "cosine" and not total_epochs:
            raise ValueError("lr_schedule='cosine' needs total_epochs")
        self.lr_schedule, self.total_epochs = lr_schedule, total_epochs

    def lr_at(self, epoch: int) -> float:
        """The learning rate of (0-based) epoch ``epoch``."""
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * (1 + math.cos(math.pi * min(epoch, self.total_epochs) / self.total_epochs)) / 2

    def set_lr(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        """Give ``optimizer`` the schedule's learning rate of ``epoch`` (nothing to do for a constant one)."""
        if self.lr_schedule != "constant":
            for group in optimizer.param_groups:
                group["lr"] = self.lr_at(epoch)

    def forward(self, x):
        return self.model(x)

    def _log(self, logits, y, loss, prefix: str) -> None:
        m = margins(logits.detach(), y)
        self.log_dict(
            {f"{prefix}/loss": loss.detach(), f"{prefix}/acc": accuracy(logits.detach(), y), f"{prefix}/margin_min": m.min(),
             f"{prefix}/margin_mean": m.mean()},
            # train: every Lightning step (one epoch covers the schedule); test: once per validation run
            on_step=prefix == "train", on_epoch=prefix != "train", prog_bar=prefix == "train", batch_size=len(y),
            sync_dist=True,
        )
        # The loggers' x axis: epochs trained (one optimiser step each), which is where a resumed run restarts
        self.log("step", float(self.global_step), on_step=prefix == "train", on_epoch=prefix != "train", batch_size=1)
        if not torch.isfinite(loss):
            raise DivergedError(f"victim training diverged ({prefix} loss {loss.item()}); lower classifier.lr")

    def training_step(self, batch, batch_idx):
        from .training import InnerSteps

        x, y = batch
        opt = InnerSteps(self)
        todo = self.epochs_per_step
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            todo = min(todo, self.trainer.max_steps - self.global_step)
        todo = max(1, todo)
        for i in range(todo):
            last = i == todo - 1
            self.set_lr(getattr(opt.opt, "optimizer", opt.opt), self.global_step)
            logits = self.model(x)
            loss = loss_fn(logits, y, self.loss_kind)
            opt.zero_grad()
            opt.backward(loss, last)
            opt.step(last)
        self._log(logits, y, loss, "train")  # the last epoch's metrics (before its update), one sync per call
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a cosine schedule's trajectory depends on its length: a resume must know which one it continues
        checkpoint["lr_schedule"] = {"kind": self.lr_schedule, "epochs": self.total_epochs}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self._log(logits, y, loss_fn(logits, y, self.loss_kind), "test")

    def configure_optimizers(self):
        params = self.model.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ConfigError(f"classifier.optimizer must be sgd or adam, got {self.optimizer_name!r}")


def _full_batch(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=max(1, len(x)), shuffle=False)


class _FullBatchSteps(torch.utils.data.Dataset):
    """The whole training set once per Lightning step, ``calls`` times: one Lightning epoch covers the
    schedule, so the progress bar counts the victim's steps towards a total, with an ETA."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, calls: int):
        self.x, self.y, self.calls = x, y, max(1, int(calls))

    def __len__(self) -> int:
        return self.calls

    def __getitem__(self, i: int):
        return self.x, self.y


def _plot_margins(path: Path, train_margins: torch.Tensor, test_margins: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(train_margins.numpy(), bins=40, alpha=0.7, label="train")
    if len(test_margins):
        ax.hist(test_margins.numpy(), bins=40, alpha=0.5, label="test")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("margin (positive = correct)")
    ax.set_ylabel("samples")
    ax.set_title("Victim margins")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_config(cfg) -> None:
    """What the schema's rules cannot check alone: per-layer lists against ``classifier.hidden``, and the
    victim's length (``trainer.max_epochs``: the trainer section is open, Lightning checks the rest)."""
    c = cfg.classifier
    for key in ("bias", "init_scale"):
        value = c[key]
        if OmegaConf.is_list(value) and len(value) != len(c.hidden) + 1:
            raise ConfigError(f"classifier.{key} needs one entry per layer ({len(c.hidden) + 1} = len(hidden) + 1), got {len(value)}")
    epochs = cfg.trainer.get("max_epochs")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"trainer.max_epochs (the victim's training length) must be an integer >= 1, got {epochs!r}")


def run_stage(cfg, run_dir: Path) -> dict:
    """Train the victim on the cached embeddings and save it to ``run_dir/classifier``."""
    from .embed import load_embeddings
    from .training import build_logger, checkpoint_dir, checkpointing, make_trainer

    c = cfg.classifier
    emb = load_embeddings(run_dir)
    num_classes = emb.num_classes
    loss = c.loss if c.loss != "auto" else ("bce" if num_classes == 2 else "ce")
    if loss not in ("bce", "ce", "mse") or (loss == "bce" and num_classes != 2):
        raise ConfigError(f"classifier.loss={c.loss!r} does not fit {num_classes} classes (bce needs exactly 2)")
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    as_plain = lambda v: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v  # noqa: E731
    model = VictimMLP(emb.dim, list(c.hidden), num_classes, bias=as_plain(c.bias), init_scale=as_plain(c.init_scale),
                      center=bool(c.center))
    if model.center:  # Haim et al.'s data_reduce_mean: the victim sees x - mean(train)
        model.input_mean.copy_(emb.train_x.float().mean(0))
    if loss == "ce" and model.out_dim == 1:
        raise ConfigError("ce loss needs more than 2 classes")
    # The parameters before the first step, drawn from the seed: a resumed training rebuilds the same ones here,
    # before the checkpoint's weights are loaded, and finds them already saved.
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if distributed.is_rank_zero():
        save_initial_parameters(run_dir / "classifier", init)
    epochs = int(cfg.trainer.max_epochs)
    # Epochs per Lightning step: the largest that keeps logging, checkpoints and the end on whole steps.
    per_step = math.gcd(math.gcd(int(c.log_every_n_epochs), int(c.checkpoint_every_n_epochs) or epochs), epochs)
    module = VictimModule(model, loss, c.optimizer, float(c.lr), float(c.momentum), float(c.weight_decay), per_step,
                          lr_schedule=c.lr_schedule, total_epochs=epochs)
    has_test = len(emb.test_x) > 0
    # Long schedules checkpoint periodically; a killed run resumes from the last checkpoint.
    ckpt_callback, resume_from = checkpointing(run_dir, "classifier", every_n_steps=int(c.checkpoint_every_n_epochs))
    # trainer.max_epochs is resumable: a longer schedule continues the victim trained so far (full-batch
    # training is deterministic, so this equals training that long from the start); a checkpoint past
    # a shorter schedule cannot be wound back, so training then starts over.
    # Epochs already trained, and Lightning epochs already run (one covers the schedule; a resumed fit may need one more)
    done_epochs, loop_epochs = 0, 0
    if resume_from is not None:
        # Full batch: one optimiser step per epoch, so the step count is the number of finished epochs.
        state = torch.load(resume_from, map_location="cpu", weights_only=True)
        done_epochs, loop_epochs = int(state.get("global_step", 0)), int(state.get("epoch", 0))
        schedule = state.get("lr_schedule") or {"kind": "constant", "epochs": None}
        if done_epochs > int(cfg.trainer.max_epochs):
            log.info("classifier checkpoint is at epoch %d > trainer.max_epochs=%d: training from the start",
                     done_epochs, int(cfg.trainer.max_epochs))
            resume_from, loop_epochs = None, 0
        elif schedule["kind"] != c.lr_schedule or (c.lr_schedule == "cosine" and schedule["epochs"] != epochs):
            # a cosine schedule of another length took other steps: continuing would not equal training this long
            log.info("classifier checkpoint follows lr_schedule=%s over %s epochs, not %s over %d: training from the start",
                     schedule["kind"], schedule["epochs"], c.lr_schedule, epochs)
            resume_from, loop_epochs = None, 0
    # metrics.csv keeps the rows of the epochs a resumed training does not redo
    logger = build_logger(cfg, run_dir, "classifier", resume_step=done_epochs if resume_from else 0)
    trainer = make_trainer(
        cfg, run_dir, "classifier", logger, progress=(per_step, "epoch"),
        max_epochs=loop_epochs + 2,  # max_steps (= epochs: one optimiser step per epoch) ends training
        max_steps=epochs,
        val_check_interval=max(1, min(int(c.log_every_n_epochs), epochs) // per_step),
        log_every_n_steps=1,
        callbacks=[ckpt_callback],
        default_root_dir=str(checkpoint_dir(run_dir, "classifier")),
        limit_val_batches=1.0 if has_test else 0,
        num_sanity_val_steps=0,
        # Full batch: under DDP every rank takes the whole batch (a DistributedSampler would split it and pad an
        # odd n with duplicates), so the averaged gradient is exactly the full-batch gradient of one process.
        use_distributed_sampler=False,
    )
    train_steps = DataLoader(_FullBatchSteps(emb.train_x, emb.train_y, epochs // per_step), batch_size=None)
    trainer.fit(module, train_steps, _full_batch(emb.test_x, emb.test_y) if has_test else None,
                ckpt_path=resume_from, weights_only=True)

    model.eval()
    with torch.no_grad():
        train_logits, test_logits = model(emb.train_x), model(emb.test_x)
    train_m, test_m = margins(train_logits, emb.train_y), margins(test_logits, emb.test_y)
    health = victim_health(train_logits, emb.train_y)
    moved = relative_displacement(init, model.state_dict())
    log.info("victim's relative displacement from its initial parameters, ||theta_T - theta_0|| / ||theta_0||: %s",
             ", ".join(f"{k} {v:.3g}" for k, v in moved.items() if v is not None))
    metrics = {
        "train_acc": health["train_acc"],
        "train_loss": float(loss_fn(train_logits, emb.train_y, loss)),
        "test_acc": float(accuracy(test_logits, emb.test_y)) if has_test else None,
        "train_margin_min": health["margin_min"],
        "train_margin_mean": health["margin_mean"],
        "first_layer_displacement": moved["layers.0.weight"],
    }
    if trainer.is_global_zero:
        out = run_dir / "classifier"
        save_victim(out, model, {
            "loss": loss,
            "weight_decay": float(c.weight_decay),
            # SGD's and Adam's weight_decay: an L2 penalty in the mean loss, on every parameter (kkt.training_recipe)
            "regularization": {"kind": "l2", "coefficient": float(c.weight_decay), "params": "all"},
            "loss_reduction": "mean",
            "optimizer": c.optimizer,
            "lr": float(c.lr),
            "epochs": int(cfg.trainer.max_epochs),
            "n_train": len(emb.train_x),
            "class_names": emb.meta["class_names"],
            "embedding": {k: emb.meta.get(k) for k in ("backbone_name", "modality", "embed_dim", "normalize", "mean_norm", "input_size")},
            "metrics": metrics,
            "health": {k: health[k] for k in ("collapsed", "misclassified", "problems")},
            "init": INIT_FILE,
            "relative_displacement": moved,
        })
        _plot_margins(out / "margins.png", train_m, test_m)
    # Written first, so the victim and its margins plot can be inspected; the stage is not marked done.
    check_health(health, c.allow_unhealthy, "trained in classifier/")
    return metrics


STAGE = Stage(
    name="classifier",
    run=run_stage,
    sections=[Section("classifier", ClassifierConfig)],
    config_keys=["classifier", "trainer.max_epochs", "trainer.precision", "seed"],
    cadence_keys=["classifier.log_every_n_epochs", "classifier.checkpoint_every_n_epochs"],
    # a longer schedule continues the victim from its last checkpoint (full-batch training is deterministic)
    resumable_keys=["trainer.max_epochs", "classifier.epochs"],
    all_ranks=True,
    enabled=lambda cfg: not cfg.reconstruct.victim_dir,  # auditing a victim trained elsewhere
    check=check_config,
    inputs=["embed/embeddings.safetensors"],
    outputs=["classifier/model.safetensors", "classifier/init.safetensors", "classifier/victim.json", "classifier/margins.png"],
)
