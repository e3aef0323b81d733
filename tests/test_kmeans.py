"""`spherical_kmeans` and `kmeans_subprompts`: shapes, bad arguments, values and properties."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from promptmix import functional as PF

pytestmark = pytest.mark.usefixtures("single_thread")


def _clusters(seed: int, n_per: int = 6, centres: int = 3, dim: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(centres, dim, generator=generator), dim=-1)
    noise = 0.05 * torch.randn(centres, n_per, dim, generator=generator)
    return (means[:, None] + noise).reshape(-1, dim)


def test_smoke_shapes_and_dtype() -> None:
    points = torch.randn(20, 7, dtype=torch.float64)
    result = PF.spherical_kmeans(points, n_subprompts=3)
    assert result.centroids.shape == (3, 7)
    assert result.assignments.shape == (20,)
    assert result.centroids.dtype == torch.float64
    assert result.objective.shape == ()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(n_subprompts=0), ValueError, "n_subprompts must be >= 1"),
        (dict(n_subprompts=11), ValueError, "n_subprompts must be <= the number of points"),
        (dict(n_subprompts=2, iterations=-1), ValueError, "iterations"),
        (dict(n_subprompts=2, restarts=0), ValueError, "restarts"),
        (dict(n_subprompts=2.0), TypeError, "n_subprompts must be an int"),
    ],
)
def test_spherical_kmeans_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        PF.spherical_kmeans(torch.randn(10, 3), **kwargs)


def test_spherical_kmeans_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"features must have shape \(n, dim\)"):
        PF.spherical_kmeans(torch.randn(2, 3, 4), n_subprompts=2)


def test_kmeans_subprompts_bad_arguments() -> None:
    images, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        PF.kmeans_subprompts(images, labels, num_classes=2, n_subprompts=2)
    with pytest.raises(ValueError, match="n_subprompts must be >= 1"):
        PF.kmeans_subprompts(images, labels, num_classes=3, n_subprompts=0)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        PF.kmeans_subprompts(images, labels.float(), num_classes=3, n_subprompts=1)


def test_recovers_separated_clusters() -> None:
    points = _clusters(0)
    result = PF.spherical_kmeans(points, n_subprompts=3, generator=torch.Generator().manual_seed(0))
    truth = torch.arange(3).repeat_interleave(6)
    # Each true cluster maps to exactly one found cluster, and vice versa.
    pairs = set(zip(truth.tolist(), result.assignments.tolist(), strict=True))
    assert len(pairs) == 3
    expected = F.normalize(points.reshape(3, 6, -1).sum(dim=1), dim=-1)
    cosine = result.centroids @ expected.T
    assert torch.allclose(cosine.amax(dim=0), torch.ones(3), atol=1e-5)


def test_one_cluster_is_the_normalised_mean() -> None:
    points = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    result = PF.spherical_kmeans(points, n_subprompts=1)
    expected = torch.tensor([[1.0, 1.0]]) / 2**0.5
    assert torch.allclose(result.centroids, expected)
    assert torch.allclose(result.objective, torch.tensor(2 / 2**0.5))


def test_duplicate_points_more_clusters_than_directions() -> None:
    # Two distinct directions, three clusters: k-means++ must still seed three distinct points.
    points = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    result = PF.spherical_kmeans(points, n_subprompts=3, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(result.centroids).all()
    assert torch.allclose(result.objective, torch.tensor(6.0))


@given(seed=st.integers(0, 10_000), k=st.integers(1, 5), iterations=st.integers(1, 8))
def test_objective_never_decreases_over_iterations(seed: int, k: int, iterations: int) -> None:
    points = torch.randn(25, 4, generator=torch.Generator().manual_seed(seed))
    objectives = [
        PF.spherical_kmeans(
            points,
            n_subprompts=k,
            iterations=i,
            restarts=1,
            generator=torch.Generator().manual_seed(seed),
        ).objective.item()
        for i in range(iterations + 1)
    ]
    assert all(b >= a - 1e-5 for a, b in itertools.pairwise(objectives))


@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), restarts=st.integers(1, 3))
def test_centroids_on_the_sphere(seed: int, k: int, restarts: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(20, 6, generator=generator) * 3
    labels = torch.randint(0, 3, (20,), generator=generator)
    centroids = PF.kmeans_subprompts(
        images, labels, num_classes=3, n_subprompts=k, restarts=restarts, generator=generator
    )
    norms = centroids.norm(dim=-1)
    present = torch.bincount(labels, minlength=3) > 0
    assert torch.allclose(norms[present], torch.ones_like(norms[present]), atol=1e-5)
    assert (norms[~present] == 0).all()


def test_restarts_take_the_best_objective() -> None:
    points = torch.randn(40, 3, generator=torch.Generator().manual_seed(3))
    single = [
        PF.spherical_kmeans(
            points, n_subprompts=4, restarts=1, generator=torch.Generator().manual_seed(s)
        )
        for s in range(5)
    ]
    best = PF.spherical_kmeans(
        points, n_subprompts=4, restarts=5, generator=torch.Generator().manual_seed(0)
    )
    assert best.objective >= max(r.objective for r in single[:1]) - 1e-6


def test_kmeans_subprompts_sorted_by_size_and_matches_per_class_kmeans() -> None:
    generator = torch.Generator().manual_seed(0)
    big = F.normalize(torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.randn(5, 3, generator=generator))
    small = F.normalize(
        torch.tensor([0.0, 1.0, 0.0]) + 0.01 * torch.randn(2, 3, generator=generator)
    )
    images = torch.cat([small, big])
    labels = torch.zeros(7, dtype=torch.long)
    centroids = PF.kmeans_subprompts(images, labels, num_classes=1, n_subprompts=2)
    assert centroids[0, 0, 0] > 0.99 and centroids[0, 1, 1] > 0.99  # largest cluster first


def test_fallback_for_a_class_with_fewer_images_than_k() -> None:
    images = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [1.0, -1.0], [2.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    centroids = PF.kmeans_subprompts(images, labels, num_classes=2, n_subprompts=3)
    unit = F.normalize(images, dim=-1)
    expected = unit[[0, 1, 0]]  # its two images, then repeated in order
    assert torch.allclose(centroids[0], expected)
    assert torch.allclose(centroids[1].norm(dim=-1), torch.ones(3))


def test_device_and_dtype_follow_the_input() -> None:
    images = torch.randn(12, 4, dtype=torch.float64)
    labels = torch.arange(3).repeat(4)
    centroids = PF.kmeans_subprompts(images, labels, num_classes=3, n_subprompts=2)
    assert centroids.dtype == torch.float64 and centroids.device == images.device


def test_deterministic_with_a_generator() -> None:
    images = torch.randn(30, 5, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(3).repeat(10)
    first, second = (
        PF.kmeans_subprompts(
            images,
            labels,
            num_classes=3,
            n_subprompts=3,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    )
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0]]), "features must be finite"),
        (torch.tensor([[1.0, 0.0], [float("inf"), 1.0], [0.0, 1.0]]), "features must be finite"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), r"no zero rows .* rows \[1\]"),
        (torch.zeros(3, 0), r"dim >= 1 but has shape \(3, 0\)"),
    ],
)
def test_points_k_means_cannot_use_are_named(features, match) -> None:
    with pytest.raises(ValueError, match=match):
        PF.spherical_kmeans(features, n_subprompts=2)
    labels = torch.zeros(len(features), dtype=torch.long)
    with pytest.raises(ValueError, match=match.replace("features", "image_features")):
        PF.kmeans_subprompts(features, labels, num_classes=1, n_subprompts=2)


def test_a_class_of_zero_features_is_not_a_class_without_images() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"zero rows .* rows \[2, 3\]"):
        PF.kmeans_subprompts(images, labels, num_classes=2, n_subprompts=2)


def test_labels_are_checked_as_class_indices() -> None:
    images = torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"labels must be an integer torch\.Tensor but is a list"):
        PF.kmeans_subprompts(images, [0, 0, 1, 1], num_classes=2, n_subprompts=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\] but ranges over \[0, 2\]"):
        PF.kmeans_subprompts(images, torch.tensor([0, 0, 1, 2]), num_classes=2, n_subprompts=1)
