"""Tests of the open_clip text-tower adapter: exact encode_text from embeddings, every layout."""

from __future__ import annotations

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
from promptmix.text_tower import TextTower, encode_by_length

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
    """A transformer without ``batch_first`` that takes ``(L, N, D)``, as open_clip < 2.24."""

    def __init__(self, resblocks: nn.ModuleList) -> None:
        super().__init__()
        self.resblocks = resblocks

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.transpose(0, 1)  # blocks below were built batch-first
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x.transpose(0, 1)


def sequence_first(model: nn.Module) -> nn.Module:
    """Swap in the same weights run as ``batch_first=False`` (open_clip transposes inside)."""
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
@pytest.mark.parametrize("chunk_size", [None, 3])
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


def record_lengths(calls: list[tuple[int, int]]):
    def encode(rows: torch.Tensor, length: int) -> torch.Tensor:
        calls.append((len(rows), length))
        return torch.stack([rows.double(), torch.full_like(rows, length).double()], dim=1)

    return encode


@given(
    positions=st.lists(st.integers(1, 76), min_size=1, max_size=60),
    chunk_size=st.one_of(st.none(), st.integers(1, 70)),
)
def test_encode_by_length_restores_order_and_cuts_each_chunk(positions, chunk_size):
    pool_positions = torch.tensor(positions)
    calls: list[tuple[int, int]] = []
    features = encode_by_length(record_lengths(calls), pool_positions, chunk_size=chunk_size)
    assert torch.equal(features[:, 0].long(), torch.arange(len(positions)))
    assert (features[:, 1].long() > pool_positions).all()  # every end-of-text token is kept
    assert sum(rows for rows, _ in calls) == len(positions)
    if chunk_size is None:
        assert calls == [(len(positions), max(positions) + 1)]
    else:  # sorted chunks: each cut at its own longest position, lengths non-decreasing
        lengths = [length for _, length in calls]
        assert lengths == sorted(lengths)


def test_sorted_chunks_do_a_fifth_of_the_token_work_on_stanford_cars(tokenizer):
    classnames = CLASSNAMES_FILE.read_text().splitlines()
    token_ids = tokenizer([f"a photo of a {name}." for name in classnames])
    positions = token_ids.argmax(dim=-1)

    def work(chunk_size: int | None) -> int:
        calls: list[tuple[int, int]] = []
        encode_by_length(record_lengths(calls), positions, chunk_size=chunk_size)
        return sum(rows * length for rows, length in calls)

    assert work(None) == 4508 and work(32) == 3164  # against 15,092 at 77 tokens
    assert 77 * len(classnames) / work(32) > 4.7
