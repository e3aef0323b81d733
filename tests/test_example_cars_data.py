"""Stanford Cars loading of ``examples/``: the three layouts, few-shot sampling, missing files."""

from __future__ import annotations

import doctest
import random
from pathlib import Path

import numpy as np
import pytest
from cars_fixtures import (
    CLASSNAMES,
    cars_config,
    cars_data,
    cars_files,
    write_coop,
    write_folders,
    write_original,
)

DatasetNotFoundError = cars_data.DatasetNotFoundError
few_shot = cars_data.few_shot
load_stanford_cars = cars_data.load_stanford_cars


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The devkit layout under ``<tmp>/stanford_cars``; returns ``<tmp>``."""
    root = tmp_path_factory.mktemp("cars")
    write_original(root)
    return root


def _by_file(splits: cars_data.CarsSplits, part: str) -> list[tuple[str, str]]:
    """(image file name, class name with "/" as "-") pairs, whatever the folder structure."""
    samples = getattr(splits, part)
    return sorted((s.path.name[-9:], splits.classnames[s.label].replace("/", "-")) for s in samples)


def test_original_layout_reads_like_torchvision(original: Path) -> None:
    torchvision_datasets = pytest.importorskip("torchvision.datasets")
    splits = load_stanford_cars(original)  # finds the stanford_cars/ folder torchvision uses
    assert splits.layout == "original"
    assert splits.classnames == list(CLASSNAMES)
    for part in ("train", "test"):
        reference = torchvision_datasets.StanfordCars(str(original), split=part)
        assert reference.classes == splits.classnames
        ours = [(str(s.path), s.label) for s in getattr(splits, part)]
        assert ours == [(path, label) for path, label in reference._samples]


@pytest.mark.parametrize("layout", ["coop", "folders", "folders_devkit"])
def test_every_layout_gives_the_same_dataset(original: Path, tmp_path: Path, layout: str) -> None:
    reference = load_stanford_cars(original)
    if layout == "coop":
        write_coop(original / "stanford_cars", tmp_path)
    else:
        write_folders(original / "stanford_cars", tmp_path, with_devkit=layout == "folders_devkit")
    splits = load_stanford_cars(tmp_path)
    assert splits.layout == layout.split("_")[0]
    assert _by_file(splits, "test") == _by_file(reference, "test")
    if layout == "coop":  # CoOp holds part of the training images out as "val"
        assert set(_by_file(splits, "train")) < set(_by_file(reference, "train"))
    else:
        assert _by_file(splits, "train") == _by_file(reference, "train")
    if layout == "folders":  # without the devkit: folder names, sorted
        assert splits.classnames == sorted(name.replace("/", "-") for name in CLASSNAMES)
    else:  # devkit order, with the real names
        assert splits.classnames == list(CLASSNAMES)


def test_missing_files_are_named_with_every_layout(original: Path, tmp_path: Path) -> None:
    base = tmp_path / "partial"
    base.mkdir()
    (base / "cars_train").mkdir()
    (base / "devkit").mkdir()
    (base / "devkit" / "cars_meta.mat").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as error:
        load_stanford_cars(base)
    message = str(error.value)
    assert str(base) in message
    for layout in ("'original'", "'coop'", "'folders'"):
        assert f"layout {layout}" in message
    assert "[  found] cars_train/" in message
    assert "[  found] devkit/cars_meta.mat" in message
    assert "[MISSING] cars_test_annos_withlabels.mat" in message
    assert "[MISSING] split_zhou_StanfordCars.json" in message
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_stanford_cars(tmp_path / "nowhere")


def test_missing_image_files_are_listed(original: Path, tmp_path: Path) -> None:
    write_coop(original / "stanford_cars", tmp_path)
    victim = next((tmp_path / "test").iterdir())
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match="1 of 8 test images") as error:
        load_stanford_cars(tmp_path)
    assert str(victim) in str(error.value)


def test_few_shot_is_reproducible_and_balanced(original: Path) -> None:
    train = load_stanford_cars(original).train
    random.seed(123)
    np.random.seed(123)
    first = few_shot(train, 2, seed=1)
    random.seed(7)
    np.random.seed(7)
    again = few_shot(list(reversed(train)), 2, seed=1)  # global RNG and input order don't matter
    assert first == again
    assert [s.label for s in first] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(set(first)) == len(first)
    draws = {tuple(str(s.path) for s in few_shot(train, 2, seed=seed)) for seed in range(6)}
    assert len(draws) > 1, "the seed must change the sample"
    assert few_shot(train, 100, seed=1) == few_shot(train, None, seed=1)  # all images, sorted
    assert len(few_shot(train, None, seed=1)) == len(train)


def test_module_examples_run() -> None:
    from cars import schedule

    for module in (cars_files, cars_config, cars_data, schedule):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_unreadable_dataset_files_are_named(original: Path, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    (root / "split_zhou_StanfordCars.json").write_text("{not json")
    with pytest.raises(DatasetNotFoundError) as error:
        load_stanford_cars(root, layout="coop")
    (message,) = error.value.messages
    assert message.startswith(f"{root}: expected the files of Stanford Cars' coop layout")
