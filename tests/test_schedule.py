"""TemperatureSchedule / functional.temperature_at."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import promptmix.functional as PF
from promptmix import TemperatureSchedule

pytestmark = pytest.mark.usefixtures("single_thread")

KINDS = ("linear", "cosine", "exponential")
positive = st.floats(1e-3, 10.0, allow_nan=False, allow_infinity=False)


def run(schedule: TemperatureSchedule, steps: int) -> list[float]:
    taus = []
    for _ in range(steps):
        taus.append(schedule())
        schedule.step()
    return taus


class TestTemperatureSchedule:
    def test_smoke(self) -> None:
        schedule = TemperatureSchedule(total_steps=10)
        assert schedule() == 1.0
        schedule.step()
        assert 0.3 < schedule() < 1.0
        assert int(schedule.step_count) == 1

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"total_steps": 0}, ValueError, "total_steps"),
            ({"total_steps": -5}, ValueError, "total_steps"),
            ({"total_steps": 10.0}, TypeError, "total_steps"),
            ({"total_steps": 10, "start": 0.0}, ValueError, "start"),
            ({"total_steps": 10, "end": -0.3}, ValueError, "end"),
            ({"total_steps": 10, "end": float("nan")}, ValueError, "end"),
            ({"total_steps": 10, "kind": "step"}, ValueError, "kind"),
            ({"total_steps": 10, "warmup_steps": 10}, ValueError, "warmup_steps"),
            ({"total_steps": 10, "warmup_steps": -1}, ValueError, "warmup_steps"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            TemperatureSchedule(**kwargs)

    def test_total_steps_is_required(self) -> None:
        with pytest.raises(TypeError, match="total_steps"):
            TemperatureSchedule()  # type: ignore[call-arg]

    def test_functional_bad_step(self) -> None:
        with pytest.raises(ValueError, match="step"):
            PF.temperature_at(step=-1, total_steps=10)

    def test_output_is_a_python_float(self) -> None:
        assert type(TemperatureSchedule(total_steps=3)()) is float

    def test_hand_computed_values(self) -> None:
        linear = run(TemperatureSchedule(start=1.0, end=0.3, total_steps=4), 6)
        assert linear == pytest.approx([1.0, 0.825, 0.65, 0.475, 0.3, 0.3])
        cosine = run(TemperatureSchedule(start=1.0, end=0.3, total_steps=2, kind="cosine"), 3)
        assert cosine == pytest.approx([1.0, 0.65, 0.3])
        cosine4 = TemperatureSchedule(start=1.0, end=0.3, total_steps=4, kind="cosine")
        cosine4.step()
        assert cosine4() == pytest.approx(0.3 + 0.7 * (1 + math.cos(math.pi / 4)) / 2)
        exponential = run(
            TemperatureSchedule(start=1.0, end=0.25, total_steps=2, kind="exponential"), 3
        )
        assert exponential == pytest.approx([1.0, 0.5, 0.25])  # geometric midpoint

    def test_warmup_holds_start(self) -> None:
        taus = run(TemperatureSchedule(start=1.0, end=0.3, total_steps=6, warmup_steps=2), 8)
        # progress = (step - 2) / 4
        assert taus == pytest.approx([1.0, 1.0, 1.0, 0.825, 0.65, 0.475, 0.3, 0.3])

    def test_annealing_upwards_is_allowed(self) -> None:
        assert run(TemperatureSchedule(start=0.1, end=0.5, total_steps=2), 3) == pytest.approx(
            [0.1, 0.3, 0.5]
        )

    def test_step_counter_is_saved_and_restored(self) -> None:
        schedule = TemperatureSchedule(total_steps=10, kind="cosine")
        run(schedule, 7)
        state = schedule.state_dict()
        assert set(state) == {"step_count", "_extra_state"} and int(state["step_count"]) == 7
        assert state["_extra_state"] == {
            "start": 1.0,
            "end": 0.3,
            "total_steps": 10,
            "kind": "cosine",
            "warmup_steps": 0,
        }
        resumed = TemperatureSchedule(total_steps=10, kind="cosine")
        assert resumed() == 1.0
        resumed.load_state_dict(state)
        assert resumed() == schedule()
        resumed.step()
        schedule.step()
        assert resumed() == schedule() and int(resumed.step_count) == 8

    def test_load_state_dict_rolls_the_counter_back(self) -> None:
        schedule = TemperatureSchedule(total_steps=10)
        run(schedule, 3)
        saved = {k: clone(v) for k, v in schedule.state_dict().items()}
        run(schedule, 2)
        schedule.load_state_dict(saved)
        assert int(schedule.step_count) == 3

    def test_counter_is_a_buffer_not_a_parameter(self) -> None:
        schedule = TemperatureSchedule(total_steps=10)
        assert list(schedule.parameters()) == []
        assert "step_count" in dict(schedule.named_buffers())
        assert schedule.step_count.dtype == torch.long

    def test_tau_and_step_read_nothing_back_from_the_step_counter(self) -> None:
        schedule = TemperatureSchedule(start=1.0, end=0.3, total_steps=4)

        def forbid(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a tensor was read on the host")

        with pytest.MonkeyPatch.context() as patch:
            for name in ("item", "tolist", "__int__", "__index__", "__float__", "__bool__"):
                patch.setattr(torch.Tensor, name, forbid)
            with pytest.raises(RuntimeError, match="read on the host"):
                int(schedule.step_count)  # the guard works
            taus = run(schedule, 3)
        assert taus == pytest.approx([1.0, 0.825, 0.65])
        assert schedule.step_count.item() == 3  # the buffer keeps counting for state_dict

    def test_a_parent_module_restores_the_step(self) -> None:
        parent = torch.nn.Module()
        parent.schedule = TemperatureSchedule(start=1.0, end=0.3, total_steps=4)
        run(parent.schedule, 2)
        state = {k: clone(v) for k, v in parent.state_dict().items()}
        assert list(state) == ["schedule.step_count", "schedule._extra_state"]
        resumed = torch.nn.Module()
        resumed.schedule = TemperatureSchedule(start=1.0, end=0.3, total_steps=4)
        resumed.load_state_dict(state)
        assert resumed.schedule() == pytest.approx(0.65) and "step=2" in repr(resumed)
        resumed.load_state_dict(state | {"schedule.step_count": torch.tensor(4)})
        assert resumed.schedule() == pytest.approx(0.3)

    @pytest.mark.parametrize(
        ("other", "match"),
        [
            (dict(total_steps=1000, kind="cosine"), "was saved with .*'total_steps': 5"),
            (dict(total_steps=5, end=0.1), "was saved with .*'end': 0.3"),
            (dict(total_steps=5, warmup_steps=2), "'warmup_steps': 0"),
        ],
    )
    def test_the_state_of_another_schedule_is_refused_and_nothing_changes(
        self, other, match
    ) -> None:
        saved = TemperatureSchedule(total_steps=5)
        run(saved, 3)
        target = TemperatureSchedule(**other)
        run(target, 1)
        with pytest.raises(RuntimeError, match=match):
            target.load_state_dict(saved.state_dict())
        assert int(target.step_count) == 1 and "step=1" in repr(target)

    @pytest.mark.parametrize(
        "step_count",
        [torch.tensor(2.7), torch.tensor(-1), torch.tensor(True), torch.tensor([1, 2])],
    )
    def test_a_step_count_that_is_not_a_count_is_refused(self, step_count) -> None:
        schedule = TemperatureSchedule(total_steps=5)
        state = schedule.state_dict() | {"step_count": step_count}
        with pytest.raises(RuntimeError, match="step_count must be a non-negative integer"):
            schedule.load_state_dict(state)
        assert int(schedule.step_count) == 0

    @pytest.mark.parametrize("kind", KINDS)
    def test_module_equals_functional(self, kind) -> None:
        schedule = TemperatureSchedule(start=0.9, end=0.2, total_steps=7, kind=kind, warmup_steps=2)
        for step, tau in enumerate(run(schedule, 10)):
            expected = PF.temperature_at(
                step=step, start=0.9, end=0.2, total_steps=7, kind=kind, warmup_steps=2
            )
            assert tau == expected


def clone(value: object) -> object:
    return value.clone() if isinstance(value, torch.Tensor) else dict(value)  # type: ignore[call-overload]


# ----------------------------------------------------------------------------- properties


@given(
    positive,
    positive,
    st.integers(1, 500).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))),
    st.sampled_from(KINDS),
)
def test_property_endpoints_and_monotone(start, end, steps, kind) -> None:
    total_steps, warmup_steps = steps
    taus = [
        PF.temperature_at(
            step=step,
            start=start,
            end=end,
            total_steps=total_steps,
            kind=kind,
            warmup_steps=warmup_steps,
        )
        for step in range(total_steps + 3)
    ]
    assert taus[0] == start  # exactly
    assert taus[total_steps] == end  # exactly
    assert taus[total_steps:] == [end] * 3  # held after
    assert taus[: warmup_steps + 1] == [start] * (warmup_steps + 1)  # warm-up holds start
    sign = 1 if end >= start else -1
    differences = [sign * (b - a) for a, b in itertools.pairwise(taus)]
    assert all(d >= 0 for d in differences)  # monotone toward end
    low, high = min(start, end), max(start, end)
    assert all(low <= tau <= high for tau in taus)
