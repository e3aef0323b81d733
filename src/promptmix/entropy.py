"""`AssignmentEntropy`: the entropy of sub-prompt assignments, maximised so they spread."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from promptmix import distributed
from promptmix import functional as PF
from promptmix._validation import check_choice, check_int, check_positive, check_unit_interval


class AssignmentEntropy(nn.Module):
    r"""Entropy of the responsibilities, in nats (a positive number that the objective maximises).

    - `"sample"` (default, as in the design note): $\frac{1}{B}\sum_b H(\gamma_b)$.
    - `"marginal"`: per class in the batch, $H(\bar\gamma_c)$ of its mean assignment,
      averaged over classes: spreads *usage* without forcing each image to be uncertain.
    - `"mutual_information"`: per class, marginal minus the class's mean sample entropy
      (the mutual information between image and sub-prompt), averaged over classes.

    **Small classes per batch.** With few-shot data a class often has 1-4 images in a batch, and
    with one image the marginal entropy is just that image's entropy. Give `num_classes` and
    `n_subprompts` and the module keeps a running usage estimate $u_c$ per class (an
    exponential moving average of the class's mean assignment, a buffer saved with the model);
    the class mean becomes $(\sum_{b\in c}\gamma_b + n_0 u_c)/(n_c + n_0)$ with
    `prior_count` $= n_0$. The estimate is a constant in the gradient, which therefore
    pushes this batch's images toward the sub-prompts the class has been under-using.

    Args:
        mode: `"sample"`, `"marginal"` or `"mutual_information"`.
        normalize: divide by `log K`, so the value lies in `[0, 1]`.
        num_classes: number of classes, to keep a running usage estimate (marginal modes).
        n_subprompts: `K`, with `num_classes`.
        momentum: EMA momentum of the usage estimate, in `[0, 1)`.
        prior_count: weight `n_0 >= 0` of the usage estimate, in images.
        sync_distributed: compute the marginal terms over the global batch of all DDP processes.

    Shape:
        - responsibilities: `(batch, K)`, rows on the probability simplex.
        - labels: `(batch,)` integer classes, or `None` (the batch is one class).
        - output: scalar.

    Examples:
        >>> import torch
        >>> uniform = torch.full((3, 4), 0.25)
        >>> AssignmentEntropy(normalize=True)(uniform)
        tensor(1.)
        >>> one_hot = torch.eye(4)
        >>> AssignmentEntropy()(one_hot), AssignmentEntropy("marginal", normalize=True)(one_hot)
        (tensor(0.), tensor(1.))
    """

    usage: Tensor | None

    def __init__(
        self,
        mode: PF.EntropyMode = "sample",
        *,
        normalize: bool = False,
        num_classes: int | None = None,
        n_subprompts: int | None = None,
        momentum: float = 0.9,
        prior_count: float = 4.0,
        sync_distributed: bool = False,
    ):
        super().__init__()
        self.mode: PF.EntropyMode = check_choice(  # type: ignore[assignment]
            "mode", mode, PF.ENTROPY_MODES
        )
        self.normalize = bool(normalize)
        self.momentum = check_unit_interval("momentum", momentum)
        self.prior_count = check_positive("prior_count", prior_count, allow_zero=True)
        self.sync_distributed = bool(sync_distributed)
        if (num_classes is None) != (n_subprompts is None):
            raise ValueError(
                "num_classes and n_subprompts must be given together (to keep a running usage "
                f"estimate) but got num_classes={num_classes}, n_subprompts={n_subprompts}."
            )
        usage = None
        if num_classes is not None and n_subprompts is not None and mode != "sample":
            check_int("num_classes", num_classes, minimum=1)
            check_int("n_subprompts", n_subprompts, minimum=1)
            usage = torch.full((num_classes, n_subprompts), 1.0 / n_subprompts)
        self.register_buffer("usage", usage)

    def forward(self, responsibilities: Tensor, labels: Tensor | None = None) -> Tensor:
        """Entropy of `responsibilities` `(batch, K)`; see the class docstring."""
        if self.sync_distributed and self.mode != "sample" and distributed.is_distributed():
            responsibilities = distributed.gather_with_grad(responsibilities)
            labels = None if labels is None else distributed.gather_no_grad(labels)
        use_prior = self.usage is not None and labels is not None
        if use_prior:
            self._check_subprompts(responsibilities)
            self._follow(responsibilities)
        value = PF.assignment_entropy(
            responsibilities,
            labels,
            mode=self.mode,
            normalize=self.normalize,
            usage_prior=self.usage if use_prior else None,
            prior_count=self.prior_count if use_prior else 0.0,
        )
        if use_prior and self.training and len(responsibilities):
            self._update_usage(responsibilities.detach(), labels)  # type: ignore[arg-type]
        return value

    def _check_subprompts(self, responsibilities: Tensor) -> None:
        """Name the constructor's `n_subprompts` when the input has another K."""
        assert self.usage is not None
        k, expected = responsibilities.shape[-1], self.usage.shape[1]
        if responsibilities.dim() == 2 and k != expected:
            raise ValueError(
                f"responsibilities have K={k} sub-prompts but this AssignmentEntropy was built "
                f"with n_subprompts={expected}; build it with n_subprompts={k}."
            )

    def _follow(self, responsibilities: Tensor) -> None:
        """Move the usage buffer to the device of the inputs (and a floating dtype at least as
        wide as theirs), so a loss built on the CPU works on CUDA input without `.to(device)`."""
        assert self.usage is not None
        dtype = torch.promote_types(self.usage.dtype, responsibilities.dtype)
        if self.usage.device != responsibilities.device or self.usage.dtype != dtype:
            self.usage = self.usage.to(device=responsibilities.device, dtype=dtype)

    @torch.no_grad()
    def _update_usage(self, responsibilities: Tensor, labels: Tensor) -> None:
        """EMA of each present class's mean assignment, on the device: no host sync."""
        assert self.usage is not None
        usage = self.usage
        num_classes = usage.shape[0]
        labels = labels.long().clamp(0, num_classes - 1)
        rows = responsibilities.to(usage.dtype)
        sums = usage.new_zeros(usage.shape).index_add(0, labels, rows)
        counts = usage.new_zeros(num_classes).index_add(0, labels, usage.new_ones(len(labels)))
        means = sums / counts.clamp_min(1).unsqueeze(1)
        updated = self.momentum * usage + (1 - self.momentum) * means
        usage.copy_(torch.where((counts > 0).unsqueeze(1), updated, usage))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, normalize={self.normalize}, prior_count={self.prior_count}"
