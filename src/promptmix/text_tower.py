"""Adapter that runs an open_clip text tower on learned prompt embeddings.

open_clip's ``encode_text`` starts from token ids; a CoOp-style learner needs to start one step
later, from token embeddings in which some positions hold learned context vectors.
:class:`TextTower` finds the tower's parts by attribute (``token_embedding``,
``positional_embedding``, ``transformer``, ``attn_mask``, ``ln_final``, ``text_projection`` and the
pooling rule) on a ``CLIP`` or under ``model.text`` of a ``CustomTextCLIP``, and repeats the rest of
``encode_text`` exactly. Nothing from open_clip is imported: these parts move between releases.

Speed comes from doing fewer tokens. The causal mask makes the end-of-text feature independent of
every later token, so a batch can be cut after its longest end-of-text position without changing
the result; :func:`encode_by_length` goes further and encodes prompts sorted by length, in chunks
each cut after its own longest end-of-text position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["TextTower", "encode_by_length"]

_REQUIRED_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final")
_END_OF_TEXT_POOLING = ("argmax", "eos")


def _find_tower(clip_model: object) -> nn.Module:
    """Return the module that owns the text parts: the model itself or its ``.text`` tower."""
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

    Holds references to the model's parts (it is not an ``nn.Module``, so nothing here is saved or
    moved by a module that keeps it). ``encode_embeddings`` equals ``encode_text`` on the same
    prompts to float rounding, for any length that covers every pooled position.

    Args:
        clip_model: An open_clip ``CLIP`` or ``CustomTextCLIP`` whose text tower is open_clip's
            ``TextTransformer``. The transformer may be batch-first or not, the projection a
            Parameter ``(width, dim)``, an ``nn.Linear`` or ``None``.

    Raises:
        TypeError: If the tower takes token ids only (Hugging Face) or has no ``token_embedding``.
        ValueError: If the tower cannot be cut exactly: no causal ``attn_mask``, a CoCa class
            token (``cls_emb``), or pooling other than at the end-of-text token.
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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the tower computes in (open_clip's ``cast_dtype``)."""
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
        """The token-embedding weight ``(vocab_size, width)``."""
        return cast(Tensor, self.token_embedding.weight)

    def pool_positions(self, token_ids: Tensor) -> Tensor:
        """Position of the token each prompt is pooled at, as ``encode_text`` finds it.

        Args:
            token_ids: Token ids ``(..., length)``.

        Returns:
            Positions ``(...)`` (int64).
        """
        if self.pool_type == "eos":
            return torch.eq(token_ids, cast(int, self.eos_id)).int().argmax(dim=-1)
        return token_ids.argmax(dim=-1)

    def token_embeddings(self, token_ids: Tensor) -> Tensor:
        """Embed token ids ``(N, length)`` into ``(N, length, width)`` in the tower's dtype."""
        return self.token_embedding(token_ids).to(self.dtype)

    def encode_embeddings(self, embeddings: Tensor, pool_positions: Tensor) -> Tensor:
        """Run ``encode_text`` from the token-embedding step on.

        Args:
            embeddings: Token embeddings ``(N, length, width)``, ``length <= context_length`` and
                greater than every pool position (tokens after them cannot matter: causal mask).
            pool_positions: End-of-text position of each prompt ``(N,)``.

        Returns:
            Unnormalised text features ``(N, dim)``.
        """
        length = embeddings.shape[1]
        x = embeddings.to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        attn_mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        if self.takes_batch_first:
            x = self.transformer(x, attn_mask=attn_mask)
        else:
            x = self.transformer(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        # ln_final acts on each token alone, so pooling first gives the same feature for less work.
        x = self.ln_final(x[torch.arange(x.shape[0], device=x.device), pool_positions])
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        if isinstance(self.text_projection, Tensor):
            return x @ self.text_projection
        return x

    def encode_token_ids(self, token_ids: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """``encode_text`` of token ids ``(N, length)``, cut and chunked; returns ``(N, dim)``."""
        positions = self.pool_positions(token_ids)

        def encode(rows: Tensor, length: int) -> Tensor:
            return self.encode_embeddings(
                self.token_embeddings(token_ids[rows, :length]), positions[rows]
            )

        return encode_by_length(encode, positions, chunk_size=chunk_size)


def encode_by_length(
    encode: Callable[[Tensor, int], Tensor],
    pool_positions: Tensor,
    *,
    chunk_size: int | None,
    gradient_checkpointing: bool = False,
) -> Tensor:
    """Encode prompts sorted by length, in chunks each cut after its own longest end-of-text token.

    Exact: with a causal mask the pooled feature never sees the tokens that a cut removes.

    Args:
        encode: ``encode(rows, length) -> (len(rows), dim)`` encodes the prompts ``rows``
            (int64 indices) from their first ``length`` tokens.
        pool_positions: End-of-text position of every prompt ``(N,)``.
        chunk_size: Prompts per chunk; ``None`` encodes all prompts as one batch cut after the
            longest end-of-text position.
        gradient_checkpointing: Keep no activations of a chunk for backward; recompute them chunk
            by chunk during backward instead (one extra forward; peak memory of one chunk).

    Returns:
        Features ``(N, dim)`` in the original prompt order.
    """
    count = pool_positions.shape[0]
    if chunk_size is None:
        order = torch.arange(count, device=pool_positions.device)
        chunk_size = max(count, 1)
    else:
        order = torch.argsort(pool_positions, stable=True)
    chunks = []
    for rows in order.split(chunk_size):
        length = int(pool_positions[rows].max()) + 1
        if gradient_checkpointing and torch.is_grad_enabled():
            chunks.append(checkpoint(encode, rows, length, use_reentrant=False))
        else:
            chunks.append(encode(rows, length))
    features = torch.cat(chunks)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(count, device=order.device)
    return features[inverse]
