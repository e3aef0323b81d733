"""AssignmentEntropy / functional.assignment_entropy / functional.entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import promptmix.functional as PF
from promptmix import AssignmentEntropy, UsageEstimate

pytestmark = pytest.mark.usefixtures("single_thread")

MODES = ("sample", "marginal", "mutual_information")


def h(*probabilities: float) -> float:
    """Shannon entropy in nats of a hand-written distribution."""
    return -sum(p * math.log(p) for p in probabilities if p > 0)


@st.composite
def assignments(draw, max_batch: int = 8, max_k: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft responsibilities ``(B, K)`` (softmax of bounded logits) and labels in ``[0, 3)``."""
    batch = draw(st.integers(1, max_batch))
    k = draw(st.integers(1, max_k))
    logits = draw(
        hnp.arrays(np.float64, (batch, k), elements=st.floats(-6, 6, allow_subnormal=False))
    )
    labels = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, 2)))
    return torch.softmax(torch.from_numpy(logits), dim=-1), torch.from_numpy(labels)


#: A running usage estimate of 2 classes: class 0 uses sub-prompt 0, class 1 sub-prompt 1.
PRIOR = torch.tensor([[0.9, 0.1], [0.1, 0.9]])


def with_prior(mode: str = "marginal", **kwargs):
    """An entropy module and the usage prior to call it with."""
    module = AssignmentEntropy(mode=mode, **kwargs)
    return lambda gamma, labels=None: module(gamma, labels, PRIOR)


class TestEntropyFunction:
    def test_hand_values(self) -> None:
        probabilities = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.7, 0.2, 0.1]])
        expected = torch.tensor([math.log(2), 0.0, h(0.7, 0.2, 0.1)])
        torch.testing.assert_close(PF.entropy(probabilities), expected)
        torch.testing.assert_close(PF.entropy(probabilities.T, dim=0), expected)

    def test_zero_probability_has_finite_gradient(self) -> None:
        probabilities = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
        PF.entropy(probabilities).backward()
        assert torch.isfinite(probabilities.grad).all()


