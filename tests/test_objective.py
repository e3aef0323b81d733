"""MixtureOfPromptsLoss: the combined objective, its parts, and where gradients go."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import promptmix.functional as PF
from promptmix import (
    AssignmentEntropy,
    DiversityLoss,
    MixtureOfPromptsLoss,
    PromptAnchor,
    SoftEMAssigner,
    TemperatureSchedule,
    UsageEstimate,
    UsageFloor,
)

pytestmark = pytest.mark.usefixtures("single_thread")

AGGREGATIONS = ("logsumexp", "max", "mean", "responsibility")
ASSIGNMENTS = ("soft", "hard", "sinkhorn")
ENTROPY_MODES = ("sample", "marginal", "mutual_information")
SCALAR_KEYS = ("loss", "ce", "mixture", "diversity", "entropy", "prior")

# Small explicit problem: 3 images, 2 classes with K = 2 sub-prompts each, D = 3.
IMAGES = torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.5, 0.5, 0.5]])
PROMPTS = torch.tensor(
    [
        [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]],
        [[0.0, 1.0, 0.0], [0.0, 0.6, 0.8]],
    ]
)
LABELS = torch.tensor([0, 1, 1])


class TakesSubprompts(torch.nn.Module):
    """A toy extra regularizer: mean squared distance of the sub-prompts to `target`."""

    inputs = ("subprompt_features", "target")

    def forward(self, subprompt_features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (subprompt_features - target).pow(2).mean()


def make_loss(
    *,
    assignment: str = "soft",
    entropy_mode: str = "marginal",
    assignment_logit_scale: float = 100.0,
    num_classes: int | None = None,
    n_subprompts: int | None = None,
    **kwargs,
) -> MixtureOfPromptsLoss:
    """The loss with its assigner and entropy configured from flat test parameters.

    Every term is on with fixed weights (diversity 0.1, entropy 0.3, mixture 1) and every label is
    trusted (label noise 0) unless a test says otherwise, so the tests do not depend on the
    library's defaults.
    """
    kwargs = {
        "diversity_weight": 0.1,
        "entropy_weight": 0.3,
        "mixture_weight": 1.0,
        "label_noise": 0.0,
    } | kwargs
    estimate = None
    if num_classes is not None and n_subprompts is not None:
        estimate = UsageEstimate(num_classes=num_classes, n_subprompts=n_subprompts)
    return MixtureOfPromptsLoss(
        assigner=SoftEMAssigner(mode=assignment, logit_scale=assignment_logit_scale),
        entropy=AssignmentEntropy(mode=entropy_mode),
        usage_estimate=estimate,
        **kwargs,
    )


def problem(batch: int = 6, classes: int = 4, k: int = 3, dim: int = 8, dtype=torch.float32):
    images = torch.randn(batch, dim, dtype=dtype)
    prompts = torch.randn(classes, k, dim, dtype=dtype, requires_grad=True)
    labels = torch.arange(batch) % (classes - 1)  # the last class is absent from the batch
    return images, prompts, labels


def reference(
    images,
    prompts,
    labels,
    *,
    logit_scale,
    tau,
    estep_scale,
    wm,
    wd,
    we,
    detach=True,
    mode="sample",
):
    """The objective written out from the formula, without promptmix."""
    x = images / images.norm(dim=-1, keepdim=True)
    t = prompts / prompts.norm(dim=-1, keepdim=True)
    cos = torch.einsum("bd,ckd->bck", x, t)
    k = cos.shape[-1]
    logits = torch.logsumexp(logit_scale * cos, dim=-1) - math.log(k)
    ce = F.cross_entropy(logits, labels)
    own = cos[torch.arange(len(labels)), labels]
    soft = torch.softmax(estep_scale * own / tau, dim=-1)
    targets = soft.detach() if detach else soft
    mixture = (targets * (1 - own)).sum(-1).mean()
    present = t[labels.unique()]
    pair_cos = torch.einsum("ckd,cjd->ckj", present, present)
    i, j = torch.triu_indices(k, k, offset=1)
    diversity = (pair_cos[:, i, j] ** 2).mean()
    if mode == "sample":
        entropy = -(soft * soft.log()).sum(-1).mean()
    else:  # marginal: the entropy of each present class's mean assignment, averaged
        means = torch.stack([soft[labels == c].mean(0) for c in labels.unique()])
        entropy = -(means * means.log()).sum(-1).mean()
    loss = ce + wm * mixture + wd * diversity - we * entropy
    return {"loss": loss, "ce": ce, "mixture": mixture, "diversity": diversity, "entropy": entropy}


class TestMixtureOfPromptsLoss:
    def test_smoke(self) -> None:
        images, prompts, labels = problem()
        out = MixtureOfPromptsLoss()(images, prompts, labels)
        assert set(out) == {*SCALAR_KEYS, "tau", "logits", "responsibilities", "label_confidence"}
        for key in SCALAR_KEYS:
            assert out[key].shape == () and torch.isfinite(out[key]), key
        assert out["tau"].shape == () and out["tau"].item() == pytest.approx(0.3)
        assert out["logits"].shape == (6, 4) and not out["logits"].requires_grad
        assert out["responsibilities"].shape == (6, 3)
        assert not out["responsibilities"].requires_grad
        out["loss"].backward()
        assert prompts.grad.abs().sum() > 0

    def test_default_weights(self) -> None:
        loss_fn = MixtureOfPromptsLoss()
        assert (loss_fn.diversity_weight, loss_fn.entropy_weight, loss_fn.mixture_weight) == (
            0.0,
            0.0,
            1.0,
        )
        assert loss_fn.label_noise == 0.1
        off = MixtureOfPromptsLoss(diversity_weight=0, entropy_weight=0.0, mixture_weight=0)
        assert (off.diversity_weight, off.entropy_weight, off.mixture_weight) == (0.0, 0.0, 0.0)

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"diversity_weight": -0.1}, ValueError, "diversity_weight"),
            ({"entropy_weight": -1.0}, ValueError, "entropy_weight"),
            ({"mixture_weight": float("inf")}, ValueError, "mixture_weight"),
            ({"diversity_weight": "0.1"}, TypeError, "diversity_weight"),
            ({"aggregation": "sum"}, ValueError, "aggregation"),
            ({"tau": 0.0}, ValueError, "tau"),
            ({"tau": -0.3}, ValueError, "tau"),
            ({"assigner": "sinkhorn"}, TypeError, "assigner must be an instance of SoftEMAssigner"),
            ({"entropy": torch.nn.Linear(2, 2)}, TypeError, r"entropy \(Linear\) must declare"),
            ({"diversity": "mean"}, TypeError, "diversity must hold an nn.Module"),
            ({"usage_estimate": torch.zeros(2, 2)}, TypeError, "UsageEstimate"),
            (
                {"assigner": SoftEMAssigner(sync_distributed=True)},
                ValueError,
                "assigner.sync_distributed",
            ),
            ({"regularizers": [DiversityLoss()]}, TypeError, "mapping"),
            ({"regularizers": {"ce": (TakesSubprompts(), 1.0)}}, ValueError, "shadow"),
            ({"regularizers": {"a b": (TakesSubprompts(), 1.0)}}, ValueError, "identifiers"),
            ({"regularizers": {"x": TakesSubprompts()}}, TypeError, "tuple"),
            ({"regularizers": {"x": (lambda t: t, 1.0)}}, TypeError, "nn.Module"),
            ({"regularizers": {"x": (torch.nn.Identity(), 1.0)}}, TypeError, "inputs"),
            (
                {"regularizers": {"x": (PromptAnchor(reduction="none"), 1.0)}},
                ValueError,
                "reduction='none'",
            ),
            ({"diversity": DiversityLoss(reduction="none")}, ValueError, "must be a scalar"),
            ({"regularizers": {"x": (TakesSubprompts(), -1.0)}}, ValueError, "weight"),
        ],
    )
    def test_bad_constructor_arguments(self, kwargs, error, match) -> None:
        with pytest.raises(error, match=match):
            MixtureOfPromptsLoss(**kwargs)

    @pytest.mark.parametrize(
        ("change", "error", "match"),
        [
            ({"images": torch.randn(6)}, ValueError, "image_features"),
            ({"images": torch.randn(6, 7)}, ValueError, "share the last dimension"),
            ({"prompts": torch.randn(8)}, ValueError, "subprompt_features"),
            ({"prompts": torch.randn(4, 0, 8)}, ValueError, "subprompt_features"),  # K < 1
            ({"labels": torch.tensor([0, 1, 2, 4, 0, 1])}, ValueError, "labels"),
            ({"labels": torch.tensor([0, 1, 2, -1, 0, 1])}, ValueError, "labels"),
            ({"labels": torch.zeros(6)}, TypeError, "labels"),
            ({"labels": torch.zeros(6, 1, dtype=torch.long)}, ValueError, "labels"),
            ({"tau": 0.0}, ValueError, "tau"),
            ({"logit_scale": -1.0}, ValueError, "logit_scale"),
        ],
    )
    def test_bad_inputs(self, change, error, match) -> None:
        images, prompts, labels = problem()
        args = {"images": images, "prompts": prompts, "labels": labels} | change
        kwargs = {key: change[key] for key in ("tau", "logit_scale") if key in change}
        with pytest.raises(error, match=match):
            MixtureOfPromptsLoss()(args["images"], args["prompts"], args["labels"], **kwargs)

    @pytest.mark.parametrize(
        "weights",
        [
            {},
            {"diversity_weight": 0.5, "entropy_weight": 0.2, "mixture_weight": 0.3},
            {"diversity_weight": 0.0, "entropy_weight": 0.0, "mixture_weight": 0.0},
        ],
    )
    @pytest.mark.parametrize("mode", ["marginal", "sample"])
    def test_loss_equals_hand_computation(self, weights, mode) -> None:
        loss_fn = make_loss(tau=0.5, assignment_logit_scale=5.0, entropy_mode=mode, **weights)
        out = loss_fn(IMAGES, PROMPTS, LABELS, logit_scale=10.0)
        wd, we, wm = loss_fn.diversity_weight, loss_fn.entropy_weight, loss_fn.mixture_weight
        expected = reference(
            IMAGES,
            PROMPTS,
            LABELS,
            logit_scale=10.0,
            tau=0.5,
            estep_scale=5.0,
            wm=wm,
            wd=wd,
            we=we,
            mode=mode,
        )
        for key in SCALAR_KEYS:  # every term is reported, whatever its weight
            torch.testing.assert_close(out[key], expected.get(key, torch.tensor(0.0)), msg=key)
        combined = out["ce"] + wm * out["mixture"] + wd * out["diversity"] - we * out["entropy"]
        torch.testing.assert_close(out["loss"], combined)

    def test_hand_computation_of_the_parts(self) -> None:
        # Class 0's sub-prompts have cosine 0.6, class 1's 0.6: diversity = 0.36 (both present).
        out = make_loss(assignment_logit_scale=5.0, tau=0.5)(IMAGES, PROMPTS, LABELS)
        assert out["diversity"].item() == pytest.approx(0.36, rel=1e-6)
        # The diversity term sees only the classes in the batch. With class 1's pair at cosine
        # 0.8 instead (squared 0.64), each class alone gives its own pair, both the mean 0.5.
        prompts = PROMPTS.clone()
        prompts[1, 1] = torch.tensor([0.0, 0.8, 0.6])
        loss_fn = MixtureOfPromptsLoss(diversity_weight=0.1)
        only0 = loss_fn(IMAGES[:1], prompts, LABELS[:1])
        assert only0["diversity"].item() == pytest.approx(0.36, rel=1e-6)
        only1 = loss_fn(IMAGES[1:], prompts, LABELS[1:])
        assert only1["diversity"].item() == pytest.approx(0.64, rel=1e-6)
        both = loss_fn(IMAGES, prompts, LABELS)
        assert both["diversity"].item() == pytest.approx(0.5, rel=1e-6)
        # Image 0 = (1, 0.2, 0)/|.|, its class-0 cosines: (1/n, (0.6 + 0.16)/n) with n = |x|.
        n = math.sqrt(1.04)
        cos = torch.tensor([1 / n, 0.76 / n])
        gamma = torch.softmax(5.0 * cos / 0.5, dim=0)
        torch.testing.assert_close(out["responsibilities"][0], gamma)
        logit0 = math.log((math.exp(100 * cos[0]) + math.exp(100 * cos[1])) / 2)
        assert out["logits"][0, 0].item() == pytest.approx(logit0, rel=1e-5)

    def test_parts_equal_the_functional_api(self) -> None:
        images, prompts, labels = problem()
        loss_fn = make_loss(
            aggregation="max", assignment="sinkhorn", entropy_mode="mutual_information", tau=0.7
        )
        out = loss_fn(images, prompts, labels, logit_scale=50.0)
        sims = PF.subprompt_similarities(images, prompts)
        logits = PF.class_logits(sims, logit_scale=50.0, aggregation="max")
        torch.testing.assert_close(out["logits"], logits)
        torch.testing.assert_close(out["ce"], F.cross_entropy(logits, labels))
        targets = PF.responsibilities(images, prompts, labels, tau=0.7, mode="sinkhorn")
        torch.testing.assert_close(out["responsibilities"], targets)
        own = PF.own_class_similarities(images, prompts, labels)
        torch.testing.assert_close(out["mixture"], (targets * (1 - own)).sum(-1).mean())
        torch.testing.assert_close(out["diversity"], PF.diversity_loss(prompts[labels.unique()]))
        soft = PF.responsibilities(images, prompts, labels, tau=0.7)
        expected_entropy = PF.assignment_entropy(soft, labels, mode="mutual_information")
        torch.testing.assert_close(out["entropy"], expected_entropy)

    @pytest.mark.parametrize("term", ["diversity", "entropy", "mixture"])
    def test_zero_weight_keeps_a_term_out_of_the_gradient(self, term) -> None:
        images, prompts, labels = problem()
        others = {"diversity": 0.1, "entropy": 1.0, "mixture": 10.0}
        on = MixtureOfPromptsLoss(**{f"{t}_weight": w for t, w in others.items()})
        live = on(images, prompts, labels)[term]
        assert live.item() != 0.0 and live.requires_grad  # live with a positive weight
        weights = {f"{t}_weight": w for t, w in others.items()} | {f"{term}_weight": 0.0}
        out = MixtureOfPromptsLoss(**weights)(images, prompts, labels)
        # Still computed and reported (so it can be logged), but without a graph.
        torch.testing.assert_close(out[term], live.detach())
        assert not out[term].requires_grad
        others[term] = 0.0
        combined = (
            out["ce"]
            + others["mixture"] * out["mixture"]
            + others["diversity"] * out["diversity"]
            - others["entropy"] * out["entropy"]
        )
        torch.testing.assert_close(out["loss"], combined)
        (grad,) = torch.autograd.grad(out["loss"], prompts, retain_graph=True)
        (without,) = torch.autograd.grad(combined, prompts)
        torch.testing.assert_close(grad, without)

    @pytest.mark.parametrize("term", ["diversity", "entropy", "mixture"])
    def test_a_zero_weight_term_still_shows_nan(self, term) -> None:
        images, prompts, labels = problem()
        prompts = prompts.detach().clone()
        prompts[3, 0, 0] = float("nan")  # class 3 is not in the batch: only diversity sees it
        out = MixtureOfPromptsLoss(**{f"{term}_weight": 0.0})(images, prompts, labels)
        assert torch.isnan(out["loss"])

    def test_entropy_skipped_with_hard_assignments(self) -> None:
        images, prompts, labels = problem()
        out = make_loss(assignment="hard", entropy_weight=1.0)(images, prompts, labels)
        assert out["entropy"].item() == 0.0 and out["entropy"].requires_grad
        torch.testing.assert_close(out["loss"], out["ce"] + out["mixture"] + 0.1 * out["diversity"])
        gamma = out["responsibilities"]
        assert torch.equal(gamma, F.one_hot(gamma.argmax(-1), 3).float())

    @pytest.mark.parametrize("aggregation", AGGREGATIONS)
    def test_every_aggregation_gives_batch_by_class_logits(self, aggregation) -> None:
        images, prompts, labels = problem()
        out = MixtureOfPromptsLoss(aggregation=aggregation)(images, prompts, labels)
        assert out["logits"].shape == (6, 4)
        out["loss"].backward()
        assert torch.isfinite(prompts.grad).all() and prompts.grad.abs().sum() > 0

    @pytest.mark.parametrize("aggregation", AGGREGATIONS)
    def test_single_subprompt_logits_are_scaled_cosines(self, aggregation) -> None:
        images, prompts, labels = problem(k=1)
        out = MixtureOfPromptsLoss(aggregation=aggregation)(
            images, prompts, labels, logit_scale=30.0
        )
        cos = F.normalize(images, dim=-1) @ F.normalize(prompts[:, 0], dim=-1).T
        torch.testing.assert_close(out["logits"], 30.0 * cos.detach())

    @pytest.mark.parametrize("assignment", ASSIGNMENTS)
    @pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
    def test_single_subprompt_gives_connected_zeros(self, assignment, entropy_mode) -> None:
        images, prompts, labels = problem(k=1)
        out = make_loss(assignment=assignment, entropy_mode=entropy_mode)(images, prompts, labels)
        for key in ("diversity", "entropy"):
            assert out[key].item() == 0.0 and out[key].requires_grad, key
        assert torch.equal(out["responsibilities"], torch.ones(6, 1))
        out["loss"].backward()
        assert torch.isfinite(prompts.grad).all() and prompts.grad.abs().sum() > 0

    @pytest.mark.parametrize("assignment", ASSIGNMENTS)
    @pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
    def test_empty_batch_gives_connected_zeros(self, assignment, entropy_mode) -> None:
        _, prompts, _ = problem()
        images = torch.randn(0, 8, requires_grad=True)
        labels = torch.zeros(0, dtype=torch.long)
        loss_fn = make_loss(
            assignment=assignment, entropy_mode=entropy_mode, num_classes=4, n_subprompts=3
        )
        out = loss_fn(images, prompts, labels)
        for key in SCALAR_KEYS:
            assert out[key].item() == 0.0 and out[key].requires_grad, key
        assert out["logits"].shape == (0, 4) and out["responsibilities"].shape == (0, 3)
        out["loss"].backward()
        assert torch.equal(prompts.grad, torch.zeros_like(prompts))

    def test_mixture_gradient_does_not_flow_through_the_targets(self) -> None:
        prompts = PROMPTS.clone().requires_grad_()
        out = make_loss(tau=0.5, assignment_logit_scale=5.0)(IMAGES, prompts, LABELS)
        (grad,) = torch.autograd.grad(out["mixture"], prompts)
        args = {"logit_scale": 100.0, "tau": 0.5, "estep_scale": 5.0}
        args |= {"wm": 1.0, "wd": 0.1, "we": 0.01}
        detached = reference(IMAGES, prompts, LABELS, **args)["mixture"]
        attached = reference(IMAGES, prompts, LABELS, **args, detach=False)["mixture"]
        (expected,) = torch.autograd.grad(detached, prompts)
        (through_targets,) = torch.autograd.grad(attached, prompts)
        torch.testing.assert_close(grad, expected)
        assert not torch.allclose(grad, through_targets, atol=1e-4)  # the test can tell

    @pytest.mark.parametrize("assignment", ["soft", "sinkhorn"])
    @pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
    def test_entropy_gradient_reaches_the_subprompts(self, assignment, entropy_mode) -> None:
        # Regression: the precursor computed the entropy of detached responsibilities, so the
        # entropy term had no effect on training.
        images, prompts, labels = problem()
        loss_fn = make_loss(assignment=assignment, entropy_mode=entropy_mode, tau=1.0)
        out = loss_fn(images, prompts, labels)
        (grad,) = torch.autograd.grad(out["entropy"], prompts, retain_graph=True)
        assert torch.isfinite(grad).all() and grad[labels.unique()].abs().sum() > 1e-6
        # ... and it reaches the loss with weight -entropy_weight.
        (total,) = torch.autograd.grad(out["loss"], prompts)
        without = make_loss(
            assignment=assignment, entropy_mode=entropy_mode, tau=1.0, entropy_weight=0.0
        )(images, prompts, labels)
        (rest,) = torch.autograd.grad(without["loss"], prompts)
        torch.testing.assert_close(total, rest - 0.3 * grad)

    def test_entropy_ascent_spreads_the_assignments(self) -> None:
        # Gradient descent on -entropy alone must raise the entropy of the assignments.
        images, prompts, labels = problem()
        loss_fn = make_loss(
            diversity_weight=0.0,
            mixture_weight=0.0,
            entropy_weight=1.0,
            assignment_logit_scale=10.0,
        )
        optimizer = torch.optim.SGD([prompts], lr=0.5)
        values = []
        for _ in range(5):
            out = loss_fn(images, prompts, labels, tau=1.0)
            values.append(out["entropy"].item())
            optimizer.zero_grad()
            (-out["entropy"]).backward()
            optimizer.step()
        assert all(b > a for a, b in itertools.pairwise(values)), values
        assert values[-1] > values[0] + 0.1

    def test_tau_fixed_schedule_and_override(self) -> None:
        images, prompts, labels = problem()
        schedule = TemperatureSchedule(start=1.0, end=0.2, total_steps=4)
        loss_fn = MixtureOfPromptsLoss(tau=schedule)
        assert loss_fn.schedule is schedule
        assert loss_fn(images, prompts, labels)["tau"].item() == 1.0
        assert int(schedule.step_count) == 0  # forward does not step the schedule
        schedule.step()
        out = loss_fn(images, prompts, labels)
        assert out["tau"].item() == pytest.approx(0.8)
        expected = SoftEMAssigner()(images, prompts, labels, tau=0.8)
        torch.testing.assert_close(out["responsibilities"], expected)
        assert loss_fn(images, prompts, labels, tau=0.5)["tau"].item() == 0.5
        assert "schedule.step_count" in loss_fn.state_dict()
        assert MixtureOfPromptsLoss(tau=0.4).schedule is None

    def test_logit_scale_tensor_gets_gradient(self) -> None:
        images, prompts, labels = problem()
        logit_scale = torch.tensor(4.6, requires_grad=True)
        out = MixtureOfPromptsLoss()(images, prompts, labels, logit_scale=logit_scale.exp())
        out["loss"].backward()
        assert logit_scale.grad is not None and logit_scale.grad != 0

    def test_int32_labels_equal_int64_labels(self) -> None:
        images, prompts, labels = problem()
        out64 = MixtureOfPromptsLoss()(images, prompts, labels)
        out32 = MixtureOfPromptsLoss()(images, prompts, labels.int())
        for key in SCALAR_KEYS:
            torch.testing.assert_close(out32[key], out64[key])

    def test_usage_estimate_lives_in_the_loss(self) -> None:
        images, prompts, labels = problem()
        loss_fn = make_loss(entropy_mode="marginal", num_classes=4, n_subprompts=3)
        assert "usage_estimate.usage" in loss_fn.state_dict()
        start = loss_fn.usage_estimate.usage.clone()
        loss_fn.eval()(images, prompts, labels)
        torch.testing.assert_close(loss_fn.usage_estimate.usage, start)
        out = loss_fn.train()(images, prompts, labels)
        moved = (loss_fn.usage_estimate.usage - start).abs().sum(-1)
        assert (moved[:3] > 0).all() and moved[3] == 0  # class 3 is not in the batch
        # Updated once, with this step's soft responsibilities.
        soft = PF.responsibilities(images, prompts, labels, tau=0.3)
        expected = PF.running_usage(start, soft, labels, momentum=0.9)
        torch.testing.assert_close(loss_fn.usage_estimate.usage, expected)
        # The entropy got the estimate before the update, as its usage prior.
        prior_entropy = PF.assignment_entropy(soft, labels, start, mode="marginal")
        torch.testing.assert_close(out["entropy"], prior_entropy)

    @pytest.mark.parametrize("entropy_mode", ENTROPY_MODES)
    @pytest.mark.parametrize("aggregation", ["logsumexp", "max", "mean"])
    def test_gradcheck(self, aggregation, entropy_mode) -> None:
        # The mixture term (detached EM targets) and the "responsibility" aggregation (detached
        # weights) are semi-gradients by design, so gradcheck covers the other terms; their
        # gradients are checked against the detached hand computation above.
        images = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        prompts = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 1, 2, 1])
        loss_fn = make_loss(
            aggregation=aggregation,
            entropy_mode=entropy_mode,
            mixture_weight=0.0,
            entropy_weight=0.5,
            tau=0.5,
            assignment_logit_scale=3.0,
        )

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return loss_fn(x, t, labels, logit_scale=5.0)["loss"]

        assert torch.autograd.gradcheck(fn, (images, prompts))

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("assignment", ASSIGNMENTS)
    def test_half_precision_finite(self, dtype, assignment) -> None:
        images, prompts, labels = problem(dtype=dtype)
        images[0] = 0.0
        loss_fn = make_loss(
            assignment=assignment, entropy_mode="marginal", num_classes=4, n_subprompts=3
        )
        out = loss_fn(images, prompts, labels)
        out["loss"].backward()
        for key in SCALAR_KEYS:
            assert torch.isfinite(out[key]), key
        assert torch.isfinite(prompts.grad).all() and prompts.grad.abs().sum() > 0
        reference_fn = make_loss(assignment=assignment, entropy_mode="marginal")
        expected = reference_fn(images.float(), prompts.detach().float(), labels)
        torch.testing.assert_close(out["ce"].float(), expected["ce"], atol=0.15, rtol=0.05)


# ----------------------------------------------------------------------------- properties


@given(
    hnp.arrays(np.float32, (5, 4), elements=st.floats(-3, 3, allow_subnormal=False, width=32)),
    hnp.arrays(np.float32, (3, 3, 4), elements=st.floats(-3, 3, allow_subnormal=False, width=32)),
    hnp.arrays(np.int64, (5,), elements=st.integers(0, 2)),
    st.sampled_from(ASSIGNMENTS),
    st.sampled_from(ENTROPY_MODES),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_decomposition_and_finite_gradients(
    images, prompts, labels, assignment, entropy_mode, dtype
) -> None:
    images = torch.from_numpy(images).to(dtype)
    prompts = torch.from_numpy(prompts).to(dtype).requires_grad_()
    loss_fn = make_loss(
        assignment=assignment, entropy_mode=entropy_mode, diversity_weight=0.3, entropy_weight=0.2
    )
    out = loss_fn(images, prompts, torch.from_numpy(labels))
    combined = out["ce"] + out["mixture"] + 0.3 * out["diversity"] - 0.2 * out["entropy"]
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out["loss"], combined, atol=tolerance, rtol=tolerance)
    assert 0 <= out["diversity"].item() <= 1 + tolerance
    out["loss"].backward()
    assert torch.isfinite(prompts.grad).all()


@given(
    hnp.arrays(np.float64, (4, 5), elements=st.floats(-3, 3, allow_subnormal=False)),
    hnp.arrays(np.float64, (2, 3, 5), elements=st.floats(-3, 3, allow_subnormal=False)),
    hnp.arrays(np.int64, (4,), elements=st.integers(0, 1)),
    st.sampled_from(ENTROPY_MODES),
    st.sampled_from(["soft", "sinkhorn"]),
)
def test_property_entropy_gradient_reaches_subprompts(
    images, prompts, labels, entropy_mode, assignment
) -> None:
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    prompts = torch.from_numpy(prompts).requires_grad_()
    loss_fn = make_loss(
        entropy_mode=entropy_mode, assignment=assignment, assignment_logit_scale=5.0, tau=1.0
    )
    # Whenever the entropy of the soft assignments depends on the sub-prompts at all (zero or
    # parallel vectors can leave every cosine at a stationary point) ...
    free = prompts.detach().clone().requires_grad_()
    soft = torch.softmax(5.0 * PF.own_class_similarities(images, free, labels), dim=-1)
    entropy = PF.assignment_entropy(soft, labels, mode=entropy_mode)
    (by_prompts,) = torch.autograd.grad(entropy, free)
    assume(bool(by_prompts.abs().max() > 1e-6))
    # ... its gradient reaches the sub-prompts (it is not computed on detached assignments).
    (grad,) = torch.autograd.grad(loss_fn(images, prompts, labels)["entropy"], prompts)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


class TestRegularizers:
    """Extra named terms: weighted into the loss, reported, fed from forward's keywords."""

    def test_term_is_weighted_reported_and_gets_its_inputs(self) -> None:
        images, prompts, labels = problem()
        target = torch.randn(prompts.shape[-1])
        plain = MixtureOfPromptsLoss()(images, prompts, labels)
        loss_fn = MixtureOfPromptsLoss(regularizers={"pull": (TakesSubprompts(), 2.5)})
        out = loss_fn(images, prompts, labels, target=target)
        expected = (prompts - target).pow(2).mean()
        torch.testing.assert_close(out["pull"], expected)
        torch.testing.assert_close(out["loss"], plain["loss"] + 2.5 * expected)
        (grad,) = torch.autograd.grad(out["loss"] - plain["loss"], prompts)
        torch.testing.assert_close(grad, 2.5 * 2 * (prompts - target).detach() / prompts.numel())

    def test_logits_input_carries_gradient(self) -> None:
        class LogitNorm(torch.nn.Module):
            inputs = ("logits", "labels")

            def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                return logits.gather(1, labels[:, None]).mean()

        images, prompts, labels = problem()
        out = MixtureOfPromptsLoss(regularizers={"own": (LogitNorm(), 1.0)})(
            images, prompts, labels
        )
        torch.testing.assert_close(out["own"], out["logits"].gather(1, labels[:, None]).mean())
        (grad,) = torch.autograd.grad(out["own"], prompts)
        assert grad.abs().sum() > 0

    def test_missing_and_unused_inputs_are_named(self) -> None:
        images, prompts, labels = problem()
        loss_fn = MixtureOfPromptsLoss(regularizers={"pull": (TakesSubprompts(), 1.0)})
        with pytest.raises(TypeError, match=r"pull \(TakesSubprompts\) needs target="):
            loss_fn(images, prompts, labels)
        with pytest.raises(TypeError, match=r"anchor_features.*no part takes"):
            loss_fn(images, prompts, labels, target=prompts, anchor_features=prompts)
        with pytest.raises(TypeError, match="no part takes"):
            MixtureOfPromptsLoss()(images, prompts, labels, target=prompts)

    def test_zero_weight_is_computed_checked_and_out_of_the_gradient(self) -> None:
        images, prompts, labels = problem()
        loss_fn = MixtureOfPromptsLoss(regularizers={"pull": (TakesSubprompts(), 0.0)})
        target = torch.ones(8)
        out = loss_fn(images, prompts, labels, target=target)
        torch.testing.assert_close(out["pull"], (prompts - target).pow(2).mean().detach())
        assert not out["pull"].requires_grad
        plain = MixtureOfPromptsLoss()(images, prompts, labels)
        torch.testing.assert_close(out["loss"], plain["loss"])
        # Its inputs are checked: NaN in them still makes the loss NaN.
        nan_target = torch.full((8,), float("nan"))
        assert torch.isnan(loss_fn(images, prompts, labels, target=nan_target)["loss"])

    @pytest.mark.parametrize(
        ("returned", "match"),
        [
            (None, "returned NoneType"),
            (torch.zeros(3), r"returned a tensor of shape \(3,\)"),
            (torch.tensor(1), "dtype torch.int64"),
        ],
    )
    def test_a_part_that_does_not_return_a_scalar_is_named(self, returned, match) -> None:
        class Returns(torch.nn.Module):
            inputs = ("labels",)

            def forward(self, labels: torch.Tensor) -> object:
                return returned

        images, prompts, labels = problem()
        loss_fn = MixtureOfPromptsLoss(regularizers={"odd": (Returns(), 1.0)})
        with pytest.raises(TypeError, match=r"odd \(Returns\) must return a 0-dim") as error:
            loss_fn(images, prompts, labels)
        assert error.match(match)

    def test_regularizers_move_with_the_loss(self) -> None:
        loss_fn = MixtureOfPromptsLoss(regularizers={"pull": (TakesSubprompts(), 1.0)})
        assert "regularizers.pull" in dict(loss_fn.named_modules())
        assert "regularizer_weights=(pull=1.0)" in repr(loss_fn)


