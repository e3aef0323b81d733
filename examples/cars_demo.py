"""The demo's world: a synthetic Stanford Cars in the devkit layout and a tiny CLIP that sees it.

Every class has its own colour and two looks (bright with horizontal stripes, dark with vertical
ones), so a class needs two sub-prompts. A random-init CLIP cannot tell the looks apart, so the
demo first pre-trains the tiny CLIP for a few seconds, contrastively, on synthetic images with
captions that name their class and look (:func:`pretrain_tiny_clip`), as CLIP's own pre-training
taught it what real cars look like. The demo then trains the mixture twice, uncured and with
promptmix's defaults (:data:`DEMO_RUNS`).
"""

from __future__ import annotations

import colorsys
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import scipy.io
import torch
import torch.nn.functional as F
from cars_model import TINY_TOKENIZER, tiny_clip
from PIL import Image

import promptmix

logger = logging.getLogger(__name__)

#: How each look is named in the pre-training captions (index = the look of ``synthetic_image``).
LOOKS = ("bright, with horizontal stripes", "dark, with vertical stripes")

_MAKES = ("Aurora", "Bexley", "Corvan", "Dunmore", "Elstar", "Fenwick", "Galt", "Harlow")
_BODIES = ("Sedan", "Coupe", "SUV", "Convertible", "Hatchback", "Wagon", "Minivan", "Cab")

#: ``annotations`` struct fields of the devkit's ``cars_*_annos.mat`` files.
ANNOTATION_DTYPE = [
    ("bbox_x1", "O"),
    ("bbox_y1", "O"),
    ("bbox_x2", "O"),
    ("bbox_y2", "O"),
    ("class", "O"),
    ("fname", "O"),
]


def synthetic_classnames(num_classes: int) -> list[str]:
    """Car-like class names ``"<make> <model> <body> <year>"``, one per class, all different."""
    return [
        f"{_MAKES[index % len(_MAKES)]} M{index} {_BODIES[(index // 2) % len(_BODIES)]} "
        f"{2000 + index % 13}"
        for index in range(num_classes)
    ]


