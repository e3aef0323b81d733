"""The usage estimate, `usage_floor`, `revive_dead_subprompts` and their modules."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from promptmix import MixtureOfPromptsLoss, SubpromptReviver, UsageEstimate, UsageFloor
from promptmix import functional as PF

pytestmark = pytest.mark.usefixtures("single_thread")


def test_floor_smoke_and_zero_above_the_floor() -> None:
    gamma = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).repeat(5, 1)
    assert PF.usage_floor(gamma, floor=0.25) == 0  # 40/30/20/10: above 1/16 everywhere
    assert PF.usage_floor(gamma, floor=0.5) > 0  # 0.1 < 0.125


def test_floor_hand_computation() -> None:
    gamma = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0]])
    level = 0.6 / 3  # 0.2
    expected = ((level - 0.1) / level) ** 2 / 3 + 1.0 / 3
    assert torch.allclose(PF.usage_floor(gamma, floor=0.6), torch.tensor(expected))


def test_floor_per_class_mean_and_prior_blend() -> None:
    gamma = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    # Each class alone uses one sub-prompt: one dead each, 1/2 per class.
    assert torch.allclose(PF.usage_floor(gamma, labels, floor=1.0), torch.tensor(0.5))
    prior = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    blended = PF.usage_floor(gamma, labels, floor=1.0, usage_prior=prior, prior_count=1.0)
    assert torch.allclose(blended, torch.tensor(0.0))  # (1 + 0) / 2 = 0.5 each: at the floor


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(floor=1.5), "floor must be in"),
        (dict(prior_count=-1.0), "prior_count"),
        (dict(usage_prior=torch.full((2, 3), 1 / 3)), "usage_prior must have shape"),
    ],
)
def test_floor_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PF.usage_floor(torch.full((4, 2), 0.5), **kwargs)


def test_floor_degenerate_cases_are_connected_zeros() -> None:
    for gamma in (torch.ones(3, 1, requires_grad=True), torch.empty(0, 3, requires_grad=True)):
        value = PF.usage_floor(gamma)
        value.backward()
        assert value == 0 and gamma.grad is not None


def test_floor_gradcheck() -> None:
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])

    def penalty(x: torch.Tensor) -> torch.Tensor:
        return PF.usage_floor(torch.softmax(x * 3, dim=-1), labels, floor=1.0)

    assert torch.autograd.gradcheck(penalty, (logits,))


def test_floor_gradient_moves_mass_to_the_starved_sub_prompt() -> None:
    logits = torch.tensor([[4.0, 0.0], [3.0, 0.0]], requires_grad=True)
    PF.usage_floor(torch.softmax(logits, dim=-1), floor=1.0).backward()
    assert (logits.grad[:, 1] < 0).all()  # descending raises sub-prompt 1


@given(seed=st.integers(0, 10_000), k=st.integers(2, 6), floor=st.floats(0.0, 1.0))
def test_floor_bounds(seed: int, k: int, floor: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    gamma = torch.softmax(5 * torch.randn(7, k, generator=generator), dim=-1)
    labels = torch.randint(0, 3, (7,), generator=generator)
    value = PF.usage_floor(gamma, labels, floor=floor).item()
    assert -1e-6 <= value <= (k - 1) / k + 1e-6


def test_module_equals_function() -> None:
    generator = torch.Generator().manual_seed(0)
    gamma = torch.randn(12, 4, generator=generator).softmax(-1)
    labels = torch.arange(3).repeat(4)
    prior = torch.randn(3, 4, generator=generator).softmax(-1)
    module = UsageFloor(floor=0.5, prior_count=2.0)
    for usage_prior in (None, prior):
        expected = PF.usage_floor(gamma, labels, usage_prior, floor=0.5, prior_count=2.0)
        torch.testing.assert_close(module(gamma, labels, usage_prior), expected)


@given(seed=st.integers(0, 10_000), momentum=st.floats(0.0, 0.99))
def test_usage_estimate_stays_on_the_simplex(seed: int, momentum: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    estimate = UsageEstimate(num_classes=3, n_subprompts=4, momentum=momentum)
    for _ in range(3):
        labels = torch.randint(0, 3, (9,), generator=generator)
        estimate.update(torch.randn(9, 4, generator=generator).softmax(-1), labels)
    assert torch.allclose(estimate.usage.sum(dim=-1), torch.ones(3))
    assert (estimate.usage >= 0).all()


def test_running_usage_hand_computation_and_absent_classes() -> None:
    usage = torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    gamma = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.4, 0.6]])
    labels = torch.tensor([0, 0, 2])
    new = PF.running_usage(usage, gamma, labels, momentum=0.75)
    expected = torch.tensor(
        [
            [0.75 * 0.5 + 0.25 * 0.5] * 2,
            [0.2, 0.8],
            [0.75 * 0.9 + 0.25 * 0.4, 0.75 * 0.1 + 0.25 * 0.6],
        ]
    )
    torch.testing.assert_close(new, expected)
    assert torch.equal(usage, torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]))  # pure


def test_running_usage_propagates_nan_to_its_class_only() -> None:
    usage = torch.full((2, 2), 0.5)
    gamma = torch.tensor([[float("nan"), 0.5], [0.3, 0.7]])
    new = PF.running_usage(usage, gamma, torch.tensor([0, 1]))
    assert torch.isnan(new[0]).any() and torch.isfinite(new[1]).all()


def test_usage_estimate_checks_its_k_and_labels() -> None:
    estimate = UsageEstimate(num_classes=2, n_subprompts=3)
    with pytest.raises(ValueError, match=r"\(batch, 3\).*n_subprompts=3"):
        estimate.update(torch.full((2, 2), 0.5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        estimate.update(torch.full((2, 3), 1 / 3), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match=r"labels must be an integer torch\.Tensor but is a list"):
        estimate.update(torch.full((2, 3), 1 / 3), [0, 1])
    for kwargs, match in (
        ({"num_classes": 0, "n_subprompts": 2}, "num_classes"),
        ({"num_classes": 2, "n_subprompts": 0}, "n_subprompts"),
        ({"num_classes": 2, "n_subprompts": 2, "momentum": 1.0}, "momentum"),
    ):
        with pytest.raises(ValueError, match=match):
            UsageEstimate(**kwargs)


def test_usage_floor_in_the_loss_is_reported_and_weighted() -> None:
    images, prompts = torch.randn(8, 4), torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.arange(2).repeat(4)
    plain = MixtureOfPromptsLoss()(images, prompts, labels)
    loss_fn = MixtureOfPromptsLoss(regularizers={"usage": (UsageFloor(floor=1.0), 2.0)})
    out = loss_fn(images, prompts, labels)
    assert torch.allclose(out["loss"], plain["loss"] + 2.0 * out["usage"])
    # It sees the loss's E-step: the soft responsibilities at the loss's tau and scale.
    soft = PF.responsibilities(images, prompts, labels, tau=0.3)
    torch.testing.assert_close(out["usage"], PF.usage_floor(soft, labels, floor=1.0))


def test_usage_floor_blends_the_losss_usage_estimate() -> None:
    images, prompts = torch.randn(8, 4), torch.randn(2, 3, 4)
    labels = torch.arange(2).repeat(4)
    estimate = UsageEstimate(num_classes=2, n_subprompts=3)
    with torch.no_grad():
        estimate.usage.copy_(torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]]))
    prior = estimate.usage.clone()
    loss_fn = MixtureOfPromptsLoss(
        usage_estimate=estimate, regularizers={"usage": (UsageFloor(floor=1.0), 1.0)}
    )
    out = loss_fn(images, prompts, labels)
    soft = PF.responsibilities(images, prompts, labels, tau=0.3)
    torch.testing.assert_close(out["usage"], PF.usage_floor(soft, labels, prior, floor=1.0))
    assert not torch.allclose(out["usage"], PF.usage_floor(soft, labels, floor=1.0))


def test_revive_bad_arguments() -> None:
    with pytest.raises(ValueError, match="usage must have shape"):
        PF.revive_dead_subprompts(torch.zeros(2, 3, 4), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="parameter must be a tensor"):
        PF.revive_dead_subprompts(torch.zeros(3), torch.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="min_share"):
        PF.revive_dead_subprompts(torch.zeros(1, 2, 3), torch.full((1, 2), 0.5), min_share=2.0)
    with pytest.raises(TypeError, match="parameter must be a floating-point tensor"):
        PF.revive_dead_subprompts(torch.zeros(1, 2, 3, dtype=torch.long), torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="parameter must be finite"):
        PF.revive_dead_subprompts(torch.full((1, 2, 3), float("nan")), torch.full((1, 2), 0.5))


def test_revive_leaves_live_and_unseen_classes_alone() -> None:
    params = torch.randn(3, 2, 4)
    usage = torch.tensor([[0.6, 0.4], [float("nan")] * 2, [1.0, 0.0]])
    new, revived, new_usage = PF.revive_dead_subprompts(params, usage)
    assert torch.equal(new[:2], params[:2])
    assert revived.tolist() == [[False, False], [False, False], [False, True]]
    assert torch.allclose(new[2, 0] + new[2, 1], 2 * params[2, 0])  # a symmetric split
    torch.testing.assert_close(new_usage[2], torch.tensor([0.5, 0.5]))  # the split halves
    torch.testing.assert_close(new_usage[0], usage[0])


def test_revive_several_dead_split_the_busiest_in_turn() -> None:
    params = torch.arange(4.0).reshape(1, 4, 1) + 1
    usage = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    new, revived, new_usage = PF.revive_dead_subprompts(params, usage, split_std=0.0)
    assert revived.tolist() == [[False, False, True, True]]
    torch.testing.assert_close(new_usage.sum(), torch.tensor(1.0))  # still on the simplex
    # First split 0 (0.7 -> 0.35 each), then 0.35 vs 0.3: sub-prompt 0 or its copy again.
    assert new[0, 2, 0] == 1.0 and new[0, 3, 0] == 1.0


def test_revived_sub_prompt_takes_assignments() -> None:
    generator = torch.Generator().manual_seed(0)
    # One class, two looks; sub-prompt 0 sits between them, sub-prompt 1 points away (dead).
    looks = torch.tensor([[1.0, 0.3, 0.0], [1.0, -0.3, 0.0]])
    images = looks.repeat_interleave(10, 0) + 0.02 * torch.randn(20, 3, generator=generator)
    labels = torch.zeros(20, dtype=torch.long)
    prompts = torch.nn.Parameter(torch.tensor([[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.5]]]))
    estimate = UsageEstimate(num_classes=1, n_subprompts=2, momentum=0.0)
    loss_fn = MixtureOfPromptsLoss(usage_estimate=estimate)
    loss_fn(images, prompts, labels)  # the loss's step updates the estimate
    assert estimate.usage[0, 1] < 1e-6
    reviver = SubpromptReviver(estimate, split_std=0.05)
    assert reviver.revive_(prompts, generator=generator).tolist() == [[False, True]]
    torch.testing.assert_close(estimate.usage.sum(-1), torch.ones(1))
    own = PF.own_class_similarities(images, prompts.detach(), labels)
    share = (own.argmax(dim=-1) == 1).float().mean()
    assert 0 < share < 1


def test_reviver_validates_everything_before_changing_anything() -> None:
    estimate = UsageEstimate(num_classes=2, n_subprompts=3, momentum=0.0)
    estimate.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 1]))
    reviver = SubpromptReviver(estimate)
    usage = estimate.usage.clone()
    wrong_k = torch.nn.Parameter(torch.randn(2, 2, 4))
    before = wrong_k.detach().clone()
    with pytest.raises(ValueError, match=r"parameter must have shape \(2, 3, \.\.\.\)"):
        reviver.revive_(wrong_k)
    assert torch.equal(wrong_k, before) and torch.equal(estimate.usage, usage)
    # NaN images reached the loss: the estimate holds NaN, nothing is revived or changed.
    estimate.update(torch.tensor([[float("nan"), 0.5, 0.5]]), torch.tensor([1]))
    prompts = torch.nn.Parameter(torch.randn(2, 3, 4))
    before = prompts.detach().clone()
    with pytest.raises(ValueError, match=r"NaN or inf for class\(es\) \[1\]"):
        reviver.revive_(prompts)
    assert torch.equal(prompts, before)
    with pytest.raises(TypeError, match="usage_estimate must be a UsageEstimate"):
        SubpromptReviver(torch.full((2, 3), 1 / 3))


def test_reviver_reads_the_same_estimate_as_the_loss() -> None:
    estimate = UsageEstimate(num_classes=2, n_subprompts=2)
    loss_fn = MixtureOfPromptsLoss(usage_estimate=estimate)
    reviver = SubpromptReviver(loss_fn.usage_estimate)
    assert reviver.usage_estimate is estimate
    assert list(loss_fn.state_dict()) == ["usage_estimate.usage"]


def test_revived_split_has_the_documented_default_size() -> None:
    """The split is +-epsilon with epsilon of std `split_std` (0.01 by default) times the RMS
    of the busiest sub-prompt's entries, so the two halves differ by about 2 * 0.01 * RMS."""
    dim = 4096
    busy = torch.randn(dim, generator=torch.Generator().manual_seed(0)) * 3.0
    params = torch.stack([busy, torch.zeros(dim)]).unsqueeze(0)  # (1 class, K=2, dim)
    new, revived, _ = PF.revive_dead_subprompts(
        params, torch.tensor([[1.0, 0.0]]), generator=torch.Generator().manual_seed(1)
    )
    assert revived.tolist() == [[False, True]]
    rms = busy.pow(2).mean().sqrt()
    gap = (new[0, 0] - new[0, 1]).pow(2).mean().sqrt() / rms  # std of 2 * epsilon / RMS
    assert gap.item() == pytest.approx(2 * 0.01, rel=0.1)


def test_the_floors_simplex_check_acts_on_the_device(monkeypatch) -> None:
    """Off the CPU the check cannot raise: it must make the value NaN (its result is used)."""
    from promptmix import _validation

    off = torch.full((2, 2), 0.75)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        PF.usage_floor(off)
    monkeypatch.setattr(_validation, "HOST_CHECKS", False)
    assert torch.isnan(PF.usage_floor(off))
    assert torch.isnan(PF.usage_floor(torch.full((2, 2), 0.5), usage_prior=torch.full((1, 2), 0.9)))
    assert torch.isfinite(PF.usage_floor(torch.full((2, 2), 0.5)))
