"""The E-step: responsibilities of a class's sub-prompts for its images, soft, hard or balanced."""

from __future__ import annotations

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
    check_subprompts,
    nan_where,
)
from promptmix.functional._common import (
    ASSIGNMENT_MODES,
    DEFAULT_LOGIT_SCALE,
    DEFAULT_TAU,
    AssignmentMode,
    _dense_groups,
    _group_sums,
)
from promptmix.functional.similarity import own_class_similarities
from promptmix.functional.usage import _check_usage_prior

__all__ = [
    "DEFAULT_SINKHORN_ITERATIONS",
    "responsibilities",
    "responsibilities_from_similarities",
    "sinkhorn",
]

#: Sinkhorn rounds, then Newton steps, in the training step. Chosen from
#: `benchmarks/sinkhorn_iterations.py`: together the fewest that bring every class's usage within
#: 1 % of its target in all of its cases at `scale / tau` up to 333 (K = 2 to 16, 2 to 32 images
#: per class, one sub-prompt winning every image, skewed usage priors); plain Sinkhorn needs ~160
#: rounds there.
DEFAULT_SINKHORN_ITERATIONS = 20
DEFAULT_NEWTON_STEPS = 10
#: Step sizes tried along each Newton direction; each class keeps the best for its dual (0
#: included), so a step never makes it worse.
_NEWTON_STEP_SIZES = (1.0, 0.5, 0.25, 0.125, 0.0)
#: Largest move of a potential in one Newton step (in units of the scores).
_NEWTON_MAX_MOVE = 30.0


def _row_prior(usage_prior: Tensor, labels: Tensor | None, batch: int) -> Tensor:
    """`(batch, K)`: the usage prior of each row's class; the mean row when `labels` is None."""
    if labels is None:
        return usage_prior.mean(dim=0, keepdim=True).expand(batch, -1)
    return usage_prior[labels]


