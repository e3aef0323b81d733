"""The maths of promptmix as pure functions; the modules are thin, validated wrappers around them.

Shapes use ``B`` for the batch, ``C`` for classes, ``K`` for sub-prompts per class and ``D`` for the
embedding dimension. Every function accepts raw (unnormalised) features and normalises internally;
a zero vector gives zeros and a zero gradient, never NaN, in every dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor

from promptmix._validation import (
    check_choice,
    check_int,
    check_labels,
    check_positive,
    check_rank,
    check_simplex,
    check_subprompts,
)

Reduction = Literal["mean", "sum", "none"]
EntropyMode = Literal["sample", "marginal", "mutual_information"]
AssignmentMode = Literal["soft", "hard", "sinkhorn"]
Aggregation = Literal["logsumexp", "max", "mean", "responsibility"]
ScheduleKind = Literal["linear", "cosine", "exponential"]

REDUCTIONS = ("mean", "sum", "none")
ENTROPY_MODES = ("sample", "marginal", "mutual_information")
ASSIGNMENT_MODES = ("soft", "hard", "sinkhorn")
AGGREGATIONS = ("logsumexp", "max", "mean", "responsibility")
SCHEDULE_KINDS = ("linear", "cosine", "exponential")

SUBPROMPT_SHAPE = "(num_classes, K, dim)"


def connected_zero(*tensors: Tensor) -> Tensor:
    """A scalar zero that is part of the graph of ``tensors``, so ``backward()`` never fails.

    Examples:
        >>> x = torch.ones(2, 3, requires_grad=True)
        >>> zero = connected_zero(x)
        >>> zero.backward(); zero.item(), x.grad.abs().sum().item()
        (0.0, 0.0)
    """
    return sum((t * 0).sum() for t in tensors)  # type: ignore[return-value]


def _unit(features: Tensor) -> Tensor:
    """L2-normalise the last dimension; a zero vector maps to zero, with zero gradient.

    Not ``F.normalize``: its ``eps = 1e-12`` rounds to 0 in float16 (a zero vector gives
    ``0 / 0 = NaN``), and any ``eps`` gives a zero vector the gradient ``1 / eps``, which
    overflows float16 and is ~1e12 in float32. A zero vector has no direction to move along.
    """
    norm = torch.linalg.vector_norm(features, dim=-1, keepdim=True)
    nonzero = norm > 0
    unit = features / torch.where(nonzero, norm, torch.ones_like(norm))
    return torch.where(nonzero, unit, torch.zeros_like(unit))


def pairwise_cosine(subprompt_features: Tensor) -> Tensor:
    """Cosine similarity between every pair of a class's sub-prompts.

    Args:
        subprompt_features: ``(num_classes, K, dim)`` sub-prompt features, normalised or not.

    Returns:
        ``(num_classes, K, K)`` cosine similarities; the diagonal is 1 (0 for a zero vector).

    Examples:
        >>> pairwise_cosine(torch.eye(2).unsqueeze(0))
        tensor([[[1., 0.],
                 [0., 1.]]])
    """
    check_rank("subprompt_features", subprompt_features, (3,), SUBPROMPT_SHAPE)
    check_subprompts("subprompt_features", subprompt_features, 1)
    normed = _unit(subprompt_features)
    return einsum(normed, normed, "c i d, c j d -> c i j")


def diversity_loss(
    subprompt_features: Tensor,
    *,
    power: float = 2.0,
    margin: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Mean penalised pairwise cosine between each class's sub-prompts.

    .. math::
        L = \frac{1}{C} \sum_c \frac{2}{K(K-1)} \sum_{i<j}
            \max\left(0, |\cos(t_{ci}, t_{cj})| - m\right)^p

    With the defaults (``p = 2``, ``m = 0``) this is the mean squared cosine: identical sub-prompts
    give 1, mutually orthogonal ones give 0. Similarities with ``|cos| <= margin`` cost nothing.

    Args:
        subprompt_features: ``(num_classes, K, dim)``.
        power: exponent ``p >= 1`` applied to the penalised similarity.
        margin: ``m`` in ``[0, 1)``, the similarity below which pairs are not penalised.
        reduction: ``"mean"`` or ``"sum"`` over classes, or ``"none"`` for ``(num_classes,)``.

    Returns:
        A scalar, or ``(num_classes,)`` with ``reduction="none"``. ``K == 1`` (no pairs) or no
        classes give zeros that are still connected to the graph.

    Examples:
        >>> same = torch.ones(1, 3, 4)
        >>> diversity_loss(same)
        tensor(1.)
        >>> diversity_loss(torch.eye(3).unsqueeze(0))
        tensor(0.)
    """
    cosine = pairwise_cosine(subprompt_features)
    check_choice("reduction", reduction, REDUCTIONS)
    num_classes, k = subprompt_features.shape[:2]
    if k < 2 or num_classes == 0:
        per_class = subprompt_features.sum(dim=(1, 2)) * 0
    else:
        rows, cols = torch.triu_indices(k, k, offset=1, device=cosine.device)
        pairs = cosine[:, rows, cols]
        per_class = F.relu(pairs.abs() - margin).pow(power).mean(dim=-1)
    if reduction == "none":
        return per_class
    if num_classes == 0:
        return connected_zero(subprompt_features)
    return per_class.mean() if reduction == "mean" else per_class.sum()


