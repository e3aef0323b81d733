"""`AssignmentEntropy`: the entropy of sub-prompt assignments, maximised so they spread."""

from __future__ import annotations

from torch import Tensor, nn

from promptmix import distributed
from promptmix import functional as PF
from promptmix._validation import check_choice, check_positive
from promptmix.functional.usage import DEFAULT_PRIOR_COUNT

__all__ = ["AssignmentEntropy"]


class AssignmentEntropy(nn.Module):
    r"""Entropy of the responsibilities, in nats (a positive number that the objective maximises).

    - `"marginal"` (default, as in `MixtureOfPromptsLoss`): per class in the batch,
      $H(\bar\gamma_c)$ of its mean assignment, averaged over classes: spreads *usage* without
      forcing each image to be uncertain.
    - `"sample"`: $\frac{1}{B}\sum_b H(\gamma_b)$, every image uncertain (the original
      mixture-of-prompts code's term, which there was computed on detached responsibilities and
      so never moved the prompts).
    - `"mutual_information"`: per class, marginal minus the class's mean sample entropy
      (the mutual information between image and sub-prompt), averaged over classes.

    **Small classes per batch.** With few-shot data a class often has 1-4 images in a batch, and
    with one image the marginal entropy is just that image's entropy. Pass a running usage
    estimate $u_c$ (`usage_prior`, e.g. a `UsageEstimate`'s; `MixtureOfPromptsLoss` passes its
    own when built with `usage_estimate=`) and the class mean becomes
    $(\sum_{b\in c}\gamma_b + n_0 u_c)/(n_c + n_0)$ with `prior_count` $= n_0$. The estimate
    is a constant in the gradient, which therefore pushes this batch's images toward the
    sub-prompts the class has been under-using.

    Args:
        mode: `"marginal"`, `"sample"` or `"mutual_information"`.
        normalize: divide by `log K`, so the value lies in `[0, 1]`.
        prior_count: weight `n_0 >= 0` of the usage prior, in images.
        sync_distributed: compute the marginal terms over the global batch of all DDP processes.

    Shape:
        - responsibilities: `(batch, K)`, rows on the probability simplex.
        - labels: `(batch,)` integer classes, or `None` (the batch is one class).
        - usage_prior: `(num_classes, K)` simplex rows, or `None`.
        - output: scalar.

    Examples:
        >>> import torch
        >>> uniform = torch.full((3, 4), 0.25)
        >>> AssignmentEntropy(normalize=True)(uniform)
        tensor(1.)
        >>> one_hot = torch.eye(4)
        >>> AssignmentEntropy(mode="sample")(one_hot), AssignmentEntropy(normalize=True)(one_hot)
        (tensor(0.), tensor(1.))
        >>> AssignmentEntropy().inputs
        ('responsibilities', 'labels', 'usage_prior')
    """

    #: What `MixtureOfPromptsLoss` passes to `forward`, by name.
    inputs: tuple[str, ...] = ("responsibilities", "labels", "usage_prior")

    def __init__(
        self,
        *,
        mode: PF.EntropyMode = "marginal",
        normalize: bool = False,
        prior_count: float = DEFAULT_PRIOR_COUNT,
        sync_distributed: bool = False,
    ):
        super().__init__()
        self.mode: PF.EntropyMode = check_choice(  # type: ignore[assignment]
            "mode", mode, PF.ENTROPY_MODES
        )
        self.normalize = bool(normalize)
        self.prior_count = check_positive("prior_count", prior_count, allow_zero=True)
        self.sync_distributed = bool(sync_distributed)

    def forward(
        self,
        responsibilities: Tensor,
        labels: Tensor | None = None,
        usage_prior: Tensor | None = None,
    ) -> Tensor:
        """Entropy of `responsibilities` `(batch, K)`; see the class docstring."""
        if self.sync_distributed and self.mode != "sample" and distributed.is_distributed():
            responsibilities = distributed.gather_with_grad(responsibilities)
            labels = None if labels is None else distributed.gather_no_grad(labels)
        return PF.assignment_entropy(
            responsibilities,
            labels,
            usage_prior,
            mode=self.mode,
            normalize=self.normalize,
            prior_count=self.prior_count,
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}, prior_count={self.prior_count}"
