"""``examples/train_cars.py`` end to end: a tiny random CLIP, Stanford Cars fixtures on disk."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from cars_fixtures import (
    cars_clip,
    cars_config,
    cars_data,
    cars_distributed,
    cars_files,
    old_config,
    run,
    step_records,
    train_cars,
    write_original,
)

import promptmix

pytestmark = pytest.mark.usefixtures("single_thread")


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
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train_cars.main(_args(data_root, config, output)) == train_cars.EXIT_OK
    return output


def _args(data_root: Path, config: Path, output: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--data-root", str(data_root), "--output-dir", str(output),
            *extra]


def _args_no_plots(data_root: Path, config: Path, output: Path, *extra: str) -> list[str]:
    return _args(data_root, config, output, "output.plots=false", *extra)


def _fail_at_call(monkeypatch: pytest.MonkeyPatch, call: int, action: str) -> None:
    """Make the objective's ``call``-th forward raise Ctrl-C or return a NaN loss."""
    original = promptmix.MixtureOfPromptsLoss.forward
    calls = {"count": 0}

    def forward(self: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        calls["count"] += 1
        out = original(self, *args, **kwargs)
        if calls["count"] >= call:
            if action == "interrupt":
                raise KeyboardInterrupt
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(promptmix.MixtureOfPromptsLoss, "forward", forward)


def test_unset_settings_train_with_promptmix_defaults(uninterrupted: Path) -> None:
    saved = cars_files.read_checkpoint(uninterrupted / "checkpoints" / "last.pt", "test")
    model = saved["config"]["model"]
    assert model["mixture_loss_weight"] is None and model["em_tau_end"] is None  # left to promptmix
    assert model["label_noise"] is None and model["share_looks"] is None
    defaults = promptmix.MixtureOfPromptsLoss()
    steps = step_records(uninterrupted)
    assert len(steps) == 4  # 16 images (4 shots x 4 classes), batch 8, 2 epochs
    for r in steps:  # the objective's documented combination of its parts, with its defaults
        expected = (r["ce"] + defaults.mixture_weight * r["mixture"]
                    + defaults.diversity_weight * r["diversity"]
                    - defaults.entropy_weight * r["entropy"] + r["prior"])
        assert math.isclose(r["loss"], expected, rel_tol=1e-5, abs_tol=1e-6)
        assert r["prior"] > 0  # the learner's prior reached the loss
    schedule = promptmix.TemperatureSchedule(total_steps=4)
    taus = [r["tau"] for r in steps]
    assert taus[0] == schedule() and taus == sorted(taus, reverse=True) and taus[-1] > schedule.end


def test_run_reports_the_start_and_writes_everything(uninterrupted: Path) -> None:
    records = cars_files.read_records(uninterrupted / "metrics.jsonl")
    assert records[0]["event"] == "eval" and records[0]["epoch"] == 0
    assert 0 <= records[0]["test_accuracy"] <= 100
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for record in epochs:
        assert 0 <= record["test_accuracy"] <= 100 and 0 <= record["train_accuracy"] <= 100
        assert 0 <= record["mean_cosine"] <= 1
        assert 1 <= record["effective_subprompts"] <= 2 + 1e-6
    assert records[-1]["event"] == "final"
    saved = cars_files.read_checkpoint(uninterrupted / "checkpoints" / "last.pt", "test")
    assert (saved["epoch"], saved["step"]) == (2, 4)
    # What OffsetMixtureOfPrompts learns (shared looks: promptmix's default) and the number of
    # images that weighs its prior; not the frozen CLIP or the text features.
    assert sorted(saved["learner"]) == ["class_offsets", "num_images", "offsets",
                                        "shared_offsets"]
    assert saved["learner"]["num_images"] == 16  # set by initialize_from_kmeans
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
    assert "step 0, the start: test top-1" in log
    assert "image features: 16 training images (1 view(s), encoded once)" in log
    assert "DEBUG epoch 1: mean sub-prompt cosine" in log  # the details, in the file only
    assert not list(uninterrupted.rglob("*.tmp")), "no temporary file may stay behind"


def test_results_go_to_stdout_and_the_log_to_stderr(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, *_args_no_plots(data_root, config, tmp_path / "run"),
                           "train.epochs=1")
    assert status == 0
    (line,) = out.splitlines()
    assert "% test top-1 (" in line and "% at step 0)" in line and str(tmp_path / "run") in line
    assert "epoch 1/1: loss" in err and "epoch 1/1" not in out


def test_interrupt_says_how_to_resume_and_the_resumed_run_is_the_same(
    data_root: Path, config: Path, uninterrupted: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "run"
    with monkeypatch.context() as patch:
        _fail_at_call(patch, call=4, action="interrupt")  # the last step of epoch 2
        status, out, err = run(capsys, *_args_no_plots(data_root, config, output))
    assert status == train_cars.EXIT_INTERRUPTED and out == ""
    (line,) = [line for line in err.splitlines() if line.startswith("train_cars.py:")]
    assert "interrupted at epoch 2, step 4 (the checkpoint holds epoch 1, step 2)" in line
    assert "Traceback" not in err
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["python", "examples/train_cars.py"] or resume[1].endswith("train_cars.py")
    assert resume[2:] == ["--config", str(output / "config.yaml"), "--resume"]
    log_before = (output / "train.log").read_text()
    records_before = [r for r in step_records(output) if r["step"] <= 2]
    status, _, _ = run(capsys, *resume[2:])
    assert status == train_cars.EXIT_OK
    assert (output / "train.log").read_text().startswith(log_before)  # appended, never rewritten
    assert step_records(output)[:2] == records_before
    _assert_same_run(output, uninterrupted)


def _assert_same_run(resumed: Path, reference: Path) -> None:
    assert [r["step"] for r in step_records(resumed)] == [1, 2, 3, 4]  # replayed lines dropped
    assert step_records(resumed) == step_records(reference)  # every loss term, tau, lr: exactly
    final = cars_files.read_checkpoint(resumed / "checkpoints" / "last.pt", "test")
    expected = cars_files.read_checkpoint(reference / "checkpoints" / "last.pt", "test")
    assert final["learner"].keys() == expected["learner"].keys()
    assert all(torch.equal(value, expected["learner"][name])
               for name, value in final["learner"].items())
    for name in ("objective", "optimizer"):
        assert str(final[name]) == str(expected[name])


@pytest.mark.parametrize("views", [0, 2])
def test_resume_is_exact_with_augmentation(
    data_root: Path, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, views: int
) -> None:
    overrides = ("train.augment=true", f"train.augment_views={views}")
    reference = tmp_path / "reference"
    assert train_cars.main(_args_no_plots(data_root, config, reference, *overrides)) == 0
    output = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _fail_at_call(patch, call=4, action="interrupt")
        status = train_cars.main(_args_no_plots(data_root, config, output, *overrides))
    assert status == train_cars.EXIT_INTERRUPTED
    assert train_cars.main(["--config", str(output / "config.yaml"), "--resume"]) == 0
    _assert_same_run(output, reference)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    data_root: Path, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fail_at_call(monkeypatch, call=3, action="nan")  # the first step of epoch 2
    status, _, err = run(capsys, *_args_no_plots(data_root, config, tmp_path))
    assert status == train_cars.EXIT_NONFINITE
    assert "train_cars.py: non-finite loss at epoch 2, step 3" in err
    saved = cars_files.read_checkpoint(tmp_path / "checkpoints" / "last.pt", "test")
    assert saved["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in saved["learner"].values())
    records = cars_files.read_records(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in records if r["event"] != "step"] == ["eval", "epoch", "nonfinite"]
    assert records[-1]["loss"] is None  # NaN written as JSON null


def test_missing_dataset_exits_with_the_expected_files(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(capsys, *_args(tmp_path / "no_cars", config, tmp_path / "out"))
    assert status == train_cars.EXIT_USAGE
    assert err.startswith("train_cars.py: error: Stanford Cars was not found under")
    assert "[MISSING] devkit/cars_meta.mat" in err
    assert "[MISSING] split_zhou_StanfordCars.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("views", "expected"), [(2, "(2 view(s), encoded once)"), (0, "(augmented and encoded every")]
)
def test_augmented_training_cached_or_online(
    data_root: Path, config: Path, tmp_path: Path, views: int, expected: str
) -> None:
    overrides = ["train.epochs=1", "train.augment=true", f"train.augment_views={views}"]
    assert train_cars.main(_args_no_plots(data_root, config, tmp_path, *overrides)) == 0
    assert expected in (tmp_path / "train.log").read_text()
    steps = step_records(tmp_path)
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)


def test_augmented_views_are_reproducible(data_root: Path) -> None:
    cfg = cars_config.load(None, ["model.clip_name=tiny-random", "model.pretrained=null"])
    clip = cars_clip.load_clip(cfg.model, torch.device("cpu"))
    encoder = cars_clip.ImageEncoder(clip, torch.device("cpu"), None)
    samples = cars_data.load_stanford_cars(data_root).train[:6]
    runtime = cars_distributed.Runtime(0, 1, torch.device("cpu"))

    def encode(seed: int | None) -> torch.Tensor:
        return encoder.encode(samples, runtime, batch_size=4, num_workers=0, augment_seed=seed)

    torch.manual_seed(1)
    first = encode(3)
    torch.manual_seed(2)  # the global random state does not matter, the seed does
    assert torch.equal(encode(3), first)
    assert not torch.allclose(encode(4), first)
    assert torch.equal(encode(None), encode(None))


def test_coop_learner_with_tensorboard(data_root: Path, config: Path, tmp_path: Path) -> None:
    """MixtureOfPrompts has no prior: nothing is passed, and the logged prior is 0."""
    overrides = ["train.epochs=1", "model.learner=mixture", "model.n_ctx=4",
                 "output.tensorboard=true"]
    assert train_cars.main(_args_no_plots(data_root, config, tmp_path, *overrides)) == 0
    saved = cars_files.read_checkpoint(tmp_path / "checkpoints" / "last.pt", "test")
    assert list(saved["learner"]) == ["context"]  # only what this learner trains
    assert saved["learner"]["context"].abs().sum() > 0
    assert all(r["prior"] == 0 for r in step_records(tmp_path))
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_the_recipe_is_built_with_the_library_defaults() -> None:
    """Settings left null build the learner and the loss with promptmix's own defaults."""
    cfg = cars_config.load(None, ["model.clip_name=tiny-random", "model.pretrained=null",
                                  "model.n_subprompts=2"])
    clip = cars_clip.load_clip(cfg.model, torch.device("cpu"))
    names = ["Acura TL Sedan 2012", "Volvo 240 Sedan 1993"]
    learner = train_cars.build_learner(cfg, clip, names)
    reference = promptmix.OffsetMixtureOfPrompts(clip.model, clip.tokenizer, names, n_subprompts=2)
    assert type(learner) is promptmix.OffsetMixtureOfPrompts
    for name in ("share_looks", "text_prior_weight", "subprompt_prior_weight", "init_noise_std"):
        assert getattr(learner, name) == getattr(reference, name), name
    loss = train_cars.build_loss(cfg, clip, names, 2, 10, sync=False)
    default = promptmix.MixtureOfPromptsLoss()
    for name in ("mixture_weight", "entropy_weight", "diversity_weight", "label_noise",
                 "aggregation"):
        assert getattr(loss, name) == getattr(default, name), name
    assert loss.assigner.mode == default.assigner.mode and loss.entropy.mode == default.entropy.mode
    schedule = promptmix.TemperatureSchedule(total_steps=10)
    assert loss.schedule is not None
    assert (loss.schedule.start, loss.schedule.end, loss.schedule.kind) == (
        schedule.start, schedule.end, schedule.kind)
