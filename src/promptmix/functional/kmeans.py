"""Spherical k-means of image features: data-driven starting points for the sub-prompts."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from promptmix._validation import (
    check_finite,
    check_int,
    check_label_range,
    check_labels,
    check_rank,
)
from promptmix.functional._common import _unit

__all__ = ["KMeansResult", "kmeans_subprompts", "spherical_kmeans"]


class KMeansResult(NamedTuple):
    """Output of `spherical_kmeans`.

    Attributes:
        centroids: `(n_subprompts, dim)` unit-norm centroids.
        assignments: `(n,)` cluster of each point.
        objective: 0-dim tensor, $\\sum_i \\cos(x_i, \\mu_{a_i})$ (higher is better).
    """

    centroids: Tensor
    assignments: Tensor
    objective: Tensor


def _seed_centroids(points: Tensor, n_subprompts: int, generator: torch.Generator | None) -> Tensor:
    """k-means++ on the sphere: each next seed drawn with probability ∝ its distance `1 - cos`."""
    first = torch.randint(len(points), (1,), generator=generator).item()
    chosen = [int(first)]
    distance = (1 - points @ points[chosen[0]]).clamp_min(0)
    for _ in range(1, n_subprompts):
        if float(distance.sum()) <= 0:  # every point already is a seed: take any other one
            weights = torch.ones_like(distance)
            weights[chosen] = 0
        else:
            weights = distance
        index = int(torch.multinomial(weights.cpu(), 1, generator=generator).item())
        chosen.append(index)
        distance = torch.minimum(distance, (1 - points @ points[index]).clamp_min(0))
    return points[chosen].clone()


def _lloyd(points: Tensor, centroids: Tensor, iterations: int) -> KMeansResult:
    """Alternate assignment and re-centring; an empty cluster moves to the worst-served point."""
    for _ in range(iterations):
        cosine = points @ centroids.T
        assignments = cosine.argmax(dim=-1)
        sums = torch.zeros_like(centroids).index_add(0, assignments, points)
        counts = torch.bincount(assignments, minlength=len(centroids))
        updated = _unit(sums)
        centroids = torch.where((counts > 0).unsqueeze(1), updated, centroids)
        for cluster in (counts == 0).nonzero().flatten().tolist():
            served = (points @ centroids.T).amax(dim=-1)
            centroids[cluster] = points[served.argmin()]
    cosine = points @ centroids.T
    best, assignments = cosine.max(dim=-1)
    return KMeansResult(centroids, assignments, best.sum())


def _check_points(name: str, features: Tensor) -> None:
    """k-means reads its points on the host anyway: non-finite or zero rows raise on any device."""
    if features.shape[-1] < 1:
        raise ValueError(
            f"{name} must have shape (n, dim) with dim >= 1 but has shape {tuple(features.shape)}."
        )
    check_finite(name, features)
    zero = (features.detach() == 0).all(dim=-1)
    if bool(zero.any()):
        rows = zero.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} must have no zero rows (a zero vector has no direction to cluster) but rows "
            f"{rows[:10]}{' ...' if len(rows) > 10 else ''} are zero."
        )


def spherical_kmeans(
    features: Tensor,
    *,
    n_subprompts: int,
    iterations: int = 30,
    restarts: int = 4,
    generator: torch.Generator | None = None,
) -> KMeansResult:
    r"""Spherical k-means: unit centroids that maximise the summed cosine of points to them.

    $$
    \max_{\mu_1..\mu_k,\ \|\mu_j\| = 1} \sum_i \max_j \cos(x_i, \mu_j)
    $$

    Lloyd's algorithm on the sphere: assign each point to its most similar centroid, then set
    each centroid to the normalised sum of its points (which maximises the summed cosine of those
    points). Neither step can lower the objective, so it never decreases over iterations. Seeds
    come from k-means++ with the cosine distance $1 - \cos$; a cluster left empty moves to the
    point its centroid set serves worst. Of `restarts` runs the one with the highest objective
    is returned.

    Args:
        features: `(n, dim)` points, normalised or not; finite and non-zero.
        n_subprompts: `k`, the number of clusters (one per sub-prompt), `1 <= k <= n`.
        iterations: Lloyd rounds per restart, `>= 0` (0 returns the seeds).
        restarts: independent seedings, `>= 1`.
        generator: random generator for the seeds.

    Returns:
        A `KMeansResult` `(centroids (k, dim), assignments (n,), objective)` in the dtype of
        `features`, computed in float32 (or float64 for float64 input).

    Raises:
        ValueError: On NaN, inf or zero rows in `features` (k-means reads them on the host, so
            on every device), or `n_subprompts` larger than the number of points.

    Examples:
        >>> points = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
        >>> generator = torch.Generator().manual_seed(0)
        >>> result = spherical_kmeans(points, n_subprompts=2, generator=generator)
        >>> sorted(result.centroids.round(decimals=3).tolist())
        [[0.0, 1.0], [1.0, 0.0]]
    """
    check_rank("features", features, (2,), "(n, dim)")
    count = features.shape[0]
    check_int("n_subprompts", n_subprompts, minimum=1)
    if n_subprompts > count:
        raise ValueError(
            f"n_subprompts must be <= the number of points ({count}) but is {n_subprompts}."
        )
    _check_points("features", features)
    check_int("iterations", iterations, minimum=0)
    check_int("restarts", restarts, minimum=1)
    work_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    points = _unit(features.detach().to(work_dtype))
    best: KMeansResult | None = None
    for _ in range(restarts):
        result = _lloyd(points, _seed_centroids(points, n_subprompts, generator), iterations)
        if best is None or result.objective > best.objective:
            best = result
    assert best is not None
    return KMeansResult(
        best.centroids.to(features.dtype), best.assignments, best.objective.to(features.dtype)
    )


def kmeans_subprompts(
    image_features: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    n_subprompts: int,
    iterations: int = 30,
    restarts: int = 4,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Per-class spherical k-means of image features: a starting point for each sub-prompt.

    For every class `c`, `spherical_kmeans` of the unit-norm features of its images with
    `k = n_subprompts`, so each sub-prompt can start at one of the looks the class's images
    actually have instead of at the class's text feature. Centroids are sorted by cluster size,
    largest first.

    **Fallback.** A class with `n < K` images (but at least one) gets its `n` image directions
    as its first `n` centroids and repeats them, in order, for the rest, so its sub-prompts start
    as duplicates of its images (the learners' `init_noise_std` separates them). A class with no
    image gets zero rows; `promptmix.initialize_from_kmeans` leaves such classes as they are.

    Args:
        image_features: `(n, dim)` training image features, normalised or not; finite and
            non-zero (a zero feature has no look to start from).
        labels: `(n,)` integer class of each image, in `[0, num_classes)`.
        num_classes: number of classes `C >= 1`.
        n_subprompts: `K >= 1`.
        iterations: Lloyd rounds per restart.
        restarts: seedings per class; the best objective wins.
        generator: random generator for the seeds (CPU generator; one for all classes).

    Returns:
        `(num_classes, K, dim)` unit-norm centroids (zero rows for classes without images), in
        the dtype and on the device of `image_features`.

    Raises:
        ValueError: On NaN, inf or zero rows in `image_features`, or labels outside
            `[0, num_classes)` (on every device: k-means reads its inputs on the host).

    Examples:
        >>> images = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [1.0, 1.0]])
        >>> labels = torch.tensor([0, 0, 0, 0, 1])
        >>> centroids = kmeans_subprompts(images, labels, num_classes=3, n_subprompts=2)
        >>> centroids.shape, centroids.norm(dim=-1).round(decimals=3)
        (torch.Size([3, 2, 2]), tensor([[1., 1.],
                [1., 1.],
                [0., 0.]]))
    """
    check_rank("image_features", image_features, (2,), "(n, dim)")
    check_int("num_classes", num_classes, minimum=1)
    check_int("n_subprompts", n_subprompts, minimum=1)
    labels = check_labels("labels", labels, image_features.shape[0], None)
    check_label_range("labels", labels, num_classes)
    check_int("iterations", iterations, minimum=0)
    check_int("restarts", restarts, minimum=1)
    _check_points("image_features", image_features)
    dim = image_features.shape[1]
    out = image_features.new_zeros(num_classes, n_subprompts, dim)
    for label in range(num_classes):
        points = image_features[labels == label]
        if len(points) == 0:
            continue
        if len(points) < n_subprompts:
            repeats = torch.arange(n_subprompts, device=points.device) % len(points)
            out[label] = _unit(points.detach())[repeats]
            continue
        result = spherical_kmeans(
            points,
            n_subprompts=n_subprompts,
            iterations=iterations,
            restarts=restarts,
            generator=generator,
        )
        sizes = torch.bincount(result.assignments, minlength=n_subprompts)
        order = torch.sort(sizes, descending=True, stable=True).indices
        out[label] = result.centroids[order]
    return out
