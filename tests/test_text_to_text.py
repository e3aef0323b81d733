"""TextToTextLoss / functional.text_to_text_loss (LASP): the kornia grid plus properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import promptmix.functional as PF
from promptmix import MixtureOfPromptsLoss, TextToTextLoss

pytestmark = pytest.mark.usefixtures("single_thread")


def lasp(text: torch.Tensor, templates: torch.Tensor, scale: float) -> torch.Tensor:
    """LASP's forward_text_to_text (prompting/lasp.py, losses.py) without the noise."""
    class_text_features = templates / templates.norm(dim=-1, keepdim=True)
    text_features = (text / text.norm(dim=-1, keepdim=True)).unsqueeze(0)
    label = torch.arange(text.shape[0]).unsqueeze(0).expand(class_text_features.size(0), -1)
    logits = scale * text_features @ class_text_features.permute(0, 2, 1)
    return F.cross_entropy(logits, label)


class TestTextToTextLoss:
    def test_smoke(self) -> None:
        prompts = torch.randn(4, 3, 8, requires_grad=True)
        loss = TextToTextLoss()(prompts, torch.randn(2, 4, 8))
        assert loss.shape == () and loss.item() > 0
        loss.backward()
        assert prompts.grad.abs().sum() > 0

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"logit_scale": 0.0}, ValueError, "logit_scale"),
            ({"aggregation": "sum"}, ValueError, "aggregation"),
            ({"reduction": "batchmean"}, ValueError, "reduction"),
            ({"noise_std": -0.1}, ValueError, "noise_std"),
            ({"noise_probability": 1.5}, ValueError, "noise_probability"),
        ],
    )
    def test_bad_constructor_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            TextToTextLoss(**kwargs)

    @pytest.mark.parametrize(
        ("prompts", "templates", "match"),
        [
            (torch.randn(3, 8), torch.randn(8), "template_features"),
            (torch.randn(3, 8), torch.randn(4, 8), "template_features"),  # classes differ
            (torch.randn(3, 2, 8), torch.randn(2, 3, 4), "template_features"),  # dims differ
            (torch.randn(3, 2, 2, 8), torch.randn(3, 8), "subprompt_features"),
        ],
    )
    def test_bad_inputs(self, prompts, templates, match) -> None:
        with pytest.raises(ValueError, match=match):
            TextToTextLoss()(prompts, templates)

    @pytest.mark.parametrize(
        ("templates", "reduction", "shape"),
        [((4, 8), "none", (1, 4)), ((3, 4, 8), "none", (3, 4)), ((3, 4, 8), "mean", ())],
    )
    def test_cardinality(self, templates, reduction, shape) -> None:
        loss = TextToTextLoss(reduction=reduction)(torch.randn(4, 2, 8), torch.randn(templates))
        assert loss.shape == shape

    def test_hand_computed_values(self) -> None:
        # Two classes, K = 1: template 0 sits on prompt 0 (cos 1 vs 0), template 1 halfway.
        prompts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        templates = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
        losses = PF.text_to_text_loss(prompts, templates, logit_scale=2.0, reduction="none")
        expected = torch.tensor([[math.log(1 + math.exp(-2.0)), math.log(2.0)]])
        torch.testing.assert_close(losses, expected)

    def test_matches_lasp(self) -> None:
        text, templates = torch.randn(5, 8), torch.randn(3, 5, 8)
        torch.testing.assert_close(
            TextToTextLoss(logit_scale=100.0)(text, templates), lasp(text, templates, 100.0)
        )

    def test_subprompts_pool_like_the_mixture(self) -> None:
        prompts, templates = torch.randn(4, 3, 8), torch.randn(4, 8)
        loss_fn = MixtureOfPromptsLoss(aggregation="max")
        logits = loss_fn.logits(templates, prompts, logit_scale=20.0)
        expected = F.cross_entropy(logits, torch.arange(4))
        actual = PF.text_to_text_loss(prompts, templates, logit_scale=20.0, aggregation="max")
        torch.testing.assert_close(actual, expected)

    def test_gradcheck(self) -> None:
        prompts = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
        templates = torch.randn(2, 3, 5, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda p: PF.text_to_text_loss(p, templates, logit_scale=5.0), (prompts,)
        )

    @pytest.mark.parametrize("kwargs", [{}, {"aggregation": "mean"}, {"reduction": "none"}])
    def test_module_equals_functional(self, kwargs) -> None:
        prompts, templates = torch.randn(3, 4, 8), torch.randn(2, 3, 8)
        expected = PF.text_to_text_loss(prompts, templates, **kwargs)
        torch.testing.assert_close(TextToTextLoss(**kwargs)(prompts, templates), expected)
        stored = TextToTextLoss(**kwargs, template_features=templates)
        assert stored.inputs == ("subprompt_features",)
        torch.testing.assert_close(stored(prompts), expected)

    def test_noise_only_in_training(self) -> None:
        prompts, templates = torch.randn(3, 2, 8), torch.randn(3, 8)
        noisy = TextToTextLoss(noise_std=0.5, noise_probability=1.0, template_features=templates)
        clean = PF.text_to_text_loss(prompts, templates)
        assert not torch.allclose(noisy(prompts), clean)
        torch.testing.assert_close(noisy.eval()(prompts), clean)
        never = TextToTextLoss(noise_std=0.5, noise_probability=0.0, template_features=templates)
        torch.testing.assert_close(never(prompts), clean)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_finite(self, dtype) -> None:
        prompts32, templates = torch.randn(4, 3, 8), torch.randn(2, 4, 8)
        prompts = prompts32.to(dtype).requires_grad_()
        loss = TextToTextLoss()(prompts, templates.to(dtype))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(prompts.grad).all()
        expected = TextToTextLoss()(prompts32, templates)
        torch.testing.assert_close(loss.float(), expected, atol=0.5, rtol=0.05)