def test_logits_method_is_the_classifier_forward_trains() -> None:
    images, prompts, labels = problem()
    for aggregation in AGGREGATIONS:
        loss_fn = MixtureOfPromptsLoss(aggregation=aggregation, tau=0.7, label_noise=0.0)
        out = loss_fn(images, prompts, labels, logit_scale=20.0)
        logits = loss_fn.logits(images, prompts, logit_scale=20.0)
        torch.testing.assert_close(logits.detach(), out["logits"])
        torch.testing.assert_close(F.cross_entropy(logits, labels), out["ce"])
        assert logits.requires_grad


class TestOneEStep:
    """The loss runs the E-step once and hands its result to every part that asks for it."""

    class Spy(torch.nn.Module):
        inputs = ("responsibilities", "labels", "usage_prior", "class_mask")

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[dict[str, torch.Tensor | None]] = []

        def forward(self, responsibilities, labels, usage_prior, class_mask):  # type: ignore[no-untyped-def]
            self.seen.append(
                {
                    "responsibilities": responsibilities,
                    "usage_prior": usage_prior,
                    "mask": class_mask,
                }
            )
            return responsibilities.sum() * 0

    def test_every_part_gets_the_same_responsibilities_and_usage(self) -> None:
        images, prompts, labels = problem()
        entropy, first, second = self.Spy(), self.Spy(), self.Spy()
        estimate = UsageEstimate(num_classes=4, n_subprompts=3)
        before = estimate.usage.clone()
        loss_fn = MixtureOfPromptsLoss(
            entropy=entropy,
            usage_estimate=estimate,
            regularizers={"a": (first, 1.0), "b": (second, 0.5)},
            tau=0.7,
        )
        loss_fn(images, prompts, labels)
        seen = [spy.seen[0] for spy in (entropy, first, second)]
        assert seen[0]["responsibilities"] is seen[1]["responsibilities"]
        assert seen[1]["responsibilities"] is seen[2]["responsibilities"]
        soft = PF.responsibilities(images, prompts, labels, tau=0.7)
        torch.testing.assert_close(seen[0]["responsibilities"], soft)
        assert seen[0]["responsibilities"].requires_grad  # the soft E-step, with its gradient
        torch.testing.assert_close(seen[0]["usage_prior"], before)  # before this step's update
        assert seen[0]["usage_prior"] is seen[2]["usage_prior"]
        assert seen[0]["mask"].tolist() == [True, True, True, False]
        assert not torch.equal(estimate.usage, before)  # updated once, after the parts

    @pytest.mark.parametrize("assignment", ["soft", "hard"])
    def test_the_softmax_of_the_e_step_runs_once(self, assignment, monkeypatch) -> None:
        images, prompts, labels = problem()
        loss_fn = MixtureOfPromptsLoss(
            assigner=SoftEMAssigner(mode=assignment),
            usage_estimate=UsageEstimate(num_classes=4, n_subprompts=3),
            regularizers={"floor": (UsageFloor(), 1.0)},
        )
        calls = []
        original = torch.softmax

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(args[0].shape)
            return original(*args, **kwargs)

        monkeypatch.setattr(torch, "softmax", counting)
        loss_fn(images, prompts, labels)
        assert calls == [torch.Size([6, 3])], calls  # one (batch, K) softmax, nothing else

    def test_usage_floor_gets_the_losss_responsibilities_not_its_own(self) -> None:
        images, prompts, labels = problem()
        # At the loss's tau (30: soft), not at UsageFloor's former own tau of 1 (nearly hard).
        loss_fn = MixtureOfPromptsLoss(regularizers={"floor": (UsageFloor(floor=1.0), 1.0)})
        out = loss_fn(images, prompts, labels, tau=30.0)
        at_loss_tau = PF.usage_floor(
            PF.responsibilities(images, prompts, labels, tau=30.0), labels, floor=1.0
        )
        at_tau_1 = PF.usage_floor(
            PF.responsibilities(images, prompts, labels, tau=1.0), labels, floor=1.0
        )
        torch.testing.assert_close(out["floor"], at_loss_tau)
        assert not torch.allclose(at_loss_tau, at_tau_1)  # the test can tell