def entropy(probabilities: Tensor, dim: int = -1) -> Tensor:
    r"""Shannon entropy in nats, :math:`H(p) = -\sum_k p_k \log p_k`, safe at ``p_k = 0``.

    The logarithm is taken of ``p`` clamped to the dtype's smallest normal number, so zero
    probabilities contribute exactly 0 with a finite gradient (``p log p`` would give NaN).

    Args:
        probabilities: ``(..., K)`` distributions along ``dim``.
        dim: the dimension that holds the distribution.

    Returns:
        ``(...)``: the entropy of each distribution, between 0 and ``log K``.

    Examples:
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    tiny = torch.finfo(probabilities.dtype).tiny
    # ``0.0 - x`` rather than ``-x``: a certain distribution reads 0., not -0.
    return 0.0 - (probabilities * probabilities.clamp_min(tiny).log()).sum(dim=dim)


def class_mean_responsibilities(
    responsibilities: Tensor, labels: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean responsibility of each class present in the batch.

    Args:
        responsibilities: ``(batch, K)``.
        labels: ``(batch,)`` integer classes, or ``None`` for a single class ``0``.

    Returns:
        ``(classes, means, counts)``: the sorted classes present ``(num_present,)``, their mean
        assignments ``(num_present, K)`` and their numbers of images ``(num_present,)``.

    Examples:
        >>> gamma = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        >>> classes, means, counts = class_mean_responsibilities(gamma, torch.tensor([3, 3, 1]))
        >>> classes, means, counts
        (tensor([1, 3]), tensor([[1.0000, 0.0000],
                [0.5000, 0.5000]]), tensor([1., 2.]))
    """
    if labels is None:
        labels = torch.zeros(
            len(responsibilities), dtype=torch.long, device=responsibilities.device
        )
    classes, groups = torch.unique(labels, return_inverse=True)
    sums = responsibilities.new_zeros(len(classes), responsibilities.shape[1])
    sums = sums.index_add(0, groups, responsibilities)
    counts = torch.bincount(groups, minlength=len(classes)).to(responsibilities.dtype)
    return classes, sums / counts.unsqueeze(1), counts


def _blended_class_means(
    responsibilities: Tensor,
    labels: Tensor | None,
    usage_prior: Tensor | None,
    prior_count: float,
) -> Tensor:
    """Per class in the batch, ``(sum_b gamma_b + n0 * u_c) / (n_c + n0)``: ``(num_present, K)``."""
    classes, means, counts = class_mean_responsibilities(responsibilities, labels)
    if usage_prior is None or prior_count == 0:
        return means
    prior = usage_prior.detach().to(means.dtype)
    prior = prior[classes] if labels is not None else prior.mean(dim=0, keepdim=True)
    weight = (counts / (counts + prior_count)).unsqueeze(1)
    return weight * means + (1 - weight) * prior


