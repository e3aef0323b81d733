"""The frozen open_clip model, its preprocessing, the sub-prompt learner and the objective."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import open_clip
import torch
from cars_config import TINY_CLIP_NAME, ConfigError
from omegaconf import DictConfig
from torch import nn

import promptmix

#: The open_clip models whose towers the example uses (both have ``encode_image``).
ClipModel: TypeAlias = open_clip.CLIP | open_clip.CustomTextCLIP

#: The tokenizer of the ``tiny-random`` model (open_clip's bundled BPE vocabulary, no download).
TINY_TOKENIZER = "ViT-B-32"


@dataclass
class ClipBundle:
    """A frozen open_clip model with its tokenizer and image preprocessing."""

    model: ClipModel
    tokenizer: Callable[[list[str]], torch.Tensor]
    train_transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]

    @property
    def logit_scale(self) -> float:
        """CLIP's learned classifier scale ``exp(logit_scale)`` (100 for pretrained models)."""
        return float(self.model.logit_scale.exp())


def tiny_clip() -> open_clip.CLIP:
    """A small random-init CLIP (32-pixel images, 2-layer towers) for demos and tests."""
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


def _check_model_name(name: str, pretrained: str | None) -> None:
    if name.startswith("hf-hub:"):
        return
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, [*models, TINY_CLIP_NAME], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.clip_name '{name}' is not an open_clip model.{hint}")
    if pretrained is None or Path(pretrained).expanduser().exists():
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        close = difflib.get_close_matches(pretrained, tags, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"model.pretrained '{pretrained}' is neither a local file nor a pretrained tag of "
            f"{name} ({tags}).{hint}"
        )


def load_clip(cfg: DictConfig, device: torch.device) -> ClipBundle:
    """Build the frozen CLIP of ``cfg.model`` with open_clip's own preprocessing.

    ``model.clip_name: tiny-random`` builds :func:`tiny_clip`; any other name goes through
    ``open_clip.create_model_and_transforms(name, pretrained=tag_or_local_path)``.

    Raises:
        ConfigError: unknown model name or pretrained tag (with the closest valid one).
        RuntimeError: the weights could not be downloaded (offline), with what to do about it.
    """
    name, pretrained = cfg.model.clip_name, cfg.model.pretrained
    if name == TINY_CLIP_NAME:
        if pretrained is not None:
            raise ConfigError(
                f"model.clip_name={TINY_CLIP_NAME} has no weights: set pretrained=null."
            )
        model = tiny_clip()
        preprocess = open_clip.get_model_preprocess_cfg(model)
        train_transform, eval_transform = (
            open_clip.image_transform(
                preprocess["size"],
                is_train=is_train,
                mean=preprocess.get("mean"),
                std=preprocess.get("std"),
            )
            for is_train in (True, False)
        )
        tokenizer_name = cfg.model.tokenizer or TINY_TOKENIZER
    else:
        _check_model_name(name, pretrained)
        try:
            model, train_transform, eval_transform = open_clip.create_model_and_transforms(
                name, pretrained=pretrained
            )
        except RuntimeError as error:
            if "download" not in str(error).lower():
                raise
            raise RuntimeError(
                f"Could not get the '{pretrained}' weights of {name}: {error}\n"
                "Without internet, download them on a connected machine (open_clip caches them "
                "under ~/.cache/huggingface) and copy the cache, or pass "
                "model.pretrained=/path/to/open_clip_model.safetensors. Set HF_HUB_OFFLINE=1 to "
                "fail fast instead of retrying."
            ) from error
        tokenizer_name = cfg.model.tokenizer or name
    model.requires_grad_(False).eval().to(device)
    tokenizer = open_clip.get_tokenizer(tokenizer_name)
    return ClipBundle(model, tokenizer, train_transform, eval_transform)


def build_learner(cfg: DictConfig, clip: ClipBundle, classnames: list[str]) -> nn.Module:
    """The sub-prompt learner of ``cfg.model.learner``, initialised from ``cfg.train.seed``."""
    generator = torch.Generator().manual_seed(cfg.train.seed)
    model = cfg.model
    if model.learner == "offset":
        return promptmix.OffsetMixtureOfPrompts(
            clip.model,
            clip.tokenizer,
            classnames,
            n_subprompts=model.n_subprompts,
            ctx_init=model.ctx_init,
            init_noise_std=model.init_noise_std,
            generator=generator,
        )
    return promptmix.MixtureOfPrompts(
        clip.model,
        clip.tokenizer,
        classnames,
        n_subprompts=model.n_subprompts,
        n_ctx=model.n_ctx,
        ctx_init=model.ctx_init,
        class_specific=model.class_specific,
        init_noise_std=model.init_noise_std,
        gradient_checkpointing=model.gradient_checkpointing,
        generator=generator,
    )


