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
        average = GaussianPromptAverage(learner, epochs, mean=mean, std=std)
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
        average = GaussianPromptAverage(Learner(), 20)
        assert average.weights.argmax().item() == 14  # epoch 15 (1-based)
        torch.testing.assert_close(average.weights.sum(), torch.tensor(1.0, dtype=torch.float64))

    def test_epochs_far_from_the_mean_do_not_underflow(self) -> None:
        learner = Learner()
        average = GaussianPromptAverage(learner, 3)  # mean 15: weights e^-98 .. e^-72
        for value in (1.0, 2.0, 3.0):
            learner.ctx.data.fill_(value)
            average.update()
        assert torch.isfinite(average.averaged()["ctx"]).all()
        torch.testing.assert_close(average.averaged()["ctx"], torch.full((2, 3), 3.0))

    def test_copy_to_and_mapping_input(self) -> None:
        learner = Learner()
        average = GaussianPromptAverage({"ctx": learner.ctx}, 2, mean=1.5)
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
        average = GaussianPromptAverage(learner, 4, mean=2.0)
        learner.ctx.data.fill_(1.0)
        average.update()
        resumed = GaussianPromptAverage(learner, 4, mean=2.0)
        resumed.load_state_dict(average.state_dict())
        for target in (average, resumed):
            learner.ctx.data.fill_(5.0)
            target.update()
        torch.testing.assert_close(resumed.averaged()["ctx"], average.averaged()["ctx"])
        assert resumed.epoch == 2
        with pytest.raises(ValueError, match="total_epochs"):
            GaussianPromptAverage(learner, 5, mean=2.0).load_state_dict(average.state_dict())

    def test_half_precision_parameters(self) -> None:
        learner = Learner().half()
        average = GaussianPromptAverage(learner, 2, mean=1.5)
        for value in (1.0, 2.0):
            learner.ctx.data.fill_(value)
            average.update()
        assert average.averaged()["ctx"].dtype == torch.float16
        torch.testing.assert_close(average.averaged()["ctx"].float(), torch.full((2, 3), 1.5))

    @pytest.mark.parametrize(
        ("args", "kwargs", "error", "match"),
        [
            ((Learner(), 0), {}, ValueError, "total_epochs"),
            ((Learner(), 2.0), {}, TypeError, "total_epochs"),
            ((Learner(), 5), {"std": 0.0}, ValueError, "std"),
            ((Learner(), 5), {"mean": float("inf")}, ValueError, "mean"),
            (([1.0], 5), {}, TypeError, "module"),
            ((torch.nn.ReLU(), 5), {}, ValueError, "no parameter"),
        ],
    )
    def test_bad_arguments(self, args, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            GaussianPromptAverage(*args, **kwargs)

    def test_misuse_is_named(self) -> None:
        average = GaussianPromptAverage(Learner(), 1)
        with pytest.raises(RuntimeError, match="update"):
            average.averaged()
        average.update()
        with pytest.raises(RuntimeError, match="total_epochs=1"):
            average.update()