def synthetic_image(
    label: int, mode: int, num_classes: int, rng: np.random.Generator
) -> Image.Image:
    """A ``48x40`` image: the class's hue; mode 0 bright with horizontal stripes, mode 1 dark
    with vertical ones (two "looks" of one class for the sub-prompts to split); shifted, noisy."""
    height, width = 40, 48
    brightness = 0.95 if mode == 0 else 0.45
    red, green, blue = colorsys.hsv_to_rgb(label / num_classes, 0.8, brightness)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:] = (red * 255, green * 255, blue * 255)
    shift = int(rng.integers(0, 8))
    coordinate = np.arange(height if mode == 0 else width) + shift
    stripes = ((coordinate // 4) % 2 == 0).astype(np.float32) * 70.0
    pixels += -stripes[:, None, None] if mode == 0 else stripes[None, :, None]
    pixels += rng.normal(0.0, 10.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_split(
    folder: Path, annotations_path: Path, counts: list[int], num_classes: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = np.zeros(sum(counts), dtype=ANNOTATION_DTYPE)
    index = 0
    for label, count in enumerate(counts):
        for image_index in range(count):
            fname = f"{index + 1:05d}.jpg"
            image = synthetic_image(label, image_index % 2, num_classes, rng)
            image.save(folder / fname, quality=90)
            records[index] = (
                np.uint16(1),
                np.uint16(1),
                np.uint16(image.width),
                np.uint16(image.height),
                np.uint8(label + 1),  # the devkit's classes are 1-based
                fname,
            )
            index += 1
    scipy.io.savemat(annotations_path, {"annotations": records})


def write_synthetic_cars(
    root: str | Path,
    *,
    num_classes: int = 8,
    train_per_class: int = 8,
    test_per_class: int = 4,
    seed: int = 0,
    classnames: Sequence[str] | None = None,
) -> list[str]:
    """Write a synthetic dataset in the devkit layout torchvision's ``StanfordCars`` reads.

    Writes ``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat``,
    ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` under ``root``.

    Args:
        classnames: the class names (default: :func:`synthetic_classnames`); sets ``num_classes``.

    Returns:
        The class names, in label order.
    """
    root = Path(root)
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    classnames = list(classnames) if classnames is not None else synthetic_classnames(num_classes)
    num_classes = len(classnames)
    names = np.empty((num_classes,), dtype=object)
    names[:] = classnames
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    _write_split(
        root / "cars_train",
        root / "devkit" / "cars_train_annos.mat",
        [train_per_class] * num_classes,
        num_classes,
        seed,
    )
    _write_split(
        root / "cars_test",
        root / "cars_test_annos_withlabels.mat",
        [test_per_class] * num_classes,
        num_classes,
        seed + 1,
    )
    return classnames


def pretrain_tiny_clip(
    path: str | Path,
    classnames: Sequence[str],
    *,
    steps: int = 30,
    images_per_look: int = 16,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Path:
    """Pre-train :func:`tiny_clip` contrastively on captioned synthetic images; save its weights.

    Each image of class ``c`` and look ``m`` is captioned ``"a photo of a <name c>, <LOOKS[m]>."``
    and the image tower learns to pick its caption among all of them (CLIP's image-to-text
    contrastive loss, with both towers trained), so the image features of the two looks of a
    class end up apart. The images are drawn afresh (seed ``seed + 1000``), not the dataset's.

    Returns:
        ``path``, a state-dict file for ``model.clip_name=tiny-random model.pretrained=PATH``.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed + 1000)
    model = tiny_clip().to(device)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    transform = open_clip.image_transform(
        preprocess["size"], is_train=False, mean=preprocess.get("mean"), std=preprocess.get("std")
    )
    num_classes = len(classnames)
    images, captions = [], []
    for label in range(num_classes):
        for look in range(len(LOOKS)):
            for _ in range(images_per_look):
                images.append(transform(synthetic_image(label, look, num_classes, generator)))
                captions.append(label * len(LOOKS) + look)
    pixels, targets = torch.stack(images).to(device), torch.tensor(captions, device=device)
    texts = [f"a photo of a {name}, {look}." for name in classnames for look in LOOKS]
    tokens = open_clip.get_tokenizer(TINY_TOKENIZER)(texts).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sampler = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(pixels), (batch_size,), generator=sampler).to(device)
        image_features = F.normalize(model.encode_image(pixels[batch]), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        loss = F.cross_entropy(logits, targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(pixels), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        picked = (image_features @ text_features.T).argmax(dim=-1)
    accuracy = 100.0 * (picked == targets).float().mean().item()
    logger.info(
        "pre-trained the tiny CLIP contrastively: %d steps on %d captioned synthetic images in "
        "%.1fs; it now picks the right caption (class and look) for %.0f%% of them",
        steps,
        len(pixels),
        time.perf_counter() - start,
        accuracy,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.cpu().state_dict(), path)
    return path


def library_defaults() -> dict[str, Any]:
    """promptmix's own defaults, as the example's config keys (read from the library).

    The loss's weights, E-step, entropy mode and aggregation come from a default-built
    ``MixtureOfPromptsLoss``; the temperature schedule's ends and shape from the defaults of
    ``TemperatureSchedule``. The demo's ``defaults`` run uses these, so it follows the library.
    """
    loss = promptmix.MixtureOfPromptsLoss()
    schedule = inspect.signature(promptmix.TemperatureSchedule).parameters
    return {
        "model.mixture_loss_weight": loss.mixture_weight,
        "model.diversity_loss_weight": loss.diversity_weight,
        "model.entropy_loss_weight": loss.entropy_weight,
        "model.entropy_mode": loss.entropy.mode,
        "model.assignment": loss.assigner.mode,
        "model.aggregation": loss.aggregation,
        "model.em_tau_start": schedule["start"].default,
        "model.em_tau_end": schedule["end"].default,
        "model.em_tau_schedule": schedule["kind"].default,
    }


#: The uncured mixture: the design note's "before" (tau annealed 1 -> 0.05, no regularisers).
UNCURED = {
    "model.mixture_loss_weight": 1.0,
    "model.diversity_loss_weight": 0.0,
    "model.entropy_loss_weight": 0.0,
    "model.assignment": "soft",
    "model.em_tau_start": 1.0,
    "model.em_tau_end": 0.05,
    "model.em_tau_schedule": "linear",
}


def demo_runs() -> dict[str, dict[str, Any]]:
    """The demo's two runs, by name, as config overrides: ``uncured`` and ``defaults``."""
    return {"uncured": dict(UNCURED), "defaults": library_defaults()}


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """The demo's Markdown table: one row per run with accuracy, dominant share, effective K."""
    lines = ["| run | accuracy | dominant share | effective K |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {name} | {r['accuracy']:.1f}% | {r['dominant_share']:.2f} | "
        f"{r['effective_subprompts']:.2f} |"
        for name, r in results.items()
    ]
    return "\n".join(lines) + "\n"
