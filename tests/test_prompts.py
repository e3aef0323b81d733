"""Tests of MixtureOfPrompts and OffsetMixtureOfPrompts: exactness, freezing, speed, errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptmix import functional as PF
from promptmix.prompts import MixtureOfPrompts, OffsetMixtureOfPrompts
from promptmix.text_tower import ChunkCost, TextTower, plan_chunks

NAMES = [
    "cat",
    "red panda",
    "AM General Hummer SUV 2000",
    "Rolls-Royce Phantom Drophead Coupe",
    "x",
]
TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "a bad photo of {}!"]


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


def encode_text(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(texts)), dim=-1)


def full_length_coop(model: nn.Module, tokenizer, prompts: MixtureOfPrompts, texts) -> torch.Tensor:
    """The obvious way: every prompt at 77 tokens, context spliced in after [SOS]."""
    token_ids = tokenizer(texts)
    context = prompts.context.flatten(0, 1)
    embeddings = model.token_embedding(token_ids)
    x = torch.cat([embeddings[:, :1], context, embeddings[:, 1 + prompts.n_ctx :]], dim=1)
    x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(texts)), token_ids.argmax(dim=-1)]
    return F.normalize(x @ model.text_projection, dim=-1)


def diversity(features: torch.Tensor) -> torch.Tensor:
    """Mean over classes of the mean over pairs i<j of cos^2 (features are unit vectors)."""
    cosine = features @ features.transpose(1, 2)
    i, j = torch.triu_indices(features.shape[1], features.shape[1], offset=1)
    return cosine[:, i, j].pow(2).mean()


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 64])
@pytest.mark.parametrize("class_specific", [True, False])
def test_one_subprompt_from_the_phrase_equals_encode_text(
    model, tokenizer, chunk_size, class_specific
):
    prompts = MixtureOfPrompts(
        model,
        tokenizer,
        NAMES,
        n_subprompts=1,
        ctx_init="a photo of a",
        init_noise_std=0.0,
        chunk_size=chunk_size,
        class_specific=class_specific,
    )
    expected = encode_text(model, tokenizer, [f"a photo of a {name}." for name in NAMES])
    features = prompts()
    assert features.shape == (len(NAMES), 1, 32)
    torch.testing.assert_close(features[:, 0], expected, atol=1e-5, rtol=0)


def test_real_vit_b_32_config_is_exact(tokenizer):
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    names = NAMES[:3]
    prompts = MixtureOfPrompts(model, tokenizer, names, n_subprompts=1, init_noise_std=0.0)
    with torch.no_grad():
        features = prompts()
    expected = encode_text(model, tokenizer, [f"a photo of a {name}." for name in names])
    torch.testing.assert_close(features[:, 0], expected, atol=1e-5, rtol=0)


def test_each_subprompt_follows_its_template(model, tokenizer):
    templates = ["a photo of {}.", "i love my {}!", "one big old {}", "picture of my {} ,"]
    prompts = MixtureOfPrompts(
        model, tokenizer, NAMES, n_subprompts=4, n_ctx=3, templates=templates, init_noise_std=0.0
    )
    features = prompts()
    for k, template in enumerate(templates):
        expected = encode_text(model, tokenizer, [template.format(name) for name in NAMES])
        torch.testing.assert_close(features[:, k], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_cut_and_chunked_encoding_equals_full_77_tokens_with_gradients(
    model, tokenizer, chunk_size
):
    prompts = MixtureOfPrompts(
        model, tokenizer, NAMES, n_subprompts=4, ctx_init=None, chunk_size=chunk_size
    )
    texts = [f"X X X X {name}." for name in NAMES for _ in range(4)]
    expected = full_length_coop(model, tokenizer, prompts, texts).view(len(NAMES), 4, -1)
    (expected_grad,) = torch.autograd.grad(expected.sum(), prompts.context)
    features = prompts()
    (grad,) = torch.autograd.grad(features.sum(), prompts.context)
    assert prompts.token_ids.shape[-1] < 77
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_equals_without(model, tokenizer):
    kwargs = dict(n_subprompts=3, chunk_size=4, generator=torch.Generator().manual_seed(1))
    plain = MixtureOfPrompts(model, tokenizer, NAMES, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(1)
    checkpointed = MixtureOfPrompts(model, tokenizer, NAMES, gradient_checkpointing=True, **kwargs)
    assert torch.equal(plain.context, checkpointed.context)
    weights = torch.randn(len(NAMES), 3, 32)
    outputs = []
    for prompts in (plain, checkpointed):
        features = prompts()
        (features * weights).sum().backward()
        outputs.append((features.detach(), prompts.context.grad))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=1e-6, rtol=1e-5)
    assert outputs[0][1].abs().sum() > 0


def test_class_ids_subset_equals_slicing_the_full_output(model, tokenizer):
    prompts = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2, chunk_size=3)
    full = prompts().detach()
    for class_ids in (torch.tensor([4, 0, 2, 2]), [1], (3, 4)):
        subset = prompts(class_ids)
        torch.testing.assert_close(subset, full[torch.as_tensor(class_ids)], atol=1e-6, rtol=0)
    # Only the requested classes' context receives gradient.
    prompts(torch.tensor([1, 3])).sum().backward()
    touched = prompts.context.grad.flatten(1).abs().sum(dim=1) > 0
    assert touched.tolist() == [False, True, False, True, False]


def test_clip_is_frozen_and_only_context_is_learned(model, tokenizer):
    model.train()
    prompts = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2)
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert [name for name, _ in prompts.named_parameters()] == ["context"]
    prompts().sum().backward()
    assert all(parameter.grad is None for parameter in model.parameters())
    assert prompts.context.grad is not None
    prompts.train()  # the model is not a submodule: training the prompts leaves it in eval
    assert not model.training


def test_state_dict_holds_only_the_context_and_round_trips(model, tokenizer):
    prompts = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2)
    state = prompts.state_dict()
    assert list(state) == ["context"]
    buffers = {name for name, _ in prompts.named_buffers()}
    assert buffers == {"token_ids", "pool_positions", "order", "inverse"}
    restored = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2)
    assert not torch.equal(restored.context, prompts.context)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(), prompts(), atol=0, rtol=0)


def test_identical_subprompts_are_stationary_and_the_init_breaks_the_symmetry(model, tokenizer):
    def diversity_gradient(**kwargs: object) -> torch.Tensor:
        prompts = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=4, **kwargs)
        (grad,) = torch.autograd.grad(diversity(prompts()), prompts.context)
        return grad

    # The trap: zero up to the float rounding of encoding equal prompts in different batch rows.
    assert diversity_gradient(init_noise_std=0.0).abs().max() < 1e-6
    assert diversity_gradient().abs().max() > 1e-3  # the default noise
    assert diversity_gradient(templates=TEMPLATES, init_noise_std=0.0).abs().max() > 1e-3


def test_diversity_loss_of_the_library_has_gradient_at_init(model, tokenizer):
    prompts = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=8)
    (grad,) = torch.autograd.grad(PF.diversity_loss(prompts()), prompts.context)
    assert grad.abs().max() > 1e-6


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(n_subprompts=0), ValueError, r"n_subprompts must be >= 1 but is 0"),
        (dict(n_subprompts=2.0), TypeError, r"n_subprompts must be an int but is float"),
        (dict(n_ctx=5), ValueError, r"n_ctx must equal .*'a photo of a' has 4\) but is 5"),
        (dict(templates=TEMPLATES[:2], n_subprompts=3), ValueError, r"templates must .* \(3\)"),
        (dict(templates=["a photo of a", "{}"], n_subprompts=2), ValueError, r"templates\[0\]"),
        (
            dict(templates=["a b c d {}", "a b {}"], n_subprompts=2),
            ValueError,
            r"templates\[1\] before .*'a b' has 2\) but is 4",
        ),
        (dict(init_noise_std=-0.1), ValueError, r"init_noise_std must be in \[0, inf\)"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be >= 1 but is 0"),
        (dict(ctx_init=4), TypeError, r"ctx_init must be a str or None but is int"),
        (dict(classnames=[]), ValueError, r"classnames must hold at least one"),
        (dict(classnames="cat"), TypeError, r"classnames must be a sequence of str"),
        (dict(classnames=["cat", ""]), ValueError, r"classnames\[1\] is ''"),
        (dict(classnames=["cat", "  "]), ValueError, r"must not be empty or blank"),
        (
            dict(classnames=["cat", "dog", "cat"]),
            ValueError,
            r"classnames\[0\] and classnames\[2\] are both 'cat'",
        ),
        (
            dict(classnames=["cat", " ".join(["very"] * 80) + " long", " ".join(["very"] * 80)]),
            ValueError,
            r"classnames\[1\] is too long: .* fills all 77 tokens",
        ),
        (dict(tokenizer=None), TypeError, r"tokenizer must be .* but is NoneType"),
    ],
)
@pytest.mark.parametrize("cls", [MixtureOfPrompts, OffsetMixtureOfPrompts])
def test_bad_arguments_name_the_argument(model, tokenizer, kwargs, error, match, cls):
    kwargs = dict(kwargs)
    classnames = kwargs.pop("classnames", NAMES)
    tokenizer = kwargs.pop("tokenizer", tokenizer)
    if cls is OffsetMixtureOfPrompts and ("n_ctx" in match or "before" in match):
        pytest.skip("n_ctx is an option of MixtureOfPrompts only")
    with pytest.raises(error, match=match):
        cls(model, tokenizer, classnames, **kwargs)
    assert all(parameter.requires_grad for parameter in model.parameters())  # left untouched


@pytest.mark.parametrize("cls", [MixtureOfPrompts, OffsetMixtureOfPrompts])
@pytest.mark.parametrize(
    ("class_ids", "error", "match"),
    [
        (
            torch.tensor([0, 5]),
            ValueError,
            r"class_ids must lie in \[0, 4\] but ranges over \[0, 5\]",
        ),
        (torch.tensor([-1]), ValueError, r"class_ids must lie in \[0, 4\]"),
        (torch.tensor([0.0, 1.0]), TypeError, r"class_ids must be an integer tensor .*float32"),
        (torch.tensor([[0, 1]]), ValueError, r"class_ids must have shape \(n,\) .* \(1, 2\)"),
        (torch.tensor([], dtype=torch.long), ValueError, r"class_ids must have shape \(n,\)"),
        ("0", TypeError, r"class_ids must be None, an integer tensor"),
    ],
)
def test_bad_class_ids_name_the_argument(model, tokenizer, cls, class_ids, error, match):
    prompts = cls(model, tokenizer, NAMES, n_subprompts=2)
    with pytest.raises(error, match=match):
        prompts(class_ids)


def test_offset_prompts_start_at_the_frozen_text_features(model, tokenizer):
    prompts = OffsetMixtureOfPrompts(
        model, tokenizer, NAMES, n_subprompts=4, templates=TEMPLATES, init_noise_std=0.0
    )
    features = prompts()
    for k, template in enumerate(TEMPLATES):
        expected = encode_text(model, tokenizer, [template.format(name) for name in NAMES])
        torch.testing.assert_close(features[:, k], expected, atol=1e-5, rtol=0)
    assert sorted(prompts.state_dict()) == [
        "class_offsets",
        "num_images",
        "offsets",
        "shared_offsets",
    ]
    assert prompts.offsets.shape == (len(NAMES), 4, 32)
    assert prompts.class_offsets is not None and prompts.class_offsets.shape == (len(NAMES), 32)
    assert prompts.shared_offsets is not None and prompts.shared_offsets.shape == (4, 32)
    alone = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=4, share_looks=False)
    assert sorted(alone.state_dict()) == ["num_images", "offsets"]


@pytest.mark.parametrize("share_looks", [True, False])
def test_offset_prompts_never_run_the_text_tower_and_break_symmetry(model, tokenizer, share_looks):
    prompts = OffsetMixtureOfPrompts(
        model, tokenizer, NAMES, n_subprompts=4, share_looks=share_looks
    )
    model.transformer.forward = None  # any call to the tower now fails
    features = prompts()
    torch.testing.assert_close(prompts([3, 1]), features[[3, 1]], atol=0, rtol=0)
    noisy = prompts.shared_offsets if share_looks else prompts.offsets
    assert noisy is not None
    (grad,) = torch.autograd.grad(diversity(features), noisy)
    assert grad.abs().max() > 1e-6
    norms = noisy.detach().norm(dim=-1)
    assert 0.05 < norms.mean() < 0.2  # init_noise_std=0.1 is the expected offset norm


def test_a_shared_look_receives_gradient_from_every_class(model, tokenizer):
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=3)
    assert prompts.shared_offsets is not None
    for label in range(len(NAMES)):
        # A loss on one class's sub-prompts alone still moves every shared look.
        (grad,) = torch.autograd.grad(prompts()[label].sum(), prompts.shared_offsets)
        assert (grad.norm(dim=-1) > 0).all(), label
        (own,) = torch.autograd.grad(prompts()[label].sum(), prompts.class_offsets)
        assert own[label].norm() > 0 and own[torch.arange(len(NAMES)) != label].abs().max() == 0


def test_prior_loss_is_zero_at_the_text_and_fades_with_the_number_of_images(model, tokenizer):
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=3)
    assert prompts.prior_loss().item() == pytest.approx(0.0, abs=1e-6)  # a = 0, e = 0
    with torch.no_grad():
        prompts.offsets.add_(0.3 * torch.randn_like(prompts.offsets))
    one_shot = prompts.prior_loss()
    with torch.no_grad():
        prompts.num_images.mul_(16)
    torch.testing.assert_close(prompts.prior_loss(), one_shot / 16)
    with torch.no_grad():
        prompts.class_offsets.add_(0.3 * torch.randn_like(prompts.class_offsets))  # type: ignore[union-attr]
    text_only = OffsetMixtureOfPrompts(
        model, tokenizer, NAMES, n_subprompts=3, subprompt_prior_weight=0.0
    )
    with torch.no_grad():
        text_only.class_offsets.copy_(prompts.class_offsets)  # type: ignore[union-attr]
        text_only.shared_offsets.mul_(5.0)  # type: ignore[union-attr]
    # The text anchor acts on the class part only: the shared looks do not change it.
    class_text = torch.nn.functional.normalize(text_only.text_features.mean(1), dim=-1)
    cosine = torch.nn.functional.cosine_similarity(
        class_text + text_only.class_offsets, class_text, dim=-1
    )
    torch.testing.assert_close(text_only.prior_loss(), 8.0 * (1 - cosine).mean())


def test_offset_prompts_reject_bad_prior_settings(model, tokenizer):
    with pytest.raises(TypeError, match="share_looks"):
        OffsetMixtureOfPrompts(model, tokenizer, NAMES, share_looks=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="text_prior_weight"):
        OffsetMixtureOfPrompts(model, tokenizer, NAMES, text_prior_weight=-1.0)
    with pytest.raises(ValueError, match="subprompt_prior_weight"):
        OffsetMixtureOfPrompts(model, tokenizer, NAMES, subprompt_prior_weight=float("nan"))


@pytest.mark.parametrize("num_images", [0.0, -5.0, float("nan")])
def test_a_state_whose_num_images_is_not_positive_is_refused_before_loading(
    model, tokenizer, num_images
):
    prompts = OffsetMixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2)
    saved = {name: value + 1 for name, value in prompts.state_dict().items()}
    saved["num_images"] = torch.tensor(num_images)
    before = {name: value.clone() for name, value in prompts.state_dict().items()}
    with pytest.raises(RuntimeError, match="num_images must be a floating-point tensor"):
        prompts.load_state_dict(saved)
    for name, value in prompts.state_dict().items():
        assert torch.equal(value, before[name]), name
    saved["num_images"] = torch.tensor(12.0)
    prompts.load_state_dict(saved)
    assert prompts.num_images.item() == 12.0


class HostSync(RuntimeError):
    """Raised by `no_host_reads` where a step would wait for the device on a GPU."""


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Make every tensor-to-host read (a device synchronisation on a GPU) raise `HostSync`."""

    def forbid(name: str) -> Callable[..., None]:
        def raise_sync(*args: object, **kwargs: object) -> None:
            raise HostSync(f"{name} reads a tensor on the host")

        return raise_sync

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "numpy", "__int__", "__bool__", "__float__", "__index__"):
            patch.setattr(torch.Tensor, name, forbid(f"Tensor.{name}"))
        for name in ("unique", "nonzero", "masked_select", "unique_consecutive"):
            patch.setattr(torch.Tensor, name, forbid(f"Tensor.{name}"))
            patch.setattr(torch, name, forbid(f"torch.{name}"))
        yield