def _work_dtype(tensor: Tensor) -> torch.dtype:
    """float64 for the potentials (tiny tensors; float32 stalls at ~0.5 % error), except where
    the device has no float64 (MPS)."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def sinkhorn(
    scores: Tensor,
    groups: Tensor | None = None,
    usage_prior: Tensor | None = None,
    *,
    sinkhorn_iterations: int = DEFAULT_SINKHORN_ITERATIONS,
    newton_steps: int = DEFAULT_NEWTON_STEPS,
    tol: float | None = None,
) -> Tensor:
    r"""Balanced assignment of each group's rows over the K columns (entropic optimal transport).

    For each group `g` (a class) of $n_g$ rows, finds $Q_{bk} = \operatorname{softmax}_k(S_{bk}
    + v_{gk})$, rows on the simplex, whose columns sum to the target usage $n_g \pi_{gk}$:
    the entropic optimal transport of the rows onto the sub-prompts with cost $-S$ (the fixed
    point of Sinkhorn-Knopp). $\pi_g$ is uniform ($1/K$) by default, or the row of
    `usage_prior` of the group's class. The column potentials $v$ live in the log domain and
    every row is recomputed from the scores, so a sub-prompt that wins every image by a wide
    margin is still balanced instead of underflowing to exact zeros.

    1. `sinkhorn_iterations` Sinkhorn rounds, $v_{gk} \mathrel{+}= \log(n_g \pi_{gk}) -
       \log \sum_{b \in g} Q_{bk}$;
    2. `newton_steps` Newton steps on the concave dual
       $F_g(v) = \sum_k n_g \pi_{gk} v_k - \sum_{b \in g} \operatorname{logsumexp}_k(S_{bk} + v_k)$,
       whose gradient is the column error; of the step sizes 1, 1/2, 1/4, 1/8 and 0 each class
       keeps the one with the highest $F_g$, so a step never makes it worse.

    Sinkhorn alone converges slowly when `scale / tau` is large (~160 rounds for 1 % at the
    defaults); the Newton steps finish in a few. The potentials are float64 (float32 on MPS). A
    group of one row gets its prior (uniform by default): balance needs several images per
    class in a batch (class-balanced sampling). No gradient flows.

    The training step runs a fixed number of rounds and never reads a value on the host: no
    device-to-host synchronisation. `tol` is for tests and diagnostics: it stops as soon as every
    column is within a relative `tol` of its target (a host read per round), with
    `sinkhorn_iterations` and `newton_steps` as maxima.

    Args:
        scores: `(batch, K)` logits, e.g. `logit_scale * cosine / tau`.
        groups: `(batch,)` integer group of each row (the class), or `None` for one group.
        usage_prior: `(num_classes, K)` target usage of each class (simplex rows), indexed by
            `groups`; with `groups=None`, the mean row is the target. `None`: uniform.
        sinkhorn_iterations: Sinkhorn rounds, `>= 1`; with `tol`, a maximum.
        newton_steps: Newton steps after them, `>= 0`; with `tol`, a maximum.
        tol: stop when $\max_{g,k} |\text{mass}_{gk} - n_g \pi_{gk}| / (n_g \pi_{gk}) \le$ `tol`
            (over targets > 0), or `None` to run every round and step.

    Returns:
        `(batch, K)` responsibilities in the dtype of `scores`. A NaN score makes every row of
        its group NaN (the rows of a group are coupled), not only its own.

    Examples:
        >>> scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
        >>> sinkhorn(scores).sum(dim=0).round(decimals=4)
        tensor([2., 2.])
        >>> prior = torch.tensor([[0.75, 0.25]])
        >>> sinkhorn(scores, usage_prior=prior).sum(dim=0).round(decimals=4)
        tensor([3., 1.])
    """
    check_rank("scores", scores, (2,), "(batch, K)")
    check_subprompts("scores", scores, -1)
    check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=1)
    check_int("newton_steps", newton_steps, minimum=0)
    if tol is not None:
        tol = check_positive("tol", tol)
    batch, k = scores.shape
    if usage_prior is not None:
        usage_prior = _check_usage_prior(usage_prior, k, "scores")
    if groups is not None:
        num_classes = None if usage_prior is None else usage_prior.shape[0]
        groups = check_labels("groups", groups, batch, num_classes)
    if batch == 0:
        return scores.detach().clone()
    with torch.no_grad():
        work = _work_dtype(scores)
        logits = scores.detach().to(work)
        group = _dense_groups(groups, batch, scores.device)
        num_groups = batch if groups is not None else 1
        counts = _group_sums(logits.new_ones(batch), group, num_groups)
        if usage_prior is None:
            target = (counts / k).unsqueeze(1).expand(num_groups, k)
        else:
            rows = _row_prior(usage_prior.detach().to(work), groups, batch)
            target = _group_sums(rows, group, num_groups)
        log_target = target.log()
        tiny = torch.finfo(work).tiny
        potentials = logits.new_zeros(num_groups, k)
        for _ in range(sinkhorn_iterations):
            if tol is not None and _column_error(logits, potentials, group, target) <= tol:
                break
            mass = _group_sums(torch.softmax(logits + potentials[group], dim=-1), group, num_groups)
            # The clamp bounds a round's move (by -log(tiny)) where a column's mass underflows.
            potentials = potentials + log_target - mass.clamp_min(tiny).log()
        for _ in range(newton_steps):
            if tol is not None and _column_error(logits, potentials, group, target) <= tol:
                break
            potentials = _newton_step(logits, potentials, group, target, counts)
        q = torch.softmax(logits + potentials[group], dim=-1)
    return q.to(scores.dtype)


def _newton_step(
    logits: Tensor, potentials: Tensor, group: Tensor, target: Tensor, counts: Tensor
) -> Tensor:
    """One Newton step on each group's dual, the best of a few step sizes (no host sync)."""
    num_groups, k = potentials.shape
    q = torch.softmax(logits + potentials[group], dim=-1)
    mass = _group_sums(q, group, num_groups)
    # Hessian of -F: sum over a group's rows of diag(q) - q q^T. Its null space is the all-ones
    # direction (adding a constant to v changes nothing); n/K^2 * 11^T fills it and leaves the
    # step unchanged, as the gradient sums to 0. The ridge keeps saturated columns solvable.
    outer = torch.diag_embed(q) - q.unsqueeze(2) * q.unsqueeze(1)
    size = counts.clamp_min(1).view(-1, 1, 1)
    eye = torch.eye(k, dtype=q.dtype, device=q.device)
    hessian = _group_sums(outer, group, num_groups) + size / k**2 + 1e-9 * size * eye
    # `solve_ex`: no error check, so no host sync; a failed solve gives non-finite entries,
    # which become a zero step.
    direction = torch.linalg.solve_ex(hessian, (target - mass).unsqueeze(-1))[0].squeeze(-1)
    finite = torch.isfinite(direction)
    direction = torch.where(finite, direction, torch.zeros_like(direction))
    direction = direction.clamp(-_NEWTON_MAX_MOVE, _NEWTON_MAX_MOVE)
    steps = torch.tensor(_NEWTON_STEP_SIZES, dtype=q.dtype, device=q.device).view(-1, 1, 1)
    candidates = potentials + steps * direction  # (steps, groups, K)
    row_lse = torch.logsumexp(logits + candidates[:, group], dim=-1)  # (steps, batch)
    linear = torch.where(target > 0, target * candidates, torch.zeros_like(candidates)).sum(-1)
    dual = linear - row_lse.new_zeros(len(steps), num_groups).index_add(1, group, row_lse)
    best = dual.argmax(dim=0).view(1, num_groups, 1).expand(1, num_groups, k)
    return candidates.gather(0, best).squeeze(0)


