"""Sinkhorn balancing against an independent OT solver (POT), and the issue's cases.

Only the tests that compare with POT need it (the `pot` fixture skips them without it); the
others run everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import promptmix.functional as PF
from promptmix import SoftEMAssigner

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def pot():
    """POT, the `test` extra: only the tests that compare with it skip without it."""
    return pytest.importorskip("ot")


def pot_reference(ot, scores: torch.Tensor, groups: torch.Tensor, prior: torch.Tensor | None):
    """Per group, POT's entropic OT plan with cost -S, row mass 1 and column mass n * prior."""
    expected = np.zeros(tuple(scores.shape))
    k = scores.shape[1]
    for group in groups.unique().tolist():
        rows = (groups == group).nonzero().flatten()
        n = len(rows)
        target = np.full(k, n / k) if prior is None else n * prior[group].double().numpy()
        plan = ot.sinkhorn(
            np.ones(n), target, -scores[rows].double().numpy(), reg=1.0,
            method="sinkhorn_log", numItermax=100_000, stopThr=1e-13,
        )
        expected[rows.numpy()] = plan
    return torch.from_numpy(expected)


def usage_error(q: torch.Tensor, groups: torch.Tensor, prior: torch.Tensor | None) -> float:
    """Worst relative gap between a class's usage and its target."""
    worst = 0.0
    for group in groups.unique().tolist():
        rows = q[groups == group].double()
        target = torch.full((q.shape[1],), 1 / q.shape[1], dtype=torch.float64)
        if prior is not None:
            target = prior[group].double()
        usage = rows.mean(0)
        worst = max(worst, ((usage - target).abs() / target).max().item())
    return worst


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("with_prior", [False, True])
def test_equals_pot_on_random_problems(pot, seed, with_prior) -> None:
    generator = torch.Generator().manual_seed(seed)
    groups = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 1, 1])
    scores = 4 * torch.randn(10, 4, generator=generator, dtype=torch.float64)
    prior = None
    if with_prior:
        prior = torch.rand(3, 4, generator=generator, dtype=torch.float64) + 0.1
        prior = prior / prior.sum(1, keepdim=True)
    expected = pot_reference(pot, scores, groups, prior)
    torch.testing.assert_close(
        PF.sinkhorn(scores, groups, usage_prior=prior), expected, atol=1e-7, rtol=1e-6
    )
    # float32 scores: the potentials are float64 inside, the result is rounded to float32.
    torch.testing.assert_close(
        PF.sinkhorn(scores.float(), groups, usage_prior=prior), expected.float(),
        atol=1e-5, rtol=1e-4,
    )


def test_scale_of_the_scores_matters(pot) -> None:
    # The transport depends on S itself: halving the scores is a different (softer) plan.
    scores = 4 * torch.randn(6, 3, dtype=torch.float64)
    groups = torch.zeros(6, dtype=torch.long)
    expected = pot_reference(pot, scores, groups, None)
    halved = pot_reference(pot, scores / 2, groups, None)
    assert (expected - halved).abs().max() > 0.05
    torch.testing.assert_close(PF.sinkhorn(scores, groups), expected, atol=1e-7, rtol=1e-6)


def clip_like(case: str, k: int, per_class: int, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    cosine = 0.3 + 0.03 * torch.randn(classes * per_class, k, generator=generator)
    if case == "winner":  # one sub-prompt wins every image: a softmax underflows to exact 0/1
        cosine[:, 0] = cosine.max(dim=1).values + 0.2
    return cosine, labels


@pytest.mark.parametrize("case", ["clip", "winner"])
@pytest.mark.parametrize(("k", "per_class"), [(4, 8), (8, 4), (2, 16)])
def test_defaults_balance_within_one_percent(case, k, per_class) -> None:
    cosine, labels = clip_like(case, k, per_class)
    # The loss's default tau = 0.3 with scale 100, as the issue measured.
    gamma = SoftEMAssigner(mode="sinkhorn").from_similarities(cosine, labels, tau=0.3)
    torch.testing.assert_close(gamma.sum(-1), torch.ones(len(labels)))
    assert usage_error(gamma, labels, None) <= 0.01
    soft = torch.softmax(cosine * 100 / 0.3, dim=-1)
    assert usage_error(soft, labels, None) > 0.5  # the test would see no balancing


def test_defaults_reach_a_skewed_prior() -> None:
    cosine, labels = clip_like("winner", 4, 8)
    prior = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25] * 4])
    gamma = PF.responsibilities_from_similarities(
        cosine, labels, tau=0.3, mode="sinkhorn", usage_prior=prior
    )
    assert usage_error(gamma, labels, prior) <= 0.01


def test_tolerance_mode_stops_at_the_tolerance() -> None:
    cosine, labels = clip_like("clip", 4, 8)
    scores = cosine * 100 / 0.3
    loose = PF.sinkhorn(scores, labels, sinkhorn_iterations=500, newton_steps=0, tol=0.05)
    assert 0.001 < usage_error(loose, labels, None) <= 0.05
    tight = PF.sinkhorn(scores, labels, sinkhorn_iterations=500, newton_steps=50, tol=1e-6)
    assert usage_error(tight, labels, None) <= 1e-5


def test_zero_prior_column_gets_nothing() -> None:
    scores = torch.randn(6, 3)
    prior = torch.tensor([[0.5, 0.5, 0.0]])
    gamma = PF.sinkhorn(scores, usage_prior=prior)
    assert gamma[:, 2].abs().max() == 0
    torch.testing.assert_close(gamma.sum(0), torch.tensor([3.0, 3.0, 0.0]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sinkhorn_iterations": 0}, ValueError, "sinkhorn_iterations"),
        ({"newton_steps": -1}, ValueError, "newton_steps"),
        ({"tol": 0.0}, ValueError, "tol"),
        ({"usage_prior": torch.full((1, 2), 0.5)}, ValueError, r"usage_prior must have shape"),
        ({"usage_prior": torch.full((1, 3), 0.5)}, ValueError, "usage_prior rows must sum"),
        ({"usage_prior": torch.full((0, 3), 0.5)}, ValueError, "at least one class"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        PF.sinkhorn(torch.randn(4, 3), **kwargs)


def test_prior_needs_sinkhorn_mode() -> None:
    with pytest.raises(ValueError, match='mode="sinkhorn" only'):
        SoftEMAssigner(mode="soft").from_similarities(
            torch.rand(2, 2), torch.tensor([0, 0]), usage_prior=torch.full((1, 2), 0.5)
        )


def test_tolerance_is_relative_to_small_targets() -> None:
    # Two images per class and K = 4: each target is 0.5 image, below 1.
    cosine, labels = clip_like("clip", 4, 2)
    scores = cosine * 100 / 0.3
    one_round = PF.sinkhorn(scores, labels, sinkhorn_iterations=1, newton_steps=0)
    assert usage_error(one_round, labels, None) > 0.01
    gamma = PF.sinkhorn(scores, labels, sinkhorn_iterations=2000, newton_steps=0, tol=0.01)
    assert usage_error(gamma, labels, None) <= 0.01
