"""The annealed E-step temperature as a function of the step."""

from __future__ import annotations

import math

from promptmix._validation import check_choice, check_int, check_positive
from promptmix.functional._common import DEFAULT_TAU, SCHEDULE_KINDS, ScheduleKind

__all__ = ["temperature_at"]


def temperature_at(
    *,
    step: int,
    start: float = 1.0,
    end: float = DEFAULT_TAU,
    total_steps: int,
    kind: ScheduleKind = "linear",
    warmup_steps: int = 0,
) -> float:
    r"""The annealed temperature after `step` steps.

    `tau` stays at `start` for `warmup_steps`, then moves monotonically to `end` at
    `total_steps` and stays there. With progress $t \in [0, 1]$:
    linear $\tau_0 + (\tau_1 - \tau_0) t$, cosine
    $\tau_1 + (\tau_0 - \tau_1)\frac{1 + \cos \pi t}{2}$, exponential
    $\tau_0 (\tau_1 / \tau_0)^t$.

    Args:
        step: number of steps taken, `>= 0`.
        start: `tau` at step 0, `> 0`.
        end: `tau` from `total_steps` on, `> 0`.
        total_steps: step at which `end` is reached, `>= 1`.
        kind: `"linear"`, `"cosine"` or `"exponential"`.
        warmup_steps: steps held at `start`, in `[0, total_steps)`.

    Returns:
        `tau` as a Python float: exactly `start` at step 0, exactly `end` at `total_steps`.

    Examples:
        >>> [round(temperature_at(step=s, total_steps=4), 3) for s in range(6)]
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

