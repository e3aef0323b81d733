"""A small synthetic Stanford Cars in the real devkit layout, for ``--demo`` and the tests.

Every class has its own colour and two visual "modes" (horizontal or vertical stripes), so a
mixture of sub-prompts has something to find even with a random-init CLIP.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

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
