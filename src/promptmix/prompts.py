"""Learnable sub-prompts: K CoOp-style prompts per class through a frozen open_clip text tower.

Two parameterisations with one contract, `forward(class_ids=None) -> (num_classes, K, dim)`
L2-normalised sub-prompt features:

- `MixtureOfPrompts` learns context vectors per class and sub-prompt (CoOp) and runs the
  text tower every step, cut to the tokens that can matter (see `promptmix.text_tower`).
- `OffsetMixtureOfPrompts` encodes each class once at construction and learns an offset in
  feature space; the text tower never runs in the training step.

Symmetry breaking: K sub-prompts that start equal stay equal, because identical sub-prompts are a
stationary point of the diversity loss (its gradient is exactly zero). Both classes therefore start
their sub-prompts apart, by `init_noise_std` and/or by one template per sub-prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from promptmix._validation import check_int, check_positive
from promptmix.text_tower import (
    Chunk,
    ChunkCost,
    ChunkSize,
    TextTower,
    compute_dtype,
    encode_in_chunks,
    plan_chunks,
)

__all__ = ["MixtureOfPrompts", "OffsetMixtureOfPrompts"]

Tokenizer = Callable[[list[str]], Tensor]


def _check_classnames(classnames: object) -> tuple[str, ...]:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a sequence of str but is {type(classnames).__name__}.")
    if len(classnames) == 0:
        raise ValueError("classnames must hold at least one class name but is empty.")
    bad = [name for name in classnames if not isinstance(name, str)]
    if bad:
        raise TypeError(f"classnames must all be str but include {bad[0]!r}.")
    blank = [index for index, name in enumerate(classnames) if not name.strip()]
    if blank:
        raise ValueError(
            f"classnames must not be empty or blank but classnames[{blank[0]}] is "
            f"{classnames[blank[0]]!r}."
        )
    seen: dict[str, int] = {}
    for index, name in enumerate(classnames):
        if name in seen:
            raise ValueError(
                f"classnames must be distinct but classnames[{seen[name]}] and "
                f"classnames[{index}] are both {name!r}: two classes with one prompt cannot be "
                "told apart."
            )
        seen[name] = index
    return tuple(classnames)


def _check_tokenizer(tokenizer: object) -> Tokenizer:
    if not callable(tokenizer):
        raise TypeError(
            "tokenizer must be the model's open_clip tokenizer (a callable list[str] -> token "
            f"ids), e.g. open_clip.get_tokenizer(name), but is {type(tokenizer).__name__}."
        )
    return cast(Tokenizer, tokenizer)


def _resolve_templates(
    templates: Sequence[str] | None, ctx_init: str | None, n_subprompts: int, default: str
) -> tuple[str, ...]:
    """One template (text with a single `{}` for the class name) per sub-prompt."""
    if templates is None:
        if ctx_init is not None and not isinstance(ctx_init, str):
            raise TypeError(f"ctx_init must be a str or None but is {type(ctx_init).__name__}.")
        return (default if ctx_init is None else f"{ctx_init} {{}}.",) * n_subprompts
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise TypeError(f"templates must be a sequence of str but is {type(templates).__name__}.")
    if len(templates) != n_subprompts:
        raise ValueError(
            f"templates must hold one template per sub-prompt ({n_subprompts}) but holds "
            f"{len(templates)}."
        )
    for index, template in enumerate(templates):
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(
                f"templates[{index}] must be a str with exactly one '{{}}' for the class name but "
                f"is {template!r}."
            )
    return tuple(templates)


def _check_chunk_size(chunk_size: object) -> ChunkSize:
    """`"auto"`, `None` or an int `>= 1`."""
    if chunk_size is None or chunk_size == "auto":
        return cast(ChunkSize, chunk_size)
    if isinstance(chunk_size, str):
        raise ValueError(f"chunk_size must be 'auto', None or an int >= 1 but is {chunk_size!r}.")
    return check_int("chunk_size", chunk_size, minimum=1)


def _tokenize(tokenizer: Tokenizer, texts: list[str]) -> Tensor:
    token_ids = tokenizer(texts)
    if not isinstance(token_ids, Tensor) or token_ids.dim() != 2 or token_ids.is_floating_point():
        raise TypeError(
            "tokenizer must map a list of str to an integer tensor (num_texts, context_length), "
            f"as open_clip's tokenizers do, but returned {type(token_ids).__name__}."
        )
    return token_ids.long()


def _tokenize_prompts(
    tokenizer: Tokenizer, classnames: tuple[str, ...], templates: tuple[str, ...]
) -> Tensor:
    """Token ids `(num_classes, K, context_length)` of `templates[k].format(classname)`.

    A prompt that fills the tokenizer's whole context may have been cut (tokenizers truncate
    silently), and two names cut to the same tokens would get identical features: an error.
    """
    texts = [template.format(name) for name in classnames for template in templates]
    token_ids = _tokenize(tokenizer, [*texts, ""])
    padding = token_ids[-1, -1]  # the empty text ends in padding, whatever the padding id is
    full = (token_ids[:-1, -1] != padding).nonzero().flatten().tolist()
    if full:
        first = full[0]
        raise ValueError(
            f"classnames[{first // len(templates)}] is too long: the prompt "
            f"{texts[first][:80]!r}{'...' if len(texts[first]) > 80 else ''} fills all "
            f"{token_ids.shape[-1]} tokens of the tokenizer's context and may have been cut "
            "(two names cut alike would get identical features); shorten it."
        )
    return rearrange(token_ids[:-1], "(c k) l -> c k l", k=len(templates))


def _check_class_ids(class_ids: object, num_classes: int) -> Tensor | None:
    """`None` or a non-empty 1-D int64 tensor of class ids in `[0, num_classes)`, where it was.

    Ids on the CPU (or given as a sequence) are checked on the host, with a message naming the
    range that came; ids already on an accelerator are checked there by an asynchronous assertion,
    so the check never waits for the device.
    """
    if class_ids is None:
        return None
    if not isinstance(class_ids, Tensor):
        if isinstance(class_ids, (str, bytes)) or not isinstance(class_ids, Sequence):
            raise TypeError(
                f"class_ids must be None, an integer tensor or a sequence of int but is "
                f"{type(class_ids).__name__}."
            )
        class_ids = torch.as_tensor(class_ids)
    if class_ids.is_floating_point() or class_ids.is_complex() or class_ids.dtype == torch.bool:
        raise TypeError(f"class_ids must be an integer tensor but has dtype {class_ids.dtype}.")
    if class_ids.dim() != 1 or class_ids.numel() == 0:
        raise ValueError(
            f"class_ids must have shape (n,) with n >= 1 but has shape {tuple(class_ids.shape)}."
        )
    if class_ids.device.type == "cpu":
        low, high = int(class_ids.min()), int(class_ids.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"class_ids must lie in [0, {num_classes - 1}] but ranges over [{low}, {high}]."
            )
    else:
        in_range = ((class_ids >= 0) & (class_ids < num_classes)).all()
        torch._assert_async(in_range, f"class_ids must lie in [0, {num_classes - 1}].")
    return class_ids.long()


class MixtureOfPrompts(nn.Module):
    r"""K learnable CoOp prompts per class, encoded by a frozen open_clip text tower.

    Sub-prompt $k$ of class $c$ has the unit feature

    $$
    f_{ck} = \frac{g([\text{SOS}], v_{ck1}, \dots, v_{ckn}, \text{classname}_c, ., [\text{EOS}])}
                  {\lVert g(\cdot) \rVert}
    $$

    where $g$ is the frozen text tower (`encode_text` from the token embeddings on) and the
    $n$ = `n_ctx` context vectors $v$ are learned, per class and sub-prompt (`class_specific=True`,
    `context` of shape `(num_classes, K, n_ctx, width)`) or shared by all classes
    (`(K, n_ctx, width)`). With `templates`, sub-prompt `k` is `templates[k]` with the
    class name in its `{}`: the words before `{}` (`n_ctx` tokens) initialise its context,
    the words after follow the class name.

    The CLIP model is frozen (`requires_grad_(False)`, `eval()`) and held by reference, not
    as a submodule: `state_dict()` holds only `context`, and `.to()` does not move the model.
    Token ids of the fixed words are non-persistent buffers; their embeddings are looked up in
    the frozen table each step (5 MB of ids instead of 1.3 GB of embeddings for 8,000 prompts).

    Speed and memory, all exact (features equal the 77-token encoding to float rounding): the
    prompts are sorted by end-of-text position once, at construction, and encoded in chunks each
    cut after its own longest end-of-text token. With `chunk_size="auto"` the chunks come from a
    cost model of the device and dtype the tower runs in (`promptmix.text_tower.ChunkCost`): on
    CPU, groups of equal end-of-text position (no padding); on CUDA, one or a few large batches
    (fewer kernel launches). The plan is made on the host from the fixed token ids and cached, so
    `forward()` never reads a value back from the device. `forward(class_ids)` encodes only those
    classes, and `gradient_checkpointing=True` keeps no activations for backward but re-encodes
    one chunk at a time (about one extra forward pass), with chunks capped at 1 GiB of
    activations: peak memory is that of one chunk, not of all `num_classes * K` prompts.

    Args:
        clip_model: open_clip `CLIP` or `CustomTextCLIP` with open_clip's own text tower.
        tokenizer: The model's open_clip tokenizer (`list[str] -> (N, context_length)`).
        classnames: One name per class, used as given.
        n_subprompts: K, the number of sub-prompts per class.
        n_ctx: Number of learned context vectors per prompt.
        ctx_init: Phrase of `n_ctx` tokens that initialises every sub-prompt's context; `None`
            draws the context from a normal with the token-embedding table's RMS as std (CoOp's
            random init). Ignored when `templates` is given.
        class_specific: One context per class (`True`) or one shared by all classes.
        templates: Optional K templates, e.g. `["a photo of a {}.", "a photo of the {}.", ...]`,
            each with `n_ctx` tokens before `{}`.
        init_noise_std: Std of Gaussian noise added to the initial context, in units of the RMS
            entry of the token-embedding table (`0.1` moves each vector about 10% of a typical
            token embedding). `0` with identical templates starts all sub-prompts equal.
        chunk_size: `"auto"` (chunks chosen per device and dtype), an int (that many sorted
            prompts per chunk) or `None` (all prompts at once, cut after the longest end-of-text
            token).
        gradient_checkpointing: Recompute each chunk during backward instead of storing it.
        generator: Random generator for the initial context.

    Raises:
        TypeError: On a tower that takes token ids only (Hugging Face) or wrongly typed arguments
            (a `tokenizer` that is not callable).
        ValueError: On empty, blank or duplicate classnames, a class name whose prompt fills the
            tokenizer's whole context (it may have been cut), `n_subprompts < 1`, or `n_ctx`
            that does not match the token count of `ctx_init` / the templates.

    Examples:
        >>> import open_clip, torch
        >>> from promptmix.prompts import MixtureOfPrompts
        >>> model = open_clip.CLIP(
        ...     embed_dim=32,
        ...     vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        ...     text_cfg=dict(width=64, heads=2, layers=1),
        ... )
        >>> tokenizer = open_clip.get_tokenizer("ViT-B-32")
        >>> classnames = ["cat", "dog", "red panda"]
        >>> prompts = MixtureOfPrompts(model, tokenizer, classnames, n_subprompts=4)
        >>> prompts().shape  # (num_classes, K, dim), unit norm
        torch.Size([3, 4, 32])
        >>> prompts(torch.tensor([2, 0])).shape
        torch.Size([2, 4, 32])
        >>> list(prompts.state_dict()), tuple(prompts.context.shape)
        (['context'], (3, 4, 4, 64))
    """

    token_ids: Tensor
    pool_positions: Tensor
    order: Tensor
    inverse: Tensor

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Tokenizer,
        classnames: Sequence[str],
        *,
        n_subprompts: int = 8,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        class_specific: bool = True,
        templates: Sequence[str] | None = None,
        init_noise_std: float = 0.1,
        chunk_size: ChunkSize = "auto",
        gradient_checkpointing: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.classnames = _check_classnames(classnames)
        tokenizer = _check_tokenizer(tokenizer)
        self.n_subprompts = check_int("n_subprompts", n_subprompts, minimum=1)
        self.n_ctx = check_int("n_ctx", n_ctx, minimum=1)
        self.class_specific = bool(class_specific)
        self.init_noise_std = check_positive("init_noise_std", init_noise_std, allow_zero=True)
        self.chunk_size = _check_chunk_size(chunk_size)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._tower = TextTower(clip_model)

        placeholder = " ".join(["X"] * self.n_ctx) + " {}."
        prompt_templates = _resolve_templates(templates, ctx_init, self.n_subprompts, placeholder)
        prefixes = [template.split("{}")[0].strip() for template in prompt_templates]
        source = "templates" if templates is not None else "ctx_init"
        self.context_start, prefix_ids = self._locate_prefixes(tokenizer, prefixes, source)

        token_ids = _tokenize_prompts(tokenizer, self.classnames, prompt_templates)
        prompt_prefix_ids = token_ids[:, :, self.context_start : self.context_start + self.n_ctx]
        if not torch.equal(prompt_prefix_ids, prefix_ids.expand_as(prompt_prefix_ids)):
            raise ValueError(
                "each template's words before '{}' must tokenize the same alone and in the prompt; "
                "put a space between them and '{}'."
            )
        pool_positions = self._tower.pool_positions(token_ids)
        length = int(pool_positions.max()) + 1  # tokens after every end-of-text never matter
        device = self._tower.device
        self.register_buffer("token_ids", token_ids[..., :length].to(device), persistent=False)
        self.register_buffer("pool_positions", pool_positions.to(device), persistent=False)
        # The encoding order (prompts sorted by end-of-text position) and the chunk plans depend
        # only on these fixed ids: computed here on the host, never in a training step.
        self._host_positions = pool_positions.flatten().cpu()
        order = torch.argsort(self._host_positions, stable=True)
        self._sorted_lengths: list[int] = (self._host_positions[order] + 1).tolist()
        self.register_buffer("order", order.to(device), persistent=False)
        self.register_buffer("inverse", torch.argsort(order).to(device), persistent=False)
        self._plans: dict[tuple[str, torch.dtype, bool], tuple[Chunk, ...]] = {}
        self._plan(device, self._tower.dtype)

        table = self._tower.embedding_table.detach()
        scale = table.float().pow(2).mean().sqrt().item()
        shape = (*prefix_ids.shape, table.shape[-1])  # (K, n_ctx, width)
        if self.class_specific:
            shape = (self.num_classes, *shape)
        if templates is None and ctx_init is None:
            context = torch.randn(shape, generator=generator) * scale
        else:
            context = table[prefix_ids.to(table.device)].float().cpu().expand(shape).clone()
            noise = torch.randn(shape, generator=generator)
            context += noise * (self.init_noise_std * scale)
        self.context = nn.Parameter(context.to(device=device, dtype=table.dtype))
        clip_model.requires_grad_(False).eval()  # last, so a rejected call leaves it untouched

    def _locate_prefixes(
        self, tokenizer: Tokenizer, prefixes: list[str], source: str
    ) -> tuple[int, Tensor]:
        """Index of the first context token and the prefix token ids `(K, n_ctx)`."""
        token_ids = _tokenize(tokenizer, [*prefixes, ""])
        positions = self._tower.pool_positions(token_ids)
        counts = (positions[:-1] - positions[-1]).tolist()
        for index, (prefix, count) in enumerate(zip(prefixes, counts, strict=True)):
            if count == self.n_ctx:
                continue
            where = "ctx_init" if source == "ctx_init" else f"templates[{index}] before '{{}}'"
            raise ValueError(
                f"n_ctx must equal the number of tokens of {where} ({prefix!r} has {count}) "
                f"but is {self.n_ctx}."
            )
        # Tokens before the first one that differs from the empty text's are special ([SOS]).
        differs = token_ids[:-1] != token_ids[-1:]
        start = int(differs.int().argmax(dim=-1).min())
        return start, token_ids[:-1, start : start + self.n_ctx]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    @property
    def output_dim(self) -> int:
        """Dimension of the sub-prompt features."""
        return self._tower.output_dim

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and torch.is_grad_enabled()

    def _cost(self, device: torch.device, dtype: torch.dtype) -> ChunkCost:
        return ChunkCost.default(
            self._tower, device=device, dtype=dtype, checkpointing=self._checkpointing()
        )

    def _plan(self, device: torch.device, dtype: torch.dtype) -> tuple[Chunk, ...]:
        """The chunks of all prompts in sorted order for `device` and `dtype` (cached)."""
        key = (device.type, dtype, self._checkpointing())
        if key not in self._plans:
            cost = self._cost(device, dtype)
            lengths, chunk_size = self._sorted_lengths, self.chunk_size
            self._plans[key] = plan_chunks(lengths, chunk_size=chunk_size, cost=cost)
        return self._plans[key]

    def _subset_plan(
        self, ids: Tensor, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None, tuple[Chunk, ...]]:
        """Encoding order, inverse order and chunks of the prompts of classes `ids`.

        Ids the host can read without waiting for a device (CPU tensors) are sorted and planned
        like the full set; ids on an accelerator are encoded in their given order, cut at the
        longest end-of-text position of all classes, so that nothing is read back from the device.
        """
        k = self.n_subprompts
        rows = (ids[:, None] * k + torch.arange(k, device=ids.device)).flatten()
        if ids.device.type != "cpu":
            lengths = [int(self.token_ids.shape[-1])] * int(rows.shape[0])
            plan = plan_chunks(lengths, chunk_size=self.chunk_size, cost=self._cost(device, dtype))
            return rows.to(device), None, plan
        permutation = torch.argsort(self._host_positions[rows], stable=True)
        order = rows[permutation]
        lengths = (self._host_positions[order] + 1).tolist()
        plan = plan_chunks(lengths, chunk_size=self.chunk_size, cost=self._cost(device, dtype))
        return order.to(device), torch.argsort(permutation).to(device), plan

    def forward(self, class_ids: Tensor | Sequence[int] | None = None) -> Tensor:
        """Encode the sub-prompts of all classes, or of `class_ids` only.

        With `class_ids=None` nothing is read back from the device (no host synchronisation), so
        a training step can run ahead of the GPU.

        Args:
            class_ids: `None` for all classes, or class indices `(n,)`.

        Returns:
            L2-normalised sub-prompt features `(num_classes, K, dim)` or `(n, K, dim)`.
        """
        device = self._tower.device
        if self.context.device != device:
            raise RuntimeError(
                f"the prompts are on {self.context.device} but the CLIP model is on "
                f"{device}; the model is held by reference, move it too."
            )
        dtype = compute_dtype(self._tower, device=device)
        ids = _check_class_ids(class_ids, self.num_classes)
        inverse: Tensor | None
        if ids is None:
            order, inverse, chunks = self.order, self.inverse, self._plan(device, dtype)
        else:
            order, inverse, chunks = self._subset_plan(ids, device, dtype)
        token_ids = rearrange(self.token_ids, "c k l -> (c k) l")
        positions = rearrange(self.pool_positions, "c k -> (c k)")
        k, start, end = self.n_subprompts, self.context_start, self.context_start + self.n_ctx
        if self.class_specific:
            context, context_rows = rearrange(self.context, "c k n w -> (c k) n w"), order
        else:
            context, context_rows = self.context, order.remainder(k)

        def encode(first: int, stop: int, length: int) -> Tensor:
            rows = order[first:stop]
            fixed = self._tower.token_embeddings(token_ids[:, :length].index_select(0, rows))
            learned = context.index_select(0, context_rows[first:stop]).to(fixed.dtype)
            embeddings = torch.cat([fixed[:, :start], learned, fixed[:, end:]], dim=1)
            return self._tower.encode_embeddings(embeddings, positions.index_select(0, rows))

        features = encode_in_chunks(
            encode, chunks, gradient_checkpointing=self.gradient_checkpointing
        )
        if inverse is not None:
            features = features.index_select(0, inverse)
        return rearrange(F.normalize(features, dim=-1), "(c k) d -> c k d", k=k)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, n_subprompts={self.n_subprompts}, "
            f"n_ctx={self.n_ctx}, class_specific={self.class_specific}, "
            f"chunk_size={self.chunk_size}, gradient_checkpointing={self.gradient_checkpointing}"
        )


def _encode_frozen(clip_model: nn.Module, token_ids: Tensor, chunk_size: ChunkSize) -> Tensor:
    """`clip_model.encode_text(token_ids)` `(N, dim)` without a graph, cut where possible."""
    try:
        tower: TextTower | None = TextTower(clip_model)
    except (TypeError, ValueError):  # e.g. a Hugging Face tower: encode_text on full token ids
        tower = None
    was_training = clip_model.training
    clip_model.eval()
    try:
        with torch.no_grad():
            if tower is not None:
                return tower.encode_token_ids(token_ids.to(tower.device), chunk_size=chunk_size)
            encode_text = getattr(clip_model, "encode_text", None)
            if not callable(encode_text):
                raise TypeError(
                    f"clip_model must have an encode_text method but {type(clip_model).__name__} "
                    "has none."
                )
            device = next(clip_model.parameters()).device
            rows = 256 if chunk_size == "auto" else chunk_size or max(len(token_ids), 1)
            chunks = token_ids.split(rows)
            return torch.cat([encode_text(chunk.to(device)) for chunk in chunks])
    finally:
        clip_model.train(was_training)


class OffsetMixtureOfPrompts(nn.Module):
    r"""K sub-prompts per class as learned offsets from the class's frozen text feature.

    With `share_looks=True` (the default), sub-prompt $k$ of class $c$ is

    $$
    f_{ck} = \frac{t_{ck} + a_c + s_k + e_{ck}}{\lVert t_{ck} + a_c + s_k + e_{ck} \rVert}
    $$

    where $t_{ck}$ is the unit text feature of `templates[k].format(classname)`
    (`f"{ctx_init} {classname}."` when no templates are given), $a_c$ = `class_offsets`
    `(num_classes, dim)` is the class's own part (the capacity of one CoOp prompt), $s_k$ =
    `shared_offsets` `(K, dim)` a look shared by every class (a colour, a viewpoint: learned from
    every class's images) and $e_{ck}$ = `offsets` `(num_classes, K, dim)` that look's correction
    for the class. With `share_looks=False` only the offsets $e_{ck}$ exist (each class learns its
    looks alone). `promptmix.initialize_from_kmeans` starts all three from the few-shot images
    (`promptmix.functional.shared_look_start`), and `prior_loss()` is the prior that keeps the
    mixture near its text: add it to the loss (`MixtureOfPromptsLoss(...)(..., prior=...)`).

    The text tower runs once, at construction (no graph, chunked, cut like `MixtureOfPrompts`);
    a training step is an add and a normalise. Any open_clip model with `encode_text` works,
    including Hugging Face text towers, and the model is not kept. The frozen features are a
    non-persistent buffer: `state_dict()` holds the offsets and `num_images`.

    Args:
        clip_model: open_clip model; it is used in eval mode and left as it was.
        tokenizer: The model's open_clip tokenizer.
        classnames: One name per class, used as given.
        n_subprompts: K, the number of sub-prompts per class.
        ctx_init: Phrase before the class name (`None`: the class name alone, then `.`).
            Ignored when `templates` is given.
        templates: Optional K templates with one `{}`, one per sub-prompt; distinct templates
            start the sub-prompts apart even without noise.
        share_looks: learn a class part and K looks shared by all classes beside the per-class
            offsets (`True`), or the per-class offsets alone.
        text_prior_weight: weight $w_t \ge 0$ of the text anchor in `prior_loss`, per image of
            prior (KgCoOp's 8 at one shot per class).
        subprompt_prior_weight: weight $w_e \ge 0$ of the sub-prompt prior in `prior_loss`, per
            image of prior.
        init_noise_std: Expected norm of each initial offset (normal, std
            `init_noise_std / sqrt(dim)` per entry), relative to the unit text feature; it goes
            to the shared looks (`share_looks=True`) or to the per-class offsets.
        chunk_size: Chunks when encoding at construction, as in `MixtureOfPrompts`.
        generator: Random generator for the initial offsets.

    Examples:
        >>> import open_clip, torch
        >>> from promptmix.prompts import OffsetMixtureOfPrompts
        >>> model = open_clip.CLIP(
        ...     embed_dim=32,
        ...     vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        ...     text_cfg=dict(width=64, heads=2, layers=1),
        ... )
        >>> tokenizer = open_clip.get_tokenizer("ViT-B-32")
        >>> prompts = OffsetMixtureOfPrompts(model, tokenizer, ["cat", "dog"], n_subprompts=3)
        >>> prompts().shape, prompts([1]).shape
        (torch.Size([2, 3, 32]), torch.Size([1, 3, 32]))
        >>> sorted(prompts.state_dict())
        ['class_offsets', 'num_images', 'offsets', 'shared_offsets']
        >>> prompts.prior_loss().shape
        torch.Size([])
    """

    text_features: Tensor
    num_images: Tensor
    class_offsets: nn.Parameter | None
    shared_offsets: nn.Parameter | None

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Tokenizer,
        classnames: Sequence[str],
        *,
        n_subprompts: int = 8,
        ctx_init: str | None = "a photo of a",
        templates: Sequence[str] | None = None,
        share_looks: bool = True,
        text_prior_weight: float = 8.0,
        subprompt_prior_weight: float = 4.0,
        init_noise_std: float = 0.1,
        chunk_size: ChunkSize = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.classnames = _check_classnames(classnames)
        tokenizer = _check_tokenizer(tokenizer)
        self.n_subprompts = check_int("n_subprompts", n_subprompts, minimum=1)
        if not isinstance(share_looks, bool):
            raise TypeError(f"share_looks must be a bool but is {type(share_looks).__name__}.")
        self.share_looks = share_looks
        self.text_prior_weight = check_positive(
            "text_prior_weight", text_prior_weight, allow_zero=True
        )
        self.subprompt_prior_weight = check_positive(
            "subprompt_prior_weight", subprompt_prior_weight, allow_zero=True
        )
        self.init_noise_std = check_positive("init_noise_std", init_noise_std, allow_zero=True)
        chunk_size = _check_chunk_size(chunk_size)
        if not isinstance(clip_model, nn.Module):
            raise TypeError(
                f"clip_model must be an open_clip model (torch.nn.Module) but is "
                f"{type(clip_model).__name__}."
            )
        prompt_templates = _resolve_templates(templates, ctx_init, self.n_subprompts, "{}.")
        # Encode each distinct template once; equal templates share their features.
        distinct = tuple(dict.fromkeys(prompt_templates))
        token_ids = rearrange(
            _tokenize_prompts(tokenizer, self.classnames, distinct), "c u l -> (c u) l"
        )
        features = _encode_frozen(clip_model, token_ids, chunk_size)
        features = rearrange(F.normalize(features, dim=-1), "(c u) d -> c u d", u=len(distinct))
        template_index = torch.tensor([distinct.index(t) for t in prompt_templates])
        features = features[:, template_index.to(features.device)].contiguous()
        self.register_buffer("text_features", features, persistent=False)

        num_classes, k, dim = features.shape
        device, dtype = features.device, features.dtype
        noise_shape = (k, dim) if share_looks else (num_classes, k, dim)
        noise = torch.randn(noise_shape, generator=generator, dtype=torch.float32)
        noise = (noise * (self.init_noise_std / math.sqrt(dim))).to(device=device, dtype=dtype)
        zeros = features.new_zeros(num_classes, k, dim)
        self.offsets = nn.Parameter(zeros if share_looks else noise)
        self.class_offsets = nn.Parameter(zeros[:, 0].clone()) if share_looks else None
        self.shared_offsets = nn.Parameter(noise) if share_looks else None
        # The number of training images the priors are weighed against; set by
        # `initialize_from_kmeans`, and one image per class until then.
        self.register_buffer("num_images", features.new_tensor(float(num_classes)))

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    @property
    def output_dim(self) -> int:
        """Dimension of the sub-prompt features."""
        return int(self.text_features.shape[-1])

    def _moved(self, ids: Tensor | None, *, corrections: bool) -> Tensor:
        """`t + a + s (+ e)` of the classes `ids` (all for `None`), unnormalised."""
        text = self.text_features if ids is None else self.text_features[ids]
        moved = text + (self.offsets if ids is None else self.offsets[ids]) if corrections else text
        if self.class_offsets is not None and self.shared_offsets is not None:
            own = self.class_offsets if ids is None else self.class_offsets[ids]
            moved = moved + own[:, None] + self.shared_offsets[None]
        return moved

    def forward(self, class_ids: Tensor | Sequence[int] | None = None) -> Tensor:
        """Sub-prompt features of all classes, or of `class_ids` only.

        Args:
            class_ids: `None` for all classes, or class indices `(n,)`.

        Returns:
            L2-normalised sub-prompt features `(num_classes, K, dim)` or `(n, K, dim)`.
        """
        ids = _check_class_ids(class_ids, self.num_classes)
        if ids is not None:
            ids = ids.to(self.offsets.device)
        return F.normalize(self._moved(ids, corrections=True), dim=-1)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # `num_images` divides the prior: checked before anything is loaded, so a rejected
        # state leaves the learner as it was (PyTorch raises the collected messages).
        saved = state_dict.get(prefix + "num_images")
        if isinstance(saved, Tensor) and not (
            saved.is_floating_point()
            and saved.numel() == 1
            and bool(torch.isfinite(saved).all())
            and float(saved) > 0
        ):
            error_msgs.append(
                f"{prefix}num_images must be a floating-point tensor of one finite value > 0 "
                f"(the number of training images, which divides prior_loss()) but is {saved!r}."
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def prior_loss(self) -> Tensor:
        r"""The prior that keeps the mixture near its text: a scalar to add to the loss.

        $$
        P = \frac{w_t}{N} \sum_c \bigl(1 - \cos(\bar t_c + a_c,\ \bar t_c)\bigr)
          + \frac{w_e}{N} \sum_{c,k} \bigl(1 - \cos(f_{ck},\ t_{ck} + a_c + s_k)\bigr)
        $$

        The first term is KgCoOp's anchor on the class part alone ($\bar t_c$ the class's mean
        text feature; zero without `share_looks`), so it never pulls the shared looks together.
        The second keeps each sub-prompt near its class part plus its shared look (near its text
        without `share_looks`). Both are summed over classes and divided by the number of
        training images $N$ = `num_images`, as a prior of fixed worth is against a mean loss: at
        one shot per class the anchor weighs KgCoOp's 8, at 16 shots half a unit, so the text
        prior rules where images are few and fades where they are many.

        Returns:
            0-dim tensor with gradient to the offsets.
        """
        class_text = F.normalize(self.text_features.mean(dim=1), dim=-1)
        text_term = self.offsets.new_zeros(())
        if self.class_offsets is not None:
            cosine = F.cosine_similarity(class_text + self.class_offsets, class_text, dim=-1)
            text_term = (1 - cosine).sum() / self.num_images
        features = self._moved(None, corrections=True)
        centres = self._moved(None, corrections=False)
        distance = 1 - F.cosine_similarity(features, centres, dim=-1)
        subprompt_term = distance.sum() / self.num_images
        return self.text_prior_weight * text_term + self.subprompt_prior_weight * subprompt_term

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, n_subprompts={self.n_subprompts}, "
            f"share_looks={self.share_looks}"
        )