def assignment_entropy(
    responsibilities: Tensor,
    labels: Tensor | None = None,
    *,
    mode: EntropyMode = "sample",
    normalize: bool = False,
    usage_prior: Tensor | None = None,
    prior_count: float = 0.0,
) -> Tensor:
    r"""Entropy of sub-prompt assignments, in nats; a regulariser *maximises* it.

    - ``"sample"``: :math:`\frac{1}{B}\sum_b H(\gamma_b)`, every image spread over sub-prompts.
    - ``"marginal"``: for each class ``c`` in the batch, :math:`H(\bar\gamma_c)` of the class's mean
      assignment, averaged over classes: spreads *usage* without making each image uncertain.
    - ``"mutual_information"``: per class, :math:`H(\bar\gamma_c) - \frac{1}{n_c}\sum_{b \in c}
      H(\gamma_b)`, averaged over classes: spread usage, confident images. Without a usage prior
      it is a mutual information, so it lies in ``[0, log K]``.

    A class with few images in a batch has a noisy mean (with one image the marginal entropy *is*
    the sample entropy). ``usage_prior`` fixes that: the class mean becomes
    :math:`(\sum_{b \in c} \gamma_b + n_0 u_c) / (n_c + n_0)` with a running usage estimate
    :math:`u_c` (treated as a constant) worth ``prior_count`` = :math:`n_0` images. The gradient
    then still pushes the batch's images toward the sub-prompts the class under-uses.

    Args:
        responsibilities: ``(batch, K)`` rows on the probability simplex.
        labels: ``(batch,)`` integer class of each image; ``None`` treats the batch as one class.
        mode: ``"sample"``, ``"marginal"`` or ``"mutual_information"``.
        normalize: divide by ``log K`` so the value lies in ``[0, 1]``.
        usage_prior: ``(num_classes, K)`` running usage per class (simplex rows), or ``None``.
        prior_count: weight ``n_0 >= 0`` of the prior, in images.

    Returns:
        A scalar. An empty batch or ``K == 1`` gives a graph-connected zero.

    Examples:
        >>> uniform = torch.full((4, 2), 0.5)
        >>> assignment_entropy(uniform, normalize=True)
        tensor(1.)
        >>> one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> assignment_entropy(one_hot), assignment_entropy(one_hot, mode="marginal")
        (tensor(0.), tensor(0.6931))
    """
    check_rank("responsibilities", responsibilities, (2,), "(batch, K)")
    check_subprompts("responsibilities", responsibilities, -1)
    check_choice("mode", mode, ENTROPY_MODES)
    batch, k = responsibilities.shape
    num_classes = None
    if usage_prior is not None:
        check_rank("usage_prior", usage_prior, (2,), "(num_classes, K)")
        if usage_prior.shape[1] != k:
            raise ValueError(
                f"usage_prior must have shape (num_classes, {k}) to match responsibilities "
                f"but has shape {tuple(usage_prior.shape)}."
            )
        num_classes = usage_prior.shape[0]
    if labels is not None:
        check_labels("labels", labels, batch, num_classes)
    check_positive("prior_count", prior_count, allow_zero=True)
    check_simplex("responsibilities", responsibilities)
    if batch == 0 or k == 1:
        return connected_zero(responsibilities)

    value = responsibilities.new_zeros(())
    if mode in ("marginal", "mutual_information"):
        class_means = _blended_class_means(responsibilities, labels, usage_prior, prior_count)
        value = value + entropy(class_means).mean()
    if mode == "sample":
        value = value + entropy(responsibilities).mean()
    if mode == "mutual_information":
        # Per class, I(image; sub-prompt) = H(mean gamma) - mean H(gamma_b) >= 0 (Jensen); the
        # sample entropies are averaged within each class, as the marginal ones are.
        sample = entropy(responsibilities).unsqueeze(1)
        value = value - class_mean_responsibilities(sample, labels)[1].mean()
    return value / math.log(k) if normalize else value


