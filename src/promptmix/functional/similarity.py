"""Cosine similarities between images and sub-prompts, and the class logits that pool them."""

from __future__ import annotations

import math

import torch
from einops import einsum
from torch import Tensor

from promptmix._validation import (
    as_subprompts,
    check_choice,
    check_labels,
    check_logit_scale,
    check_positive,
    check_rank,
    check_score_range,
    check_subprompts,
    clamp_labels,
    labels_out_of_range,
    nan_where,
    reads_host,
)
from promptmix.functional._common import (
    AGGREGATIONS,
    DEFAULT_LOGIT_SCALE,
    DEFAULT_TAU,
    Aggregation,
    _unit,
)

__all__ = [
    "class_logits",
    "own_class_similarities",
    "pairwise_cosine",
    "subprompt_similarities",
]


def pairwise_cosine(subprompt_features: Tensor) -> Tensor:
    """Cosine similarity between every pair of a class's sub-prompts.

    Args:
        subprompt_features: `(num_classes, K, dim)` sub-prompt features, normalised or not
            (`(num_classes, dim)`: `K = 1`).

    Returns:
        `(num_classes, K, K)` cosine similarities; the diagonal is 1 (0 for a zero vector).

    Examples:
        >>> pairwise_cosine(torch.eye(2).unsqueeze(0))
        tensor([[[1., 0.],
                 [0., 1.]]])
    """
    normed = _unit(as_subprompts("subprompt_features", subprompt_features))
    return einsum(normed, normed, "c i d, c j d -> c i j")


def subprompt_similarities(image_features: Tensor, subprompt_features: Tensor) -> Tensor:
    """Cosine similarity of every image to every sub-prompt of every class.

    Args:
        image_features: `(batch, dim)`.
        subprompt_features: `(num_classes, K, dim)` (`(num_classes, dim)`: `K = 1`).

    Returns:
        `(batch, num_classes, K)`.

    Examples:
        >>> subprompt_similarities(torch.ones(5, 8), torch.ones(3, 2, 8)).shape
        torch.Size([5, 3, 2])
        >>> subprompt_similarities(torch.ones(5, 8), torch.ones(3, 8)).shape  # one prompt each
        torch.Size([5, 3, 1])
    """
    subprompt_features = _check_features(image_features, subprompt_features)
    images = _unit(image_features)
    prompts = _unit(subprompt_features)
    return einsum(images, prompts.to(images.dtype), "b d, c k d -> b c k")


def own_class_similarities(
    image_features: Tensor, subprompt_features: Tensor, labels: Tensor | None = None
) -> Tensor:
    """Cosine similarity of each image to the K sub-prompts of its own class.

    Args:
        image_features: `(batch, dim)`.
        subprompt_features: `(num_classes, K, dim)` with `labels`, or `(batch, K, dim)`
            already gathered per image when `labels` is `None` (`(rows, dim)`: `K = 1`).
        labels: `(batch,)` integer class of each image, or `None`.

    Returns:
        `(batch, K)`; a row is NaN where its features hold NaN or inf, or (on tensors whose
        values are not read on the host, see `docs/reliability.md`) its label is out of range.
    """
    subprompt_features = _check_features(image_features, subprompt_features)
    batch = image_features.shape[0]
    invalid: Tensor | None = None
    if labels is None:
        if subprompt_features.shape[0] != batch:
            raise ValueError(
                f"subprompt_features must have shape ({batch}, K, dim) (gathered per image) when "
                f"labels is None, but has shape {tuple(subprompt_features.shape)}; pass labels to "
                "index a (num_classes, K, dim) table."
            )
        gathered = subprompt_features
    else:
        num_classes = subprompt_features.shape[0]
        labels = check_labels("labels", labels, batch, num_classes)
        invalid = None if reads_host(labels) else labels_out_of_range(labels, num_classes)
        if invalid is not None:
            labels = clamp_labels(labels, num_classes)
        gathered = subprompt_features[labels]
    images = _unit(image_features)
    prompts = _unit(gathered).to(images.dtype)
    similarities = einsum(images, prompts, "b d, b k d -> b k")
    if invalid is not None:
        similarities = nan_where(invalid.unsqueeze(1), similarities)
    return similarities


