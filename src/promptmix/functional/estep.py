"""The E-step: responsibilities of a class's sub-prompts for its images, soft, hard or balanced."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from promptmix._validation import (
    check_choice,
    check_int,
    check_labels,
    check_positive,
    check_rank,
    check_score_range,
    check_simplex,
    check_subprompts,
    nan_where,
)
from promptmix.functional._common import (
    ASSIGNMENT_MODES,
    AssignmentMode,
    _dense_groups,
    _group_sums,
)
from promptmix.functional.similarity import own_class_similarities

#: Sinkhorn rounds in the training step. Chosen from `benchmarks/sinkhorn_iterations.py`: the
#: fewest rounds that bring every class's usage within 1 % of its target in all of its cases
#: (K = 2 to 16, 2 to 32 images per class, `scale / tau` up to 333, one sub-prompt winning
#: every image, skewed usage priors).
DEFAULT_SINKHORN_ITERATIONS = 50


def check_usage_prior(usage_prior: Tensor, k: int, against: str) -> Tensor:
    """Return `usage_prior` if it is `(num_classes, k)` with rows on the simplex (see
    `check_simplex` for when values are checked)."""
    check_rank("usage_prior", usage_prior, (2,), "(num_classes, K)")
    if usage_prior.shape[1] != k:
        raise ValueError(
            f"usage_prior must have shape (num_classes, {k}) to match {against} but has shape "
            f"{tuple(usage_prior.shape)}."
        )
    if usage_prior.shape[0] < 1:
        raise ValueError("usage_prior must have at least one class row but has shape (0, K).")
    return check_simplex("usage_prior", usage_prior)


def _row_prior(usage_prior: Tensor, labels: Tensor | None, batch: int) -> Tensor:
    """`(batch, K)`: the usage prior of each row's class; the mean row when `labels` is None."""
    if labels is None:
        return usage_prior.mean(dim=0, keepdim=True).expand(batch, -1)
    return usage_prior[labels]


