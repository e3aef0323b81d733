"""Stanford Cars from local disk, in any of three layouts, and CoOp's few-shot sampling.

Nothing here downloads. The accepted layouts, under ``data.root`` or ``data.root/stanford_cars``:

* ``original``: the devkit release as torchvision's ``StanfordCars`` reads it: ``cars_train/``,
  ``cars_test/``, ``devkit/cars_meta.mat`` (``class_names``), ``devkit/cars_train_annos.mat`` and
  ``cars_test_annos_withlabels.mat`` (struct ``annotations`` with ``fname``, 1-based ``class`` and
  the ``bbox_*`` fields).
* ``coop``: CoOp's ``split_zhou_StanfordCars.json`` = ``{"train": [[relpath, label, classname],
  ...], "val": ..., "test": ...}`` with image paths relative to the folder holding the file.
* ``folders``: ``train/<class name>/*.jpg`` and ``test/<class name>/*.jpg``.

Classes are numbered in devkit order (``cars_meta.mat``) wherever that file is present.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from PIL import Image
from scipy.io.matlab import MatReadError
from torch.utils.data import Dataset

from cars import UsageError

logger = logging.getLogger(__name__)

LAYOUTS = ("original", "coop", "folders")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetNotFoundError(UsageError):
    """The dataset files are missing or incomplete; the message lists what was expected where."""


@dataclass(frozen=True)
class Sample:
    """One labelled image file."""

    path: Path
    label: int


@dataclass
class CarsSplits:
    """The training and test samples of one layout, with the class names in label order."""

    classnames: list[str]
    train: list[Sample]
    test: list[Sample]
    layout: str
    root: Path


def _expected_files(base: Path, layout: str, split_file: str) -> list[Path]:
    if layout == "original":
        devkit = base / "devkit"
        return [
            base / "cars_train",
            base / "cars_test",
            devkit / "cars_meta.mat",
            devkit / "cars_train_annos.mat",
            base / "cars_test_annos_withlabels.mat",
        ]
    if layout == "coop":
        return [base / split_file]
    return [base / "train", base / "test"]


def _missing(base: Path, layout: str, split_file: str) -> list[Path]:
    return [path for path in _expected_files(base, layout, split_file) if not path.exists()]


def _candidate_bases(root: Path) -> list[Path]:
    # torchvision and CoOp both put the files in a ``stanford_cars`` folder under their root.
    nested = root / "stanford_cars"
    return [root, nested] if nested.is_dir() else [root]


def missing_data_message(root: Path, split_file: str) -> str:
    """What each accepted layout expects under ``root`` and which of those files are missing."""
    where = f"{root}" if root.is_dir() else f"{root} (which does not exist)"
    lines = [f"Stanford Cars was not found under {where}; nothing is downloaded.", ""]
    for base in _candidate_bases(root):
        for layout in LAYOUTS:
            lines.append(f"  layout '{layout}' expects, in {base}:")
            missing = set(_missing(base, layout, split_file))
            for path in _expected_files(base, layout, split_file):
                state = "MISSING" if path in missing else "found"
                folder = "/" if not path.suffix else ""  # the expected files all have suffixes
                lines.append(f"    [{state:>7}] {path.relative_to(base)}{folder}")
    lines += [
        "",
        "Get the images and devkit from the Stanford Cars mirror you use (for CoOp's split also",
        "split_zhou_StanfordCars.json), unpack them there and pass --data-root; one complete",
        "layout is enough.",
    ]
    return "\n".join(lines)


def find_layout(root: str | Path, layout: str = "auto", split_file: str = "") -> tuple[str, Path]:
    """The layout and the folder holding it, trying ``root`` and ``root/stanford_cars``.

    Raises:
        DatasetNotFoundError: no complete layout (or not the requested one) was found.
    """
    root = Path(root).expanduser()
    split_file = split_file or "split_zhou_StanfordCars.json"
    layouts = LAYOUTS if layout == "auto" else (layout,)
    for base in _candidate_bases(root):
        for name in layouts:
            if not _missing(base, name, split_file):
                return name, base
    raise DatasetNotFoundError(missing_data_message(root, split_file))


def _loadmat_field(path: Path, key: str) -> np.ndarray:
    contents = scipy.io.loadmat(path, squeeze_me=True)
    if key not in contents:
        raise DatasetNotFoundError(f"{path} has no '{key}' entry; is it the Stanford Cars devkit?")
    return np.atleast_1d(contents[key])


def read_devkit_classnames(meta_path: Path) -> list[str]:
    """Class names in devkit order from ``cars_meta.mat``."""
    return [str(name) for name in _loadmat_field(meta_path, "class_names").tolist()]


def _read_annotations(annotations_path: Path, image_dir: Path) -> list[Sample]:
    return [
        Sample(image_dir / str(record["fname"]), int(record["class"]) - 1)
        for record in _loadmat_field(annotations_path, "annotations")
    ]


def _load_original(base: Path, split_file: str) -> CarsSplits:
    classnames = read_devkit_classnames(base / "devkit" / "cars_meta.mat")
    train = _read_annotations(base / "devkit" / "cars_train_annos.mat", base / "cars_train")
    test = _read_annotations(base / "cars_test_annos_withlabels.mat", base / "cars_test")
    return CarsSplits(classnames, train, test, "original", base)


def _load_coop(base: Path, split_file: str) -> CarsSplits:
    split_path = base / split_file
    with split_path.open() as handle:
        split = json.load(handle)
    names: dict[int, str] = {}
    samples: dict[str, list[Sample]] = {}
    for part in ("train", "test"):
        if part not in split:
            raise DatasetNotFoundError(f"{split_path} has no '{part}' list.")
        samples[part] = []
        for relative_path, label, classname in split[part]:
            names.setdefault(int(label), str(classname))
            samples[part].append(Sample(base / relative_path, int(label)))
    if sorted(names) != list(range(len(names))):
        raise DatasetNotFoundError(f"{split_path}: labels are not 0..C-1 (found {sorted(names)}).")
    classnames = [names[label] for label in range(len(names))]
    return CarsSplits(classnames, samples["train"], samples["test"], "coop", base)


def _folder_classes(base: Path, folders: list[str]) -> list[tuple[str, str]]:
    """``(folder, class name)`` in label order: devkit order when ``cars_meta.mat`` is there."""
    meta_path = base / "devkit" / "cars_meta.mat"
    if not meta_path.exists():
        return [(folder, folder) for folder in sorted(folders)]
    # Folder names cannot hold "/" ("Ram C/V Cargo Van Minivan 2012"): match with it replaced.
    by_folder = {name.replace("/", "-"): name for name in read_devkit_classnames(meta_path)}
    unknown = sorted(set(folders) - set(by_folder))
    if unknown:
        raise DatasetNotFoundError(f"Class folders {unknown} are not in {meta_path}.")
    return [(folder, name) for folder, name in by_folder.items() if folder in folders]


def _load_folders(base: Path, split_file: str) -> CarsSplits:
    folders = [path.name for path in (base / "train").iterdir() if path.is_dir()]
    classes = _folder_classes(base, folders)
    label_of = {folder: label for label, (folder, _) in enumerate(classes)}
    samples: dict[str, list[Sample]] = {}
    for part in ("train", "test"):
        samples[part] = []
        for class_dir in sorted(path for path in (base / part).iterdir() if path.is_dir()):
            if class_dir.name not in label_of:
                raise DatasetNotFoundError(f"{class_dir} is not a class of {base / 'train'}.")
            samples[part] += [
                Sample(path, label_of[class_dir.name])
                for path in sorted(class_dir.iterdir())
                if path.suffix.lower() in IMAGE_SUFFIXES
            ]
    classnames = [name for _, name in classes]
    return CarsSplits(classnames, samples["train"], samples["test"], "folders", base)


_LOADERS: dict[str, Callable[[Path, str], CarsSplits]] = {
    "original": _load_original,
    "coop": _load_coop,
    "folders": _load_folders,
}


def load_stanford_cars(
    root: str | Path, layout: str = "auto", split_file: str = "split_zhou_StanfordCars.json"
) -> CarsSplits:
    """Read the class names and the train/test samples of Stanford Cars from local disk.

    Args:
        root: the dataset folder (or its parent holding ``stanford_cars/``).
        layout: ``"auto"`` or one of ``"original"``, ``"coop"``, ``"folders"``.
        split_file: file name of CoOp's split for the ``"coop"`` layout.

    Raises:
        DatasetNotFoundError: files are missing; the message lists the expected files per layout,
            where they were looked for and which are missing, including missing image files.
    """
    name, base = find_layout(root, layout, split_file)
    try:
        splits = _LOADERS[name](base, split_file)
    except (ValueError, TypeError, KeyError, IndexError, OSError, MatReadError) as error:
        raise DatasetNotFoundError(
            f"{base}: expected the files of Stanford Cars' {name} layout, got files that cannot "
            f"be read ({type(error).__name__}: {error})"
        ) from None
    for part, samples in (("train", splits.train), ("test", splits.test)):
        if not samples:
            raise DatasetNotFoundError(
                f"The '{part}' split of the {name} layout in {base} is empty."
            )
        bad_labels = {s.label for s in samples if not 0 <= s.label < len(splits.classnames)}
        if bad_labels:
            raise DatasetNotFoundError(
                f"{part} labels {sorted(bad_labels)} are outside 0..{len(splits.classnames) - 1}."
            )
        missing = [s.path for s in samples if not s.path.is_file()]
        if missing:
            shown = "\n  ".join(str(path) for path in missing[:5])
            raise DatasetNotFoundError(
                f"{len(missing)} of {len(samples)} {part} images listed by the {name} layout in "
                f"{base} are missing, e.g.:\n  {shown}"
            )
    logger.info(
        "Stanford Cars (%s layout, %s): %d classes, %d train and %d test images",
        name,
        base,
        len(splits.classnames),
        len(splits.train),
        len(splits.test),
    )
    return splits


def few_shot(samples: Sequence[Sample], shots: int | None, seed: int) -> list[Sample]:
    """``shots`` images per class drawn without replacement, as CoOp does, reproducibly.

    The draw depends only on ``samples`` (in any order), ``shots`` and ``seed``, not on the global
    random state. Classes with fewer images keep all of them. ``shots=None`` keeps everything.

    Examples:
        >>> pool = [Sample(Path(f"{i}.jpg"), i % 2) for i in range(10)]
        >>> picked = few_shot(pool, 2, seed=1)
        >>> [s.label for s in picked], picked == few_shot(pool[::-1], 2, seed=1)
        ([0, 0, 1, 1], True)
    """
    if shots is None:
        return sorted(samples, key=lambda s: (s.label, str(s.path)))
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in sorted(samples, key=lambda s: str(s.path)):
        by_class[sample.label].append(sample)
    generator = np.random.default_rng(seed)
    picked: list[Sample] = []
    for label in sorted(by_class):
        pool = by_class[label]
        if len(pool) < shots:
            logger.warning("class %d has %d images, fewer than %d shots", label, len(pool), shots)
        chosen = generator.choice(len(pool), size=min(shots, len(pool)), replace=False)
        picked += [pool[index] for index in sorted(chosen)]
    return picked


def subsample_classes(
    classnames: Sequence[str], samples: Sequence[Sample], which: str
) -> tuple[list[str], list[Sample]]:
    """CoCoOp's base-to-new split: the ``"base"`` or ``"new"`` half of the classes, or ``"all"``.

    Base is the first ``ceil(n / 2)`` labels in class order, new the rest; the kept classes are
    relabelled from 0 in the same order, so new classes form their own classification problem.

    Examples:
        >>> pool = [Sample(Path(f"{i}.jpg"), i % 3) for i in range(6)]
        >>> names, kept = subsample_classes(["a", "b", "c"], pool, "new")
        >>> names, [(s.path.name, s.label) for s in kept]
        (['c'], [('2.jpg', 0), ('5.jpg', 0)])
    """
    if which == "all":
        return list(classnames), list(samples)
    middle = math.ceil(len(classnames) / 2)
    kept = range(middle) if which == "base" else range(middle, len(classnames))
    relabel = {old: new for new, old in enumerate(kept)}
    return (
        [classnames[label] for label in kept],
        [Sample(s.path, relabel[s.label]) for s in samples if s.label in relabel],
    )


@dataclass
class FewShot:
    """A run's data: its classes, its few-shot training images and the test images."""

    classnames: list[str]
    train: list[Sample]
    test: list[Sample]
    root: Path

    def train_files(self) -> list[str]:
        """The training images relative to the dataset folder (which may move between runs)."""
        return [str(sample.path.relative_to(self.root)) for sample in self.train]


def load_few_shot(data: Any, *, shots: int | None, seed: int) -> FewShot:
    """Stanford Cars as the ``data`` settings say (``root``, ``layout``, ``split_file``), with
    ``shots`` training images per class and the ``data.subsample_classes`` half of the classes.

    The shots are drawn over all classes before the base/new filter (CoCoOp's order), so a
    seed picks the same images in every setting.
    """
    which = data.subsample_classes
    splits = load_stanford_cars(data.root, data.layout, data.split_file)
    drawn = few_shot(splits.train, shots, seed)
    classnames, train = subsample_classes(splits.classnames, drawn, which)
    _, test = subsample_classes(splits.classnames, splits.test, which)
    logger.info(
        "%s shots per class, seed %d, %s classes (%d): %d training and %d test images",
        shots or "all", seed, which, len(classnames), len(train), len(test),
    )
    return FewShot(classnames, train, test, splits.root)


def load_image(path: Path) -> Image.Image:
    """An RGB PIL image (Stanford Cars has a few greyscale and CMYK files)."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageDataset(Dataset):
    """``(transformed image, label)`` pairs for a list of samples."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_image(sample.path)), sample.label
