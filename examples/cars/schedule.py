"""The learning rate's schedule of ``train_cars.py``: CoOp's warm-up and cosine, or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

from omegaconf import DictConfig


def warmup_cosine(train: DictConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate's factor per step, for ``torch.optim.lr_scheduler.LambdaLR``: a linear
    warm-up from ``warmup_start_lr`` over ``warmup_epochs``, then a cosine down to ``min_lr``
    (``null``: no decay, ``lr`` throughout, as the recipe's loop).

    Examples:
        >>> from omegaconf import OmegaConf
        >>> train = OmegaConf.create(dict(lr=1.0, warmup_epochs=1, warmup_start_lr=0.0,
        ...                               min_lr=0.0, epochs=3))
        >>> factor = warmup_cosine(train, steps_per_epoch=2)
        >>> [round(factor(step), 2) for step in range(7)]
        [0.0, 0.5, 1.0, 0.85, 0.5, 0.15, 0.0]
        >>> constant = warmup_cosine(OmegaConf.merge(train, dict(min_lr=None)), 2)
        >>> [round(constant(step), 2) for step in range(2, 7)]
        [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    warmup, total = round(train.warmup_epochs * steps_per_epoch), train.epochs * steps_per_epoch
    start = train.warmup_start_lr / train.lr
    floor = 1.0 if train.min_lr is None else train.min_lr / train.lr

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        progress = min((step - warmup) / max(1, total - warmup), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