def subprompt_similarities(image_features: Tensor, subprompt_features: Tensor) -> Tensor:
    """Cosine similarity of every image to every sub-prompt of every class.

    Args:
        image_features: ``(batch, dim)``.
        subprompt_features: ``(num_classes, K, dim)``.

    Returns:
        ``(batch, num_classes, K)``.

    Examples:
        >>> subprompt_similarities(torch.ones(5, 8), torch.ones(3, 2, 8)).shape
        torch.Size([5, 3, 2])
    """
    _check_features(image_features, subprompt_features)
    images = _unit(image_features)
    prompts = _unit(subprompt_features)
    return einsum(images, prompts.to(images.dtype), "b d, c k d -> b c k")


def own_class_similarities(
    image_features: Tensor, subprompt_features: Tensor, labels: Tensor | None = None
) -> Tensor:
    """Cosine similarity of each image to the K sub-prompts of its own class.

    Args:
        image_features: ``(batch, dim)``.
        subprompt_features: ``(num_classes, K, dim)`` with ``labels``, or ``(batch, K, dim)``
            already gathered per image when ``labels`` is ``None``.
        labels: ``(batch,)`` integer class of each image, or ``None``.

    Returns:
        ``(batch, K)``.
    """
    _check_features(image_features, subprompt_features)
    batch = image_features.shape[0]
    if labels is None:
        if subprompt_features.shape[0] != batch:
            raise ValueError(
                f"subprompt_features must have shape ({batch}, K, dim) (gathered per image) when "
                f"labels is None, but has shape {tuple(subprompt_features.shape)}; pass labels to "
                "index a (num_classes, K, dim) table."
            )
        gathered = subprompt_features
    else:
        check_labels("labels", labels, batch, subprompt_features.shape[0])
        gathered = subprompt_features[labels]
    images = _unit(image_features)
    prompts = _unit(gathered).to(images.dtype)
    return einsum(images, prompts, "b d, b k d -> b k")


def _check_features(image_features: Tensor, subprompt_features: Tensor) -> None:
    """Ranks, ``K >= 1`` and a shared feature dimension of images and sub-prompts."""
    check_rank("image_features", image_features, (2,), "(batch, dim)")
    check_rank("subprompt_features", subprompt_features, (3,), SUBPROMPT_SHAPE)
    check_subprompts("subprompt_features", subprompt_features, 1)
    if image_features.shape[-1] != subprompt_features.shape[-1]:
        raise ValueError(
            f"image_features and subprompt_features must share the last dimension, but "
            f"image_features has dim {image_features.shape[-1]} and subprompt_features has "
            f"dim {subprompt_features.shape[-1]}."
        )


def sinkhorn(scores: Tensor, groups: Tensor | None = None, *, iterations: int = 3) -> Tensor:
    """Balanced (equipartitioned) assignment of each group's rows over the K columns.

    Sinkhorn-Knopp as in SwAV: starting from ``softmax(scores)``, alternately make every column of
    a group sum to the same mass and every row sum to 1. The result has rows on the simplex and,
    within each group, sub-prompt usage close to uniform. A group of one row ends uniform: balance
    needs several images per class in a batch (class-balanced sampling). No gradient flows.

    Args:
        scores: ``(batch, K)`` logits, e.g. ``scale * cosine / tau``.
        groups: ``(batch,)`` integer group of each row (the class), or ``None`` for one group.
        iterations: number of column/row normalisation rounds, ``>= 1``.

    Returns:
        ``(batch, K)`` responsibilities.

    Examples:
        >>> scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
        >>> sinkhorn(scores, iterations=20).sum(dim=0).round()
        tensor([2., 2.])
    """
    check_rank("scores", scores, (2,), "(batch, K)")
    check_int("iterations", iterations, minimum=1)
    if groups is None:
        groups = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
    else:
        check_labels("groups", groups, len(scores), None)
    with torch.no_grad():
        q = torch.softmax(scores.float(), dim=-1)
        _, inverse = torch.unique(groups, return_inverse=True)
        tiny = torch.finfo(q.dtype).tiny
        for _ in range(iterations):
            column_mass = q.new_zeros(int(inverse.max()) + 1 if len(q) else 0, q.shape[1])
            column_mass = column_mass.index_add(0, inverse, q)[inverse]
            q = q / column_mass.clamp_min(tiny)
            q = q / q.sum(dim=-1, keepdim=True).clamp_min(tiny)
    return q.to(scores.dtype)