@given(st.integers(2, 4), st.integers(1, 3), st.integers(1, 3))
def test_property_own_templates_give_the_minimum(c, k, m) -> None:
    """Templates equal to well-separated prompts give a near-zero loss; shuffled ones do not."""
    torch.manual_seed(c * 100 + k * 10 + m)
    prompts = torch.eye(8)[:c].unsqueeze(1).expand(c, k, 8)
    templates = torch.eye(8)[:c].expand(m, c, 8)
    assert PF.text_to_text_loss(prompts, templates).item() < 1e-6
    shuffled = templates.roll(1, dims=1)
    assert PF.text_to_text_loss(prompts, shuffled).item() > 10


class TestExtraClasses:
    """LASP's "virtual classes": class names without images join the text-to-text classifier."""

    def test_extra_names_join_the_classifier(self) -> None:
        prompts, extra = torch.randn(3, 2, 8), torch.randn(2, 2, 8)
        templates = torch.randn(4, 5, 8)
        loss = PF.text_to_text_loss(prompts, templates, extra, reduction="none")
        assert loss.shape == (4, 5)
        # The same as one classifier over all five names.
        torch.testing.assert_close(
            loss, PF.text_to_text_loss(torch.cat([prompts, extra]), templates, reduction="none")
        )
        # LASP computes it over all names with K = 1.
        text = torch.cat([prompts[:, 0], extra[:, 0]])
        torch.testing.assert_close(
            PF.text_to_text_loss(prompts[:, 0], templates, extra[:, 0], logit_scale=100.0),
            lasp(text, templates, 100.0),
        )

    def test_module_in_the_loss_gets_the_extra_features_with_gradient(self) -> None:
        templates = torch.randn(3, 5, 8)  # 3 training classes, then 2 names without images
        module = TextToTextLoss(extra_classes=2, template_features=templates)
        assert module.inputs == ("subprompt_features", "extra_subprompt_features")
        loss_fn = MixtureOfPromptsLoss(regularizers={"text": (module, 5.0)})
        images, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
        prompts = torch.randn(3, 2, 8, requires_grad=True)
        extra = torch.randn(2, 2, 8, requires_grad=True)
        out = loss_fn(images, prompts, labels, extra_subprompt_features=extra)
        expected = PF.text_to_text_loss(prompts, templates, extra)
        torch.testing.assert_close(out["text"], expected)
        out["loss"].backward()
        assert extra.grad is not None and extra.grad.abs().sum() > 0

    @pytest.mark.parametrize(
        ("call", "error", "match"),
        [
            (
                lambda: PF.text_to_text_loss(
                    torch.randn(3, 8), torch.randn(3, 8), torch.randn(2, 8)
                ),
                ValueError,
                r"plus the 2 extra classes",
            ),
            (
                lambda: PF.text_to_text_loss(
                    torch.randn(3, 2, 8), torch.randn(5, 8), torch.randn(2, 3, 8)
                ),
                ValueError,
                "extra_subprompt_features must have shape",
            ),
            (
                lambda: TextToTextLoss(extra_classes=2, template_features=torch.randn(5, 8))(
                    torch.randn(3, 8)
                ),
                TypeError,
                "needs extra_subprompt_features",
            ),
            (
                lambda: TextToTextLoss(extra_classes=2, template_features=torch.randn(5, 8))(
                    torch.randn(3, 8), extra_subprompt_features=torch.randn(1, 8)
                ),
                ValueError,
                "must hold extra_classes=2",
            ),
            (
                lambda: TextToTextLoss()(
                    torch.randn(3, 8), torch.randn(5, 8), extra_subprompt_features=torch.randn(2, 8)
                ),
                TypeError,
                "extra_classes=0",
            ),
            (
                lambda: TextToTextLoss(extra_classes=5, template_features=torch.randn(5, 8)),
                ValueError,
                "more than extra_classes=5",
            ),
            (lambda: TextToTextLoss(extra_classes=-1), ValueError, "extra_classes"),
        ],
    )
    def test_bad_extra_classes(self, call, error, match) -> None:
        with pytest.raises(error, match=match):
            call()