class TestAssignmentEntropy:
    def test_smoke(self) -> None:
        logits = torch.randn(6, 4, requires_grad=True)
        value = AssignmentEntropy()(logits.softmax(-1))
        assert value.shape == () and 0 < value.item() < math.log(4)
        value.backward()
        assert logits.grad.abs().sum() > 0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"mode": "joint"}, ValueError, "mode"),
            ({"prior_count": -1.0}, ValueError, "prior_count"),
            ({"prior_count": "4"}, TypeError, "prior_count"),
        ],
    )
    def test_bad_constructor_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            AssignmentEntropy(**kwargs)

    @pytest.mark.parametrize(
        ("responsibilities", "labels", "error", "match"),
        [
            (torch.full((4,), 0.25), None, ValueError, "responsibilities"),
            (torch.full((2, 2, 2), 0.5), None, ValueError, "responsibilities"),
            (torch.ones(2, 1, dtype=torch.long), None, TypeError, "responsibilities"),
            (torch.zeros(3, 0), None, ValueError, "responsibilities"),  # K < 1
            (torch.full((2, 2), 0.7), None, ValueError, "responsibilities.*sum to 1"),
            (torch.tensor([[1.5, -0.5]]), None, ValueError, "responsibilities.*non-negative"),
            (torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]), TypeError, "labels"),
            (torch.full((2, 2), 0.5), torch.tensor([True, False]), TypeError, "labels"),
            (torch.full((2, 2), 0.5), torch.tensor([0, 1, 1]), ValueError, "labels"),
        ],
    )
    @pytest.mark.parametrize("mode", MODES)
    def test_bad_inputs(self, mode, responsibilities, labels, error, match) -> None:
        with pytest.raises(error, match=match):
            AssignmentEntropy(mode=mode)(responsibilities, labels)

    @pytest.mark.parametrize("mode", MODES)
    def test_nan_responsibilities_give_nan_not_an_error_about_them(self, mode) -> None:
        # NaN comes from upstream (NaN features): it propagates, per docs/reliability.md.
        value = AssignmentEntropy(mode=mode)(torch.tensor([[float("nan"), 1.0], [0.5, 0.5]]))
        assert torch.isnan(value)

    def test_labels_out_of_range_with_a_usage_prior(self) -> None:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
            with_prior()(torch.full((2, 2), 0.5), torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="labels"):
            with_prior()(torch.full((2, 2), 0.5), torch.tensor([-1, 0]))

    def test_k_must_match_the_usage_prior(self) -> None:
        with pytest.raises(ValueError, match="usage_prior must have shape"):
            with_prior()(torch.full((2, 3), 1 / 3), torch.tensor([0, 1]))

    def test_functional_argument_errors(self) -> None:
        uniform = torch.full((2, 2), 0.5)
        with pytest.raises(ValueError, match="usage_prior"):
            PF.assignment_entropy(uniform, mode="marginal", usage_prior=torch.full((2,), 0.5))
        with pytest.raises(ValueError, match="prior_count"):
            PF.assignment_entropy(uniform, mode="marginal", prior_count=-2.0)
        with pytest.raises(ValueError, match="mode"):
            PF.assignment_entropy(uniform, mode="Sample")

    @pytest.mark.parametrize("mode", MODES)
    def test_cardinality(self, mode) -> None:
        out = AssignmentEntropy(mode=mode)(
            torch.randn(5, 3).softmax(-1), torch.tensor([0, 1, 0, 2, 1])
        )
        assert out.shape == ()

    def test_hand_computed_values(self) -> None:
        gamma = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.2]])
        labels = torch.tensor([0, 0, 1])
        sample = h(0.8, 0.2) / 3  # the two one-hot rows have zero entropy
        marginal = (math.log(2) + h(0.8, 0.2)) / 2  # class 0 mean (0.5, 0.5), class 1 (0.8, 0.2)
        values = {mode: AssignmentEntropy(mode=mode)(gamma, labels).item() for mode in MODES}
        assert values["sample"] == pytest.approx(sample, rel=1e-6)
        assert values["marginal"] == pytest.approx(marginal, rel=1e-6)
        # Per class: class 0 has H(0.5, 0.5) - 0, class 1 has H(0.8, 0.2) - H(0.8, 0.2).
        assert values["mutual_information"] == pytest.approx(math.log(2) / 2, rel=1e-6)
        # Without labels the batch is one class: mean (0.6, 0.4).
        assert AssignmentEntropy(mode="marginal")(gamma).item() == pytest.approx(
            h(0.6, 0.4), rel=1e-6
        )
        normalized = AssignmentEntropy(mode="marginal", normalize=True)(gamma, labels).item()
        assert normalized == pytest.approx(marginal / math.log(2), rel=1e-6)

    def test_hand_computed_value_with_usage_prior(self) -> None:
        # One image of class 1, gamma (0.7, 0.2, 0.1), prior (0.1, 0.3, 0.6) worth 2 images:
        # blended mean = (1 * gamma + 2 * prior) / 3 = (0.3, 0.8/3, 1.3/3). Asymmetric in K = 3,
        # so swapping the weights n/(n+n0) and n0/(n+n0) gives another entropy.
        value = PF.assignment_entropy(
            torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64),
            torch.tensor([1]),
            mode="marginal",
            usage_prior=torch.tensor([[1 / 3] * 3, [0.1, 0.3, 0.6]], dtype=torch.float64),
            prior_count=2.0,
        )
        expected = h(0.3, 0.8 / 3, 1.3 / 3)
        swapped = h(1.5 / 3, 0.7 / 3, 0.8 / 3)
        assert abs(expected - swapped) > 0.03
        assert value.item() == pytest.approx(expected, rel=1e-9)

    def test_usage_prior_without_labels_is_the_mean_row(self) -> None:
        # labels=None: one class whose prior is the mean of the rows (0.5, 0.3, 0.2), not row 0.
        prior = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.55, 0.35]], dtype=torch.float64)
        value = PF.assignment_entropy(
            torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64),
            mode="marginal",
            usage_prior=prior,
            prior_count=1.0,
        )
        assert value.item() == pytest.approx(h(0.75, 0.15, 0.1), rel=1e-9)
        assert h(0.75, 0.15, 0.1) != pytest.approx(h(0.95, 0.025, 0.025), rel=1e-2)

    def test_uniform_and_one_hot(self) -> None:
        k = 5
        uniform = torch.full((7, k), 1 / k)
        one_hot = torch.eye(k)
        for mode in ("sample", "marginal"):
            assert AssignmentEntropy(mode=mode)(uniform).item() == pytest.approx(math.log(k))
        assert AssignmentEntropy(mode="sample")(one_hot).item() == 0.0
        # Every image certain, usage spread evenly: marginal and mutual information are log K.
        assert AssignmentEntropy(mode="marginal")(one_hot).item() == pytest.approx(math.log(k))
        assert AssignmentEntropy(mode="mutual_information")(one_hot).item() == pytest.approx(
            math.log(k)
        )
        assert AssignmentEntropy(mode="mutual_information")(uniform).item() == pytest.approx(
            0, abs=1e-6
        )

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("shape", [(4, 1), (0, 3)])
    def test_single_subprompt_or_empty_batch_is_a_connected_zero(self, mode, shape) -> None:
        logits = torch.randn(shape, requires_grad=True)
        labels = torch.zeros(shape[0], dtype=torch.long)
        value = AssignmentEntropy(mode=mode, normalize=True)(logits.softmax(-1), labels)
        assert value.item() == 0.0 and value.requires_grad
        value.backward()
        assert torch.equal(logits.grad, torch.zeros(shape))

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("with_prior", [False, True])
    def test_gradcheck(self, mode, with_prior) -> None:
        logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 1, 1, 2, 2, 2])
        prior = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])

        def fn(x: torch.Tensor) -> torch.Tensor:
            return PF.assignment_entropy(
                x.softmax(-1),
                labels,
                prior if with_prior else None,
                mode=mode,
                prior_count=3.0,
            )

        assert torch.autograd.gradcheck(fn, (logits,))

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("normalize", [False, True])
    def test_module_equals_functional(self, mode, normalize) -> None:
        gamma = torch.randn(6, 4).softmax(-1)
        labels = torch.tensor([0, 1, 1, 2, 2, 2])
        module = AssignmentEntropy(mode=mode, normalize=normalize)
        expected = PF.assignment_entropy(gamma, labels, mode=mode, normalize=normalize)
        torch.testing.assert_close(module(gamma, labels), expected)

    @pytest.mark.parametrize("mode", ["marginal", "mutual_information"])
    def test_module_with_prior_equals_functional_with_prior(self, mode) -> None:
        module = AssignmentEntropy(mode=mode, prior_count=2.5)
        prior = torch.randn(3, 4).softmax(-1)
        gamma = torch.randn(5, 4).softmax(-1)
        labels = torch.tensor([0, 2, 2, 0, 2])
        expected = PF.assignment_entropy(gamma, labels, prior, mode=mode, prior_count=2.5)
        torch.testing.assert_close(module(gamma, labels, prior), expected)
        # The prior changes the value: a class with 2-3 images is not its own marginal here.
        assert not torch.allclose(expected, PF.assignment_entropy(gamma, labels, mode=mode))

    def test_sample_mode_ignores_the_prior(self) -> None:
        gamma = torch.randn(5, 2).softmax(-1)
        labels = torch.tensor([0, 1, 1, 0, 1])
        module = AssignmentEntropy(mode="sample")
        torch.testing.assert_close(module(gamma, labels, PRIOR), module(gamma, labels))

    def test_prior_pushes_single_images_toward_the_underused_subprompt(self) -> None:
        # One image per class, each undecided (0.5, 0.5). Class 0 has been using sub-prompt 0,
        # class 1 sub-prompt 1. Without a prior, one image's marginal entropy is its own entropy,
        # already maximal here: zero gradient. With the prior, ascent must move each image toward
        # the sub-prompt its class under-uses.
        labels = torch.tensor([0, 1])
        logits = torch.zeros(2, 2, requires_grad=True)
        with_prior()(logits.softmax(-1), labels).backward()
        grad = logits.grad
        assert grad[0, 1] > 0 > grad[0, 0], grad  # class 0: toward sub-prompt 1
        assert grad[1, 0] > 0 > grad[1, 1], grad  # class 1: toward sub-prompt 0

        plain = torch.zeros(2, 2, requires_grad=True)
        AssignmentEntropy(mode="marginal")(plain.softmax(-1), labels).backward()
        torch.testing.assert_close(plain.grad, torch.zeros(2, 2))

    def test_prior_pushes_even_when_the_image_already_leans_on_the_used_subprompt(self) -> None:
        logits = torch.tensor([[2.0, 0.0]], requires_grad=True)  # image of class 0 leans on 0
        with_prior()(logits.softmax(-1), torch.tensor([0])).backward()
        assert logits.grad[0, 1] > 0 > logits.grad[0, 0]

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("mode", MODES)
    def test_half_precision_finite(self, mode, dtype) -> None:
        logits = torch.randn(6, 4).to(dtype).requires_grad_()
        labels = torch.tensor([0, 1, 1, 2, 2, 2])
        module = AssignmentEntropy(mode=mode)
        prior = torch.full((3, 4), 0.25)
        value = module(logits.softmax(-1), labels, prior)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0
        expected = module(logits.detach().float().softmax(-1), labels, prior)
        torch.testing.assert_close(value.float(), expected, atol=3e-2, rtol=0)


