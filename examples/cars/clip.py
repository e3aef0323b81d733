"""The frozen open_clip model: loading it (offline-aware), its text and image features.

The image encoder never changes, so without random augmentation a training image's feature is
the same every epoch: it is encoded once and cached, exactly. With augmentation, either a few
augmented views per image are encoded once and one is drawn per epoch, or (``augment_views: 0``)
every batch is augmented and encoded on the fly.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset
from torchvision.transforms import Compose, RandomHorizontalFlip

from cars import UsageError
from cars.config import TINY_CLIP_NAME
from cars.data import ImageDataset, Sample
from cars.distributed import Runtime, gather_shards, shard_indices
from cars.files import derive_seed, describe

logger = logging.getLogger(__name__)

#: The tokenizer of the ``tiny-random`` model (open_clip's bundled BPE vocabulary, no download).
TINY_TOKENIZER = "ViT-B-32"


@dataclass
class Clip:
    """A frozen open_clip model with its tokenizer and image preprocessing."""

    model: Any  # open_clip.CLIP or CustomTextCLIP
    tokenizer: Callable[[list[str]], torch.Tensor]
    train_transform: Callable[[Any], torch.Tensor]
    eval_transform: Callable[[Any], torch.Tensor]

    @property
    def logit_scale(self) -> float:
        """CLIP's learned classifier scale ``exp(logit_scale)`` (100 for pretrained models)."""
        return float(self.model.logit_scale.exp())


def tiny_clip() -> open_clip.CLIP:
    """A small random-init CLIP (32-pixel images, 2-layer towers) for the demo and the tests."""
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


def _tiny(pretrained: str | None) -> tuple[Any, Any, Any]:
    model = tiny_clip()
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UsageError(
                f"model.pretrained: expected null or a state-dict file for {TINY_CLIP_NAME} "
                f"(it has no published weights), got '{pretrained}'"
            )
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:  # whatever torch or open_clip raise on a foreign file
            raise _not_weights(pretrained, TINY_CLIP_NAME, error) from None
    preprocess = open_clip.get_model_preprocess_cfg(model)
    train, test = (
        open_clip.image_transform(
            preprocess["size"], is_train=is_train, mean=preprocess.get("mean"),
            std=preprocess.get("std"),
        )
        for is_train in (True, False)
    )
    return model, train, test


def _not_weights(path: str, name: str, error: Exception) -> UsageError:
    got = describe(Path(path).expanduser(), error)
    if got.startswith("a file torch cannot read"):
        got = f"a file that does not load into it{got[len('a file torch cannot read'):]}"
    return UsageError(f"model.pretrained {path}: expected weights of {name}, got {got}")


