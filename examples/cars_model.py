"""The frozen open_clip model, its preprocessing, the sub-prompt learner and the objective."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import huggingface_hub
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


def _weight_files(pretrained_cfg: dict[str, Any]) -> tuple[str, list[str]]:
    """The Hugging Face repository of a pretrained tag and the files open_clip tries there."""
    repo_id, _, filename = pretrained_cfg["hf_hub"].partition("/")
    filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
    return repo_id, [*open_clip.pretrained._get_safe_alternatives(filename), filename]


def weights_cached(name: str, pretrained: str) -> bool:
    """Whether open_clip finds the ``pretrained`` weights of ``name`` without the network."""
    pretrained_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not pretrained_cfg.get("hf_hub"):
        return False
    repo_id, filenames = _weight_files(pretrained_cfg)
    return any(
        isinstance(huggingface_hub.try_to_load_from_cache(repo_id, filename), str)
        for filename in filenames
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers within ``timeout`` seconds (``False`` when offline).

    One short request instead of open_clip's download, whose retries take about a minute to give
    up on a machine without network.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    try:
        huggingface_hub.utils.get_session().head(
            huggingface_hub.constants.ENDPOINT, timeout=timeout
        )
    except Exception:  # any failure to connect (DNS, refused, timeout, proxy) means: offline
        return False
    return True


def _offline_error(name: str, pretrained: str, why: str) -> ConfigError:
    return ConfigError(
        f"model.clip_name={name} model.pretrained={pretrained}: {why}; pass a local checkpoint "
        "instead: model.pretrained=/path/to/open_clip_model.safetensors (or the Hugging Face "
        "cache from a connected machine)."
    )


def tiny_clip_bundle(pretrained: str | None, tokenizer_name: str | None) -> ClipBundle:
    """`tiny_clip()` with open_clip's preprocessing, its weights from ``pretrained`` if given.

    ``pretrained`` is a file written by ``torch.save(model.state_dict())``, e.g. the demo's
    contrastively pre-trained tiny CLIP.
    """
    model = tiny_clip()
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.clip_name={TINY_CLIP_NAME} has no published weights: model.pretrained "
                f"must be null or a local state-dict file, but '{pretrained}' is not a file."
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
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
    tokenizer = open_clip.get_tokenizer(tokenizer_name or TINY_TOKENIZER)
    return ClipBundle(model, tokenizer, train_transform, eval_transform)


def load_clip(cfg: DictConfig, device: torch.device) -> ClipBundle:
    """Build the frozen CLIP of ``cfg.model`` with open_clip's own preprocessing.

    ``model.clip_name: tiny-random`` builds `tiny_clip()` (random weights, or a local
    state-dict file as ``model.pretrained``); any other name goes through
    ``open_clip.create_model_and_transforms(name, pretrained=tag_or_local_path)``.

    Raises:
        ConfigError: unknown model name or pretrained tag (with the closest valid one), or
            weights that are neither cached nor downloadable (one line, within seconds).
    """
    name, pretrained = cfg.model.clip_name, cfg.model.pretrained
    if name == TINY_CLIP_NAME:
        bundle = tiny_clip_bundle(pretrained, cfg.model.tokenizer)
        bundle.model.requires_grad_(False).eval().to(device)
        return bundle
    _check_model_name(name, pretrained)
    is_tag = pretrained is not None and not Path(pretrained).expanduser().exists()
    if is_tag and not weights_cached(name, pretrained) and not hub_reachable():
        raise _offline_error(
            name, pretrained, "the weights are not cached and the network is unreachable"
        )
    try:
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            name, pretrained=pretrained
        )
    except (RuntimeError, FileNotFoundError) as error:
        if "download" not in str(error).lower():
            raise
        raise _offline_error(name, pretrained, "downloading the weights failed") from error
    model.requires_grad_(False).eval().to(device)
    tokenizer = open_clip.get_tokenizer(cfg.model.tokenizer or name)
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
            anchor = promptmix.PromptAnchor(
                distance=model.anchor_distance, anchor_features=ensemble
            )
            regularizers["anchor"] = (anchor, model.anchor_loss_weight)
        if model.zero_shot_loss_weight:
            # The config's "batchmean" is promptmix's "mean"; its "mean" is PromptSRC's division
            # by batch * classes, promptmix's average_over_classes=True.
            reduction = model.zero_shot_reduction
            consistency = promptmix.ZeroShotConsistency(
                temperature=model.zero_shot_temperature,
                reduction="sum" if reduction == "sum" else "mean",
                average_over_classes=reduction == "mean",
                zero_shot_text_features=ensemble,
                logit_scale=clip.logit_scale,
            )
            regularizers["zero_shot"] = (consistency, model.zero_shot_loss_weight)
        if model.text_to_text_loss_weight:
            text_to_text = promptmix.TextToTextLoss(
                logit_scale=clip.logit_scale,
                aggregation=model.aggregation,
                noise_std=model.text_to_text_noise_std,
                template_features=templates,
            )
            regularizers["text_to_text"] = (text_to_text, model.text_to_text_loss_weight)
    if model.dispersion_loss_weight:
        dispersion = promptmix.InterClassDispersion(bandwidth=model.dispersion_bandwidth)
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
            mode=model.assignment,
            sinkhorn_iterations=model.sinkhorn_iterations,
            sync_distributed=sync_distributed,
        ),
        entropy=promptmix.AssignmentEntropy(
            mode=model.entropy_mode, sync_distributed=sync_distributed
        ),
        usage_estimate=None
        if model.entropy_mode == "sample"
        else promptmix.UsageEstimate(num_classes=num_classes, n_subprompts=model.n_subprompts),
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