def _column_error(logits: Tensor, potentials: Tensor, group: Tensor, target: Tensor) -> float:
    """Worst relative gap between a group's column mass and its target (a host read)."""
    q = torch.softmax(logits + potentials[group], dim=-1)
    mass = _group_sums(q, group, target.shape[0])
    positive = target > 0
    gap = (mass - target).abs()[positive] / target[positive]
    return float(gap.max()) if gap.numel() else 0.0


def _scores(similarities: Tensor, tau: float, logit_scale: float) -> Tensor:
    """`logit_scale * similarities / tau` in float32 at least, so a small `tau` cannot overflow."""
    ratio = check_score_range(tau, logit_scale)
    work = torch.float64 if similarities.dtype == torch.float64 else torch.float32
    return similarities.to(work) * ratio


def _check_estep(
    similarities: Tensor,
    usage_prior: Tensor | None,
    *,
    tau: float,
    logit_scale: float,
    mode: str,
    sinkhorn_iterations: int,
) -> Tensor | None:
    """Validate the E-step's arguments; the usage prior as `check_simplex` returns it."""
    check_rank("similarities", similarities, (2,), "(batch, K)")
    check_subprompts("similarities", similarities, -1)
    check_positive("tau", tau)
    check_positive("logit_scale", logit_scale)
    check_choice("mode", mode, ASSIGNMENT_MODES)
    check_int("sinkhorn_iterations", sinkhorn_iterations, minimum=1)
    if usage_prior is not None and mode != "sinkhorn":
        raise ValueError(f'usage_prior is used by mode="sinkhorn" only, but mode is {mode!r}.')
    if usage_prior is not None:
        usage_prior = _check_usage_prior(usage_prior, similarities.shape[1], "similarities")
    return usage_prior


def _estep(
    similarities: Tensor,
    labels: Tensor | None,
    usage_prior: Tensor | None,
    *,
    tau: float,
    logit_scale: float,
    mode: str,
    sinkhorn_iterations: int,
) -> tuple[Tensor, Tensor]:
    """The E-step, once: `(soft, assigned)` from validated arguments.

    `soft` is `softmax(logit_scale * similarities / tau)` with its gradient; `assigned` is the
    responsibilities of `mode`: `soft` itself, its one-hot argmax, or Sinkhorn's balance of the
    same scores. The softmax runs once, whatever the mode.
    """
    scores = _scores(similarities, tau, logit_scale)
    soft = torch.softmax(scores, dim=-1).to(similarities.dtype)
    if mode == "soft":
        return soft, soft
    if mode == "hard":
        one_hot = F.one_hot(scores.detach().argmax(dim=-1), num_classes=scores.shape[-1])
        # argmax picks a NaN as the winner; keep such a row NaN rather than a finite one-hot.
        finite = torch.isfinite(scores.detach()).all(dim=-1, keepdim=True)
        return soft, nan_where(~finite, one_hot.to(similarities.dtype))
    balanced = sinkhorn(
        scores, labels, usage_prior, sinkhorn_iterations=sinkhorn_iterations
    ).to(similarities.dtype)
    return soft, balanced


