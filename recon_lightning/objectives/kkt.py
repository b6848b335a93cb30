"""The ``kkt`` objective: KKT / stationarity residuals of a victim MLP, pure tensors.

No Lightning and no I/O here: the reconstruct stage, evaluate's diagnostic and the benchmarks all
import this module. A ReLU network trained to convergence on a classification loss ends near a KKT
point of the margin-maximisation problem (Haim et al. 2022; Buzaglo et al. 2023)::

    theta = sum_j lambda_j y_j grad_theta phi(x_j),   lambda_j >= 0                    (binary)
    theta = sum_j lambda_j grad_theta (phi_{y_j} - max_{c != y_j} phi_c)(x_j)          (multiclass, runner-up)

``sum_j lambda_j y_j grad phi(x_j)`` is the gradient of the scalar ``sum_j lambda_j y_j phi(x_j)``:
one backward pass with ``create_graph=True``, no per-sample gradients. K independent runs are
evaluated at once: candidates are a (K, m, D) tensor and the victim's weights are *expanded* to
(K, out, in) leaves, so one backward gives every run its own gradient (a batched matmul per layer).

Coordinates: a victim trained on mean-subtracted inputs (``classifier.center``) is written
``phi(x - mu)``; this module works in its centred input space (the layers only), and the
reconstruct stage adds ``mu`` back to the candidates it writes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Term, register_objective
from .victim_params import VictimObjective

FORMS = ("binary", "multiclass", "binary_wd", "multiclass_wd")
ACTIVATIONS = ("relu_sigmoid_grad", "softplus")
MULTIPLIERS = ("runner_up", "all")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision: high = TF32 on CUDA


# ----------------------------------------------------------------------------- activations


class ReluSigmoidGrad(torch.autograd.Function):
    """ReLU forward, ``sigmoid(alpha * x)`` as its derivative (Haim et al.'s smooth surrogate).

    The backward is written with differentiable torch ops, so a second backward through it
    (needed because the loss contains a gradient) gets the surrogate's own derivative. Forward and
    ``setup_context`` are separate, so torch.func's transforms (jacrev, vmap) apply to it too.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, alpha = ctx.saved_tensors
        return grad_out * torch.sigmoid(alpha * x), None


def make_activation(kind: str, alpha: torch.Tensor):
    """The activation used in place of ReLU; ``alpha`` broadcasts against the pre-activations."""
    if kind == "relu_sigmoid_grad":
        return lambda h: ReluSigmoidGrad.apply(h, alpha)
    if kind == "softplus":
        return lambda h: F.softplus(alpha * h) / alpha
    raise ConfigError(f"reconstruct.activation must be one of {ACTIVATIONS}, got {kind!r}")


def activation_grad(kind: str, az: torch.Tensor) -> torch.Tensor:
    """The activation's derivative at pre-activation z, from alpha * z: sigmoid(alpha z) (softplus: 1 above
    torch's linear threshold 20, as F.softplus's own backward)."""
    if kind == "softplus":
        return torch.where(az > 20.0, torch.ones_like(az), torch.sigmoid(az))
    return torch.sigmoid(az)


# ----------------------------------------------------------------------------- choosing the form


def resolve_form(form: str, spec: dict) -> str:
    """``auto``: multiclass if more than 2 classes; ``_wd`` (stationarity) if trained with weight decay."""
    if form != "auto":
        if form not in FORMS:
            raise ConfigError(f"reconstruct.form must be auto or one of {FORMS}, got {form!r}")
        return form
    base = "binary" if int(spec["num_classes"]) == 2 else "multiclass"
    return base + ("_wd" if training_recipe(spec)["coefficient"] > 0 else "")


# ----------------------------------------------------------------------------- the victim's training recipe

DECAY_KINDS = ("l2", "adamw")
DECAY_PARAMS = ("all", "weights")
LOSS_REDUCTIONS = ("mean", "sum")


def training_recipe(spec: dict) -> dict:
    """The regularisation and loss a victim was trained with, from victim.json, checked:
    ``{"kind", "coefficient", "params", "loss_reduction", "adam_eps"}``.

    ``regularization.kind``: ``l2``, a penalty ``(c/2) ||theta||^2`` in the loss (SGD's or Adam's ``weight_decay``;
    scikit-learn's ``alpha`` is ``l2`` with c = alpha / n on the weights); ``adamw``, torch's decoupled decay
    (``theta -= lr * c * theta`` beside the Adam step, which needs ``adam_eps``). ``params``: ``all`` or ``weights``
    (biases not decayed). ``loss_reduction``: the data loss is the ``mean`` or the ``sum`` over the n training
    samples. A victim.json without ``regularization`` means ``l2`` on all parameters with coefficient
    ``weight_decay`` and a mean loss."""
    reg = spec.get("regularization")
    if reg is None:
        reg = {"kind": "l2", "coefficient": float(spec.get("weight_decay") or 0.0), "params": "all"}
    if not isinstance(reg, dict):
        raise ConfigError(f"victim.json: regularization must be an object, got {reg!r}")
    kind, params = reg.get("kind"), reg.get("params", "all")
    reduction = spec.get("loss_reduction", "mean")
    coefficient = reg.get("coefficient")
    if kind not in DECAY_KINDS:
        raise ConfigError(f"victim.json: regularization.kind {kind!r} cannot be expressed by the stationarity forms "
                          f"(known: {DECAY_KINDS})")
    if params not in DECAY_PARAMS:
        raise ConfigError(f"victim.json: regularization.params must be one of {DECAY_PARAMS}, got {params!r}")
    if reduction not in LOSS_REDUCTIONS:
        raise ConfigError(f"victim.json: loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or coefficient < 0:
        raise ConfigError(f"victim.json: regularization.coefficient must be a number >= 0, got {coefficient!r}")
    eps = reg.get("adam_eps")
    if kind == "adamw" and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0):
        raise ConfigError(f"victim.json: regularization kind adamw needs adam_eps > 0 (the optimiser's eps), got {eps!r}")
    return {"kind": kind, "coefficient": float(coefficient), "params": params, "loss_reduction": reduction,
            "adam_eps": float(eps) if kind == "adamw" else None}


def decay_coefficients(spec: dict, params: Sequence[tuple[str, torch.Tensor]]) -> list[torch.Tensor | float]:
    """Per parameter, the c of the stationarity condition ``c * theta = (1/n) sum_i |l'_i| y_i grad phi(x_i)`` (the
    mean-loss form with multipliers |l'_i| in [0, 1]) of the recorded recipe (:func:`training_recipe`); ``params``
    are (name, tensor) pairs, the victim's state-dict names (``layers.{i}.weight`` / ``layers.{i}.bias``).

    l2 with a mean loss: c = coefficient; with a sum loss the data gradient is n times the mean's, so c =
    coefficient / n. adamw: at a fixed point of full-batch AdamW (m = g, v = g^2) the Adam step equals the decay,
    g / (|g| + eps) = -coefficient * theta per coordinate, so g = -c theta with c = eps * coefficient /
    (1 - coefficient |theta|), a tensor; coefficient |theta| >= 1 has no fixed point and is refused. Parameters the
    recipe does not decay get c = 0."""
    recipe = training_recipe(spec)
    n = spec.get("n_train")
    if recipe["loss_reduction"] == "sum" and not n:
        raise ConfigError("victim.json: a sum loss needs n_train, the number of training samples")
    scale = 1.0 / float(n) if recipe["loss_reduction"] == "sum" else 1.0
    wd = recipe["coefficient"]
    out: list[torch.Tensor | float] = []
    for name, p in params:
        if recipe["params"] == "weights" and name.endswith("bias"):
            out.append(0.0)
        elif recipe["kind"] == "l2":
            out.append(wd * scale)
        else:
            worst = float((wd * p.abs()).max()) if p.numel() else 0.0
            if worst >= 1:
                raise ConfigError(f"victim.json: adamw decay {wd} times |{name}| reaches {worst:.3g} >= 1, which no "
                                  f"fixed point of AdamW allows: these weights were not trained with this recipe")
            out.append(recipe["adam_eps"] * wd * scale / (1.0 - wd * p.abs()))
    return out



# ----------------------------------------------------------------------------- the objective


@register_objective("kkt")
class KKTObjective(VictimObjective):
    """The victim's fixed parameters and the KKT residual for K runs of candidates at once.

    Multipliers: ``lam`` is (K, m) (binary, and multiclass with ``multipliers="runner_up"``: one
    multiplier on the margin to the best wrong class, as Buzaglo et al.) or (K, m, C)
    (``multipliers="all"``: one per wrong class). ``per_candidate=True`` divides the coefficients by
    m, the number of candidates per run, as the reference implementations do; the published
    ``lambda_min`` ranges assume it.

    Weight-decay form: a victim trained with mean loss (1/n) sum_i l(x_i) plus an L2 penalty
    (wd/2)||theta||^2 (SGD/Adam ``weight_decay``) stops at a *stationary* point, not at a KKT
    point of margin maximisation: 0 = (1/n) sum_i l'_i grad phi(x_i) + wd * theta, i.e.
    ``wd * theta = (1/n) sum_i |l'_i| y_i grad phi(x_i)`` with |l'_i| in (0, 1) for logistic/CE
    losses. So we match ``wd * theta`` with coefficients lambda / n (n = n_train, whatever m is),
    and keep lambda in [0, 1]. ``wd`` is per parameter, from the training recipe victim.json records (a sum loss,
    biases not decayed, AdamW's decoupled decay: :func:`decay_coefficients`).

    ``target``: the displacement theta_T - theta_0 from a known initialisation by state-dict name
    (``reconstruct.target=displacement``), matched by ``sum_j coef_j grad phi(x_j)`` with no decay coefficient: in the
    lazy (NTK) regime gradient descent moves the parameters by ``sum_j alpha_j grad phi(x_j; theta)``, a sum over
    the training samples of their gradients, whatever the regulariser; the forms without ``_wd`` apply.
    """

    rel_key, abs_key, label, trivial = "kkt_rel", "kkt_abs", "KKT", "all multipliers zero"

    @classmethod
    def from_config(cls, victim, spec, rcfg, form, dtype, target=None):
        return cls(victim, spec, form, rcfg["activation"], dtype, multipliers=rcfg["multipliers"],
                   per_candidate=bool(rcfg["lambda_per_candidate"]), target=target)

    def __init__(self, victim, spec: dict, form: str, activation: str, dtype: torch.dtype = torch.float32,
                 multipliers: str = "runner_up", per_candidate: bool = False,
                 target: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.form, self.activation = form, activation
        self.num_classes = int(victim.num_classes)
        self.multiclass = form.startswith("multiclass")
        if self.multiclass != (victim.num_classes > 2):
            raise ConfigError(f"reconstruct.form={form} does not fit a victim with {victim.num_classes} classes")
        if multipliers not in MULTIPLIERS:
            raise ConfigError(f"reconstruct.multipliers must be one of {MULTIPLIERS}, got {multipliers!r}")
        self.per_class_multipliers = self.multiclass and multipliers == "all"
        self.wd = form.endswith("_wd")
        if self.wd and target is not None:
            raise ConfigError(f"reconstruct.form={form}: a weight-decay form matches c * theta, not the displacement "
                              "(reconstruct.target=displacement); use the form without _wd")
        wd = training_recipe(spec)["coefficient"]
        if self.wd and wd <= 0:
            raise ConfigError(f"reconstruct.form={form} needs a victim trained with weight_decay > 0 (victim.json says {wd})")
        n = spec.get("n_train")
        if self.wd and not n:
            raise ConfigError("the weight-decay form needs the training-set size: victim.json has no n_train")
        self.per_candidate = bool(per_candidate) and not self.wd  # the wd form's scale is fixed by n_train
        self.coef_scale = 1.0 / float(n) if self.wd else 1.0
        self.register_victim(victim, dtype)
        # What sum coef grad phi must equal, per parameter: theta (KKT form), c * theta (stationarity form, c from the
        # recorded training recipe: decay_coefficients), or the given displacement
        names, state_names = self.param_names(), self.state_names()
        params = [getattr(self, name) for name in names]
        if target is not None:
            for name, p in zip(names, self.displacement(target, dtype)):
                self.register_buffer(f"target_{name}", p, persistent=False)
        else:
            scales = decay_coefficients(spec, list(zip(state_names, params))) if self.wd else [1.0] * len(names)
            for name, p, c in zip(names, params, scales):
                self.register_buffer(f"target_{name}", c * p, persistent=False)
        self.register_buffer("target_sq", torch.zeros((), dtype=dtype), persistent=False)
        self.target_sq = sum((t ** 2).sum() for t in self.targets())

    def lambda_shape(self, m: int) -> tuple[int, ...]:
        return (m, self.num_classes) if self.per_class_multipliers else (m,)

    def forward(self, x, lam, runs):
        kkt_abs, kkt_rel = self.kkt(x, lam, runs["y"], runs["alpha"])
        return {"kkt_abs": kkt_abs, "kkt_rel": kkt_rel}

    def failures(self, x, lam, values, start):
        out = super().failures(x, lam, values, start)
        for k, zero in enumerate((lam.flatten(1) == 0).all(1).tolist()):
            if zero and k not in out:
                out[k] = "every multiplier ended at zero: the candidates explain nothing of the victim"
        return out

    def targets(self) -> list[torch.Tensor]:
        """What ``sum_j coef_j grad phi(x_j)`` must equal, per parameter (:meth:`victim_params` order)."""
        return [getattr(self, f"target_{name}") for name in self.param_names()]

    def forward_runs(self, x: torch.Tensor, alpha: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The victim on candidates x (K, m, D) with per-run parameter copies; logits (K, m, out)."""
        act = make_activation(self.activation, alpha.view(-1, 1, 1))
        h, k = x, 0
        for i in range(self.n_layers):
            h = torch.bmm(h, params[k].transpose(1, 2))
            k += 1
            if self.has_bias[i]:
                h = h + params[k].unsqueeze(1)
                k += 1
            if i < self.n_layers - 1:
                h = act(h)
        return h

    def weighted_output(self, out: torch.Tensor, lam: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scalar per run whose parameter gradient must equal the target, (K,).

        binary: sum_j lambda_j y_j phi(x_j) (y in {-1, +1}); multiclass runner-up:
        sum_j lambda_j (phi_{y_j} - max_{c != y_j} phi_c)(x_j); multiclass all: sum_j sum_{c != y_j}
        lambda_{j,c} (phi_{y_j} - phi_c)(x_j). Times 1/n (wd form) or 1/m (``per_candidate``).
        """
        scale = self.coef_scale / (out.shape[1] if self.per_candidate else 1.0)
        if not self.multiclass:
            return scale * (lam * (2.0 * y.to(lam.dtype) - 1.0) * out[..., 0]).sum(1)
        true = out.gather(2, y.unsqueeze(-1)).squeeze(-1)
        if self.per_class_multipliers:
            onehot = F.one_hot(y, self.num_classes).to(lam.dtype)
            off = lam * (1.0 - onehot)
            return scale * (off * (true.unsqueeze(-1) - out)).sum((1, 2))
        others = out.masked_fill(F.one_hot(y, self.num_classes).bool(), float("-inf"))
        return scale * (lam * (true - others.max(-1).values)).sum(1)

    def logit_coefficients(self, out: torch.Tensor, lam: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d weighted_output / d out, (K, m, out): linear in lambda, piecewise constant in the logits (the
        runner-up class is an argmax, whose derivative autograd also takes as zero)."""
        scale = self.coef_scale / (out.shape[1] if self.per_candidate else 1.0)
        if not self.multiclass:
            return (scale * lam * (2.0 * y.to(lam.dtype) - 1.0)).unsqueeze(-1)
        onehot = F.one_hot(y, self.num_classes).to(lam.dtype)
        if self.per_class_multipliers:
            off = lam * (1.0 - onehot)
            return scale * (onehot * off.sum(-1, keepdim=True) - off)
        others = out.detach().masked_fill(onehot.bool(), float("-inf"))
        runner_up = F.one_hot(others.argmax(-1), self.num_classes).to(lam.dtype)
        return (scale * lam).unsqueeze(-1) * (onehot - runner_up)

    def param_grads(self, x: torch.Tensor, lam: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor) -> list[torch.Tensor]:
        """sum_j coef_j grad_theta phi(x_j) per run, one (K, *p.shape) tensor per victim parameter p (in
        :meth:`victim_params` order), by explicit backpropagation through the MLP.

        The same quantity as ``torch.autograd.grad(weighted_output, theta, create_graph=True)`` (see
        :meth:`kkt_autograd`), written as ordinary differentiable tensor code: the loss needs only a first-order
        backward (no double backward, so ``torch.compile`` can trace it whole), and the layers' forward and
        backpropagated errors are single (K*m, d) GEMMs against the shared weights instead of K batched copies.
        The activation's derivative is the surrogate's, sigmoid(alpha * h) (relu_sigmoid_grad: the custom
        backward; softplus: its true derivative), and the forward ReLU keeps the surrogate derivative in the
        outer backward, exactly as in the autograd form."""
        a = alpha.view(-1, 1, 1)
        act = make_activation(self.activation, a)
        weights, biases = [], []
        for i in range(self.n_layers):
            weights.append(getattr(self, f"w{i}"))
            biases.append(getattr(self, f"b{i}") if self.has_bias[i] else None)
        inputs, pre = [x], []
        h = x
        for i in range(self.n_layers):
            z = torch.matmul(h, weights[i].transpose(0, 1))
            if biases[i] is not None:
                z = z + biases[i]
            pre.append(z)
            if i < self.n_layers - 1:
                h = act(z)
                inputs.append(h)
        delta = self.logit_coefficients(pre[-1], lam, y)  # d s / d z of the last layer, (K, m, out)
        grads: list[torch.Tensor] = []
        for i in reversed(range(self.n_layers)):
            if biases[i] is not None:
                grads.append(delta.sum(1))
            grads.append(torch.bmm(delta.transpose(1, 2), inputs[i]))  # (K, out_i, in_i)
            if i > 0:
                delta = torch.matmul(delta, weights[i]) * self._activation_grad(a * pre[i - 1])
        return grads[::-1]  # weight, bias of layer 0, then layer 1, ...: victim_params order

    def _activation_grad(self, az: torch.Tensor) -> torch.Tensor:
        return activation_grad(self.activation, az)

    def kkt(self, x: torch.Tensor, lam: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor,
            create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-run residual ||target - sum coef grad phi||^2 (absolute, relative), each (K,); differentiable in
        x and lam unless ``create_graph=False`` (then computed without a graph)."""
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            grads = self.param_grads(x, lam, y, alpha)
            return self._residual(grads, x)

    def kkt_autograd(self, x: torch.Tensor, lam: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor,
                     create_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`kkt` with the parameter gradient taken by autograd (double backward): the reference the
        explicit form is tested against."""
        K = x.shape[0]
        # Per-run leaves: expanded views (no copy) whose gradients are per run.
        params = [p.expand(K, *p.shape).requires_grad_() for p in self.victim_params()]
        with torch.enable_grad():
            out = self.forward_runs(x, alpha, params)
            s = self.weighted_output(out, lam, y).sum()
            grads = torch.autograd.grad(s, params, create_graph=create_graph)
        return self._residual(grads, x)

    def _residual(self, grads: Sequence[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        res = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for t, g in zip(self.targets(), grads):
            res = res + (t - g).pow(2).flatten(1).sum(1)
        return res, res / self.target_sq

    def lambda_penalty(self, lam: torch.Tensor, y: torch.Tensor, lambda_min: torch.Tensor) -> torch.Tensor:
        """relu(lambda_min - lambda)^2 (and, for the weight-decay form, lambda <= 1) per run (K,)."""
        lmin = lambda_min.view(-1, *([1] * (lam.dim() - 1)))
        low = F.relu(lmin - lam).pow(2)
        if self.per_class_multipliers:
            mask = 1.0 - F.one_hot(y, self.num_classes).to(lam.dtype)
            pen = (low * mask).flatten(1).sum(1)
            if self.wd:  # wrong-class softmax probabilities sum to at most 1
                pen = pen + F.relu((lam * mask).sum(-1) - 1.0).pow(2).sum(1)
            return pen
        pen = low.sum(1)
        if self.wd:  # |l'| <= 1 for the logistic / softmax loss
            pen = pen + F.relu(lam - 1.0).pow(2).sum(1)
        return pen

    def project_lambda(self, lam: torch.Tensor) -> None:
        """Dual feasibility, in place: lambda >= 0 (and <= 1 for the weight-decay form)."""
        lam.clamp_(min=0.0)
        if self.wd and not self.per_class_multipliers:
            lam.clamp_(max=1.0)

    def multiplier_sum(self, lam: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One multiplier per candidate (K, m): per-class multipliers summed over the wrong classes."""
        if not self.per_class_multipliers:
            return lam
        return (lam * (1.0 - F.one_hot(y, self.num_classes).to(lam.dtype))).sum(-1)


class LambdaPenalty(Term):
    """The multipliers' lower bound ``lambda_min`` (and, for the weight-decay forms, their upper bound 1) as a penalty
    (:meth:`KKTObjective.lambda_penalty`), weighted by ``reconstruct.lambda_weight``."""

    key = "lambda_penalty"

    def __init__(self, objective: KKTObjective):
        super().__init__()
        self.objective = objective

    def forward(self, x, lam, runs):
        return {"lambda_penalty": self.objective.lambda_penalty(lam, runs["y"], runs["lambda_min"])}


def fit_multipliers(objective: KKTObjective, x: torch.Tensor, y: torch.Tensor, steps: int = 300,
                    lr: float = 0.05) -> float:
    """The relative KKT residual of points ``x`` (m, D, victim coordinates) with labels ``y``, minimised over
    multipliers lambda >= 0 with the *exact* ReLU derivative: how well these points explain the victim.

    The same score for any set of points (the true training set, or a run's candidates), so the two can be
    compared. Multipliers are ``c * exp(u)`` (c: the best common scale, in closed form; u: Adam), so the value
    is an upper bound on the minimum; the weight-decay form's bound lambda <= 1 is not imposed.
    """
    dtype = objective.target_sq.dtype
    xs, ys = x.to(dtype).unsqueeze(0), y.long().unsqueeze(0)
    alpha = torch.tensor([1e6], dtype=dtype)  # sigmoid(1e6 h): ReLU's own derivative
    shape = (1, *objective.lambda_shape(len(x)))
    params = [p.expand(1, *p.shape).requires_grad_() for p in objective.victim_params()]
    with torch.enable_grad():  # best common scale c for lambda = c * 1: <target, g> / <g, g>
        out = objective.forward_runs(xs, alpha, params)
        g = torch.autograd.grad(objective.weighted_output(out, torch.ones(shape, dtype=dtype), ys).sum(), params)
    dot = sum((t * gi[0]).sum() for t, gi in zip(objective.targets(), g))
    scale = max(float(dot / sum((gi ** 2).sum() for gi in g).clamp_min(1e-30)), 1e-12)
    u = torch.zeros(shape, dtype=dtype, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    best = float("inf")
    for _ in range(max(1, int(steps))):
        _, rel = objective.kkt(xs, scale * u.exp(), ys, alpha)
        best = min(best, float(rel.detach()))
        opt.zero_grad()
        rel.sum().backward()
        opt.step()
    with torch.no_grad():
        _, rel = objective.kkt(xs, scale * u.exp(), ys, alpha, create_graph=False)
    return min(best, float(rel))