def _group_logsumexp(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """`(num_groups, K)`: $\\log \\sum_{b \\in g} e^{x_{bk}}$, stable, with no host sync."""
    index = groups.unsqueeze(1).expand_as(values)
    peak = values.new_full((num_groups, values.shape[1]), -math.inf)
    peak = peak.scatter_reduce(0, index, values, "amax")
    # An empty group has peak -inf; a NaN row makes its group's peak NaN, and the NaN stays.
    peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    return _group_sums((values - peak[groups]).exp(), groups, num_groups).log() + peak


def sinkhorn(
    scores: Tensor,
    groups: Tensor | None = None,
    *,
    iterations: int = DEFAULT_SINKHORN_ITERATIONS,
    tol: float | None = None,
    usage_prior: Tensor | None = None,
) -> Tensor:
    r"""Balanced assignment of each group's rows over the K columns (Sinkhorn-Knopp, log domain).

    For each group `g` (a class) of $n_g$ rows, finds $Q_{bk} = \exp(S_{bk} + u_b + v_{gk})$
    whose rows sum to 1 and whose columns sum to the target usage $n_g \pi_{gk}$: the entropic
    optimal transport of the rows onto the sub-prompts with cost $-S$. $\pi_g$ is uniform
    ($1/K$) by default, or the row of `usage_prior` of the group's class. The updates

    $$
    v_{gk} = \log(n_g \pi_{gk}) - \operatorname{logsumexp}_{b \in g}(S_{bk} + u_b), \qquad
    u_b = -\operatorname{logsumexp}_k(S_{bk} + v_{g(b)k})
    $$

    work on the scores in the log domain (float32, or float64 for float64 input), so a
    sub-prompt that wins every image by a wide margin is still balanced instead of underflowing.
    Each round ends with the row update: rows are on the simplex exactly, columns approach their
    targets. A group of one row gets its prior (uniform by default): balance needs several images
    per class in a batch (class-balanced sampling). No gradient flows.

    The training step runs a fixed number of rounds and never reads a value on the host. `tol`
    is for tests and diagnostics: it stops once every column is within a relative `tol` of its
    target (a device-to-host read per round), with `iterations` as the maximum.

    Args:
        scores: `(batch, K)` logits, e.g. `scale * cosine / tau`.
        groups: `(batch,)` integer group of each row (the class), or `None` for one group.
        iterations: rounds, `>= 1`; with `tol`, the maximum number of rounds.
        tol: stop when $\max_{g,k} |\text{mass}_{gk} - n_g \pi_{gk}| / (n_g \pi_{gk}) \le$ `tol`
            (over targets > 0), or `None` to run exactly `iterations` rounds.
        usage_prior: `(num_classes, K)` target usage of each class (simplex rows), indexed by
            `groups`; with `groups=None`, the mean row is the target. `None`: uniform.

    Returns:
        `(batch, K)` responsibilities in the dtype of `scores`. A NaN score makes its group NaN.

    Examples:
        >>> scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
        >>> sinkhorn(scores).sum(dim=0)
        tensor([2., 2.])
        >>> prior = torch.tensor([[0.75, 0.25]])
        >>> sinkhorn(scores, usage_prior=prior).sum(dim=0)
        tensor([3., 1.])
    """
    check_rank("scores", scores, (2,), "(batch, K)")
    check_subprompts("scores", scores, -1)
    check_int("iterations", iterations, minimum=1)
    if tol is not None:
        tol = check_positive("tol", tol)
    batch, k = scores.shape
    if usage_prior is not None:
        usage_prior = check_usage_prior(usage_prior, k, "scores")
    if groups is not None:
        num_classes = None if usage_prior is None else usage_prior.shape[0]
        groups = check_labels("groups", groups, batch, num_classes)
    if batch == 0:
        return scores.detach().clone()
    with torch.no_grad():
        work = torch.float64 if scores.dtype == torch.float64 else torch.float32
        log_q = scores.detach().to(work)
        group = _dense_groups(groups, batch, scores.device)
        num_groups = batch if groups is not None else 1
        counts = _group_sums(log_q.new_ones(batch), group, num_groups)
        if usage_prior is None:
            target = (counts / k).unsqueeze(1).expand(num_groups, k)
        else:
            rows = _row_prior(usage_prior.detach().to(work), groups, batch)
            target = _group_sums(rows, group, num_groups)
        log_target = target.log()
        log_u = log_q.new_zeros(batch, 1)
        for _ in range(iterations):
            log_v = log_target - _group_logsumexp(log_q + log_u, group, num_groups)
            shifted = log_q + log_v[group]
            log_u = -torch.logsumexp(shifted, dim=-1, keepdim=True)
            if tol is not None and _column_error(shifted + log_u, group, target) <= tol:
                break
        q = (shifted + log_u).exp()
    return q.to(scores.dtype)


def _column_error(log_q: Tensor, groups: Tensor, target: Tensor) -> float:
    """Worst relative gap between a group's column mass and its target (a host read)."""
    mass = _group_sums(log_q.exp(), groups, target.shape[0])
    positive = target > 0
    gap = (mass - target).abs()[positive] / target[positive]
    return float(gap.max()) if gap.numel() else 0.0


def _scores(similarities: Tensor, tau: float, scale: float) -> Tensor:
    """`scale * similarities / tau` in float32 at least, so a small `tau` cannot overflow."""
    ratio = check_score_range(tau, scale)
    work = torch.float64 if similarities.dtype == torch.float64 else torch.float32
    return similarities.to(work) * ratio


def responsibilities_from_similarities(
    similarities: Tensor,
    labels: Tensor | None = None,
    *,
    tau: float = 1.0,
    scale: float = 100.0,
    mode: AssignmentMode = "soft",
    sinkhorn_iterations: int = DEFAULT_SINKHORN_ITERATIONS,
    usage_prior: Tensor | None = None,
) -> Tensor:
    """E-step from precomputed own-class similarities; see `responsibilities`.

    Args:
        similarities: `(batch, K)` cosine of each image to its class's sub-prompts.
        labels: `(batch,)` the class of each image (groups for `"sinkhorn"`), or `None`.
        tau: temperature `> 0`.
        scale: similarity scale `> 0`.
        mode: `"soft"`, `"hard"` or `"sinkhorn"`.
        sinkhorn_iterations: rounds for `"sinkhorn"`.
        usage_prior: `(num_classes, K)` target usage per class for `"sinkhorn"`, or `None`
            for uniform.

    Returns:
        `(batch, K)` rows on the simplex, in the dtype of `similarities`; NaN rows for NaN
        similarities.
    """
    check_rank("similarities", similarities, (2,), "(batch, K)")
    check_subprompts("similarities", similarities, -1)
    check_positive("tau", tau)
    check_positive("scale", scale)
    check_choice("mode", mode, ASSIGNMENT_MODES)
    if usage_prior is not None:
        check_usage_prior(usage_prior, similarities.shape[1], "similarities")
    if usage_prior is not None and mode != "sinkhorn":
        raise ValueError(f'usage_prior is used by mode="sinkhorn" only, but mode is {mode!r}.')
    scores = _scores(similarities, tau, scale)
    if mode == "soft":
        return torch.softmax(scores, dim=-1).to(similarities.dtype)
    if mode == "hard":
        one_hot = F.one_hot(scores.argmax(dim=-1), num_classes=scores.shape[-1])
        # argmax picks a NaN as the winner; keep such a row NaN rather than a finite one-hot.
        finite = torch.isfinite(scores).all(dim=-1, keepdim=True)
        return nan_where(~finite, one_hot.to(similarities.dtype))
    return sinkhorn(
        scores, labels, iterations=sinkhorn_iterations, usage_prior=usage_prior
    ).to(similarities.dtype)


def responsibilities(
    image_features: Tensor,
    subprompt_features: Tensor,
    labels: Tensor | None = None,
    *,
    tau: float = 1.0,
    scale: float = 100.0,
    mode: AssignmentMode = "soft",
    sinkhorn_iterations: int = DEFAULT_SINKHORN_ITERATIONS,
    usage_prior: Tensor | None = None,
) -> Tensor:
    r"""E-step: how much each sub-prompt of an image's class is responsible for the image.

    $$
    \gamma_{bk} = \operatorname{softmax}_k\left(s \cos(x_b, t_{y_b k}) / \tau\right)
    $$

    The similarity scale `s` defaults to 100, CLIP's learned logit scale, so `tau = 1` assigns
    exactly as CLIP's own classifier would score the sub-prompts; `tau < 1` sharpens, `tau > 1`
    softens. CLIP cosines between sub-prompts of one class differ by a few hundredths, so at
    `tau = 0.05` (logit gaps of ~20-100) assignments are effectively hard, at `0.3` still soft.
    The scores are computed in float32 (float64 for float64 input) whatever the input dtype.

    - `"soft"`: the softmax above; it **carries gradient**, so an entropy regulariser on it moves
      the sub-prompts.
    - `"hard"`: one-hot argmax of the soft responsibilities (no gradient).
    - `"sinkhorn"`: balanced assignment of each class's images over its sub-prompts, towards a
      uniform usage or `usage_prior` (`sinkhorn`, no gradient).

    Args:
        image_features: `(batch, dim)`.
        subprompt_features: `(num_classes, K, dim)` indexed by `labels`, or `(batch, K, dim)`
            already gathered per image when `labels` is `None`.
        labels: `(batch,)` integer class of each image, or `None`.
        tau: temperature `> 0`.
        scale: similarity scale `s > 0`.
        mode: `"soft"`, `"hard"` or `"sinkhorn"`.
        sinkhorn_iterations: rounds for `"sinkhorn"`, `>= 1`.
        usage_prior: `(num_classes, K)` target usage per class for `"sinkhorn"`, or `None`.

    Returns:
        `(batch, K)` non-negative rows summing to 1 (NaN rows for NaN features).

    Examples:
        >>> images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> prompts = torch.eye(2).unsqueeze(0)  # one class, K=2 orthogonal sub-prompts
        >>> responsibilities(images, prompts, torch.tensor([0, 0]), tau=1.0, scale=1.0)
        tensor([[0.7311, 0.2689],
                [0.2689, 0.7311]])
        >>> responsibilities(images, prompts, torch.tensor([0, 0]), mode="hard")
        tensor([[1., 0.],
                [0., 1.]])
    """
    similarities = own_class_similarities(image_features, subprompt_features, labels)
    return responsibilities_from_similarities(
        similarities,
        labels,
        tau=tau,
        scale=scale,
        mode=mode,
        sinkhorn_iterations=sinkhorn_iterations,
        usage_prior=usage_prior,
    )
