"""GaussianPromptAverage: PromptSRC's GPA over the prompt parameters only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from promptmix import GaussianPromptAverage

pytestmark = pytest.mark.usefixtures("single_thread")


class Learner(torch.nn.Module):
    """A prompt parameter beside a frozen "CLIP" weight."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = torch.nn.Parameter(torch.zeros(2, 3))
        self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)


def promptsrc_gpa(states: list[dict[str, torch.Tensor]], mean: float, std: float) -> dict:
    """PromptSRC's state_dict_weighting / state_dict_add over epochs (trainers/promptsrc.py)."""
    n = len(states)
    gauss = lambda x: (1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((x - mean) / std) ** 2)  # noqa: E731
    weights = np.array([gauss(a) for a in range(1, n + 1)])
    weights = weights / sum(weights)
    previous = None
    for epoch, state in enumerate(states):
        weighted = {key: value * weights[epoch] for key, value in copy.deepcopy(state).items()}
        previous = (
            weighted if previous is None else {k: previous[k] + weighted[k] for k in weighted}
        )
    return previous


class TestGaussianPromptAverage:
    @pytest.mark.parametrize(("epochs", "mean", "std"), [(20, 15.0, 1.0), (6, 3.0, 2.0)])
    def test_matches_promptsrc(self, epochs, mean, std) -> None:
        learner = Learner()
        average = GaussianPromptAverage(learner, total_epochs=epochs, mean=mean, std=std)
        states = []
        for _ in range(epochs):
            with torch.no_grad():
                learner.ctx.add_(torch.randn(2, 3))
            states.append({"ctx": learner.ctx.detach().clone().double()})
            average.update()
        expected = promptsrc_gpa(states, mean, std)["ctx"]
        torch.testing.assert_close(
            average.averaged()["ctx"].double(), expected, rtol=1e-5, atol=1e-6
        )
        assert set(average.averaged()) == {"ctx"}  # the frozen weight is not averaged

    def test_weights(self) -> None:
        average = GaussianPromptAverage(Learner(), total_epochs=20)
        assert average.weights.argmax().item() == 14  # epoch 15 (1-based)
        torch.testing.assert_close(average.weights.sum(), torch.tensor(1.0, dtype=torch.float64))

    def test_epochs_far_from_the_mean_do_not_underflow(self) -> None:
        learner = Learner()
        average = GaussianPromptAverage(learner, total_epochs=3)  # mean 15: weights e^-98 .. e^-72
        for value in (1.0, 2.0, 3.0):
            learner.ctx.data.fill_(value)
            average.update()
        assert torch.isfinite(average.averaged()["ctx"]).all()
        torch.testing.assert_close(average.averaged()["ctx"], torch.full((2, 3), 3.0))

    def test_copy_to_and_mapping_input(self) -> None:
        learner = Learner()
        average = GaussianPromptAverage({"ctx": learner.ctx}, total_epochs=2, mean=1.5)
        for value in (1.0, 3.0):
            learner.ctx.data.fill_(value)
            average.update()
        average.copy_to()
        torch.testing.assert_close(learner.ctx.data, torch.full((2, 3), 2.0))
        other = Learner()
        average.copy_to(other)
        torch.testing.assert_close(other.ctx.data, torch.full((2, 3), 2.0))
        with pytest.raises(KeyError, match="ctx"):
            average.copy_to(torch.nn.Linear(1, 1))

    def test_state_dict_round_trip(self) -> None:
        learner = Learner()
        average = GaussianPromptAverage(learner, total_epochs=4, mean=2.0)
        learner.ctx.data.fill_(1.0)
        average.update()
        resumed = GaussianPromptAverage(learner, total_epochs=4, mean=2.0)
        resumed.load_state_dict(average.state_dict())
        for target in (average, resumed):
            learner.ctx.data.fill_(5.0)
            target.update()
        torch.testing.assert_close(resumed.averaged()["ctx"], average.averaged()["ctx"])
        assert resumed.epoch == 2
        with pytest.raises(ValueError, match="total_epochs"):
            GaussianPromptAverage(learner, total_epochs=5, mean=2.0).load_state_dict(
                average.state_dict()
            )

    def test_half_precision_parameters(self) -> None:
        learner = Learner().half()
        average = GaussianPromptAverage(learner, total_epochs=2, mean=1.5)
        for value in (1.0, 2.0):
            learner.ctx.data.fill_(value)
            average.update()
        assert average.averaged()["ctx"].dtype == torch.float16
        torch.testing.assert_close(average.averaged()["ctx"].float(), torch.full((2, 3), 1.5))

    @pytest.mark.parametrize(
        ("args", "kwargs", "error", "match"),
        [
            ((Learner(),), {"total_epochs": 0}, ValueError, "total_epochs"),
            ((Learner(),), {"total_epochs": 2.0}, TypeError, "total_epochs"),
            ((Learner(),), {"total_epochs": 5, "std": 0.0}, ValueError, "std"),
            ((Learner(),), {"total_epochs": 5, "mean": float("inf")}, ValueError, "mean"),
            (([1.0],), {"total_epochs": 5}, TypeError, "module"),
            (({"w": torch.ones(2, dtype=torch.long)},), {"total_epochs": 5}, TypeError, "w"),
            ((torch.nn.ReLU(),), {"total_epochs": 5}, ValueError, "no parameter"),
        ],
    )
    def test_bad_arguments(self, args, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            GaussianPromptAverage(*args, **kwargs)

    def test_misuse_is_named(self) -> None:
        average = GaussianPromptAverage(Learner(), total_epochs=1)
        with pytest.raises(RuntimeError, match="update"):
            average.averaged()
        with pytest.raises(RuntimeError, match="update"):
            average.copy_to()
        average.update()
        with pytest.raises(RuntimeError, match="total_epochs=1"):
            average.update()


class TestNeverHalfChanged:
    """`load_state_dict` and `copy_to` check everything before they change anything."""

    def trained(self) -> tuple[Learner, GaussianPromptAverage]:
        learner = Learner()
        average = GaussianPromptAverage(learner, total_epochs=4, mean=2.0)
        for value in (1.0, 3.0):
            learner.ctx.data.fill_(value)
            average.update()
        return learner, average

    def test_another_models_average_is_refused_whole(self) -> None:
        _, average = self.trained()
        before = average.state_dict()

        class Wider(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ctx = torch.nn.Parameter(torch.zeros(2, 5))

        other = GaussianPromptAverage(Wider(), total_epochs=4, mean=2.0)
        other.update()
        other.update()
        other.update()
        with pytest.raises(ValueError, match=r"average 'ctx' has shape \(2, 5\).*another model"):
            average.load_state_dict(other.state_dict())
        assert average.epoch == before["epoch"] == 2
        torch.testing.assert_close(average.averages["ctx"], before["averages"]["ctx"])

    @pytest.mark.parametrize(
        ("change", "error", "match"),
        [
            ({"epoch": 9}, ValueError, r"epoch must be an int in \[0, 4\]"),
            ({"epoch": 1.5}, ValueError, "epoch must be an int"),
            ({"averages": {}}, KeyError, "averages"),
            ({"averages": {"ctx": torch.zeros(3)}}, ValueError, "has shape"),
        ],
    )
    def test_a_bad_state_changes_nothing(self, change, error, match) -> None:
        _, average = self.trained()
        before = average.state_dict()
        with pytest.raises(error, match=match):
            average.load_state_dict(before | change)
        assert average.epoch == 2
        torch.testing.assert_close(average.averages["ctx"], before["averages"]["ctx"])
        with pytest.raises(KeyError, match="state lacks seen_weight"):
            average.load_state_dict({k: v for k, v in before.items() if k != "seen_weight"})

    def test_copy_to_a_module_of_other_shapes_writes_nothing(self) -> None:
        _, average = self.trained()

        class Mixed(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.ctx = torch.nn.Parameter(torch.zeros(2, 3))
                self.bias = torch.nn.Parameter(torch.zeros(4))

        learner = Learner()
        learner.bias = torch.nn.Parameter(torch.zeros(2))
        average_two = GaussianPromptAverage(learner, total_epochs=2)
        average_two.update()
        target = Mixed()
        with pytest.raises(ValueError, match=r"'bias' has shape \(4,\).*nothing was copied"):
            average_two.copy_to(target)
        assert torch.equal(target.ctx, torch.zeros(2, 3))  # the first one was not written either
        with pytest.raises(TypeError, match=r"module must be an nn\.Module"):
            average.copy_to({"ctx": torch.zeros(2, 3)})  # type: ignore[arg-type]