# ----------------------------------------------------------------------------- properties


@given(assignments(), st.sampled_from(MODES))
def test_property_bounds(data, mode) -> None:
    gamma, labels = data
    k = gamma.shape[1]
    value = PF.assignment_entropy(gamma, labels, mode=mode).item()
    normalized = PF.assignment_entropy(gamma, labels, mode=mode, normalize=True).item()
    assert value <= math.log(k) + 1e-9 and normalized <= 1 + 1e-9
    # Mutual information is >= 0 by Jensen (per class, then averaged), whatever the class counts.
    assert value >= -1e-6 and normalized >= -1e-6


def test_mutual_information_is_per_class_and_non_negative_with_unequal_counts() -> None:
    # A plain "class-averaged marginal minus image-averaged sample entropy" is negative here
    # (found by hypothesis); averaging the sample entropies within each class first is not.
    gamma = torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.5, 0.5], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 1, 2])
    value = PF.assignment_entropy(gamma, labels, mode="mutual_information").item()
    assert value == pytest.approx(0.0, abs=1e-7)
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    value = PF.assignment_entropy(spread, torch.tensor([0, 0, 1]), mode="mutual_information")
    assert value.item() == pytest.approx(math.log(2) / 2, rel=1e-6)


@given(assignments(), st.sampled_from(MODES), st.randoms(use_true_random=False))
def test_property_invariant_to_permuting_subprompts_and_images(data, mode, rng) -> None:
    gamma, labels = data
    columns = list(range(gamma.shape[1]))
    rows = list(range(gamma.shape[0]))
    rng.shuffle(columns)
    rng.shuffle(rows)
    expected = PF.assignment_entropy(gamma, labels, mode=mode)
    permuted = PF.assignment_entropy(gamma[rows][:, columns], labels[rows], mode=mode)
    torch.testing.assert_close(permuted, expected)


