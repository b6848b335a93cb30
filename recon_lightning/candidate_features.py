"""Features of reconstruction candidates that need no training set: what a learned selection score reads.

Each candidate gets the same features whichever victim it came from, computed from the victim's weights and the
reconstruction's own outputs only (so a score fitted on shadow victims, whose training sets are known, applies to
the audited victim, whose training set is not):

=================  ==========================================================================================
feature            definition
=================  ==========================================================================================
``norm``           ``||x - mu||``, the candidate's norm in the victim's frame (mu: the mean the victim subtracts)
``lam``            ``|lambda|``, the candidate's KKT multiplier
``run_loss``       the final relative KKT loss of the candidate's run
``margin``         the victim's margin at the candidate's own label (binary ``y phi(x)``, multiclass
                   ``phi_y - max_{c != y} phi_c``)
``abs_margin``     its absolute value: candidates on the decision boundary are rarely training samples
``hyperplanes``    ``log(1 + count)`` of the victim's live first-layer ReLU hyperplanes within ``HYPERPLANE_RADIUS``
                   (relative to their median offset) of the candidate: weight decay puts them through its
                   training samples (``recon_lightning.kkt.first_layer_hyperplanes``)
``plane_distance`` ``log`` of the distance to the nearest such hyperplane, relative to the same scale
``agreement``      how many *other* runs have a candidate within cosine ``AGREEMENT_COSINE`` (victim's frame)
``density``        mean cosine to the ``DENSITY_K`` nearest other candidates (victim's frame)
``public_nn``      cosine to the nearest *public* sample (the auditor's samples of the domain, never the training
                   set; victim's frame): a real reconstruction is as close to public data as a real sample is, a
                   blurred class prototype closer, noise farther
``public_knn``     mean cosine to the ``PUBLIC_K`` nearest public samples
=================  ==========================================================================================

The public pool must hold no sample the victim was trained on, and the same number of samples for every victim
scored alike (the nearest-neighbour cosine grows with the pool): :mod:`recon_lightning.shadow` sees to both.

The learned score (:mod:`recon_lightning.shadow`) takes each feature as its percentile rank within the victim's
candidates, so victims of different scales read alike.
"""

from __future__ import annotations

import numpy as np
import torch

FEATURES = ("norm", "lam", "run_loss", "margin", "abs_margin", "hyperplanes", "plane_distance", "agreement", "density",
            "public_nn", "public_knn")
HYPERPLANE_RADIUS = 1e-3  # as evaluate.MEMBERSHIP_RADIUS: relative to the hyperplanes' median offset
AGREEMENT_COSINE = 0.95
DENSITY_K = 10
PUBLIC_K = 20


def _neighbours(xf: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosines and indices of each row's ``k`` nearest other rows (exact, faiss inner product)."""
    from .select import _faiss, l2_normalize

    faiss = _faiss()
    xn = l2_normalize(xf)
    index = faiss.IndexFlatIP(xn.shape[1])
    index.add(xn)
    cos, idx = index.search(xn, min(k + 1, len(xn)))
    return cos[:, 1:], idx[:, 1:]  # drop each row itself


@torch.no_grad()
def candidate_features(model, x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, run: torch.Tensor,
                       run_loss: torch.Tensor, public: torch.Tensor, agreement_k: int = 64) -> dict[str, np.ndarray]:
    """The features above for candidates ``x`` (N, D) of the victim ``model``, with ``public`` (P, D) the public pool
    (embedding coordinates, like ``x``); each an (N,) float64 array."""
    from .kkt import first_layer_hyperplanes, hyperplane_scale
    from .victim import margins

    x = x.float()
    xf = (x - model.input_offset().float()).double()
    margin = margins(model(x).double(), y.long())
    out = {"norm": xf.norm(dim=1).numpy(), "lam": lam.double().abs().numpy(), "run_loss": run_loss.double().numpy(),
           "margin": margin.numpy(), "abs_margin": margin.abs().numpy()}
    if len(model.layers) > 1:
        first, nxt = model.layers[0], model.layers[1]
        normals, offsets = first_layer_hyperplanes(first.weight.double(), None if first.bias is None else first.bias.double(),
                                                    nxt.weight.double())
        scale = hyperplane_scale(offsets)
        dist = torch.cat([(part @ normals.T + offsets).abs() for part in xf.split(2048)]) / scale
        out["hyperplanes"] = np.log1p((dist < HYPERPLANE_RADIUS).sum(1).double().numpy())
        out["plane_distance"] = np.log(dist.min(1).values.clamp_min(1e-12).numpy())
    else:
        out["hyperplanes"] = np.zeros(len(x))
        out["plane_distance"] = np.zeros(len(x))
    cos, idx = _neighbours(xf.float(), max(agreement_k, DENSITY_K))
    runs = run.long().numpy()
    other_run = runs[idx] != runs[:, None]
    close = (cos >= AGREEMENT_COSINE) & other_run
    # distinct other runs among the close neighbours
    out["agreement"] = np.array([len(set(runs[idx[i][close[i]]].tolist())) for i in range(len(x))], dtype=np.float64)
    out["density"] = cos[:, :DENSITY_K].astype(np.float64).mean(1)
    pn = torch.nn.functional.normalize((public.float() - model.input_offset().float()).double(), dim=1)
    top = torch.cat([(part @ pn.T).topk(min(PUBLIC_K, len(pn)), dim=1).values
                     for part in torch.nn.functional.normalize(xf, dim=1).split(2048)])
    out["public_nn"], out["public_knn"] = top[:, 0].numpy(), top.mean(1).numpy()
    return {k: out[k] for k in FEATURES}


def percentile_ranks(features: dict[str, np.ndarray]) -> np.ndarray:
    """(N, F) matrix of each feature's percentile rank in [0, 1] within these candidates (ties share their mean
    rank; a constant feature is 0.5)."""
    from .select import _percentile_rank

    return np.stack([_percentile_rank(np.nan_to_num(features[k], nan=0.0)) for k in FEATURES], axis=1)
