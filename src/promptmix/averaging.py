"""PromptSRC's Gaussian-weighted prompt averaging over epochs, over the prompt parameters only.

Not a loss term: it sits beside the loss, updated once per epoch, copied into the learner at the
end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from promptmix._validation import check_int, check_positive

__all__ = ["GaussianPromptAverage"]


class GaussianPromptAverage:
    r"""A Gaussian-weighted average of the prompt parameters over epochs (PromptSRC's GPA).

    $$
    \bar\theta = \sum_{e=1}^{E} w_e\, \theta_e, \qquad
    w_e = \frac{\mathcal N(e;\, \mu, \sigma^2)}{\sum_{e'=1}^{E} \mathcal N(e';\, \mu, \sigma^2)}
    $$

    $\theta_e$ are the parameters at the end of epoch $e$ (1-based). PromptSRC
    (muzairkhattak/PromptSRC `trainers/promptsrc.py`; base-to-new: `GPA_MEAN = 15`,
    `GPA_STD = 1`, 20 epochs; cross-dataset 6 and 10 over 20 epochs; few-shot 30 and 30 over 50
    epochs) deep-copies the model's whole `state_dict` every epoch; this object keeps one
    running average of the parameters that require a gradient (the prompts), in float32, and
    nothing of the frozen CLIP. The running form
    $\bar\theta \leftarrow \bar\theta + \frac{w_e}{W_e}(\theta_e - \bar\theta)$ with
    $W_e = \sum_{e' \le e} w_{e'}$ gives the same result without underflow for epochs far from
    $\mu$, and `averaged()` mid-run is the average of the epochs so far. `copy_to` and
    `load_state_dict` check everything before they change anything.

    Args:
        module: the learner; its parameters with `requires_grad` are averaged (or give a
            mapping `{name: parameter}`).
        total_epochs: $E \ge 1$.
        mean: $\mu$, in epochs.
        std: $\sigma > 0$, in epochs.

    Examples:
        >>> import torch
        >>> learner = torch.nn.Linear(1, 1, bias=False)
        >>> average = GaussianPromptAverage(learner, total_epochs=3, mean=2.0, std=1.0)
        >>> for epoch in range(3):
        ...     _ = learner.weight.data.fill_(float(epoch + 1))  # training would go here
        ...     average.update()
        >>> average.weights.round(decimals=4)
        tensor([0.2741, 0.4519, 0.2741], dtype=torch.float64)
        >>> average.averaged()["weight"]
        tensor([[2.]])
        >>> average.copy_to(learner); learner.weight.data
        tensor([[2.]])
    """

    def __init__(
        self,
        module: nn.Module | Mapping[str, Tensor],
        *,
        total_epochs: int,
        mean: float = 15.0,
        std: float = 1.0,
    ):
        named: dict[str, Tensor]
        if isinstance(module, nn.Module):
            named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        elif isinstance(module, Mapping):
            named = dict(module)
            for name, value in named.items():
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    raise TypeError(
                        f"module[{name!r}] must be a floating-point tensor but is "
                        f"{getattr(value, 'dtype', type(value).__name__)}."
                    )
        else:
            raise TypeError(
                f"module must be an nn.Module or a mapping of tensors but is "
                f"{type(module).__name__}."
            )
        if not named:
            raise ValueError("module has no parameter that requires a gradient to average.")
        self.parameters: dict[str, Tensor] = named
        self.total_epochs = check_int("total_epochs", total_epochs, minimum=1)
        if isinstance(mean, bool) or not isinstance(mean, (int, float)):
            raise TypeError(f"mean must be a real number but is {type(mean).__name__}.")
        self.mean = float(mean)
        if not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite but is {mean}.")
        self.std = check_positive("std", std)
        epochs = torch.arange(1, self.total_epochs + 1, dtype=torch.float64)
        # Normalised in log space: exp(-(e - mean)^2 / 2 std^2) underflows far from the mean.
        self.weights: Tensor = torch.softmax(-0.5 * ((epochs - self.mean) / self.std) ** 2, 0)
        self.epoch = 0
        self._seen_weight = 0.0
        self.averages: dict[str, Tensor] = {
            name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        """Add the current parameters with the next epoch's weight; call once per epoch."""
        if self.epoch >= self.total_epochs:
            raise RuntimeError(
                f"update() was called more than total_epochs={self.total_epochs} times."
            )
        weight = float(self.weights[self.epoch])
        self.epoch += 1
        self._seen_weight += weight
        if self._seen_weight == 0:
            return
        fraction = weight / self._seen_weight
        for name, param in self.parameters.items():
            average = self.averages[name]
            average.add_(param.detach().float().to(average.device) - average, alpha=fraction)

    def averaged(self) -> dict[str, Tensor]:
        """The weighted average so far, `{name: tensor}` in each parameter's dtype."""
        if self.epoch == 0:
            raise RuntimeError("averaged() needs at least one update().")
        return {
            name: self.averages[name].to(param.dtype) for name, param in self.parameters.items()
        }

    @torch.no_grad()
    def copy_to(self, module: nn.Module | None = None) -> None:
        """Write the average into the parameters (those given at construction by default).

        Raises:
            RuntimeError: Before the first `update()`.
            KeyError: If `module` lacks an averaged parameter.
            ValueError: If one of its parameters has another shape; nothing is written then.
        """
        averaged = self.averaged()
        if module is None:
            targets = self.parameters
        else:
            if not isinstance(module, nn.Module):
                raise TypeError(f"module must be an nn.Module but is {type(module).__name__}.")
            targets = dict(module.named_parameters())
            missing = sorted(set(averaged) - set(targets))
            if missing:
                raise KeyError(f"module has no parameter(s) {', '.join(missing)}.")
        for name, value in averaged.items():  # every shape first: never half-written
            if targets[name].shape != value.shape:
                raise ValueError(
                    f"module's parameter {name!r} has shape {tuple(targets[name].shape)} but the "
                    f"average has shape {tuple(value.shape)}; nothing was copied."
                )
        for name, value in averaged.items():
            targets[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """The running average and the epoch count, for checkpoints."""
        return {
            "epoch": self.epoch,
            "seen_weight": self._seen_weight,
            "total_epochs": self.total_epochs,
            "mean": self.mean,
            "std": self.std,
            "averages": {name: value.clone() for name, value in self.averages.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned; everything is checked before anything changes.

        Raises:
            KeyError: If `state` lacks an entry, or averages other parameters.
            ValueError: If its schedule (`total_epochs`, `mean`, `std`), epoch or an average's
                shape differs from this object's.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a mapping from state_dict() but is {type(state).__name__}."
            )
        missing = sorted(
            {"epoch", "seen_weight", "total_epochs", "mean", "std", "averages"} - set(state)
        )
        if missing:
            raise KeyError(f"state lacks {', '.join(missing)}; pass what state_dict() returned.")
        settings = (state["total_epochs"], state["mean"], state["std"])
        if settings != (self.total_epochs, self.mean, self.std):
            raise ValueError(
                f"state_dict has (total_epochs, mean, std) = {settings} but this average has "
                f"{(self.total_epochs, self.mean, self.std)}."
            )
        averages = state["averages"]
        if not isinstance(averages, Mapping) or set(averages) != set(self.averages):
            saved = sorted(averages) if isinstance(averages, Mapping) else type(averages).__name__
            raise KeyError(
                f"state_dict averages {saved} but this object averages {sorted(self.averages)}."
            )
        for name, value in averages.items():
            if not isinstance(value, Tensor) or value.shape != self.averages[name].shape:
                raise ValueError(
                    f"state_dict's average {name!r} has shape "
                    f"{tuple(getattr(value, 'shape', ()))} but this object's has shape "
                    f"{tuple(self.averages[name].shape)}: it averages another model."
                )
        epoch = state["epoch"]
        if (
            isinstance(epoch, bool)
            or not isinstance(epoch, int)
            or not 0 <= epoch <= self.total_epochs
        ):
            raise ValueError(
                f"state_dict's epoch must be an int in [0, {self.total_epochs}] but is {epoch!r}."
            )
        self.epoch = epoch
        self._seen_weight = float(state["seen_weight"])
        for name, value in averages.items():
            self.averages[name].copy_(value)

    def __repr__(self) -> str:
        return (
            f"GaussianPromptAverage(total_epochs={self.total_epochs}, mean={self.mean}, "
            f"std={self.std}, epoch={self.epoch}, parameters={len(self.parameters)})"
        )
