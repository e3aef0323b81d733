"""LASP's text-to-text loss: hand-crafted prompt features classified by the learned prompts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

from promptmix._validation import check_choice, check_rank
from promptmix.functional._common import AGGREGATIONS, Aggregation, _unit, connected_zero
from promptmix.functional.anchors import _as_subprompts
from promptmix.functional.similarity import class_logits

TEXT_REDUCTIONS = ("mean", "sum", "none")
TEMPLATES_SHAPE = "(num_classes, dim) or (M, num_classes, dim)"


def text_to_text_loss(
    subprompt_features: Tensor,
    template_features: Tensor,
    *,
    logit_scale: float | Tensor = 100.0,
    aggregation: Aggregation = "logsumexp",
    reduction: str = "mean",
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

    Args:
        subprompt_features: `(num_classes, K, dim)` or `(num_classes, dim)` learned features.
        template_features: `(num_classes, dim)` for one template or `(M, num_classes, dim)`
            for M templates, from the frozen text tower.
        logit_scale: $s$, CLIP's `logit_scale.exp()` (100).
        aggregation: how a class's K similarities pool (see `class_logits`).
        reduction: `"mean"` or `"sum"` over templates and classes, or `"none"` for
            `(M, num_classes)`.

    Returns:
        A scalar, or `(M, num_classes)` with `reduction="none"`.

    Examples:
        >>> prompts = torch.eye(3)  # each template feature matches its own class only
        >>> bool(text_to_text_loss(prompts, prompts) < 1e-6)
        True
        >>> text_to_text_loss(torch.ones(2, 4), torch.ones(2, 4))  # indistinguishable: log 2
        tensor(0.6931)
    """
    prompts = _as_subprompts("subprompt_features", subprompt_features)
    templates = check_rank("template_features", template_features, (2, 3), TEMPLATES_SHAPE)
    templates = templates.unsqueeze(0) if templates.dim() == 2 else templates
    num_classes, _, dim = prompts.shape
    if templates.shape[1:] != (num_classes, dim):
        raise ValueError(
            f"template_features must have shape ({num_classes}, {dim}) or (M, {num_classes}, "
            f"{dim}) to match subprompt_features {tuple(subprompt_features.shape)}, but has "
            f"shape {tuple(template_features.shape)}."
        )
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("reduction", reduction, TEXT_REDUCTIONS)
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
        zero = connected_zero(subprompt_features, template_features)
        return zero.expand(n_templates, num_classes) if reduction == "none" else zero
    targets = torch.arange(num_classes, device=logits.device).repeat(n_templates)
    compute = torch.promote_types(logits.dtype, torch.float32)  # float16 in float32
    losses = F.cross_entropy(logits.to(compute), targets, reduction="none").to(logits.dtype)
    if reduction == "none":
        return losses.reshape(n_templates, num_classes)
    return losses.mean() if reduction == "mean" else losses.sum()
