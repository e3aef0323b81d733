"""Collapse diagnostics: mean pairwise cosine, usage, dominant share, effective sub-prompts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from promptmix import CollapseReport, detect_collapse, diagnostics

pytestmark = pytest.mark.usefixtures("single_thread")


def fan(cosine: float, k: int = 3, dim: int = 8) -> torch.Tensor:
    """K unit vectors whose pairwise cosines all equal ``cosine`` (``(K, dim)``)."""
    # a * shared + b * e_i with a^2 + b^2 = 1 has pairwise cosine a^2.
    a = math.sqrt(cosine)
    b = math.sqrt(1 - cosine)
    vectors = torch.zeros(k, dim)
    vectors[:, 0] = a
    vectors[torch.arange(k), torch.arange(1, k + 1)] = b
    return vectors


class TestMeanPairwiseCosine:
    def test_hand_values(self) -> None:
        features = torch.stack([fan(0.95), fan(0.2), torch.eye(3, 8)])
        torch.testing.assert_close(
            diagnostics.mean_pairwise_cosine(features), torch.tensor([0.95, 0.2, 0.0])
        )
        # Mean of the signed cosines over i < j: (0.7071 + 0 + 0.7071) / 3.
        s = math.sqrt(0.5)
        mixed = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]]])
        assert diagnostics.mean_pairwise_cosine(mixed).item() == pytest.approx(2 * s / 3)

    def test_single_subprompt_counts_as_collapsed(self) -> None:
        torch.testing.assert_close(
            diagnostics.mean_pairwise_cosine(torch.randn(4, 1, 8)), torch.ones(4)
        )

    def test_no_gradient_is_tracked(self) -> None:
        features = torch.randn(2, 3, 4, requires_grad=True)
        assert not diagnostics.mean_pairwise_cosine(features).requires_grad

    def test_bad_input(self) -> None:
        with pytest.raises(ValueError, match="subprompt_features"):
            diagnostics.mean_pairwise_cosine(torch.randn(4))


class TestUsage:
    def test_hand_values(self) -> None:
        gamma = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]])
        usage = diagnostics.subprompt_usage(gamma, torch.tensor([0, 0, 2, 2]), num_classes=3)
        assert usage.shape == (3, 2)
        torch.testing.assert_close(usage[0], torch.tensor([0.75, 0.25]))
        torch.testing.assert_close(usage[2], torch.tensor([0.1, 0.9]))
        # A class with no image is NaN, so it cannot pass for a balanced class.
        assert torch.isnan(usage[1]).all()
        share = diagnostics.dominant_share(usage)
        torch.testing.assert_close(share[[0, 2]], torch.tensor([0.75, 0.9]))
        effective = diagnostics.effective_subprompts(usage)
        expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
        assert effective[0].item() == pytest.approx(expected, rel=1e-6)

    def test_effective_subprompts_range(self) -> None:
        usage = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
        torch.testing.assert_close(
            diagnostics.effective_subprompts(usage), torch.tensor([4.0, 1.0, 2.0])
        )
        torch.testing.assert_close(
            diagnostics.dominant_share(usage), torch.tensor([0.25, 1.0, 0.5])
        )

    @pytest.mark.parametrize(
        ("gamma", "labels", "num_classes", "error", "match"),
        [
            (torch.full((2,), 0.5), torch.tensor([0, 1]), 2, ValueError, "responsibilities"),
            (torch.full((2, 2), 0.5), torch.tensor([0, 2]), 2, ValueError, "labels"),
            (torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]), 2, TypeError, "labels"),
            (torch.full((2, 2), 0.5), torch.tensor([0, 1]), 0, ValueError, "num_classes"),
        ],
    )
    def test_bad_inputs(self, gamma, labels, num_classes, error, match) -> None:
        with pytest.raises(error, match=match):
            diagnostics.subprompt_usage(gamma, labels, num_classes=num_classes)

    def test_usage_functions_reject_wrong_rank(self) -> None:
        with pytest.raises(ValueError, match="usage"):
            diagnostics.dominant_share(torch.rand(3))
        with pytest.raises(ValueError, match="usage"):
            diagnostics.effective_subprompts(torch.rand(2, 3, 4))


class TestDetectCollapse:
    def test_collapsed_by_cosine(self) -> None:
        features = torch.stack([fan(0.95), fan(0.2)])
        report = detect_collapse(features)
        assert isinstance(report, CollapseReport)
        assert report.collapsed and report.collapsed_classes == [0]
        assert report.mean_cosine == pytest.approx((0.95 + 0.2) / 2)
        assert report.dominant_share is None and report.effective_subprompts is None
        assert "collapse in 1/2 classes" in report.message

    def test_threshold_is_strict(self) -> None:
        assert not detect_collapse(torch.stack([fan(0.85)])).collapsed
        assert detect_collapse(torch.stack([fan(0.85)]), cosine_threshold=0.8).collapsed

    def test_collapsed_by_dominant_share_with_diverse_features(self) -> None:
        features = torch.stack([fan(0.1), fan(0.1)])
        # Class 0: 19 of 20 images on sub-prompt 0 (share 0.95); class 1 balanced.
        gamma = torch.zeros(26, 3)
        gamma[:19, 0] = 1.0
        gamma[19, 1] = 1.0
        gamma[20:, :] = torch.eye(3).repeat(2, 1)
        labels = torch.tensor([0] * 20 + [1] * 6)
        report = detect_collapse(features, gamma, labels)
        assert report.collapsed and report.collapsed_classes == [0]
        assert report.dominant_share == pytest.approx((0.95 + 1 / 3) / 2)
        assert 1 < report.effective_subprompts < 3
        assert "dominant share" in report.message

    def test_healthy_mixture(self) -> None:
        features = torch.stack([torch.eye(3, 8), fan(0.3)])
        gamma = torch.eye(3).repeat(2, 1)
        report = detect_collapse(features, gamma, torch.tensor([0, 0, 0, 1, 1, 1]))
        assert not report.collapsed and report.collapsed_classes == []
        assert report.effective_subprompts == pytest.approx(3.0)
        assert report.message.endswith("no collapse")

    def test_class_without_images_is_judged_on_features_only(self) -> None:
        features = torch.stack([fan(0.1), fan(0.1), fan(0.1)])
        gamma = torch.eye(3)
        report = detect_collapse(features, gamma, torch.tensor([0, 0, 0]))
        assert not report.collapsed
        assert report.dominant_share == pytest.approx(1 / 3)

    def test_as_dict_is_json_ready(self) -> None:
        report = detect_collapse(torch.ones(2, 3, 4))
        as_dict = report.as_dict()
        assert set(as_dict) == {
            "collapsed",
            "mean_cosine",
            "dominant_share",
            "effective_subprompts",
            "collapsed_classes",
            "message",
            "reasons",
        }
        assert json.loads(json.dumps(as_dict))["collapsed_classes"] == [0, 1]

    # ------------------------------------------------------------------ cannot be fooled

    @pytest.mark.parametrize(
        ("features", "gamma", "labels", "match"),
        [
            (torch.full((2, 3, 4), float("nan")), None, None, "subprompt_features must be finite"),
            (torch.zeros(2, 3, 4).index_fill(0, torch.tensor([1]), float("inf")), None, None,
             r"class\(es\) \[1\]"),
            (torch.randn(2, 3, 4), torch.full((2, 3), float("nan")), torch.tensor([0, 1]),
             "responsibilities must be finite"),
            (torch.randn(2, 3, 4), torch.empty(0, 3), torch.empty(0, dtype=torch.long),
             "at least one row"),
            (torch.randn(2, 3, 4), torch.full((2, 4), 0.25), torch.tensor([0, 1]),
             r"shape \(batch, 3\)"),
            (torch.randn(2, 3, 4), torch.tensor([[3.4, 0.0, 0.0], [1.0, 0.0, 0.0]]),
             torch.tensor([0, 1]), "sum to 1"),
            (torch.randn(2, 3, 4), torch.tensor([[1.5, -0.5, 0.0]] * 2), torch.tensor([0, 1]),
             "non-negative"),
            (torch.randn(4), None, None, r"\(num_classes, K, dim\)"),
            (torch.randn(0, 3, 4), None, None, "at least one class"),
        ],
    )
    def test_invalid_input_is_not_reported_healthy(self, features, gamma, labels, match) -> None:
        with pytest.raises(ValueError, match=match):
            detect_collapse(features, gamma, labels)

    def test_anti_parallel_subprompts_are_duplicates(self) -> None:
        # DiversityLoss penalises |cos|; a mixture of t and -t is as collapsed as t and t.
        t = torch.tensor([1.0, 2.0, 0.5])
        features = torch.stack([t, -t]).unsqueeze(0)
        assert diagnostics.mean_pairwise_cosine(features).item() == pytest.approx(1.0)
        assert detect_collapse(features).collapsed

    def test_message_names_the_criterion_per_class(self) -> None:
        diverse = torch.eye(3).unsqueeze(0)
        features = torch.cat([diverse, torch.ones(1, 3, 3), diverse])  # class 1: cosine
        gamma = torch.tensor([[1.0, 0.0, 0.0]] * 2 + [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        labels = torch.tensor([2, 2, 0, 0])  # class 2: one sub-prompt takes every image
        report = detect_collapse(features, gamma, labels)
        assert report.collapsed_classes == [1, 2]
        assert report.reasons == {
            1: ["mean |cos| 1.000 > 0.9"],
            2: ["dominant share 1.000 > 0.9"],
        }
        assert "class 1: mean |cos| 1.000 > 0.9" in report.message
        assert "class 2: dominant share 1.000 > 0.9" in report.message
        assert "class 0" not in report.message

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"cosine_threshold": 1.5}, "cosine_threshold"),
            ({"share_threshold": -0.1}, "share_threshold"),
            ({"responsibilities": torch.eye(3)}, "labels"),
        ],
    )
    def test_bad_arguments(self, kwargs, match) -> None:
        with pytest.raises(ValueError, match=match):
            detect_collapse(torch.randn(2, 3, 4), **kwargs)


@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 5)),
        elements=st.floats(-5, 5, allow_subnormal=False),
    ),
)
def test_property_usage_share_and_effective_number_bounds(logits) -> None:
    gamma = torch.softmax(torch.from_numpy(logits), dim=-1)
    k = gamma.shape[1]
    labels = torch.zeros(len(gamma), dtype=torch.long)
    usage = diagnostics.subprompt_usage(gamma, labels, num_classes=1)
    torch.testing.assert_close(usage.sum(-1), torch.ones(1, dtype=usage.dtype))
    share = diagnostics.dominant_share(usage).item()
    effective = diagnostics.effective_subprompts(usage).item()
    assert 1 / k - 1e-6 <= share <= 1 + 1e-6
    assert 1 - 1e-5 <= effective <= k + 1e-5
    # exp(H) >= 1 / max share (min-entropy <= Shannon entropy): a dominant sub-prompt caps it.
    assert effective >= 1 / share - 1e-5
