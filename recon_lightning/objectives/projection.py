"""The ``projection`` objective: the part of the target outside the span of the candidates' parameter gradients.

Multiplier-free (Iurada et al., ICLR 2026, arXiv 2509.22214): for candidates x_1..x_m with parameter gradients
J (m x p, rows grad_theta phi(x_j)) the best coefficients are solved for in closed form at every step, and the loss
is what they leave unexplained of the target t (the parameters, or their displacement from the initialisation)::

    loss = 1 - c^T A^-1 c / |t|^2,    A = J J^T (the candidates' NTK Gram, m x m),   c = J t

with a small ridge on A (``reconstruct.projection_ridge`` times its mean diagonal) for a stable Cholesky solve. For
a victim with one hidden layer, phi(x) = v . relu(W x + b) + c0, A and c have closed forms in O(m H (m + d)) with no
p-sized Jacobian (:meth:`ProjectionObjective.gram_closed_form`); deeper victims go through torch.func
(:meth:`ProjectionObjective.gram_torch_func`, which materialises J: K m p floats). The ReLU's derivative is the same
smooth surrogate as the KKT objective's (``reconstruct.activation``), so the loss is differentiable in x.

The coefficients a = A^-1 c are reported as the candidates' multipliers, in the KKT convention
``t ~ sum_j lam_j y_j grad phi(x_j)`` with y_j = +-1 the candidate's assigned label: lam_j = a_j y_j, so lam_j > 0
when the candidate pulls the way its label says. Binary victims only (one output).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import register_objective
from .kkt import activation_grad, make_activation
from .victim_params import VictimObjective

JACOBIANS = ("auto", "closed_form", "torch_func")


@register_objective("projection")
class ProjectionObjective(VictimObjective):
    """For K runs at once: per run the relative and absolute residual of the target's projection onto the span of
    its candidates' parameter gradients (keys ``projection_rel``, ``projection_abs``)."""

    rel_key, abs_key, label = "projection_rel", "projection_abs", "projection"
    uses_multipliers = False

    @classmethod
    def from_config(cls, victim, spec, rcfg, form, dtype, target=None):
        return cls(victim, rcfg["activation"], dtype, ridge=float(rcfg.get("projection_ridge", 1e-6)),
                   jacobian=rcfg.get("projection_jacobian", "auto"), target=target)

    def __init__(self, victim, activation: str, dtype: torch.dtype = torch.float64, ridge: float = 1e-6,
                 jacobian: str = "auto", target: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if victim.out_dim != 1:
            raise ConfigError(f"reconstruct.objective=projection supports binary victims (one output) only; this one "
                              f"has {victim.num_classes} classes: use reconstruct.objective=kkt")
        if jacobian not in JACOBIANS:
            raise ConfigError(f"reconstruct.projection_jacobian must be one of {JACOBIANS}, got {jacobian!r}")
        if ridge < 0:
            raise ConfigError(f"reconstruct.projection_ridge must be >= 0, got {ridge}")
        self.activation, self.ridge = activation, float(ridge)
        self.register_victim(victim, dtype)
        one_hidden = self.n_layers == 2
        if jacobian == "closed_form" and not one_hidden:
            raise ConfigError(f"reconstruct.projection_jacobian=closed_form needs one hidden layer; this victim has "
                              f"{self.n_layers - 1}: use auto or torch_func")
        self.closed_form = one_hidden and jacobian != "torch_func"
        targets = self.displacement(target, dtype) if target is not None else [p.clone() for p in self.victim_params()]
        for name, t in zip(self.param_names(), targets):
            self.register_buffer(f"target_{name}", t, persistent=False)
        self.register_buffer("target_sq", sum((t ** 2).sum() for t in targets).reshape(()), persistent=False)

    def extra_floats(self, m: int) -> float:
        """A, its factor and their gradients (~6 m^2); the torch.func path also holds J and its gradient (2 m p)."""
        p = sum(t.numel() for t in self.victim_params())
        return 6.0 * m * m + (0.0 if self.closed_form else 2.0 * m * p)

    def targets(self) -> list[torch.Tensor]:
        return [getattr(self, f"target_{name}") for name in self.param_names()]

    # ------------------------------------------------------------------ A and c

    def gram(self, x: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A = J J^T (K, m, m) and c = J t (K, m) for candidates x (K, m, D), activation sharpness alpha (K,)."""
        return self.gram_closed_form(x, alpha) if self.closed_form else self.gram_torch_func(x, alpha)

    def gram_closed_form(self, x: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One hidden layer, phi(x) = v . a(x) + c0 with a = relu(h), h = W x + b, s = relu'(h) (the surrogate):
        grad_v = a, grad_c0 = 1, grad_{W_h} = v_h s_h x, grad_{b_h} = v_h s_h. So with g = v * s (m, H)::

            A_jk = a_j . a_k + [c0] + (g_j . g_k) (x_j . x_k + [b])
            c_j  = a_j . t_v + [c0] t_c0 + g_j . (T_W x_j + [b] t_b)
        """
        a_ = alpha.view(-1, 1, 1)
        h = torch.matmul(x, self.w0.transpose(0, 1))
        if self.has_bias[0]:
            h = h + self.b0
        a = make_activation(self.activation, a_)(h)  # (K, m, H): ReLU forward, the surrogate's derivative in x
        g = activation_grad(self.activation, a_ * h) * self.w1[0]  # v_h s_jh
        t = dict(zip(self.param_names(), self.targets()))
        xx = torch.bmm(x, x.transpose(1, 2))
        if self.has_bias[0]:
            xx = xx + 1.0
        A = torch.bmm(a, a.transpose(1, 2)) + torch.bmm(g, g.transpose(1, 2)) * xx
        tw = torch.matmul(x, t["w0"].transpose(0, 1))  # T_W x_j, (K, m, H)
        if self.has_bias[0]:
            tw = tw + t["b0"]
        c = torch.matmul(a, t["w1"][0]) + (g * tw).sum(-1)
        if self.has_bias[1]:
            A = A + 1.0
            c = c + t["b1"][0]
        return A, c

    def gram_torch_func(self, x: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Any depth: the per-candidate parameter gradients J (K, m, p) by torch.func (jacrev, vmapped over candidates
        and runs), then A = J J^T and c = J t."""
        from torch.func import jacrev, vmap

        names = self.param_names()

        def phi(params, xj, aj):
            act = make_activation(self.activation, aj)
            p = dict(zip(names, params))
            h = xj
            for i in range(self.n_layers):
                h = h @ p[f"w{i}"].transpose(0, 1) + (p[f"b{i}"] if self.has_bias[i] else 0.0)
                if i < self.n_layers - 1:
                    h = act(h)
            return h[0]

        params = tuple(self.victim_params())
        jac = vmap(vmap(jacrev(phi), in_dims=(None, 0, None)), in_dims=(None, 0, 0))(params, x, alpha)
        J = torch.cat([j.flatten(2) for j in jac], dim=2)  # (K, m, p)
        t = torch.cat([t.flatten() for t in self.targets()])
        return torch.bmm(J, J.transpose(1, 2)), torch.matmul(J, t)

    # ------------------------------------------------------------------ the solve and the loss

    def solve(self, A: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients (K, m), c^T A^-1 c (K,)) by a Cholesky solve of A plus the ridge; a run whose A is not
        positive definite even so gets NaN (its run fails, the others go on)."""
        m = A.shape[-1]
        diag = A.diagonal(dim1=-2, dim2=-1)
        ridge = self.ridge * diag.sum(-1) / m
        L, info = torch.linalg.cholesky_ex(A + torch.diag_embed(ridge.unsqueeze(-1).expand_as(diag)))
        z = torch.linalg.solve_triangular(L, c.unsqueeze(-1), upper=False)
        explained = z.pow(2).sum((1, 2))
        coef = torch.cholesky_solve(c.unsqueeze(-1), L).squeeze(-1)
        bad = info != 0
        return coef.masked_fill(bad.unsqueeze(-1), float("nan")), explained.masked_fill(bad, float("nan"))

    def residual(self, x: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per run |t - J^T a|^2-like residual |t|^2 - c^T A^-1 c (absolute) and its ratio to |t|^2 (relative)."""
        _, explained = self.solve(*self.gram(x, alpha))
        res = self.target_sq - explained
        return res, res / self.target_sq

    def forward(self, x, lam, runs):
        res, rel = self.residual(x, runs["alpha"])
        return {"projection_abs": res, "projection_rel": rel}

    def reported_multipliers(self, x, lam, runs):
        coef, _ = self.solve(*self.gram(x, runs["alpha"]))
        return coef * (2.0 * runs["y"].to(coef.dtype) - 1.0)
