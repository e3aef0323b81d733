r"""`TemperatureSchedule`: anneals the E-step temperature $\tau$ over training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from promptmix import functional as PF
from promptmix._validation import check_choice, check_int, check_positive

__all__ = ["TemperatureSchedule"]


class TemperatureSchedule(nn.Module):
    r"""Annealed temperature $\tau$ for the E-step, saved and restored with `state_dict`.

    `schedule()` returns the current $\tau$; `schedule.step()` advances one step. $\tau$ is
    exactly `start` at step 0 (and through `warmup_steps`), moves monotonically to exactly `end` at
    `total_steps` and is held there after. The step counter is a buffer, so a resumed run continues
    where it stopped; the module also keeps it as a Python int (kept in step by `step()` and
    `load_state_dict`), so reading $\tau$ never waits for the device the buffer lives on. The
    settings are saved beside the counter, and `load_state_dict` checks both before it changes
    anything: the state of another schedule, or a counter that is not a non-negative integer,
    is an error naming what differs (raised as PyTorch's `RuntimeError` of `load_state_dict`).

    The default `end = 0.3` (not 0.05) keeps assignments soft to the end of training: at CLIP's
    similarity scale, $\tau = 0.05$ makes the E-step hard and lets one sub-prompt take over.

    Args:
        start: $\tau$ at step 0, `> 0`.
        end: $\tau$ from `total_steps` on, `> 0`.
        total_steps: Number of `step()` calls to reach `end`, `>= 1`.
        kind: `"linear"`, `"cosine"` or `"exponential"` (geometric).
        warmup_steps: Steps held at `start` before annealing, in `[0, total_steps)`.

    Raises:
        ValueError: On settings out of range (`warmup_steps >= total_steps`, a `start` or `end`
            that is not positive).
        RuntimeError: From `load_state_dict`, on the state of a schedule with other settings
            or a `step_count` that is not a non-negative integer; the schedule is left as it was.

    Examples:
        >>> schedule = TemperatureSchedule(total_steps=2)
        >>> taus = []
        >>> for _ in range(4):
        ...     taus.append(round(schedule(), 2))
        ...     schedule.step()
        >>> taus
        [1.0, 0.65, 0.3, 0.3]
        >>> schedule.state_dict()["step_count"]
        tensor(4)
    """

    step_count: torch.Tensor

    def __init__(
        self,
        *,
        start: float = 1.0,
        end: float = PF.DEFAULT_TAU,
        total_steps: int,
        kind: PF.ScheduleKind = "linear",
        warmup_steps: int = 0,
    ):
        super().__init__()
        self.start = check_positive("start", start)
        self.end = check_positive("end", end)
        self.total_steps = check_int("total_steps", total_steps, minimum=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        if warmup_steps >= total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps) = [0, {total_steps}) but is "
                f"{warmup_steps}."
            )
        self.kind: PF.ScheduleKind = check_choice(  # type: ignore[assignment]
            "kind", kind, PF.SCHEDULE_KINDS
        )
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self._step = 0  # host mirror of step_count

    def forward(self) -> float:
        r"""The current $\tau$ (a Python float; reads no tensor)."""
        return PF.temperature_at(
            step=self._step,
            start=self.start,
            end=self.end,
            total_steps=self.total_steps,
            kind=self.kind,
            warmup_steps=self.warmup_steps,
        )

    def step(self) -> None:
        """Advance the schedule by one step."""
        self.step_count += 1
        self._step += 1

    def _settings(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "total_steps": self.total_steps,
            "kind": self.kind,
            "warmup_steps": self.warmup_steps,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """The settings, saved in `state_dict` beside the step counter."""
        return self._settings()

    def set_extra_state(self, state: Any) -> None:
        """Nothing to set: `_load_from_state_dict` has checked that the settings are these."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Everything is checked before anything is loaded: a rejected state leaves this
        # schedule as it was (PyTorch raises the collected messages after the walk).
        errors = []
        settings = state_dict.get(prefix + "_extra_state")
        if settings is not None and settings != self._settings():
            errors.append(
                f"{prefix or 'the '}schedule was saved with {settings} but this "
                f"TemperatureSchedule has {self._settings()}; build it with the saved settings."
            )
        saved = state_dict.get(prefix + "step_count")
        if saved is not None and (
            not isinstance(saved, torch.Tensor)
            or saved.dtype.is_floating_point
            or saved.dtype.is_complex
            or saved.dtype == torch.bool
            or saved.numel() != 1
            or int(saved) < 0
        ):
            errors.append(
                f"{prefix}step_count must be a non-negative integer tensor of one element "
                f"but is {saved!r}."
            )
        if errors:
            error_msgs.extend(errors)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if isinstance(saved, torch.Tensor):
            self._step = int(saved)  # once per load, not per step

    def extra_repr(self) -> str:
        return (
            f"start={self.start}, end={self.end}, total_steps={self.total_steps}, "
            f"kind={self.kind!r}, warmup_steps={self.warmup_steps}, step={self._step}"
        )
