"""The evaluation protocols, the demo and the errors of ``examples/train_cars.py`` a user meets."""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cars_fixtures import (
    cars_config,
    cars_data,
    cars_demo,
    cars_grid,
    cars_metrics,
    cars_model,
    cars_plots,
    old_config,
    one_torch_thread,
    train_cars,
    write_original,
)

import promptmix


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cars")
    write_original(root, train_per_class=4, test_per_class=2)
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = old_config(tmp_path_factory.mktemp("config") / "old.yaml")
    path.write_text(path.read_text().replace("epochs: 2", "epochs: 1"))
    return path


def _sample(label: int, index: int) -> cars_data.Sample:
    return cars_data.Sample(Path(f"{label}_{index}.jpg"), label)


@pytest.mark.parametrize(
    ("num_classes", "which", "kept"),
    [(4, "base", [0, 1]), (4, "new", [2, 3]), (5, "base", [0, 1, 2]), (5, "new", [3, 4])],
)
def test_base_and_new_halves_are_relabelled_from_zero(
    num_classes: int, which: str, kept: list[int]
) -> None:
    names = [f"class {c}" for c in range(num_classes)]
    samples = [_sample(c, i) for i in range(2) for c in range(num_classes)]
    classnames, chosen = cars_data.subsample_classes(names, samples, which)
    assert classnames == [names[c] for c in kept]
    assert sorted({s.label for s in chosen}) == list(range(len(kept)))
    assert sorted(s.path.name for s in chosen) == sorted(
        s.path.name for s in samples if s.label in kept
    )
    assert cars_data.subsample_classes(names, samples, "all") == (names, samples)


def test_bad_subsample_value_is_a_config_error(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(config), "--data-root", str(data_root), "--output-dir", str(tmp_path)]
    assert train_cars.main([*argv, "data.subsample_classes=novel"]) == train_cars.EXIT_USAGE
    assert "data.subsample_classes must be one of ['all', 'base', 'new']" in capsys.readouterr().err


def test_base_to_new_grid_trains_on_base_and_tests_new_as_its_own_problem(
    data_root: Path, config: Path, tmp_path: Path
) -> None:
    argv = ["base-to-new", "--config", str(config), "--data-root", str(data_root)]
    argv += ["--output-dir", str(tmp_path), "--shots", "2", "--seeds", "1,2"]
    assert cars_grid.main([*argv, "output.plots=false"]) == train_cars.EXIT_OK
    base, new = [], []
    for seed in (1, 2):
        folder = tmp_path / "base_to_new" / f"shots2_seed{seed}"
        trained = cars_metrics.read_records(folder / "base" / "metrics.jsonl")
        assert {r["event"] for r in trained} >= {"step", "epoch"}
        evaluated = cars_metrics.read_records(folder / "new" / "metrics.jsonl")
        assert [r["event"] for r in evaluated] == ["eval"]  # no training on the new classes
        base.append(cars_grid.final_accuracy(folder / "base"))
        new.append(evaluated[0]["test_accuracy"])
        log = (folder / "new" / "train.log").read_text()
        assert "new classes (2)" in log  # 4 fixture classes: the new half is its own 2-way task
    table = (tmp_path / "base_to_new.md").read_text()
    b, n = statistics.mean(base), statistics.mean(new)
    expected_h = 2 * b * n / (b + n) if b + n else 0.0
    row = next(line for line in table.splitlines() if line.startswith("| promptmix"))
    assert row.split("|")[-2].strip() == f"{expected_h:.2f}"  # H of the seed means
    assert cars_grid.mean_std(base) in row
    assert "(published: Zhou et al., CVPR 2022, Table 1)" in table


def test_class_specific_prompts_cannot_be_evaluated_on_new_classes(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(config), "--data-root", str(data_root), "output.plots=false"]
    base = tmp_path / "base"
    assert train_cars.main([*argv, "--output-dir", str(base), "data.subsample_classes=base"]) == 0
    checkpoint = str(base / "checkpoints" / "last.pt")
    status = train_cars.main(
        [
            *argv,
            "--output-dir",
            str(tmp_path / "new"),
            "--evaluate",
            checkpoint,
            "data.subsample_classes=new",
        ]
    )
    assert status == train_cars.EXIT_USAGE
    assert "model.class_specific=false" in capsys.readouterr().err


def _fake_run(folder: Path, accuracy: float, epochs: int = 2, last_epoch: int = 2) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"train:\n  epochs: {epochs}\n")
    lines = [
        {"event": "epoch", "epoch": e, "step": e, "test_accuracy": accuracy - 1 + e / 2}
        for e in range(1, last_epoch + 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(f"{json_line(r)}\n" for r in lines))


def json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record)


def test_few_shot_table_is_mean_and_std_over_seeds(tmp_path: Path) -> None:
    for shots, seed, accuracy in [(1, 1, 50.0), (1, 2, 54.0), (2, 1, 60.0), (2, 2, 60.0)]:
        _fake_run(tmp_path / "few_shot" / f"shots{shots}_seed{seed}", accuracy)
    _fake_run(tmp_path / "few_shot" / "shots4_seed1", 70.0, last_epoch=1)  # unfinished
    argv = ["few-shot", "--output-dir", str(tmp_path), "--aggregate-only"]
    assert cars_grid.main([*argv, "--shots", "1,2,4", "--seeds", "1,2"]) == 0
    table = (tmp_path / "few_shot.md").read_text().splitlines()
    assert table[0] == "| method | 1 shots | 2 shots | 4 shots |"
    assert (
        table[2]
        == "| promptmix (this run, seeds 1, 2) | 52.00 ± 2.83 | 60.00 ± 0.00 | – (2 missing) |"
    )
    assert all("(published: " in line for line in table[3:])