def _check_features(image_features: Tensor, subprompt_features: Tensor) -> Tensor:
    """Ranks, `K >= 1` and a shared feature dimension; the sub-prompts as `(C, K, D)`."""
    check_rank("image_features", image_features, (2,), "(batch, dim)")
    prompts = as_subprompts("subprompt_features", subprompt_features)
    if image_features.shape[-1] != prompts.shape[-1]:
        raise ValueError(
            f"image_features and subprompt_features must share the last dimension, but "
            f"image_features has dim {image_features.shape[-1]} and subprompt_features has "
            f"dim {subprompt_features.shape[-1]}."
        )
    return prompts


def class_logits(
    similarities: Tensor,
    *,
    logit_scale: float | Tensor = DEFAULT_LOGIT_SCALE,
    aggregation: Aggregation = "logsumexp",
    tau: float = DEFAULT_TAU,
    assignment_logit_scale: float = DEFAULT_LOGIT_SCALE,
) -> Tensor:
    r"""Classification logits that pool each class's K sub-prompt similarities.

    - `"logsumexp"` (default): $\log \frac{1}{K} \sum_k e^{s \cos_{bck}}$, the
      log-likelihood of a uniform mixture of the K sub-prompts. Cross-entropy on it is the
      mixture's negative log-likelihood; each sub-prompt gets gradient in proportion to its
      posterior (a built-in E-step); it is smooth, and equals CoOp's logit exactly when
      `K == 1` or the sub-prompts agree.
    - `"max"`: $s \max_k \cos_{bck}$: only the best sub-prompt gets gradient.
    - `"mean"`: $s \frac{1}{K}\sum_k \cos_{bck}$: the averaged prompt ensemble.
    - `"responsibility"`: $s \sum_k \gamma_{bck} \cos_{bck}$ with weights
      `softmax(assignment_logit_scale * cos / tau)` treated as constants (an E-step).

    Args:
        similarities: `(batch, num_classes, K)` cosines from `subprompt_similarities`.
        logit_scale: `s`, a positive float or a tensor of shape `()` or `(1,)` (e.g. CLIP's
            `logit_scale.exp()`), finite and positive: checked where its value can be read on
            the host for free (CPU), NaN logits otherwise.
        aggregation: `"logsumexp"`, `"max"`, `"mean"` or `"responsibility"`.
        tau: temperature of the `"responsibility"` weights.
        assignment_logit_scale: the E-step's cosine-to-logit factor for the `"responsibility"`
            weights (the `logit_scale` of `SoftEMAssigner`), distinct from the classifier's.

    Returns:
        `(batch, num_classes)` logits.

    Examples:
        >>> sims = torch.tensor([[[0.5, 0.5], [0.1, 0.3]]])
        >>> class_logits(sims, logit_scale=10.0, aggregation="max")
        tensor([[5., 3.]])
        >>> class_logits(sims, logit_scale=10.0)
        tensor([[5.0000, 2.4338]])
    """
    check_rank("similarities", similarities, (3,), "(batch, num_classes, K)")
    check_subprompts("similarities", similarities, -1)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    logit_scale = check_logit_scale(logit_scale)
    scaled = similarities * logit_scale
    if aggregation == "logsumexp":
        return torch.logsumexp(scaled, dim=-1) - math.log(similarities.shape[-1])
    if aggregation == "max":
        return scaled.amax(dim=-1)
    if aggregation == "mean":
        return scaled.mean(dim=-1)
    check_positive("tau", tau)
    check_positive("assignment_logit_scale", assignment_logit_scale)
    ratio = check_score_range(tau, assignment_logit_scale)
    weights = torch.softmax(similarities.detach().float() * ratio, dim=-1).to(scaled.dtype)
    return (weights * scaled).sum(dim=-1)