@given(st.integers(1, 8), st.integers(1, 6), st.sampled_from(["sample", "marginal"]))
def test_property_uniform_gives_log_k(batch, k, mode) -> None:
    value = PF.assignment_entropy(torch.full((batch, k), 1 / k), mode=mode)
    assert value.item() == pytest.approx(math.log(k), abs=1e-6)


@given(
    st.integers(1, 6).flatmap(
        lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), min_size=1, max_size=8))
    )
)
def test_property_one_hot_gives_zero_sample_entropy(args) -> None:
    k, choices = args
    one_hot = torch.nn.functional.one_hot(torch.tensor(choices), k).float()
    assert PF.assignment_entropy(one_hot, mode="sample").item() == 0.0
    # ... and the marginal entropy is the entropy of the usage counts.
    counts = torch.bincount(torch.tensor(choices), minlength=k).double() / len(choices)
    expected = PF.entropy(counts).item()
    assert PF.assignment_entropy(one_hot, mode="marginal").item() == pytest.approx(expected, 1e-5)


@given(assignments(), st.sampled_from(MODES), st.sampled_from([torch.float16, torch.bfloat16]))
def test_property_finite_gradients_in_half_precision(data, mode, dtype) -> None:
    gamma, labels = data
    logits = gamma.log().to(dtype).requires_grad_()
    value = PF.assignment_entropy(logits.softmax(-1), labels, mode=mode)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()


def test_wrong_k_names_the_constructor_argument() -> None:
    """The message names `n_subprompts`, what the user wrote, not the internal usage buffer."""
    estimate = UsageEstimate(num_classes=4, n_subprompts=3)
    with pytest.raises(ValueError, match=r"\(batch, 3\).*n_subprompts=3") as error:
        estimate.update(torch.full((5, 2), 0.5), torch.zeros(5, dtype=torch.long))
    assert "buffer" not in str(error.value)


def test_default_mode_is_the_losss() -> None:
    """One default: the module, its function and the loss all use the marginal entropy."""
    from promptmix import MixtureOfPromptsLoss

    assert AssignmentEntropy().mode == "marginal"
    assert MixtureOfPromptsLoss().entropy.mode == "marginal"
    gamma, labels = torch.randn(6, 3).softmax(-1), torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(
        AssignmentEntropy()(gamma, labels),
        PF.assignment_entropy(gamma, labels, mode="marginal"),
    )
    torch.testing.assert_close(
        PF.assignment_entropy(gamma, labels), PF.assignment_entropy(gamma, labels, mode="marginal")
    )
