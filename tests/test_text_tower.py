"""Tests of the open_clip text-tower adapter: exact encode_text from embeddings, every layout."""

from __future__ import annotations

import itertools
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from open_clip.transformer import Transformer
from torch import nn

from promptmix.prompts import MixtureOfPrompts, OffsetMixtureOfPrompts
from promptmix.text_tower import ChunkCost, TextTower, encode_in_chunks, plan_chunks

CLASSNAMES_FILE = Path(__file__).resolve().parents[1] / "benchmarks/stanford_cars_classnames.txt"
NAMES = ["cat", "red panda", "AM General Hummer SUV 2000", "Rolls-Royce Phantom Drophead Coupe"]
VISION = dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32)
TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)


def tiny(layout: str = "clip", **text_cfg: object) -> nn.Module:
    torch.manual_seed(0)
    cls = open_clip.CustomTextCLIP if layout == "custom" else open_clip.CLIP
    return cls(embed_dim=32, vision_cfg=VISION, text_cfg={**TEXT, **text_cfg}).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


def reference(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokenizer(texts))


class LegacyTransformer(nn.Module):
    """A transformer without `batch_first` that takes `(L, N, D)`, as open_clip < 2.24."""

    def __init__(self, resblocks: nn.ModuleList) -> None:
        super().__init__()
        self.resblocks = resblocks

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.transpose(0, 1)  # blocks below were built batch-first
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x.transpose(0, 1)


def sequence_first(model: nn.Module) -> nn.Module:
    """Swap in the same weights run as `batch_first=False` (open_clip transposes inside)."""
    transformer = Transformer(width=64, layers=2, heads=2, batch_first=False)
    transformer.load_state_dict(model.transformer.state_dict())
    model.transformer = transformer.eval()
    return model


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: tiny(), id="CLIP-parameter-projection"),
        pytest.param(lambda: tiny(proj_bias=True), id="CLIP-linear-projection"),
        pytest.param(lambda: tiny("custom"), id="CustomTextCLIP"),
        pytest.param(lambda: tiny("custom", proj_bias=True), id="CustomTextCLIP-linear"),
        pytest.param(lambda: tiny("custom", pool_type="eos", eos_id=49407), id="eos-pooling"),
        pytest.param(lambda: tiny("custom", proj_type="none"), id="no-projection"),
        pytest.param(lambda: sequence_first(tiny()), id="not-batch-first"),
    ],
)
@pytest.mark.parametrize("chunk_size", ["auto", None, 3])
def test_encode_token_ids_equals_encode_text(build, chunk_size, tokenizer):
    model = build()
    texts = [f"a photo of a {name}." for name in NAMES]
    tower = TextTower(model)
    with torch.no_grad():
        features = tower.encode_token_ids(tokenizer(texts), chunk_size=chunk_size)
    expected = reference(model, tokenizer, texts)
    assert features.shape == expected.shape == (len(NAMES), tower.output_dim)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_linear_projection_is_used(tokenizer):
    model = tiny(proj_bias=True)
    assert isinstance(model.text_projection, nn.Linear)
    tower = TextTower(model)
    ids = tokenizer(NAMES)
    before = tower.encode_token_ids(ids).detach()
    with torch.no_grad():
        model.text_projection.bias += 1.0
    torch.testing.assert_close(tower.encode_token_ids(ids).detach(), before + 1.0)


def test_legacy_sequence_first_transformer(tokenizer):
    model = tiny()
    texts = [f"a photo of a {name}." for name in NAMES]
    expected = reference(model, tokenizer, texts)
    model.transformer = LegacyTransformer(model.transformer.resblocks)
    tower = TextTower(model)
    assert not tower.takes_batch_first
    prompts = MixtureOfPrompts(model, tokenizer, NAMES, n_subprompts=1, init_noise_std=0.0)
    torch.testing.assert_close(prompts()[:, 0], F.normalize(expected, dim=-1), atol=1e-5, rtol=0)


