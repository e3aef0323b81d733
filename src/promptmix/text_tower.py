"""Adapter that runs an open_clip text tower on learned prompt embeddings, in planned chunks.

open_clip's `encode_text` starts from token ids; a CoOp-style learner needs to start one step
later, from token embeddings in which some positions hold learned context vectors.
`TextTower` finds the tower's parts by attribute (`token_embedding`, `positional_embedding`,
`transformer`, `attn_mask`, `ln_final`, `text_projection` and the pooling rule) on a `CLIP` or
under `model.text` of a `CustomTextCLIP`, and repeats the rest of `encode_text` exactly. Nothing
from open_clip is imported: these parts move between releases.

Speed comes from doing fewer tokens. The causal mask makes the end-of-text feature independent of
every later token, so a prompt can be cut after its end-of-text position without changing the
result. Prompts sorted by that position are encoded in chunks, each cut after its own longest
end-of-text token; `plan_chunks` chooses the chunks from the fixed token ids alone, on the host,
so it runs once and the encoding itself never reads a value back from the device. The plan trades
padding (tokens beyond a prompt's end-of-text) against the fixed cost of one more chunk, which
`ChunkCost.default` sets per device and dtype:

- on CPU a chunk costs little beyond its tokens: prompts are grouped by their end-of-text position
  and every group is cut at its own length (little or no padding);
- on CUDA a chunk costs many kernel launches: one or a few large batches, cut at their longest
  end-of-text token, are faster than many exact ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ChunkCost", "TextTower", "compute_dtype", "encode_in_chunks", "plan_chunks"]

_REQUIRED_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final")
_END_OF_TEXT_POOLING = ("argmax", "eos")

# (start, stop, length): sorted prompts start:stop, encoded from their first `length` tokens.
Chunk = tuple[int, int, int]

ChunkSize = int | Literal["auto"] | None

# Cost model of one forward + backward, measured on the project's benchmark (docs/performance.md).
# Time of a chunk = launch seconds + tokens * seconds per token, where seconds per token is
# seconds per (token x weight) times the tower's matrix weights per layer (12 width^2) x layers.
# On CPU a chunk's fixed cost is mostly the threads' barriers of its ~1,000 operations: small on
# quiet cores, up to seconds on oversubscribed ones; 0.1 s merges only the smallest groups.
_LAUNCH_SECONDS = {"cpu": 0.1, "cuda": 0.01}
_SECONDS_PER_TOKEN_WEIGHT = {
    ("cpu", "full"): 1.9e-11,  # ViT-B-32 on 2 threads: about 0.7 ms per token
    ("cpu", "half"): 1.9e-11,  # CPU autocast: priced as fp32 (the same chunks win)
    ("cuda", "full"): 1.2e-13,  # H100 fp32, ViT-B-16: 4.6 us per token (no TF32)
    ("cuda", "half"): 2.7e-14,  # H100 bf16 autocast, ViT-B-16: about 1 us per token
}
# Largest chunk in tokens: on CPU larger chunks fall out of cache (measured slower beyond ~4k
# tokens of ViT-B-32); on CUDA only memory bounds it.
_MAX_TOKENS = {"cpu": 4096, "cuda": 1 << 17}
# Activation memory kept for backward per token, per layer and per unit of width, in bytes, and
# the budget one checkpointed chunk may use.
_ACTIVATION_BYTES = {"full": 72, "half": 40}
_CHECKPOINT_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True, kw_only=True)
class ChunkCost:
    """The price of a chunk in the units `plan_chunks` minimises: tokens.

    Args:
        chunk_tokens: Fixed cost of one more chunk, in tokens of work (launches, threads' wake-up).
        max_tokens: Largest `rows * length` of one chunk (cache or memory bound).
    """

    chunk_tokens: float
    max_tokens: int

    @staticmethod
    def default(
        tower: TextTower, *, device: torch.device, dtype: torch.dtype, checkpointing: bool
    ) -> ChunkCost:
        """The measured cost model for `tower` on `device` computing in `dtype`.

        Args:
            tower: The text tower; its width and depth scale the work of a token.
            device: Where it runs; devices other than CPU are priced as CUDA.
            dtype: The dtype it computes in (the autocast dtype under autocast).
            checkpointing: Bound each chunk's activations to 1 GiB as well.

        Returns:
            The cost of a chunk in tokens and the largest chunk.

        Examples:
            >>> import open_clip, torch
            >>> model = open_clip.create_model("ViT-B-32", pretrained=None)
            >>> tower = TextTower(model)
            >>> cpu = ChunkCost.default(tower, device=torch.device("cpu"), dtype=torch.float32,
            ...                         checkpointing=False)
            >>> gpu = ChunkCost.default(tower, device=torch.device("cuda"), dtype=torch.bfloat16,
            ...                         checkpointing=False)
            >>> round(cpu.chunk_tokens), cpu.max_tokens, round(gpu.chunk_tokens)
            (139, 4096, 9811)
        """
        kind = "cpu" if device.type == "cpu" else "cuda"
        precision = "half" if dtype in (torch.float16, torch.bfloat16) else "full"
        token_weights = 12 * tower.width**2 * tower.layers
        token_seconds = _SECONDS_PER_TOKEN_WEIGHT[kind, precision] * token_weights
        max_tokens = _MAX_TOKENS[kind]
        if checkpointing:
            token_bytes = _ACTIVATION_BYTES[precision] * tower.width * tower.layers
            max_tokens = min(max_tokens, max(_CHECKPOINT_BUDGET_BYTES // token_bytes, 1))
        return ChunkCost(chunk_tokens=_LAUNCH_SECONDS[kind] / token_seconds, max_tokens=max_tokens)


def plan_chunks(
    lengths: Sequence[int], *, chunk_size: ChunkSize = "auto", cost: ChunkCost | None = None
) -> tuple[Chunk, ...]:
    r"""Split prompts sorted by length into chunks, each cut at its own longest length.

    With `chunk_size="auto"` the plan minimises the total cost
    $\sum_{\text{chunks}} (c + \text{rows} \cdot \text{length})$ over contiguous groups of the
    sorted prompts, where $c$ is `cost.chunk_tokens`; a group longer than `cost.max_tokens` tokens
    is split into equal chunks. Dynamic programming over the distinct lengths (at most the context
    length, 77) finds the optimum exactly.

    Args:
        lengths: Tokens each prompt needs (end-of-text position + 1), non-decreasing, `(N,)`.
        chunk_size: `"auto"` (the cost model), an int (that many prompts per chunk) or `None`
            (all prompts in one chunk).
        cost: Cost model for `"auto"`; ignored otherwise.

    Returns:
        Chunks `(start, stop, length)` covering `0:N` in order.

    Raises:
        ValueError: If `lengths` is not sorted, or `"auto"` comes without `cost`.

    Examples:
        >>> plan_chunks([3, 3, 5, 5, 5], chunk_size=None)
        ((0, 5, 5),)
        >>> plan_chunks([3, 3, 5, 5, 5], chunk_size=2)
        ((0, 2, 3), (2, 4, 5), (4, 5, 5))
        >>> plan_chunks([3, 3, 5, 5, 5], cost=ChunkCost(chunk_tokens=1.0, max_tokens=100))
        ((0, 2, 3), (2, 5, 5))
        >>> plan_chunks([3, 3, 5, 5, 5], cost=ChunkCost(chunk_tokens=10.0, max_tokens=100))
        ((0, 5, 5),)
    """
    lengths = [int(length) for length in lengths]
    count = len(lengths)
    if any(a > b for a, b in itertools.pairwise(lengths)):
        raise ValueError("lengths must be sorted in non-decreasing order but are not.")
    if count == 0:
        return ()
    if chunk_size is None:
        return ((0, count, lengths[-1]),)
    if chunk_size != "auto":
        return tuple(
            (start, min(start + chunk_size, count), lengths[min(start + chunk_size, count) - 1])
            for start in range(0, count, chunk_size)
        )
    if cost is None:
        raise ValueError("plan_chunks needs cost when chunk_size is 'auto'.")
    # Group boundaries worth considering: where the length changes.
    bounds = [0] + [i for i in range(1, count) if lengths[i] != lengths[i - 1]] + [count]

    def pieces(start: int, stop: int) -> int:
        """Chunks a group needs so that none exceeds `max_tokens` (one row at the least)."""
        return math.ceil((stop - start) / max(1, cost.max_tokens // lengths[stop - 1]))

    best = [0.0] + [math.inf] * (len(bounds) - 1)
    previous = [0] * len(bounds)
    for j in range(1, len(bounds)):
        for i in range(j):
            rows, length = bounds[j] - bounds[i], lengths[bounds[j] - 1]
            total = best[i] + pieces(bounds[i], bounds[j]) * cost.chunk_tokens + rows * length
            if total < best[j]:
                best[j], previous[j] = total, i
    groups = []
    j = len(bounds) - 1
    while j > 0:
        groups.append((bounds[previous[j]], bounds[j]))
        j = previous[j]
    chunks: list[Chunk] = []
    for start, stop in reversed(groups):
        splits = pieces(start, stop)
        edges = [start + (stop - start) * s // splits for s in range(splits + 1)]
        chunks += [(a, b, lengths[b - 1]) for a, b in itertools.pairwise(edges) if b > a]
    return tuple(chunks)


def encode_in_chunks(
    encode: Callable[[int, int, int], Tensor],
    chunks: Sequence[Chunk],
    *,
    gradient_checkpointing: bool = False,
) -> Tensor:
    """Run `encode(start, stop, length)` on every chunk and concatenate the features.

    Args:
        encode: Encodes sorted prompts `start:stop` from their first `length` tokens, returning
            `(stop - start, dim)`.
        chunks: The plan, from `plan_chunks`.
        gradient_checkpointing: Keep no activations of a chunk for backward; recompute them chunk
            by chunk during backward instead (one extra forward; peak memory of one chunk).

    Returns:
        Features `(N, dim)` in the sorted order.

    Examples:
        >>> encode = lambda start, stop, length: torch.full((stop - start, 1), float(length))
        >>> encode_in_chunks(encode, plan_chunks([2, 2, 3], chunk_size=2)).flatten().tolist()
        [2.0, 2.0, 3.0]
    """
    features = []
    for start, stop, length in chunks:
        if gradient_checkpointing and torch.is_grad_enabled():
            features.append(
                cast(Tensor, checkpoint(encode, start, stop, length, use_reentrant=False))
            )
        else:
            features.append(encode(start, stop, length))
    return features[0] if len(features) == 1 else torch.cat(features)


def compute_dtype(tower: TextTower, *, device: torch.device) -> torch.dtype:
    """The dtype the tower's matrix products run in on `device`: autocast's, else the weights'."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    elif device.type == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    elif device.type == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    return tower.dtype


def _find_tower(clip_model: object) -> nn.Module:
    """Return the module that owns the text parts: the model itself or its `.text` tower."""
    if not isinstance(clip_model, nn.Module):
        raise TypeError(
            f"clip_model must be an open_clip model (torch.nn.Module) but is "
            f"{type(clip_model).__name__}."
        )
    if hasattr(clip_model, "token_embedding"):
        return clip_model
    text = getattr(clip_model, "text", None)
    if isinstance(text, nn.Module) and hasattr(text, "token_embedding"):
        return text
    owner = text if isinstance(text, nn.Module) else clip_model
    name = type(owner).__name__
    if "HF" in name or hasattr(owner, "config") or hasattr(owner, "pooler"):
        raise TypeError(
            f"clip_model's text tower {name} takes token ids only: it embeds them inside a "
            "Hugging Face model, so learned context vectors cannot be fed to it. Use a model whose "
            "text tower is open_clip's own (CLIP, or CustomTextCLIP built with "
            "force_custom_text=True); OffsetMixtureOfPrompts works with any tower."
        )
    raise TypeError(
        f"clip_model must be an open_clip CLIP or CustomTextCLIP with a token_embedding on the "
        f"model or on model.text, but {type(clip_model).__name__} has neither."
    )


class TextTower:
    """The parts of a frozen open_clip text tower, run from token embeddings instead of token ids.

    Holds references to the model's parts (it is not an `nn.Module`, so nothing here is saved or
    moved by a module that keeps it). `encode_embeddings` equals `encode_text` on the same prompts
    to float rounding, for any length that covers every pooled position.

    Args:
        clip_model: An open_clip `CLIP` or `CustomTextCLIP` whose text tower is open_clip's
            `TextTransformer`. The transformer may be batch-first or not, the projection a
            Parameter `(width, dim)`, an `nn.Linear` or `None`.

    Raises:
        TypeError: If the tower takes token ids only (Hugging Face) or has no `token_embedding`.
        ValueError: If the tower cannot be cut exactly: no causal `attn_mask`, a CoCa class token
            (`cls_emb`), or pooling other than at the end-of-text token.

    Examples:
        >>> import open_clip
        >>> model = open_clip.create_model("ViT-B-32", pretrained=None)
        >>> tower = TextTower(model)
        >>> token_ids = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat."])
        >>> tower.pool_positions(token_ids).tolist(), tower.encode_token_ids(token_ids).shape
        ([7], torch.Size([1, 512]))
    """

    def __init__(self, clip_model: nn.Module) -> None:
        tower = _find_tower(clip_model)
        missing = [part for part in _REQUIRED_PARTS if not hasattr(tower, part)]
        if missing:
            raise TypeError(
                f"clip_model's text tower {type(tower).__name__} must have "
                f"{', '.join(_REQUIRED_PARTS)} but lacks {', '.join(missing)}."
            )
        self.token_embedding = cast(nn.Module, tower.token_embedding)
        self.positional_embedding = cast(Tensor, tower.positional_embedding)
        self.transformer = cast(nn.Module, tower.transformer)
        self.ln_final = cast(nn.Module, tower.ln_final)
        self.text_projection: Tensor | nn.Module | None = getattr(tower, "text_projection", None)
        self.attn_mask: Tensor | None = getattr(tower, "attn_mask", None)
        # CLIP keeps these as text_pool_type / text_eos_id, TextTransformer as pool_type / eos_id.
        self.pool_type: str = getattr(
            tower, "text_pool_type", getattr(tower, "pool_type", "argmax")
        )
        self.eos_id: int | None = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        if getattr(tower, "cls_emb", None) is not None:
            raise ValueError(
                "clip_model's text tower appends a class token (cls_emb, as in CoCa) and pools it "
                "after the last position, so prompts cannot be cut; MixtureOfPrompts needs a tower "
                "that pools at the end-of-text token."
            )
        if self.pool_type not in _END_OF_TEXT_POOLING:
            raise ValueError(
                f"clip_model's text pooling must be one of {_END_OF_TEXT_POOLING} (the end-of-text "
                f"token, as CoOp assumes) but is {self.pool_type!r}."
            )
        if self.pool_type == "eos" and self.eos_id is None:
            raise ValueError("clip_model pools at 'eos' but its text tower has no eos_id.")
        if not isinstance(self.attn_mask, Tensor) or self.attn_mask.dim() != 2:
            raise ValueError(
                "clip_model's text tower must have a causal attn_mask of shape (length, length) "
                "so that later tokens cannot change the end-of-text feature, but has "
                f"{self.attn_mask!r}."
            )
        # open_clip >= 2.24 transformers take (N, L, D) and transpose themselves when built with
        # batch_first=False; older ones have no batch_first attribute and take (L, N, D).
        self.takes_batch_first: bool = hasattr(self.transformer, "batch_first")
        blocks = getattr(self.transformer, "resblocks", None)
        self.layers: int = len(blocks) if isinstance(blocks, nn.ModuleList) else 12

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tower computes in (open_clip's `cast_dtype`)."""
        get_cast_dtype = getattr(self.transformer, "get_cast_dtype", None)
        if callable(get_cast_dtype):
            return get_cast_dtype()
        return self.positional_embedding.dtype

    @property
    def device(self) -> torch.device:
        """The device of the tower's weights."""
        return self.positional_embedding.device

    @property
    def width(self) -> int:
        """Token embedding width."""
        return int(self.positional_embedding.shape[-1])

    @property
    def context_length(self) -> int:
        """Number of positions the tower has embeddings for."""
        return int(self.positional_embedding.shape[0])

    @property
    def output_dim(self) -> int:
        """Dimension of the text features."""
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection.out_features
        if isinstance(self.text_projection, Tensor):
            return int(self.text_projection.shape[-1])
        return self.width

    @property
    def embedding_table(self) -> Tensor:
        """The token-embedding weight `(vocab_size, width)`."""
        return cast(Tensor, self.token_embedding.weight)

    def pool_positions(self, token_ids: Tensor) -> Tensor:
        """Position of the token each prompt is pooled at, as `encode_text` finds it.

        A tower that pools at `"eos"` pools at the first end-of-text token (`eos_id`), whatever
        ids come before or after it; one that pools at `"argmax"` (CLIP's) at the largest id.

        Args:
            token_ids: Token ids `(..., length)`.

        Returns:
            Positions `(...)` (int64).
        """
        if self.pool_type == "eos":
            return torch.eq(token_ids, cast(int, self.eos_id)).int().argmax(dim=-1)
        return token_ids.argmax(dim=-1)

    def token_embeddings(self, token_ids: Tensor) -> Tensor:
        """Embed token ids `(N, length)` into `(N, length, width)` in the tower's dtype."""
        return self.token_embedding(token_ids).to(self.dtype)

    def encode_embeddings(self, embeddings: Tensor, pool_positions: Tensor) -> Tensor:
        """Run `encode_text` from the token-embedding step on.

        Args:
            embeddings: Token embeddings `(N, length, width)`, `length <= context_length` and
                greater than every pool position (tokens after them cannot matter: causal mask).
            pool_positions: End-of-text position of each prompt `(N,)` (int64, on the device).

        Returns:
            Unnormalised text features `(N, dim)`.
        """
        length = embeddings.shape[1]
        x = embeddings.to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        attn_mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        if self.takes_batch_first:
            x = self.transformer(x, attn_mask=attn_mask)
        else:
            x = self.transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        # ln_final acts on each token alone, so pooling first gives the same feature for less
        # work; gather (not advanced indexing) keeps the backward a scatter-add without syncs.
        index = pool_positions.view(-1, 1, 1).expand(-1, 1, x.shape[-1])
        x = self.ln_final(x.gather(1, index).squeeze(1))
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        if isinstance(self.text_projection, Tensor):
            return x @ self.text_projection
        return x

    def encode_token_ids(self, token_ids: Tensor, *, chunk_size: ChunkSize = "auto") -> Tensor:
        """`encode_text` of token ids `(N, length)`, sorted, cut and chunked; returns `(N, dim)`.

        Reads the end-of-text positions back to the host to plan the chunks: meant for encoding
        once (at construction), not for a training step.
        """
        positions = self.pool_positions(token_ids)
        order = torch.argsort(positions, stable=True)
        sorted_ids, sorted_positions = token_ids[order], positions[order]
        lengths = (sorted_positions + 1).tolist()
        cost = ChunkCost.default(
            self,
            device=self.device,
            dtype=compute_dtype(self, device=self.device),
            checkpointing=False,
        )
        chunks = plan_chunks(lengths, chunk_size=chunk_size, cost=cost)

        def encode(start: int, stop: int, length: int) -> Tensor:
            return self.encode_embeddings(
                self.token_embeddings(sorted_ids[start:stop, :length]),
                sorted_positions[start:stop],
            )

        features = encode_in_chunks(encode, chunks)
        return torch.empty_like(features).index_copy_(0, order, features)
