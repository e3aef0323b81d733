"""``examples/train_cars.py`` end to end: a tiny random CLIP, Stanford Cars fixtures on disk."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cars_fixtures import (
    cars_checkpoint,
    cars_data,
    cars_distributed,
    cars_features,
    cars_metrics,
    cars_model,
    old_config,
    one_torch_thread,
    step_records,
    train_cars,
    write_original,
)

import promptmix

LOSS_TERMS = ("loss", "ce", "mixture", "diversity", "entropy")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cars")
    write_original(root)
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return old_config(tmp_path_factory.mktemp("config") / "old.yaml")


@pytest.fixture(scope="module")
def uninterrupted(data_root: Path, config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete 2-epoch run; returns its output folder."""
    output = tmp_path_factory.mktemp("uninterrupted")
    status = train_cars.main(_args(data_root, config, output))
    assert status == train_cars.EXIT_OK
    return output


def _args(data_root: Path, config: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(config),
        "--data-root",
        str(data_root),
        "--output-dir",
        str(output),
        *extra,
    ]


def _args_no_plots(data_root: Path, config: Path, output: Path, *extra: str) -> list[str]:
    return _args(data_root, config, output, "output.plots=false", *extra)


def _fail_at_call(monkeypatch: pytest.MonkeyPatch, call: int, action: str) -> None:
    """Make the objective's ``call``-th forward raise (a crash) or return a NaN loss."""
    original = promptmix.MixtureOfPromptsLoss.forward
    calls = {"count": 0}

    def forward(self: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        calls["count"] += 1
        out = original(self, *args, **kwargs)
        if calls["count"] >= call:
            if action == "crash":
                raise KeyboardInterrupt("simulated kill")
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(promptmix.MixtureOfPromptsLoss, "forward", forward)


def test_old_config_trains_with_regulariser_defaults(uninterrupted: Path) -> None:
    saved = cars_checkpoint.load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    model = saved["config"]["model"]
    weights = ("mixture_loss_weight", "diversity_loss_weight", "entropy_loss_weight")
    assert tuple(model[w] for w in weights) == (10.0, 0.0, 1.0)
    assert (model["em_tau_start"], model["em_tau_end"]) == (1.0, 0.3)
    steps = step_records(uninterrupted)
    assert len(steps) == 4  # 16 images (4 shots x 4 classes), batch 8, 2 epochs
    assert all(r["entropy"] > 0 for r in steps)
    for r in steps:  # the documented combination, with the defaults: diversity is off (weight 0)
        expected = r["ce"] + 10 * r["mixture"] - r["entropy"]
        assert math.isclose(r["loss"], expected, rel_tol=1e-5)
    taus = [r["tau"] for r in steps]
    assert taus[0] == 1.0 and taus == sorted(taus, reverse=True) and taus[-1] > 0.3


def test_run_reports_zero_shot_first_and_writes_everything(uninterrupted: Path) -> None:
    records = cars_metrics.read_records(uninterrupted / "metrics.jsonl")
    assert records[0]["event"] == "eval" and records[0]["epoch"] == 0
    assert 0 <= records[0]["test_accuracy"] <= 100
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for record in epochs:
        assert 0 <= record["test_accuracy"] <= 100
        assert -1 <= record["mean_cosine"] <= 1
        assert 1 <= record["effective_subprompts"] <= 2 + 1e-6
        assert math.isclose(sum(record["usage_sorted"]), 1.0, rel_tol=1e-5)
    saved = cars_checkpoint.load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (2, 4)
    assert list(saved["learner"]) == ["context"]  # the frozen CLIP is not in the checkpoint
    plots = sorted(path.name for path in (uninterrupted / "plots").glob("*.png"))
    assert plots == [
        "responsibilities.png",
        "similarity.png",
        "subprompts_class000.png",
        "subprompts_class001.png",
        "training_curves.png",
    ]
    assert all((uninterrupted / "plots" / name).stat().st_size > 5000 for name in plots)
    log = (uninterrupted / "train.log").read_text()
    assert "initial prompts (zero-shot): test top-1" in log
    assert "feature cache: encoded 16 training images x 1 view(s)" in log
    assert "cache speed-up" in log
    assert not list(uninterrupted.rglob("*.tmp")), "no temporary checkpoint file may stay behind"


def _crash_then_resume(
    data_root: Path,
    config: Path,
    output: Path,
    monkeypatch: pytest.MonkeyPatch,
    *overrides: str,
) -> None:
    """Kill a 2-epoch run at its last step, then resume it from the epoch-1 checkpoint."""
    with monkeypatch.context() as patch:
        _fail_at_call(patch, call=4, action="crash")  # the last step of epoch 2
        with pytest.raises(KeyboardInterrupt):
            train_cars.main(_args_no_plots(data_root, config, output, *overrides))
    crashed = cars_checkpoint.load_checkpoint(output / "checkpoints" / "last.pt")
    assert crashed["epoch"] == 1
    assert len(step_records(output)) == 3  # epoch 2's first step was logged before the crash
    status = train_cars.main(_args_no_plots(data_root, config, output, "--resume", *overrides))
    assert status == train_cars.EXIT_OK


def _assert_same_run(resumed: Path, reference: Path) -> None:
    assert [r["step"] for r in step_records(resumed)] == [1, 2, 3, 4]  # crashed lines dropped
    assert step_records(resumed) == step_records(reference)  # every loss term, tau, lr: exactly
    final = cars_checkpoint.load_checkpoint(resumed / "checkpoints" / "last.pt")
    expected = cars_checkpoint.load_checkpoint(reference / "checkpoints" / "last.pt")
    assert torch.equal(final["learner"]["context"], expected["learner"]["context"])
    for name in ("objective", "optimizer"):
        assert str(final[name]) == str(expected[name])


def test_resume_after_a_crash_repeats_the_uninterrupted_run(
    data_root: Path,
    config: Path,
    uninterrupted: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _crash_then_resume(data_root, config, tmp_path, monkeypatch)
    _assert_same_run(tmp_path, uninterrupted)


@pytest.mark.parametrize("views", [0, 2])
def test_resume_is_exact_with_augmentation(
    data_root: Path, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, views: int
) -> None:
    overrides = ("train.augment=true", f"train.augment_views={views}")
    reference = tmp_path / "reference"
    assert train_cars.main(_args_no_plots(data_root, config, reference, *overrides)) == 0
    _crash_then_resume(data_root, config, tmp_path / "resumed", monkeypatch, *overrides)
    _assert_same_run(tmp_path / "resumed", reference)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    data_root: Path,
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fail_at_call(monkeypatch, call=3, action="nan")  # the first step of epoch 2
    assert train_cars.main(_args_no_plots(data_root, config, tmp_path)) == train_cars.EXIT_NONFINITE
    assert "Non-finite loss at epoch 2, step 3" in capsys.readouterr().err
    saved = cars_checkpoint.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1
    assert torch.isfinite(saved["learner"]["context"]).all()
    records = cars_metrics.read_records(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in records if r["event"] != "step"] == ["eval", "epoch", "nonfinite"]
    assert records[-1]["loss"] is None  # NaN written as JSON null
    assert "Non-finite loss" in (tmp_path / "train.log").read_text()


def test_bad_config_key_is_named_with_a_suggestion(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("n_subprompts:", "n_subprompt:"))
    assert train_cars.main(_args(data_root, bad, tmp_path / "out")) == train_cars.EXIT_USAGE
    error = capsys.readouterr().err
    assert "Unknown config key 'model.n_subprompt'" in error and str(bad) in error
    assert "Did you mean 'model.n_subprompts'?" in error
    status = train_cars.main(_args(data_root, config, tmp_path / "out", "train.epoch=3"))
    assert status == train_cars.EXIT_USAGE
    assert (
        "'train.epoch' in the command line. Did you mean 'train.epochs'?" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def test_missing_dataset_exits_with_the_expected_files(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = train_cars.main(_args(tmp_path / "no_cars", config, tmp_path / "out"))
    assert status == train_cars.EXIT_USAGE
    error = capsys.readouterr().err
    assert "[MISSING] devkit/cars_meta.mat" in error
    assert "[MISSING] split_zhou_StanfordCars.json" in error
    assert "nothing is downloaded" in error


@pytest.mark.parametrize(("views", "expected"), [(2, "x 2 view(s)"), (0, "every step (no cache)")])
def test_augmented_training_cached_or_online(
    data_root: Path, config: Path, tmp_path: Path, views: int, expected: str
) -> None:
    overrides = ["train.epochs=1", "train.augment=true", f"train.augment_views={views}"]
    assert train_cars.main(_args_no_plots(data_root, config, tmp_path, *overrides)) == 0
    assert expected in (tmp_path / "train.log").read_text()
    steps = step_records(tmp_path)
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)


def test_augmented_views_are_reproducible(data_root: Path) -> None:
    clip = cars_model.tiny_clip().eval()
    encoder = cars_features.ImageEncoder(clip, torch.device("cpu"), None)
    samples = cars_data.load_stanford_cars(data_root).train[:6]
    augment = cars_model.open_clip.image_transform(32, is_train=True)
    runtime = cars_distributed.Runtime(0, 1, torch.device("cpu"))

    def encode(seed: int | None, transform: Any = augment) -> torch.Tensor:
        return cars_features.encode_samples(
            encoder, samples, transform, runtime, batch_size=4, num_workers=0, seed=seed
        )

    torch.manual_seed(1)
    first = encode(seed=3)
    torch.manual_seed(2)  # the global random state does not matter, the seed does
    assert torch.equal(encode(seed=3), first)
    assert not torch.allclose(encode(seed=4), first)
    plain = cars_model.open_clip.image_transform(32, is_train=False)
    assert torch.equal(encode(None, plain), encode(None, plain))


def test_offset_learner_with_tensorboard(data_root: Path, config: Path, tmp_path: Path) -> None:
    overrides = ["train.epochs=1", "model.learner=offset", "output.tensorboard=true"]
    assert train_cars.main(_args_no_plots(data_root, config, tmp_path, *overrides)) == 0
    saved = cars_checkpoint.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert list(saved["learner"]) == ["offsets"]  # only what this learner trains
    assert saved["learner"]["offsets"].abs().sum() > 0
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