class TestLabelNoiseAndPrior:
    """The E-step over "is this label right", and the learner's prior added to the loss."""

    def test_cross_entropy_and_pull_are_weighted_by_label_confidence(self) -> None:
        images, prompts, labels = problem()
        loss_fn = make_loss(label_noise=0.2, tau=0.5)
        out = loss_fn(images, prompts, labels)
        weights = PF.label_confidence(out["logits"], labels, label_noise=0.2)
        torch.testing.assert_close(out["label_confidence"], weights)
        per_image = F.cross_entropy(out["logits"], labels, reduction="none")
        torch.testing.assert_close(out["ce"], (weights * per_image).sum() / weights.sum())
        own = PF.own_class_similarities(images, prompts, labels)
        pull = out["responsibilities"] * weights[:, None] * (1 - own)
        torch.testing.assert_close(out["mixture"], pull.sum(-1).mean())

    def test_a_flipped_label_barely_trains(self) -> None:
        # Two tight classes; image 2 is labelled 0 but sits on class 1's sub-prompt.
        prompts = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], requires_grad=True)
        images = torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.02, 1.0]])
        labels = torch.tensor([0, 0, 0])
        out = MixtureOfPromptsLoss()(images, prompts, labels)
        assert out["label_confidence"][2] < 1e-3 < 0.99 < out["label_confidence"][:2].min()
        trusting = MixtureOfPromptsLoss(label_noise=0.0)(images, prompts, labels)
        assert out["ce"] < 0.01 * trusting["ce"]

    def test_prior_is_added_and_reported(self) -> None:
        images, prompts, labels = problem()
        prior = (prompts**2).sum() * 0.01
        loss_fn = make_loss()
        plain = loss_fn(images, prompts, labels)
        out = loss_fn(images, prompts, labels, prior=prior)
        torch.testing.assert_close(out["prior"], prior)
        torch.testing.assert_close(out["loss"], plain["loss"] + prior)
        assert plain["prior"].item() == 0.0

    @pytest.mark.parametrize(
        ("prior", "error", "match"),
        [
            (torch.ones(2), ValueError, "0-dim"),
            (torch.tensor(1), TypeError, "prior"),
            (1.0, TypeError, "prior"),
        ],
    )
    def test_bad_prior_is_named(self, prior, error, match) -> None:
        images, prompts, labels = problem()
        with pytest.raises(error, match=match):
            make_loss()(images, prompts, labels, prior=prior)

    def test_nan_prior_makes_the_loss_nan(self) -> None:
        images, prompts, labels = problem()
        out = make_loss()(images, prompts, labels, prior=torch.tensor(float("nan")))
        assert torch.isnan(out["loss"])