@torch.no_grad()
def hand_crafted_features(
    clip: ClipBundle, classnames: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Unit text features ``(len(templates), num_classes, dim)`` of the frozen text tower."""
    device = next(clip.model.parameters()).device
    features = []
    for template in templates:
        tokens = clip.tokenizer([template.format(name) for name in classnames]).to(device)
        encoded = torch.cat([clip.model.encode_text(chunk) for chunk in tokens.split(256)])
        features.append(torch.nn.functional.normalize(encoded.float(), dim=-1))
    return torch.stack(features)


def build_regularizers(
    cfg: DictConfig, clip: ClipBundle | None, classnames: Sequence[str] | None
) -> dict[str, tuple[nn.Module, float]]:
    """The field's regularizers whose weight in ``cfg.model`` is positive, with their references.

    The hand-crafted templates are encoded once by the frozen text tower; their mean (over
    templates) is the anchor of ``PromptAnchor`` and the zero-shot classifier of
    ``ZeroShotConsistency``, and each template's features are a target of ``TextToTextLoss``. The
    modules keep them as non-persistent buffers, so the training step passes nothing extra.
    """
    model = cfg.model
    needs_text = (
        model.anchor_loss_weight or model.zero_shot_loss_weight or model.text_to_text_loss_weight
    )
    regularizers: dict[str, tuple[nn.Module, float]] = {}
    if needs_text:
        if clip is None or classnames is None:
            raise ValueError(
                "The anchor, zero-shot and text-to-text terms need clip and classnames."
            )
        templates = hand_crafted_features(clip, classnames, list(model.hand_crafted_templates))
        ensemble = torch.nn.functional.normalize(templates.mean(0), dim=-1)
        if model.anchor_loss_weight:
            anchor = promptmix.PromptAnchor(model.anchor_distance, anchor_features=ensemble)
            regularizers["anchor"] = (anchor, model.anchor_loss_weight)
        if model.zero_shot_loss_weight:
            consistency = promptmix.ZeroShotConsistency(
                model.zero_shot_temperature,
                model.zero_shot_reduction,
                zero_shot_text_features=ensemble,
                logit_scale=clip.logit_scale,
            )
            regularizers["zero_shot"] = (consistency, model.zero_shot_loss_weight)
        if model.text_to_text_loss_weight:
            text_to_text = promptmix.TextToTextLoss(
                clip.logit_scale,
                model.aggregation,
                noise_std=model.text_to_text_noise_std,
                template_features=templates,
            )
            regularizers["text_to_text"] = (text_to_text, model.text_to_text_loss_weight)
    if model.dispersion_loss_weight:
        dispersion = promptmix.InterClassDispersion(model.dispersion_bandwidth)
        regularizers["dispersion"] = (dispersion, model.dispersion_loss_weight)
    return regularizers


def build_objective(
    cfg: DictConfig,
    num_classes: int,
    total_steps: int,
    *,
    sync_distributed: bool,
    clip: ClipBundle | None = None,
    classnames: Sequence[str] | None = None,
) -> promptmix.MixtureOfPromptsLoss:
    """The objective with its temperature schedule annealed over ``total_steps`` iterations.

    ``clip`` and ``classnames`` encode the hand-crafted prompts for the anchor, zero-shot and
    text-to-text regularizers (see :func:`build_regularizers`); only those need them.
    """
    model = cfg.model
    schedule = promptmix.TemperatureSchedule(
        start=model.em_tau_start,
        end=model.em_tau_end,
        total_steps=total_steps,
        kind=model.em_tau_schedule,
    )
    return promptmix.MixtureOfPromptsLoss(
        diversity_weight=model.diversity_loss_weight,
        entropy_weight=model.entropy_loss_weight,
        mixture_weight=model.mixture_loss_weight,
        aggregation=model.aggregation,
        tau=schedule,
        assigner=promptmix.SoftEMAssigner(
            model.assignment,
            sinkhorn_iterations=model.sinkhorn_iterations,
            sync_distributed=sync_distributed,
        ),
        entropy=promptmix.AssignmentEntropy(
            model.entropy_mode,
            num_classes=num_classes,
            n_subprompts=model.n_subprompts,
            sync_distributed=sync_distributed,
        ),
        regularizers=build_regularizers(cfg, clip, classnames),
        sync_distributed=sync_distributed,
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (``None``: full fp32).

    ``"auto"`` is bf16 on CUDA devices that support it, else fp16 on CUDA, and fp32 on CPU.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
