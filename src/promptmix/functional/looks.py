r"""Looks shared by all classes: a start for sub-prompts that keeps the text prior.

A sub-prompt $k$ of class $c$ is the class's text feature moved by three offsets,

$$
f_{ck} = \frac{t_{ck} + a_c + s_k + e_{ck}}{\lVert t_{ck} + a_c + s_k + e_{ck} \rVert},
$$

a class part $a_c$, a look $s_k$ shared by every class (a colour, a viewpoint) and a small
correction $e_{ck}$ of that look for that class. `shared_look_start` estimates the three from the
few-shot image features: each is a mean of residuals shrunk toward zero by the number of images
behind it (an empirical-Bayes estimate, `prior_count` pseudo-images of prior), so a class with one
image stays near its text feature, while the looks, estimated from every class's images at once,
are found even at one shot per class.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from promptmix._validation import (
    check_finite,
    check_int,
    check_label_range,
    check_labels,
    check_positive,
    check_rank,
    labels_out_of_range,
    nan_where,
    reads_host,
)
from promptmix.functional._common import _unit
from promptmix.functional.kmeans import _check_points, spherical_kmeans

__all__ = ["SharedLookStart", "shared_look_start", "shrunk_group_means"]


class SharedLookStart(NamedTuple):
    """Output of `shared_look_start`.

    Attributes:
        class_offsets: `(num_classes, dim)` the class parts $a_c$.
        shared_offsets: `(K, dim)` the looks $s_k$ shared by all classes.
        subprompt_offsets: `(num_classes, K, dim)` the per-class corrections $e_{ck}$.
        looks: `(n,)` the look each image was assigned to.
    """

    class_offsets: Tensor
    shared_offsets: Tensor
    subprompt_offsets: Tensor
    looks: Tensor


def shrunk_group_means(
    values: Tensor, groups: Tensor, *, num_groups: int, prior_count: float = 4.0
) -> Tensor:
    r"""Per-group means shrunk toward zero: $\sum_{i \in g} v_i / (n_g + n_0)$.

    The posterior mean of a group's offset under a zero-mean Gaussian prior worth $n_0$ =
    `prior_count` observations: a group of one value keeps $1 / (1 + n_0)$ of it, a group of
    many keeps almost all of it, an empty group is zero.

    Args:
        values: `(n, dim)`.
        groups: `(n,)` integer group of each value in `[0, num_groups)`.
        num_groups: number of groups, `>= 1`.
        prior_count: $n_0 \ge 0$ (0: plain means).

    Returns:
        `(num_groups, dim)` in the dtype of `values`. Off the CPU a group outside
        `[0, num_groups)` is not read on the host: it makes the whole result NaN (on the CPU
        it raises).

    Examples:
        >>> values = torch.tensor([[2.0], [4.0], [6.0]])
        >>> shrunk_group_means(values, torch.tensor([0, 0, 1]), num_groups=3, prior_count=1.0)
        tensor([[2.],
                [3.],
                [0.]])
    """
    check_rank("values", values, (2,), "(n, dim)")
    check_int("num_groups", num_groups, minimum=1)
    groups = check_labels("groups", groups, values.shape[0], num_groups)
    prior_count = check_positive("prior_count", prior_count, allow_zero=True)
    invalid = None if reads_host(groups) else labels_out_of_range(groups, num_groups).any()
    if invalid is not None:
        groups = groups.clamp(0, num_groups - 1)
    sums = values.new_zeros(num_groups, values.shape[1]).index_add(0, groups, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    counts = counts.index_add(0, groups, torch.ones_like(groups, dtype=values.dtype))
    means = sums / (counts + prior_count).clamp_min(torch.finfo(values.dtype).tiny)[:, None]
    return means if invalid is None else nan_where(invalid, means)


def shared_look_start(
    image_features: Tensor,
    labels: Tensor,
    text_features: Tensor,
    *,
    n_subprompts: int,
    prior_count: float = 4.0,
    iterations: int = 30,
    restarts: int = 4,
    generator: torch.Generator | None = None,
) -> SharedLookStart:
    r"""Class parts, shared looks and per-class corrections estimated from few-shot images.

    With unit image features $x_i$, labels $y_i$ and unit text features $t_c$, the residuals
    $r_i = x_i - t_{y_i}$ are split in four, each part a shrunk mean (`shrunk_group_means`, prior
    worth $n_0$ = `prior_count` images) of what the parts before it leave:

    1. the mean residual $g$ over all images (the modality gap and the average look);
    2. the class parts $a_c$: shrunk per-class means of $r_i - g$;
    3. the looks: spherical k-means (`spherical_kmeans`, K clusters) of $q_i = r_i - g - a_{y_i}$
       pooled over *all* classes, each look's mean $l_k$ of its $q_i$; the shared offsets are
       $s_k = g + l_k$, ordered by how many images each look holds;
    4. the corrections $e_{ck}$: shrunk means of $q_i - l_k$ over the images of class $c$ in
       look $k$.

    Then $t_c + a_c + s_k + e_{ck}$ is the (unnormalised) start of sub-prompt $(c, k)$. A class
    with one image keeps $1 / (1 + n_0)$ of its own offset, and the looks are learned from every
    class's images, so they are found even at one shot per class.

    Args:
        image_features: `(n, dim)` training image features, normalised or not; finite.
        labels: `(n,)` integer classes in `[0, num_classes)`.
        text_features: `(num_classes, dim)` the class text features (normalised here).
        n_subprompts: K, the number of looks, `1 <= K <= n`.
        prior_count: $n_0 \ge 0$, the prior's worth in images.
        iterations: Lloyd rounds of the k-means.
        restarts: k-means seedings.
        generator: random generator of the k-means seeds.

    Returns:
        A `SharedLookStart` of float32 tensors (float64 for float64 input) on the device of
        `image_features`.

    Raises:
        TypeError: If `labels` is not an integer tensor, or the features are not floating-point.
        ValueError: On mismatched shapes, `n_subprompts` above the number of images, or, read
            on the host on any device (as k-means does): labels out of range, NaN, inf or zero
            rows in `image_features` or `text_features`, `iterations < 0` or `restarts < 1`.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
        >>> looks = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
        >>> labels = torch.arange(3).repeat_interleave(4)
        >>> images = text[labels] + 2 * looks[torch.arange(12) % 2]
        >>> start = shared_look_start(images, labels, text, n_subprompts=2)
        >>> start.shared_offsets.shape, start.subprompt_offsets.shape
        (torch.Size([2, 8]), torch.Size([3, 2, 8]))
        >>> truth = torch.arange(12) % 2
        >>> bool((start.looks == truth).all() or (start.looks == 1 - truth).all())
        True
    """
    check_rank("image_features", image_features, (2,), "(n, dim)")
    check_rank("text_features", text_features, (2,), "(num_classes, dim)")
    num_classes, dim = text_features.shape
    if image_features.shape[1] != dim:
        raise ValueError(
            f"image_features must have dim {dim} (that of text_features) but has shape "
            f"{tuple(image_features.shape)}."
        )
    count = image_features.shape[0]
    check_int("n_subprompts", n_subprompts, minimum=1)
    if n_subprompts > count:
        raise ValueError(
            f"n_subprompts must be <= the number of images ({count}) but is {n_subprompts}."
        )
    # A set-up function that reads its inputs on the host anyway (the k-means does): every
    # value check raises, on any device, before anything is computed.
    labels = check_labels("labels", labels, count, None)
    check_label_range("labels", labels, num_classes, " (one row of text_features per class)")
    _check_points("image_features", image_features)
    check_finite("text_features", text_features)
    zero = (text_features.detach() == 0).all(dim=-1)
    if bool(zero.any()):
        raise ValueError(
            "text_features must have no zero rows (each class's start is shrunk toward its text "
            f"direction) but rows {zero.nonzero().flatten().tolist()[:10]} are zero."
        )
    prior_count = check_positive("prior_count", prior_count, allow_zero=True)
    check_int("iterations", iterations, minimum=0)
    check_int("restarts", restarts, minimum=1)
    work = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    images = _unit(image_features.detach().to(work))
    text = _unit(text_features.detach().to(device=images.device, dtype=work))
    labels = labels.to(images.device)

    residuals = images - text[labels]
    gap = residuals.mean(dim=0)
    centred = residuals - gap
    class_offsets = shrunk_group_means(
        centred, labels, num_groups=num_classes, prior_count=prior_count
    )
    rest = centred - class_offsets[labels]
    looks = _cluster(rest, n_subprompts, iterations, restarts, generator)
    look_means = shrunk_group_means(rest, looks, num_groups=n_subprompts, prior_count=0.0)
    corrections = shrunk_group_means(
        rest - look_means[looks],
        labels * n_subprompts + looks,
        num_groups=num_classes * n_subprompts,
        prior_count=prior_count,
    )
    return SharedLookStart(
        class_offsets,
        gap + look_means,
        corrections.view(num_classes, n_subprompts, dim),
        looks,
    )


def _cluster(
    points: Tensor,
    n_clusters: int,
    iterations: int,
    restarts: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Spherical k-means labels of `points`, largest cluster first; zero rows join cluster 0."""
    nonzero = points.norm(dim=-1) > 1e-6 * points.norm(dim=-1).amax().clamp_min(1e-30)
    looks = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    if int(nonzero.sum()) < n_clusters:  # too few distinct residuals: one look per image
        return torch.arange(points.shape[0], device=points.device) % n_clusters
    result = spherical_kmeans(
        points[nonzero],
        n_subprompts=n_clusters,
        iterations=iterations,
        restarts=restarts,
        generator=generator,
    )
    looks[nonzero] = result.assignments
    sizes = torch.bincount(looks, minlength=n_clusters)
    rank = torch.empty_like(sizes)
    rank[torch.argsort(sizes, descending=True, stable=True)] = torch.arange(
        n_clusters, device=sizes.device
    )
    return rank[looks]
