"""The one matching path (recon_lightning.matching.best_matches) against brute force in numpy: best match each
way, top-k, the one-to-one assignment (over every permutation), NCC, and that chunking changes nothing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from recon_lightning.errors import DataError
from recon_lightning.matching import best_matches, pairwise_scores


def brute_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double().numpy(), b.double().numpy()
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def brute_one_to_one(sim: np.ndarray) -> float:
    """The largest total similarity of a one-to-one assignment of rows (fewer) to columns, over every choice."""
    n, m = sim.shape
    return max(sum(sim[i, cols[i]] for i in range(n)) for cols in itertools.permutations(range(m), n))


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_best_each_way_and_top_k_equal_brute_force(chunk):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(11, 4, generator=g)
    sim = brute_cosine(a, b)
    m = best_matches("cosine", a, b, chunk=chunk, top=3)
    assert m["best_index"].tolist() == sim.argmax(1).tolist()
    assert m["best_score"].tolist() == pytest.approx(sim.max(1).tolist(), abs=1e-12)
    assert m["b_best_index"].tolist() == sim.argmax(0).tolist()
    assert m["b_best_score"].tolist() == pytest.approx(sim.max(0).tolist(), abs=1e-12)
    assert m["top_index"].tolist() == np.argsort(-sim, axis=1)[:, :3].tolist()
    assert m["top_score"].numpy() == pytest.approx(-np.sort(-sim, axis=1)[:, :3], abs=1e-12)
    assert "one_to_one_index" not in m


@pytest.mark.parametrize("n_b, chunk", [(7, 2), (7, 4096), (3, 1)])
def test_one_to_one_is_the_best_assignment(n_b, chunk):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 3, generator=g), torch.randn(n_b, 3, generator=g)
    sim = brute_cosine(a, b)
    m = best_matches("cosine", a, b, chunk=chunk, one_to_one=True)
    idx, score = m["one_to_one_index"].tolist(), m["one_to_one_score"].tolist()
    assigned = [i for i in range(5) if idx[i] >= 0]
    assert len(assigned) == min(5, n_b) and len({idx[i] for i in assigned}) == len(assigned)  # one-to-one
    assert all(score[i] == pytest.approx(sim[i, idx[i]], abs=1e-12) for i in assigned)
    assert all(math.isnan(score[i]) for i in range(5) if idx[i] < 0)
    if n_b >= 5:
        assert sum(score) == pytest.approx(brute_one_to_one(sim), abs=1e-9)
    else:  # more rows than columns: the best columns' assignment, from the columns' side
        assert sum(score[i] for i in assigned) == pytest.approx(brute_one_to_one(sim.T), abs=1e-9)


def test_ncc_is_minus_the_normalised_squared_distance_of_z_scored_images():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 2, 4, 4, generator=g), torch.rand(6, 2, 4, 4, generator=g)

    def z(x):  # per image and channel, unbiased std (the reference's normalize_batch)
        x = x.double().numpy().reshape(len(x), 2, -1)
        return ((x - x.mean(2, keepdims=True)) / x.std(2, ddof=1, keepdims=True)).reshape(len(x), -1)

    za, zb = z(a), z(b)
    expected = -((za[:, None, :] - zb[None, :, :]) ** 2).sum(2) / za.shape[1]
    assert pairwise_scores("ncc", a, b, chunk=4).numpy() == pytest.approx(expected, abs=1e-12)
    m = best_matches("ncc", a, b, chunk=4)
    assert m["best_index"].tolist() == expected.argmax(1).tolist()
    assert m["b_best_index"].tolist() == expected.argmax(0).tolist()


def test_bad_inputs_are_data_errors():
    with pytest.raises(DataError, match="non-empty"):
        best_matches("cosine", torch.zeros(0, 3), torch.ones(2, 3))
    with pytest.raises(DataError, match=r"shape \(3,\) with \(2,\)"):
        best_matches("cosine", torch.eye(3), torch.ones(2, 2))
    with pytest.raises(DataError, match="NCC needs images"):
        best_matches("ncc", torch.eye(3), torch.eye(3))