def test_no_host_reads_catches_a_read():
    with no_host_reads(), pytest.raises(HostSync, match="__int__"):
        int(torch.ones((), dtype=torch.long))
    assert int(torch.ones((), dtype=torch.long)) == 1  # restored after


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("class_specific", [True, False])
def test_training_step_of_the_learner_reads_nothing_back_from_the_device(
    model, tokenizer, gradient_checkpointing, class_specific
):
    prompts = MixtureOfPrompts(
        model,
        tokenizer,
        NAMES,
        n_subprompts=2,
        class_specific=class_specific,
        gradient_checkpointing=gradient_checkpointing,
    )
    weights = torch.randn(len(NAMES), 2, 32)
    optimizer = torch.optim.SGD(prompts.parameters(), lr=0.1)
    before = prompts.context.detach().clone()
    with no_host_reads():
        for _ in range(2):
            optimizer.zero_grad()
            (prompts() * weights).sum().backward()
            optimizer.step()
    assert not torch.equal(prompts.context, before)


@pytest.mark.parametrize("chunk_size", ["auto", None, 2])
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_default_chunking_equals_full_77_tokens_with_gradients_in_float64(
    tokenizer, chunk_size, gradient_checkpointing
):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    ).double()
    prompts = MixtureOfPrompts(
        model,
        tokenizer,
        NAMES,
        n_subprompts=3,
        ctx_init=None,
        chunk_size=chunk_size,
        gradient_checkpointing=gradient_checkpointing,
    )
    texts = [f"X X X X {name}." for name in NAMES for _ in range(3)]
    expected = full_length_coop(model, tokenizer, prompts, texts).view(len(NAMES), 3, -1)
    weights = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), prompts.context)
    features = prompts()
    (grad,) = torch.autograd.grad((features * weights).sum(), prompts.context)
    torch.testing.assert_close(features, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-10)


def test_the_plan_is_made_once_per_device_and_dtype(model, tokenizer):
    prompts = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=2)
    plans = dict(prompts._plans)
    assert len(plans) == 1
    (chunks,) = plans.values()
    lengths = (prompts.pool_positions.flatten()[prompts.order] + 1).tolist()
    assert lengths == sorted(lengths)
    tower, cpu = TextTower(model), torch.device("cpu")
    cost = ChunkCost.default(tower, device=cpu, dtype=torch.float32, checkpointing=False)
    assert chunks == plan_chunks(lengths, cost=cost)
    prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prompts()
    assert set(prompts._plans) == {*plans, ("cpu", torch.bfloat16, False)}
    assert prompts._plans[next(iter(plans))] is chunks