def responsibilities_from_similarities(
    similarities: Tensor,
    labels: Tensor | None = None,
    *,
    tau: float = 1.0,
    scale: float = 100.0,
    mode: AssignmentMode = "soft",
    sinkhorn_iterations: int = 3,
) -> Tensor:
    """E-step from precomputed own-class similarities; see :func:`responsibilities`.

    Args:
        similarities: ``(batch, K)`` cosine of each image to its class's sub-prompts.
        labels: ``(batch,)`` the class of each image (groups for ``"sinkhorn"``), or ``None``.
        tau: temperature ``> 0``.
        scale: similarity scale ``> 0``.
        mode: ``"soft"``, ``"hard"`` or ``"sinkhorn"``.
        sinkhorn_iterations: rounds for ``"sinkhorn"``.

    Returns:
        ``(batch, K)`` rows on the simplex.
    """
    check_rank("similarities", similarities, (2,), "(batch, K)")
    check_subprompts("similarities", similarities, -1)
    check_positive("tau", tau)
    check_positive("scale", scale)
    check_choice("mode", mode, ASSIGNMENT_MODES)
    scores = similarities * (scale / tau)
    if mode == "soft":
        return torch.softmax(scores, dim=-1)
    if mode == "hard":
        one_hot = F.one_hot(scores.argmax(dim=-1), num_classes=scores.shape[-1])
        return one_hot.to(similarities.dtype)
    return sinkhorn(scores, labels, iterations=sinkhorn_iterations)