class HFTextEncoder(nn.Module):
    """Has the shape of open_clip's Hugging Face tower: token ids in, no token_embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Linear(4, 4)
        self.config = object()
        self.pooler = nn.Identity()
        self.proj = nn.Linear(4, 4)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.ones(token_ids.shape[0], 4))


class HFCLIP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text = HFTextEncoder()

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text(token_ids)


def test_hugging_face_tower_is_rejected_with_reason(tokenizer):
    with pytest.raises(TypeError, match=r"HFTextEncoder takes token ids only.*learned context"):
        TextTower(HFCLIP())
    with pytest.raises(TypeError, match="token ids only"):
        MixtureOfPrompts(HFCLIP(), tokenizer, NAMES)
    # The offset parameterisation only needs encode_text, so it accepts such towers.
    assert OffsetMixtureOfPrompts(HFCLIP(), tokenizer, NAMES, n_subprompts=2)().shape == (4, 2, 4)


@pytest.mark.parametrize(
    ("text_cfg", "match"),
    [
        (dict(no_causal_mask=True), "causal attn_mask"),
        (dict(pool_type="first"), "pooling must be one of"),
        (dict(embed_cls=True), "cls_emb"),
    ],
)
def test_towers_that_cannot_be_cut_are_rejected(text_cfg, match):
    with pytest.raises(ValueError, match=match):
        TextTower(tiny("custom", **text_cfg))


def test_not_a_model_is_rejected():
    with pytest.raises(TypeError, match="clip_model must be an open_clip model"):
        TextTower("ViT-B-32")
    with pytest.raises(TypeError, match="token_embedding"):
        TextTower(nn.Linear(2, 2))


def test_eos_pooling_uses_the_end_of_text_token_not_the_largest_id(tokenizer):
    """A tokenizer whose end-of-text id (0) is smaller than every id around it (padding 49407)."""

    def swapped(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts)
        return torch.where(ids == 49407, 0, torch.where(ids == 0, 49407, ids))

    model = tiny("custom", pool_type="eos", eos_id=0)
    texts = [f"a photo of a {name}." for name in NAMES[:2]]
    token_ids = swapped(texts)
    tower = TextTower(model)
    positions = tower.pool_positions(token_ids)
    assert (positions < token_ids.argmax(dim=-1)).all()  # the two rules differ on these prompts
    assert (token_ids.gather(1, positions[:, None]) == 0).all()
    expected = reference(model, swapped, texts)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode_token_ids(token_ids), expected, atol=1e-5, rtol=0)
        prompts = MixtureOfPrompts(model, swapped, NAMES[:2], n_subprompts=1, init_noise_std=0)
        features = prompts()[:, 0]
    assert prompts.token_ids.shape[-1] == int(positions.max()) + 1
    torch.testing.assert_close(features, F.normalize(expected, dim=-1), atol=1e-5, rtol=0)


def cost_of(chunks, chunk_tokens: float) -> float:
    return sum(chunk_tokens + (stop - start) * length for start, stop, length in chunks)


sorted_lengths = st.lists(st.integers(1, 77), min_size=0, max_size=40).map(sorted)


@given(
    lengths=sorted_lengths,
    chunk_size=st.one_of(st.none(), st.just("auto"), st.integers(1, 50)),
    chunk_tokens=st.floats(0, 2000),
    max_tokens=st.integers(77, 3000),
)
def test_plan_chunks_covers_every_prompt_in_order_and_keeps_every_end_of_text(
    lengths, chunk_size, chunk_tokens, max_tokens
):
    cost = ChunkCost(chunk_tokens=chunk_tokens, max_tokens=max_tokens)
    chunks = plan_chunks(lengths, chunk_size=chunk_size, cost=cost)
    edges = [0] + [stop for _, stop, _ in chunks]
    assert [start for start, _, _ in chunks] == edges[:-1] and edges[-1] == len(lengths)
    for start, stop, length in chunks:
        assert stop > start and length == max(lengths[start:stop])
        if chunk_size == "auto":
            assert (stop - start) * length <= max_tokens or stop - start == 1
        elif chunk_size is not None:
            assert stop - start <= chunk_size
    if chunk_size is None and lengths:
        assert chunks == ((0, len(lengths), lengths[-1]),)


def partitions(count: int):
    """Every way to cut range(count) into contiguous non-empty groups, as boundary lists."""
    for mask in range(1 << max(count - 1, 0)):
        yield [0] + [i + 1 for i in range(count - 1) if mask >> i & 1] + [count]


@given(
    lengths=st.lists(st.integers(1, 77), min_size=1, max_size=9).map(sorted),
    chunk_tokens=st.floats(0, 500),
)
def test_plan_chunks_is_the_cheapest_split_when_no_chunk_is_too_long(lengths, chunk_tokens):
    cost = ChunkCost(chunk_tokens=chunk_tokens, max_tokens=10**6)
    planned = cost_of(plan_chunks(lengths, cost=cost), chunk_tokens)
    brute_force = min(
        cost_of([(a, b, lengths[b - 1]) for a, b in itertools.pairwise(bounds)], chunk_tokens)
        for bounds in partitions(len(lengths))
    )
    assert planned == pytest.approx(brute_force)


def test_plan_chunks_rejects_unsorted_lengths_and_auto_without_cost():
    with pytest.raises(ValueError, match="sorted"):
        plan_chunks([3, 2], chunk_size=None)
    with pytest.raises(ValueError, match="cost"):
        plan_chunks([2, 3])


@pytest.fixture(scope="module")
def cars_lengths(tokenizer) -> list[int]:
    classnames = CLASSNAMES_FILE.read_text().splitlines()
    token_ids = tokenizer([f"a photo of a {name}." for name in classnames for _ in range(8)])
    return sorted((token_ids.argmax(dim=-1) + 1).tolist())


def test_default_plans_on_stanford_cars_x8(cars_lengths):
    """CPU: groups by end-of-text position, nearly no padding. CUDA bf16: one or two batches."""
    model = open_clip.create_model("ViT-B-32", pretrained=None)  # width 512, 12 layers
    tower = TextTower(model)
    floor = sum(cars_lengths)  # every prompt cut at its own end-of-text token
    assert 77 * len(cars_lengths) / floor > 4.9

    def plan(device: str, dtype: torch.dtype, checkpointing: bool = False):
        cost = ChunkCost.default(
            tower, device=torch.device(device), dtype=dtype, checkpointing=checkpointing
        )
        return plan_chunks(cars_lengths, cost=cost), cost

    def work(chunks) -> int:
        return sum((stop - start) * length for start, stop, length in chunks)

    cpu, cpu_cost = plan("cpu", torch.float32)
    assert work(cpu) < 1.02 * floor and len(cpu) >= 8
    assert all((stop - start) * length <= cpu_cost.max_tokens for start, stop, length in cpu)
    gpu_half, _ = plan("cuda", torch.bfloat16)
    assert len(gpu_half) <= 2 and work(gpu_half) < 1.5 * floor
    gpu_full, _ = plan("cuda", torch.float32)
    assert len(gpu_half) <= len(gpu_full) <= 6 and work(gpu_full) <= work(gpu_half)
    # Checkpointing bounds each chunk's activations, hence its tokens.
    checkpointed, checkpoint_cost = plan("cuda", torch.bfloat16, checkpointing=True)
    assert checkpoint_cost.max_tokens < 1 << 17
    assert max((stop - start) * length for start, stop, length in checkpointed) <= (
        checkpoint_cost.max_tokens
    )


def test_encode_in_chunks_checkpointed_equals_plain_with_gradients():
    weight = torch.randn(6, 3, requires_grad=True)
    chunks = plan_chunks([1, 2, 2, 3, 3, 3], chunk_size=2)

    def encode(start: int, stop: int, length: int) -> torch.Tensor:
        return (weight[start:stop] * length).tanh()

    outputs = []
    for checkpointing in (False, True):
        features = encode_in_chunks(encode, chunks, gradient_checkpointing=checkpointing)
        (grad,) = torch.autograd.grad(features.pow(2).sum(), weight)
        outputs.append((features.detach(), grad))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    expected = torch.cat([(weight[a:b] * n).tanh() for a, b, n in chunks]).detach()
    torch.testing.assert_close(outputs[0][0], expected, atol=0, rtol=0)
