"""LASP's text-to-text loss: hand-crafted prompt features classified by the learned prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from promptmix._validation import as_subprompts, check_choice, check_rank
from promptmix.functional._common import (
    AGGREGATIONS,
    DEFAULT_LOGIT_SCALE,
    REDUCTIONS,
    Aggregation,
    Reduction,
    _unit,
    connected_zero,
    reduce,
)
from promptmix.functional.similarity import class_logits

__all__ = ["text_to_text_loss"]

TEMPLATES_SHAPE = "(num_classes, dim) or (M, num_classes, dim)"


def text_to_text_loss(
    subprompt_features: Tensor,
    template_features: Tensor,
    extra_subprompt_features: Tensor | None = None,
    *,
    logit_scale: float | Tensor = DEFAULT_LOGIT_SCALE,
    aggregation: Aggregation = "logsumexp",
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Cross-entropy of hand-crafted prompt features classified by the learned prompts (LASP).

    $$
    L = \frac{1}{M C} \sum_{m=1}^{M} \sum_{c=1}^{C}
        -\log \frac{\exp \ell_c(a_{mc})}{\sum_{c'} \exp \ell_{c'}(a_{mc})},
    \qquad \ell_{c'}(a) = s \cdot \mathrm{pool}_k \cos(a, t_{c'k})
    $$

    Each frozen feature $a_{mc}$ of template $m$ for class $c$ (e.g. "a photo of a {}.",
    "art of the {}.") is a query that the learned classifier must assign to class $c$: the
    learned prompts stay where the hand-crafted text of their class is, while still separating
    the classes. With `K == 1` this is LASP's `forward_text_to_text`
    (`prompting/lasp.py`: `cross_entropy` of `exp(logit_scale) * text @ templates^T`, mean over
    templates and classes, weight 5, or 10 on some datasets). With K sub-prompts the K
    similarities pool as the mixture's class logits do (`class_logits`, default
    `"logsumexp"`). LASP's random noise on the targets is an option of the module
    (`TextToTextLoss`), not of this function.

    **Extra classes** (LASP's "virtual classes"). LASP runs this loss over every class name it
    knows, the new classes' included, though no image of them is seen: their learned features
    come from the same shared context. Pass the learned features of such names as
    `extra_subprompt_features` `(E, K, dim)`; they join the classifier after the `num_classes`
    training classes, and `template_features` then holds `num_classes + E` classes, the training
    classes first.

    Args:
        subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)` learned features.
        template_features: `(C, dim)` for one template or `(M, C, dim)` for M templates, from
            the frozen text tower, `C = num_classes + E`.
        extra_subprompt_features: `(E, K, dim)` or `(E, dim)` learned features of class names
            without images, or `None` (`E = 0`).
        logit_scale: $s$, CLIP's `logit_scale.exp()` (100).
        aggregation: how a class's K similarities pool (see `class_logits`).
        reduction: `"mean"` or `"sum"` over templates and classes, or `"none"` for `(M, C)`.

    Returns:
        A scalar, or `(M, C)` with `reduction="none"`.

    Examples:
        >>> prompts = torch.eye(3)  # each template feature matches its own class only
        >>> bool(text_to_text_loss(prompts, prompts) < 1e-6)
        True
        >>> text_to_text_loss(torch.ones(2, 4), torch.ones(2, 4))  # indistinguishable: log 2
        tensor(0.6931)
    """
    prompts = as_subprompts("subprompt_features", subprompt_features)
    extra_note = ""
    if extra_subprompt_features is not None:
        extra = as_subprompts("extra_subprompt_features", extra_subprompt_features)
        if extra.shape[1:] != prompts.shape[1:]:
            raise ValueError(
                f"extra_subprompt_features must have shape (E, {prompts.shape[1]}, "
                f"{prompts.shape[2]}) like subprompt_features but has shape "
                f"{tuple(extra_subprompt_features.shape)}."
            )
        extra_note = f" plus the {extra.shape[0]} extra classes"
        prompts = torch.cat([prompts, extra.to(prompts.dtype)])
    templates = check_rank("template_features", template_features, (2, 3), TEMPLATES_SHAPE)
    templates = templates.unsqueeze(0) if templates.dim() == 2 else templates
    num_classes, _, dim = prompts.shape
    if templates.shape[1:] != (num_classes, dim):
        raise ValueError(
            f"template_features must have shape ({num_classes}, {dim}) or (M, {num_classes}, "
            f"{dim}) to match subprompt_features {tuple(subprompt_features.shape)}"
            f"{extra_note}, but has shape {tuple(template_features.shape)}."
        )
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    n_templates = templates.shape[0]
    similarities = einsum(
        _unit(templates).to(prompts.dtype), _unit(prompts), "m j d, c k d -> m j c k"
    )
    logits = class_logits(
        rearrange(similarities, "m j c k -> (m j) c k"),
        logit_scale=logit_scale,
        aggregation=aggregation,
    )
    if logits.shape[0] == 0 or num_classes == 0:
        zero = connected_zero(prompts, template_features)
        return zero.expand(n_templates, num_classes) if reduction == "none" else zero
    targets = torch.arange(num_classes, device=logits.device).repeat(n_templates)
    compute = torch.promote_types(logits.dtype, torch.float32)  # float16 in float32
    losses = F.cross_entropy(logits.to(compute), targets, reduction="none").to(logits.dtype)
    return reduce(losses.reshape(n_templates, num_classes), reduction)