def responsibilities(
    image_features: Tensor,
    subprompt_features: Tensor,
    labels: Tensor | None = None,
    *,
    tau: float = 1.0,
    scale: float = 100.0,
    mode: AssignmentMode = "soft",
    sinkhorn_iterations: int = 3,
) -> Tensor:
    r"""E-step: how much each sub-prompt of an image's class is responsible for the image.

    .. math::
        \gamma_{bk} = \operatorname{softmax}_k\left(s \cos(x_b, t_{y_b k}) / \tau\right)

    The similarity scale ``s`` defaults to 100, CLIP's learned logit scale, so ``tau = 1`` assigns
    exactly as CLIP's own classifier would score the sub-prompts; ``tau < 1`` sharpens, ``tau > 1``
    softens. CLIP cosines between sub-prompts of one class differ by a few hundredths, so at
    ``tau = 0.05`` (logit gaps of ~20-100) assignments are effectively hard, at ``0.3`` still soft.

    - ``"soft"``: the softmax above; it **carries gradient**, so an entropy regulariser on it moves
      the sub-prompts.
    - ``"hard"``: one-hot argmax of the soft responsibilities (no gradient).
    - ``"sinkhorn"``: balanced assignment of each class's images over its sub-prompts
      (:func:`sinkhorn`, no gradient).

    Args:
        image_features: ``(batch, dim)``.
        subprompt_features: ``(num_classes, K, dim)`` indexed by ``labels``, or ``(batch, K, dim)``
            already gathered per image when ``labels`` is ``None``.
        labels: ``(batch,)`` integer class of each image, or ``None``.
        tau: temperature ``> 0``.
        scale: similarity scale ``s > 0``.
        mode: ``"soft"``, ``"hard"`` or ``"sinkhorn"``.
        sinkhorn_iterations: rounds for ``"sinkhorn"``, ``>= 1``.

    Returns:
        ``(batch, K)`` non-negative rows summing to 1.

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
    )


def class_logits(
    similarities: Tensor,
    *,
    logit_scale: float | Tensor = 100.0,
    aggregation: Aggregation = "logsumexp",
    tau: float = 1.0,
    assigner_scale: float = 100.0,
) -> Tensor:
    r"""Classification logits that pool each class's K sub-prompt similarities.

    - ``"logsumexp"`` (default): :math:`\log \frac{1}{K} \sum_k e^{s \cos_{bck}}`, the
      log-likelihood of a uniform mixture of the K sub-prompts. Cross-entropy on it is the
      mixture's negative log-likelihood; each sub-prompt gets gradient in proportion to its
      posterior (a built-in E-step); it is smooth, and equals CoOp's logit exactly when
      ``K == 1`` or the sub-prompts agree.
    - ``"max"``: :math:`s \max_k \cos_{bck}`: only the best sub-prompt gets gradient.
    - ``"mean"``: :math:`s \frac{1}{K}\sum_k \cos_{bck}`: the averaged prompt ensemble.
    - ``"responsibility"``: :math:`s \sum_k \gamma_{bck} \cos_{bck}` with weights
      ``softmax(assigner_scale * cos / tau)`` treated as constants (an E-step).

    Args:
        similarities: ``(batch, num_classes, K)`` cosines from :func:`subprompt_similarities`.
        logit_scale: ``s``, a positive float or a 0-dim tensor (e.g. CLIP's ``logit_scale.exp()``).
        aggregation: ``"logsumexp"``, ``"max"``, ``"mean"`` or ``"responsibility"``.
        tau: temperature of the ``"responsibility"`` weights.
        assigner_scale: similarity scale of the ``"responsibility"`` weights.

    Returns:
        ``(batch, num_classes)`` logits.

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
    if not isinstance(logit_scale, Tensor):
        check_positive("logit_scale", logit_scale)
    scaled = similarities * logit_scale
    if aggregation == "logsumexp":
        return torch.logsumexp(scaled, dim=-1) - math.log(similarities.shape[-1])
    if aggregation == "max":
        return scaled.amax(dim=-1)
    if aggregation == "mean":
        return scaled.mean(dim=-1)
    check_positive("tau", tau)
    weights = torch.softmax(similarities.detach() * (assigner_scale / tau), dim=-1)
    return (weights * scaled).sum(dim=-1)


def temperature_at(
    step: int,
    *,
    start: float = 1.0,
    end: float = 0.3,
    total_steps: int,
    kind: ScheduleKind = "linear",
    warmup_steps: int = 0,
) -> float:
    r"""The annealed temperature after ``step`` steps.

    ``tau`` stays at ``start`` for ``warmup_steps``, then moves monotonically to ``end`` at
    ``total_steps`` and stays there. With progress :math:`t \in [0, 1]`:
    linear :math:`\tau_0 + (\tau_1 - \tau_0) t`, cosine
    :math:`\tau_1 + (\tau_0 - \tau_1)\frac{1 + \cos \pi t}{2}`, exponential
    :math:`\tau_0 (\tau_1 / \tau_0)^t`.

    Args:
        step: number of steps taken, ``>= 0``.
        start: ``tau`` at step 0, ``> 0``.
        end: ``tau`` from ``total_steps`` on, ``> 0``.
        total_steps: step at which ``end`` is reached, ``>= 1``.
        kind: ``"linear"``, ``"cosine"`` or ``"exponential"``.
        warmup_steps: steps held at ``start``, in ``[0, total_steps)``.

    Returns:
        ``tau`` as a Python float: exactly ``start`` at step 0, exactly ``end`` at ``total_steps``.

    Examples:
        >>> [round(temperature_at(s, start=1.0, end=0.3, total_steps=4), 3) for s in range(6)]
        [1.0, 0.825, 0.65, 0.475, 0.3, 0.3]
    """
    check_int("step", step, minimum=0)
    start = check_positive("start", start)
    end = check_positive("end", end)
    check_int("total_steps", total_steps, minimum=1)
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_choice("kind", kind, SCHEDULE_KINDS)
    if warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps) = [0, {total_steps}) but is {warmup_steps}."
        )
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    if progress <= 0:
        return start
    if progress >= 1:
        return end
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
    return start * math.exp(progress * math.log(end / start))


__all__ = [
    "assignment_entropy",
    "class_logits",
    "class_mean_responsibilities",
    "connected_zero",
    "diversity_loss",
    "entropy",
    "own_class_similarities",
    "pairwise_cosine",
    "responsibilities",
    "responsibilities_from_similarities",
    "sinkhorn",
    "subprompt_similarities",
    "temperature_at",
]
