"""Shared looks, the shrunk start and label confidence (`functional.looks`, `label_noise`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import normalized_mutual_info_score

from promptmix import _validation
from promptmix import functional as PF


def world(per_class: int, *, classes: int = 6, looks: int = 3, dim: int = 24, seed: int = 0):
    """Images `text_c + 0.8 look_m + noise` with looks common to every class."""
    generator = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    common = F.normalize(torch.randn(looks, dim, generator=generator), dim=-1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    look = torch.arange(len(labels)) % looks
    noise = 0.05 * torch.randn(len(labels), dim, generator=generator)
    return text, F.normalize(text[labels] + 0.8 * common[look] + noise, dim=-1), labels, look


class TestShrunkGroupMeans:
    def test_hand_values(self) -> None:
        values = torch.tensor([[2.0, 0.0], [4.0, 2.0], [6.0, 6.0]])
        groups = torch.tensor([0, 0, 2])
        out = PF.shrunk_group_means(values, groups, num_groups=3, prior_count=2.0)
        torch.testing.assert_close(out, torch.tensor([[1.5, 0.5], [0.0, 0.0], [2.0, 2.0]]))
        plain = PF.shrunk_group_means(values, groups, num_groups=3, prior_count=0.0)
        torch.testing.assert_close(plain[0], values[:2].mean(0))

    @given(
        copies=st.integers(min_value=1, max_value=20),
        prior_count=st.floats(min_value=0.1, max_value=10.0),
    )
    def test_more_images_move_further_from_zero(self, copies: int, prior_count: float) -> None:
        values = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
        fewer = PF.shrunk_group_means(
            values.repeat(copies, 1),
            torch.zeros(2 * copies, dtype=torch.long),
            num_groups=1,
            prior_count=prior_count,
        )
        more = PF.shrunk_group_means(
            values.repeat(copies + 1, 1),
            torch.zeros(2 * copies + 2, dtype=torch.long),
            num_groups=1,
            prior_count=prior_count,
        )
        mean = values.mean(0)
        # Always a shrunk copy of the plain mean, by n / (n + n0), and less shrunk with more.
        torch.testing.assert_close(fewer[0], mean * (2 * copies) / (2 * copies + prior_count))
        assert fewer.norm() < more.norm() < mean.norm()

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            (dict(num_groups=0), ValueError, "num_groups"),
            (dict(num_groups=2, prior_count=-1.0), ValueError, "prior_count"),
            (dict(num_groups=1), ValueError, r"groups must lie in \[0, 0\]"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict, error: type, match: str) -> None:
        with pytest.raises(error, match=match):
            PF.shrunk_group_means(torch.ones(2, 3), torch.tensor([0, 1]), **kwargs)


class TestSharedLookStart:
    def test_recovers_the_shared_looks_at_one_shot_per_class(self) -> None:
        # Three images per class (one per look): no class could find its looks alone.
        text, images, labels, look = world(per_class=3, classes=12)
        start = PF.shared_look_start(
            images, labels, text, n_subprompts=3, generator=torch.Generator().manual_seed(0)
        )
        assert normalized_mutual_info_score(look.numpy(), start.looks.numpy()) > 0.99

    def test_start_is_text_plus_parts_and_shrinks_with_few_images(self) -> None:
        text, images, labels, _ = world(per_class=1, classes=4, looks=1)
        start = PF.shared_look_start(images, labels, text, n_subprompts=1, prior_count=3.0)
        residual = images - text[labels]
        gap = residual.mean(0)
        # One image per class keeps 1 / (1 + n0) of its own offset.
        torch.testing.assert_close(start.class_offsets, (residual - gap) / 4.0)
        rest = residual - gap - start.class_offsets
        torch.testing.assert_close(start.shared_offsets[0], gap + rest.mean(0))
        torch.testing.assert_close(
            start.subprompt_offsets[:, 0], (rest - rest.mean(0)) / 4.0, atol=1e-6, rtol=0
        )

    def test_looks_are_ordered_by_size(self) -> None:
        text, images, labels, _ = world(per_class=6, classes=8, looks=3)
        keep = (torch.arange(len(labels)) % 3 != 2) | (torch.arange(len(labels)) % 2 == 0)
        start = PF.shared_look_start(images[keep], labels[keep], text, n_subprompts=3)
        sizes = torch.bincount(start.looks, minlength=3)
        assert (sizes[:-1] >= sizes[1:]).all()

    @pytest.mark.parametrize(
        ("change", "error", "match"),
        [
            (dict(n_subprompts=100), ValueError, "n_subprompts must be <="),
            (dict(text_features=torch.randn(6, 5)), ValueError, "image_features must have dim 5"),
            (dict(labels=torch.arange(18) % 7), ValueError, r"labels must lie in \[0, 5\]"),
            (dict(prior_count=float("nan")), ValueError, "prior_count"),
            (dict(labels=[0] * 18), TypeError, "labels"),
        ],
    )
    def test_bad_arguments_are_named(self, change: dict, error: type, match: str) -> None:
        text, images, labels, _ = world(per_class=3)
        kwargs = dict(labels=labels, text_features=text, n_subprompts=3) | change
        with pytest.raises(error, match=match):
            PF.shared_look_start(images, **kwargs)

    @pytest.mark.parametrize("value", [float("nan"), 0.0])
    def test_nan_or_zero_images_are_refused(self, value: float) -> None:
        text, images, labels, _ = world(per_class=3)
        images = images.clone()
        images[4] = value
        with pytest.raises(ValueError, match="image_features"):
            PF.shared_look_start(images, labels, text, n_subprompts=3)


class TestLabelConfidence:
    def test_matches_the_flip_model(self) -> None:
        logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
        p = torch.softmax(logits, -1)[0, 1].item()
        eps = 0.3
        expected = (1 - eps) * p / ((1 - eps) * p + eps * (1 - p) / 3)
        got = PF.label_confidence(logits, torch.tensor([1]), label_noise=eps)
        assert got.item() == pytest.approx(expected, rel=1e-6)

    @given(st.floats(min_value=-30, max_value=30), st.floats(min_value=0.01, max_value=0.9))
    def test_rises_with_the_labels_logit(self, shift: float, eps: float) -> None:
        logits = torch.tensor([[0.0, 1.0, -2.0]]).repeat(2, 1)
        logits[1, 0] += 1.0
        logits[:, 0] += shift
        weights = PF.label_confidence(logits, torch.tensor([0, 0]), label_noise=eps)
        assert 0.0 <= weights[0] <= weights[1] <= 1.0

    def test_no_noise_one_class_and_no_gradient(self) -> None:
        logits = torch.randn(4, 3, requires_grad=True)
        assert torch.equal(
            PF.label_confidence(logits, torch.zeros(4, dtype=torch.long), label_noise=0.0),
            torch.ones(4),
        )
        assert torch.equal(
            PF.label_confidence(torch.randn(4, 1), torch.zeros(4, dtype=torch.long)), torch.ones(4)
        )
        assert not PF.label_confidence(logits, torch.zeros(4, dtype=torch.long)).requires_grad

    def test_nan_rows_give_nan_and_extremes_stay_finite(self) -> None:
        logits = torch.tensor([[float("nan"), 0.0], [1e4, -1e4], [-1e4, 1e4]])
        weights = PF.label_confidence(logits, torch.tensor([0, 0, 0]))
        assert math.isnan(weights[0]) and weights[1] == 1.0 and weights[2] == 0.0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            (dict(label_noise=1.0), ValueError, "label_noise"),
            (dict(label_noise=-0.1), ValueError, "label_noise"),
            (dict(labels=torch.tensor([0, 5])), ValueError, r"labels must lie in \[0, 2\]"),
            (dict(logits=torch.zeros(2)), ValueError, "logits"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict, error: type, match: str) -> None:
        args = dict(logits=torch.zeros(2, 3), labels=torch.tensor([0, 1])) | kwargs
        logits, labels = args.pop("logits"), args.pop("labels")
        with pytest.raises(error, match=match):
            PF.label_confidence(logits, labels, **args)


class TestBadValuesNeverGiveAFiniteResult:
    """The policy of docs/reliability.md for the recipe's new functions (found by bad_inputs.py)."""

    @pytest.fixture
    def device_path(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Value checks as on a GPU: no host reads, NaN instead of an error."""
        monkeypatch.setattr(_validation, "HOST_CHECKS", False)

    @pytest.mark.parametrize("label_noise", [0.0, 0.1])
    def test_label_confidence_keeps_a_nan_row_nan_whatever_the_noise(
        self, label_noise: float
    ) -> None:
        logits = torch.tensor([[0.0, float("nan")], [2.0, 0.0]])
        weights = PF.label_confidence(logits, torch.tensor([0, 0]), label_noise=label_noise)
        assert math.isnan(weights[0]) and math.isfinite(weights[1])
        one_class = PF.label_confidence(torch.tensor([[float("nan")], [1.0]]), torch.tensor([0, 0]))
        assert math.isnan(one_class[0]) and one_class[1] == 1.0

    @pytest.mark.parametrize("label_noise", [0.0, 0.1])
    @pytest.mark.parametrize("bad", [3, -1])
    def test_label_confidence_off_the_cpu_makes_a_bad_label_nan(
        self, device_path: None, label_noise: float, bad: int
    ) -> None:
        weights = PF.label_confidence(
            torch.randn(3, 3), torch.tensor([0, bad, 2]), label_noise=label_noise
        )
        assert math.isnan(weights[1]) and torch.isfinite(weights[[0, 2]]).all()

    @pytest.mark.parametrize("bad", [3, -1])
    def test_shrunk_group_means_off_the_cpu_makes_a_bad_group_nan(
        self, device_path: None, bad: int
    ) -> None:
        means = PF.shrunk_group_means(torch.ones(3, 2), torch.tensor([0, bad, 2]), num_groups=3)
        assert torch.isnan(means).all()

    def test_shared_look_start_checks_labels_on_the_host_on_every_device(
        self, device_path: None
    ) -> None:
        text, images, labels, _ = world(per_class=3)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\]"):
            PF.shared_look_start(images, labels + 1, text, n_subprompts=3)

    @pytest.mark.parametrize("value", [float("nan"), 0.0])
    def test_shared_look_start_refuses_nan_or_zero_text(self, value: float) -> None:
        text, images, labels, _ = world(per_class=3)
        text = text.clone()
        text[2] = value
        with pytest.raises(ValueError, match="text_features"):
            PF.shared_look_start(images, labels, text, n_subprompts=3)

    @pytest.mark.parametrize(
        ("kwargs", "match"), [(dict(iterations=-1), "iterations"), (dict(restarts=0), "restarts")]
    )
    def test_shared_look_start_checks_the_k_means_settings_even_without_k_means(
        self, kwargs: dict, match: str
    ) -> None:
        # Images on their class's text leave no residual: the k-means is skipped.
        text = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
        labels = torch.arange(3).repeat(2)
        with pytest.raises(ValueError, match=match):
            PF.shared_look_start(text[labels], labels, text, n_subprompts=2, **kwargs)