def _check_names(name: str, pretrained: str | None) -> None:
    models = open_clip.list_models()
    if not name.startswith("hf-hub:") and name not in models:
        close = difflib.get_close_matches(name, [*models, TINY_CLIP_NAME], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"model.clip_name: expected an open_clip model, got '{name}'.{hint}")
    if pretrained is None or name.startswith("hf-hub:") or Path(pretrained).expanduser().exists():
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        close = difflib.get_close_matches(pretrained, tags, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UsageError(
            f"model.pretrained: expected a local file or a pretrained tag of {name} "
            f"({', '.join(tags)}), got '{pretrained}'.{hint}"
        )


def weights_cached(name: str, pretrained: str) -> bool:
    """Whether open_clip finds the ``pretrained`` weights of ``name`` without the network."""
    pretrained_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not pretrained_cfg.get("hf_hub"):
        return False
    repo_id, _, filename = pretrained_cfg["hf_hub"].partition("/")
    filename = filename or open_clip.pretrained.HF_WEIGHTS_NAME
    filenames = [*open_clip.pretrained._get_safe_alternatives(filename), filename]
    return any(
        isinstance(huggingface_hub.try_to_load_from_cache(repo_id, file), str) for file in filenames
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers within ``timeout`` seconds.

    One short request instead of open_clip's download, whose retries take about a minute to give
    up on a machine without network.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    try:
        huggingface_hub.utils.get_session().head(
            huggingface_hub.constants.ENDPOINT, timeout=timeout
        )
    except Exception:  # any failure to connect means: offline
        return False
    return True


def _offline(name: str, pretrained: str, why: str) -> UsageError:
    return UsageError(
        f"model.clip_name={name} model.pretrained={pretrained}: {why}; pass a local checkpoint "
        "instead: model.pretrained=/path/to/open_clip_model.safetensors (or the Hugging Face "
        "cache from a connected machine)"
    )


def load_clip(model_cfg: DictConfig, device: torch.device) -> Clip:
    """The frozen CLIP of ``model.clip_name`` and ``model.pretrained``, on ``device``.

    ``tiny-random`` builds :func:`tiny_clip` (random weights, or a local state-dict file); any
    other name goes through ``open_clip.create_model_and_transforms(name, pretrained=...)``.

    Raises:
        UsageError: an unknown name or tag (with the closest valid one), weights that are
            neither cached nor downloadable (within seconds), or a file that holds no weights
            of this model.
    """
    name, pretrained = model_cfg.clip_name, model_cfg.pretrained
    tokenizer_name = model_cfg.tokenizer or (TINY_TOKENIZER if name == TINY_CLIP_NAME else name)
    if name == TINY_CLIP_NAME:
        model, train_transform, eval_transform = _tiny(pretrained)
    else:
        _check_names(name, pretrained)
        is_file = pretrained is not None and Path(pretrained).expanduser().is_file()
        is_tag = pretrained is not None and not is_file and not name.startswith("hf-hub:")
        if is_tag and not weights_cached(name, pretrained) and not hub_reachable():
            raise _offline(name, pretrained, "the weights are not cached and the network is "
                           "unreachable")
        try:
            model, train_transform, eval_transform = open_clip.create_model_and_transforms(
                name, pretrained=pretrained
            )
        except Exception as error:  # whatever torch or open_clip raise on a foreign file
            if is_file:
                raise _not_weights(pretrained, name, error) from None
            if "download" in str(error).lower():
                raise _offline(name, pretrained, "downloading the weights failed") from error
            raise
    model.requires_grad_(False).eval().to(device)
    return Clip(model, open_clip.get_tokenizer(tokenizer_name), train_transform, eval_transform)


@torch.no_grad()
def text_features(clip: Clip, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Unit text features ``(len(templates), num_classes, dim)`` of the frozen text tower."""
    device = next(clip.model.parameters()).device
    features = []
    for template in templates:
        tokens = clip.tokenizer([template.format(name) for name in classnames]).to(device)
        encoded = torch.cat([clip.model.encode_text(chunk) for chunk in tokens.split(256)])
        features.append(F.normalize(encoded.float(), dim=-1))
    return torch.stack(features)


# --- Precision ---------------------------------------------------------------------------------


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (``None``: fp32; ``auto`` is fp32 on CPU)."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- Image features ----------------------------------------------------------------------------


class ImageEncoder:
    """Unit-norm ``(batch, dim)`` float32 features of the frozen image tower."""

    def __init__(self, clip: Clip, device: torch.device, dtype: torch.dtype | None):
        self.clip, self.device, self.dtype = clip, device, dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            features = self.clip.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1)

    def encode(
        self,
        samples: Sequence[Sample],
        runtime: Runtime,
        *,
        batch_size: int,
        num_workers: int,
        augment_seed: int | None = None,
    ) -> torch.Tensor:
        """Features ``(len(samples), dim)`` on every process; each process encodes its share.

        Args:
            augment_seed: ``None`` for the deterministic test transform; else the seed of one
                augmented view, so that a resumed run re-creates the same views.
        """
        if len(samples) < runtime.world_size:
            raise UsageError(
                f"train.shots: {len(samples)} images cannot be shared by {runtime.world_size} "
                "processes"
            )
        transform = self.clip.eval_transform if augment_seed is None else augmenting(self.clip)
        dataset = Subset(ImageDataset(samples, transform), shard_indices(len(samples), runtime))
        with torch.random.fork_rng(devices=[]):
            generator = None
            if augment_seed is not None:
                seed = derive_seed(augment_seed, runtime.rank)
                torch.manual_seed(seed)  # the transforms in this process
                generator = torch.Generator().manual_seed(seed)  # the loader's workers
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                pin_memory=torch.cuda.is_available(),
                generator=generator,
            )
            parts = [self(images) for images, _ in loader]
        return gather_shards(torch.cat(parts), len(samples), runtime)


def augmenting(clip: Clip) -> Compose:
    """open_clip's training transform (random resized crop) plus CoOp's horizontal flip."""
    return Compose([RandomHorizontalFlip(), clip.train_transform])


class TrainBatches:
    """This process's batches of ``(image features, labels)`` for each epoch.

    The order is a function of ``(seed, epoch)`` (a ``DistributedSampler``, also with one
    process), so a run resumed at an epoch boundary sees the same batches. Features are read
    from a cache ``(N, views, dim)`` (one view drawn per image and epoch) or, with
    ``views=None``, augmented and encoded every step.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        batch_size: int,
        runtime: Runtime,
        seed: int,
        *,
        cache: torch.Tensor | None = None,
        online: tuple[list[Sample], ImageEncoder, int] | None = None,
    ):
        if batch_size % runtime.world_size:
            raise UsageError(
                f"train.batch_size: expected a multiple of the {runtime.world_size} processes "
                f"(it is the global batch), got {batch_size}"
            )
        self.labels, self.seed, self.cache, self.online = labels, seed, cache, online
        self.local_batch = batch_size // runtime.world_size
        self.sampler: DistributedSampler = DistributedSampler(
            range(len(labels)),  # type: ignore[arg-type]
            num_replicas=runtime.world_size,
            rank=runtime.rank,
            shuffle=True,
            seed=seed,
        )

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.local_batch)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this process's batches of ``epoch``."""
        self.sampler.set_epoch(epoch)
        batches = list(BatchSampler(self.sampler, self.local_batch, drop_last=False))
        if self.cache is not None:
            count, views = self.cache.shape[:2]
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            view = torch.randint(views, (count,), generator=generator).to(self.cache.device)
            for batch in batches:
                rows = torch.tensor(batch, device=self.cache.device)
                yield self.cache[rows, view[rows]], self.labels[rows]
            return
        assert self.online is not None
        samples, encoder, num_workers = self.online
        # Augmentation draws from the global generators, whose states the checkpoint saves.
        dataset = ImageDataset(samples, augmenting(encoder.clip))
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        for images, labels in loader:
            yield encoder(images), labels.to(encoder.device)


@dataclass
class Features:
    """The frozen image tower's features of a run's images, and its training batches."""

    train: torch.Tensor  # (N, dim), the training images without augmentation
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    batches: TrainBatches


def encode_test(encoder: ImageEncoder, test: list[Sample], cfg: DictConfig, runtime: Runtime,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images' features and labels alone (``--evaluate`` encodes no training image)."""
    features = encoder.encode(test, runtime, batch_size=cfg.encode_batch_size,
                              num_workers=cfg.num_workers)
    return features, torch.tensor([sample.label for sample in test], device=encoder.device)


def encode_images(
    encoder: ImageEncoder, train: list[Sample], test: list[Sample], cfg: DictConfig,
    runtime: Runtime,
) -> Features:
    """Encode the training and test images once; with ``train.augment``, also ``augment_views``
    augmented views per training image (0: augment and encode every step instead)."""
    sizes = dict(batch_size=cfg.encode_batch_size, num_workers=cfg.num_workers)
    train_features = encoder.encode(train, runtime, **sizes)
    test_features = encoder.encode(test, runtime, **sizes)
    train_labels = torch.tensor([sample.label for sample in train], device=encoder.device)
    views = [
        encoder.encode(train, runtime, **sizes, augment_seed=derive_seed(cfg.seed, view))
        for view in range(cfg.augment_views if cfg.augment else 0)
    ]
    online = cfg.augment and not views
    batches = TrainBatches(
        train_labels, cfg.batch_size, runtime, cfg.seed,
        cache=None if online else torch.stack(views or [train_features], dim=1),
        online=(train, encoder, cfg.num_workers),
    )
    logger.info(
        "image features: %d training images (%s), %d test images", len(train),
        "augmented and encoded every step" if online else f"{max(len(views), 1)} view(s), "
        "encoded once", len(test),
    )
    test_labels = torch.tensor([sample.label for sample in test], device=encoder.device)
    return Features(train_features, train_labels, test_features, test_labels, batches)