def responsibilities_from_similarities(
    similarities: Tensor,
    labels: Tensor | None = None,
    usage_prior: Tensor | None = None,
    *,
    tau: float = DEFAULT_TAU,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    mode: AssignmentMode = "soft",
    sinkhorn_iterations: int = DEFAULT_SINKHORN_ITERATIONS,
) -> Tensor:
    """E-step from precomputed own-class similarities; see `responsibilities`.

    Args:
        similarities: `(batch, K)` cosine of each image to its class's sub-prompts.
        labels: `(batch,)` the class of each image (groups for `"sinkhorn"`), or `None`.
        usage_prior: `(num_classes, K)` target usage per class for `"sinkhorn"`, or `None`
            for uniform.
        tau: temperature `> 0`.
        logit_scale: the E-step's cosine-to-logit factor `> 0`.
        mode: `"soft"`, `"hard"` or `"sinkhorn"`.
        sinkhorn_iterations: rounds for `"sinkhorn"`.

    Returns:
        `(batch, K)` rows on the simplex, in the dtype of `similarities`; NaN rows for NaN
        similarities (with `"sinkhorn"`, every row of that image's class).
    """
    usage_prior = _check_estep(
        similarities,
        usage_prior,
        tau=tau,
        logit_scale=logit_scale,
        mode=mode,
        sinkhorn_iterations=sinkhorn_iterations,
    )
    return _estep(
        similarities,
        labels,
        usage_prior,
        tau=tau,
        logit_scale=logit_scale,
        mode=mode,
        sinkhorn_iterations=sinkhorn_iterations,
    )[1]


def responsibilities(
    image_features: Tensor,
    subprompt_features: Tensor,
    labels: Tensor | None = None,
    usage_prior: Tensor | None = None,
    *,
    tau: float = DEFAULT_TAU,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    mode: AssignmentMode = "soft",
    sinkhorn_iterations: int = DEFAULT_SINKHORN_ITERATIONS,
) -> Tensor:
    r"""E-step: how much each sub-prompt of an image's class is responsible for the image.

    $$
    \gamma_{bk} = \operatorname{softmax}_k\left(s \cos(x_b, t_{y_b k}) / \tau\right)
    $$

    The cosine-to-logit factor `s` (`logit_scale`) defaults to 100, CLIP's learned logit scale,
    so `tau = 1` assigns exactly as CLIP's own classifier would score the sub-prompts; `tau < 1`
    sharpens, `tau > 1` softens (the original mixture-of-prompts code used `s = 50`: the same
    assignments take a `tau` twice as large here). CLIP cosines between sub-prompts of one class
    differ by a few hundredths, so at `tau = 0.05` (logit gaps of ~20-100) assignments are
    effectively hard, at `0.3` (the default) still soft. The scores are computed in float32
    (float64 for float64 input) whatever the input dtype.

    - `"soft"`: the softmax above; it **carries gradient**, so an entropy regulariser on it moves
      the sub-prompts.
    - `"hard"`: one-hot argmax of the soft responsibilities (no gradient).
    - `"sinkhorn"`: balanced assignment of each class's images over its sub-prompts, towards a
      uniform usage or `usage_prior` (`sinkhorn`, no gradient).

    Args:
        image_features: `(batch, dim)`.
        subprompt_features: `(num_classes, K, dim)` indexed by `labels`, or `(batch, K, dim)`
            already gathered per image when `labels` is `None` (`(rows, dim)`: `K = 1`).
        labels: `(batch,)` integer class of each image, or `None`.
        usage_prior: `(num_classes, K)` target usage per class for `"sinkhorn"`, or `None`.
        tau: temperature `> 0`.
        logit_scale: the cosine-to-logit factor `s > 0`.
        mode: `"soft"`, `"hard"` or `"sinkhorn"`.
        sinkhorn_iterations: rounds for `"sinkhorn"`, `>= 1`.

    Returns:
        `(batch, K)` non-negative rows summing to 1. NaN features give NaN rows: the image's own
        row, or with `"sinkhorn"` every row of its class (a class's rows are coupled).

    Examples:
        >>> images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> prompts = torch.eye(2).unsqueeze(0)  # one class, K=2 orthogonal sub-prompts
        >>> responsibilities(images, prompts, torch.tensor([0, 0]), tau=1.0, logit_scale=1.0)
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
        usage_prior,
        tau=tau,
        logit_scale=logit_scale,
        mode=mode,
        sinkhorn_iterations=sinkhorn_iterations,
    )