def test_harmonic_mean() -> None:
    assert math.isclose(cars_grid.harmonic_mean(80.0, 60.0), 2 * 80 * 60 / 140)
    assert cars_grid.harmonic_mean(0.0, 0.0) == 0.0


def test_offline_pretrained_model_fails_fast_in_one_line(
    data_root: Path,
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cars_model, "weights_cached", lambda name, tag: False)
    monkeypatch.setattr(cars_model, "hub_reachable", lambda timeout=3.0: False)
    argv = ["--config", str(config), "--data-root", str(data_root), "--output-dir", str(tmp_path)]
    status = train_cars.main([*argv, "model.clip_name=ViT-B-32", "model.pretrained=openai"])
    assert status == train_cars.EXIT_USAGE
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert "model.clip_name=ViT-B-32 model.pretrained=openai" in error
    assert "model.pretrained=/path/to/open_clip_model.safetensors" in error


def test_resume_without_a_checkpoint_fails_before_encoding(
    data_root: Path,
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the run was built (images loaded and encoded)")

    monkeypatch.setattr(train_cars, "Run", no_run)
    argv = ["--config", str(config), "--data-root", str(data_root), "--output-dir", str(tmp_path)]
    assert train_cars.main([*argv, "--resume"]) == train_cars.EXIT_USAGE
    error = capsys.readouterr().err
    assert "--resume: there is no checkpoint" in error and "last.pt" in error


def test_rising_temperature_schedule_warns() -> None:
    with pytest.warns(UserWarning, match=r"model.em_tau_start \(0.05\) is below model.em_tau_end"):
        cars_config.load_config(None, ["model.em_tau_start=0.05", "model.em_tau_end=1.0"])


def test_config_defaults_are_the_library_defaults() -> None:
    """The example's config follows promptmix's defaults (a change there must reach here)."""
    cfg = cars_config.load_config(None)
    for key, value in cars_demo.library_defaults().items():
        assert cars_config.OmegaConf.select(cfg, key) == value, key


def test_demo_classes_of_one_colour_differ_only_by_whole_looks() -> None:
    """Classes 2j and 2j+1 share colour j; no single trait but a whole look tells them apart."""
    for colour in range(4):
        even, odd = (
            {cars_demo.appearance(2 * colour + parity, look) for look in (0, 1)}
            for parity in (0, 1)
        )
        assert {look[0] for look in even | odd} == {colour}
        assert not even & odd  # no look shared
        for trait in (1, 2):  # brightness, stripes: each value in both classes
            assert {look[trait] for look in even} == {look[trait] for look in odd} == {0, 1}
    looks = {cars_demo.appearance(label, look) for label in range(8) for look in (0, 1)}
    assert len({cars_demo.caption(*look, 4) for look in looks}) == len(looks) == 16


def test_demo_compares_uncured_and_defaults_and_writes_the_docs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = functools.partial(cars_demo.pretrain_tiny_clip, steps=3, images_per_look=2)
    monkeypatch.setattr(train_cars, "pretrain_tiny_clip", short)
    docs = tmp_path / "docs"
    argv = ["--demo", "--output-dir", str(tmp_path / "out"), "--write-docs", str(docs)]
    assert train_cars.main([*argv, "train.epochs=1"]) == train_cars.EXIT_OK
    table = (docs / "demo_results.md").read_text().splitlines()
    assert table[0] == "| run | accuracy | dominant share | effective K |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["uncured", "defaults"]
    assert table == (tmp_path / "out" / "results.md").read_text().splitlines()
    defaults = cars_config.load_config(tmp_path / "out" / "defaults" / "config.yaml")
    loss = promptmix.MixtureOfPromptsLoss()
    assert defaults.model.entropy_loss_weight == loss.entropy_weight  # read from the library
    uncured = cars_config.load_config(tmp_path / "out" / "uncured" / "config.yaml")
    assert (uncured.model.em_tau_end, uncured.model.entropy_loss_weight) == (0.05, 0.0)
    assert (uncured.model.init, defaults.model.init) == ("text", "kmeans")
    log = (docs / "demo.log").read_text()
    assert "pre-trained the tiny CLIP contrastively" in log and "/tmp/promptmix_cars_demo_…" in log
    assert "INFO root" not in log  # library chatter filtered out
    for name in ("galleries.png", "uncured_training_curves.png", "defaults_similarity.png"):
        assert (docs / name).stat().st_size > 5000


def test_gallery_rows_say_how_many_images_they_show(tmp_path: Path, data_root: Path) -> None:
    samples = cars_data.load_stanford_cars(data_root).train[:4]  # class 0: 4 images
    gamma = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]])
    figure = cars_plots.plt.figure()
    cars_plots._draw_gallery(figure, samples, gamma, 0, top_n=2, title="t")
    labels = [axis.get_ylabel() for axis in figure.axes if axis.get_ylabel()]
    assert labels == ["sub-prompt 0\n2 of 3 shown", "sub-prompt 1\n1 of 1 shown"]
    cars_plots.plt.close(figure)
