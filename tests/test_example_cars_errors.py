"""Bad values and files give one line each and write nothing; nothing a run wrote is ever lost.

Each probe runs ``train_cars.main`` as a user would and checks the contract: exit status 2,
every line of stderr is ``train_cars.py: error: ...`` naming the key or the path, no traceback,
and not one file written or changed.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
from cars_fixtures import (
    cars_files,
    run,
    train_cars,
)

# data_root and config: the small dataset and one-epoch config of tests/conftest.py.
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(data_root: Path, config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run; returns its folder."""
    output = tmp_path_factory.mktemp("trained") / "run"
    argv = ["--config", str(config), "--data-root", str(data_root), "--output-dir", str(output)]
    assert train_cars.main([*argv, "output.plots=false"]) == train_cars.EXIT_OK
    return output


def _hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (recursively) with its content's hash."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _refused(capsys: pytest.CaptureFixture[str], *argv: object, lines: int = 1) -> list[str]:
    """Run ``argv``; check that it is refused in ``lines`` clean lines; return them."""
    status, out, err = run(capsys, *argv)
    assert status == train_cars.EXIT_USAGE, err
    assert out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("train_cars.py")]
    assert len(errors) == lines, err
    assert all(line.startswith("train_cars.py: error: ") for line in errors), err
    logged = [line for line in err.splitlines() if line not in errors]
    assert all(re.match(r"\d\d:\d\d:\d\d INFO ", line) for line in logged), err  # progress only
    return errors


# The probes of bad values: (overrides, what the one line names, what it expects).
BAD_VALUES = [
    (["train.grad_clip_norm=-1"], "train.grad_clip_norm", "expected a finite number > 0, or null"),
    (["train.min_lr=-1"], "train.min_lr", "expected a finite number >= 0, or null (no decay), "
     "got -1.0"),
    (["train.warmup_start_lr=-0.01"], "train.warmup_start_lr", "got -0.01"),
    (["model.mixture_loss_weight=inf"], "model.mixture_loss_weight", "got inf"),
    (["model.sinkhorn_iterations=0"], "model.sinkhorn_iterations", "expected an integer >= 1"),
    (["train.seed=-1"], "train.seed", "expected an integer >= 0, got -1"),
    (["model.learner=mixture", "model.n_ctx=3"], "model.n_ctx",
     "expected the 4 tokens of model.ctx_init 'a photo of a'"),
    (["model.label_noise=1.5"], "model.label_noise", "expected a number in [0, 1), got 1.5"),
    (["model.prior_count=-1"], "model.prior_count", "expected a finite number >= 0, got -1.0"),
    (["model.learner=mixture", "model.share_looks=true"], "model.share_looks",
     "expected null with model.learner=mixture"),
    (["output.collapse_share_threshold=5"], "output.collapse_share_threshold", "[0, 1], got 5"),
    (["model.prompt_averaging_mean=nan"], "model.prompt_averaging_mean", "got nan"),
    (["train.lr=0"], "train.lr", "expected a finite number > 0, got 0.0"),
    (["train.epochs=two"], "train.epochs", "expected an integer, got 'two'"),
    (["train.epoch=3"], "unknown key 'train.epoch'", "Did you mean 'train.epochs'?"),
    (["model.assignment=sofft"], "model.assignment", "Did you mean 'soft'?"),
    (["output.plot_classes=[0,99]"], "output.plot_classes", "(0 to 3), got [0, 99]"),
]


@pytest.mark.parametrize(("overrides", "key", "expected"), BAD_VALUES)
def test_a_bad_value_is_one_line_and_writes_nothing(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    overrides: list[str], key: str, expected: str,
) -> None:
    output = tmp_path / "run"
    (line,) = _refused(capsys, "--config", config, "--data-root", data_root, "--output-dir",
                       output, *overrides)
    assert key in line and expected in line
    assert not output.exists()


def test_two_bad_keys_are_reported_together(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("lr: 0.01", "lr: -1").replace("shots: 4", "shot: 4"))
    errors = _refused(capsys, "--config", bad, "--data-root", data_root, "--output-dir",
                      tmp_path / "run", "train.seed=-1", lines=3)
    assert [line.split("error: ")[1].split(" ")[0] for line in errors] == [
        "unknown", "train.seed:", "train.lr:"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00", "expected a YAML file, got unreadable text"),
        (b"- model: {}\n- train: {}\n", "expected a mapping of sections"),
        (None, "expected a YAML file, got nothing (no such file)"),
    ],
)
def test_a_config_that_is_no_yaml_mapping_is_named(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    content: bytes | None, expected: str,
) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_bytes(content)
    (line,) = _refused(capsys, "--config", path, "--data-root", data_root, "--output-dir",
                       tmp_path / "run")
    assert f"--config {path}: {expected}" in line


def test_the_demo_refuses_a_setting_it_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = tmp_path / "demo"
    (line,) = _refused(capsys, "--demo", "--output-dir", demo, "model.pretrained=openai")
    assert "model.pretrained: expected no override with --demo" in line
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--evaluate", "x.pt", "--resume"], "--evaluate: expected no --resume"),
        (["--write-docs", "docs"], "--write-docs: expected --demo with it"),
        (["--demo", "--data-root", "cars"], "--demo: expected no --data-root"),
    ],
)
def test_flags_that_do_not_go_together(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    (line,) = _refused(capsys, *flags)
    assert expected in line


def test_a_foreign_file_as_pretrained_weights(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "weights.safetensors"
    foreign.write_text("these are not weights")
    (line,) = _refused(capsys, "--config", config, "--data-root", data_root, "--output-dir",
                       tmp_path / "run", f"model.pretrained={foreign}")
    expected = f"model.pretrained {foreign}: expected weights of tiny-random, got a text file"
    assert line.endswith(expected)
    assert not (tmp_path / "run").exists()


def test_an_output_folder_that_is_a_file_or_read_only(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = ["--config", config, "--data-root", data_root, "--output-dir"]
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    (line,) = _refused(capsys, *argv, a_file)
    assert line.endswith(f"--output-dir {a_file}: expected a folder, got a file")
    (line,) = _refused(capsys, *argv, a_file / "run")
    assert f"got a file at {a_file}" in line
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: play the part of a read-only folder
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    (line,) = _refused(capsys, *argv, locked / "run")
    assert f"--output-dir {locked / 'run'}: expected a folder we may write, got read-only" in line
    assert a_file.read_text() == "mine" and list(locked.iterdir()) == []


@pytest.mark.parametrize("what", ["truncated", "text"])
def test_evaluating_a_file_that_is_no_checkpoint(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    path = tmp_path / "last.pt"
    checkpoint = (trained / "checkpoints" / "last.pt").read_bytes()
    path.write_bytes(checkpoint[: len(checkpoint) // 2] if what == "truncated" else b"epoch: 3\n")
    (line,) = _refused(capsys, "--evaluate", path)
    got = "a truncated checkpoint" if what == "truncated" else "a text file"
    assert line.endswith(f"--evaluate {path}: expected a train_cars.py checkpoint, got {got}") or (
        f"got {got} (" in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


# --- Nothing lost --------------------------------------------------------------------------------


def test_evaluate_writes_a_folder_of_its_own_and_never_touches_the_run(
    trained: Path, config: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _hashes(trained)
    checkpoint = trained / "checkpoints" / "last.pt"
    # With the run's own config and output folder: the command that once emptied metrics.jsonl.
    argv = ["--config", config, "--data-root", data_root, "--evaluate", checkpoint]
    for attempt in (1, 2):
        status, out, _ = run(capsys, *argv)
        assert status == train_cars.EXIT_OK
        folder = trained / "eval" / ("all" if attempt == 1 else "all-2")  # never overwritten
        assert out.endswith(f"written to {folder}\n")
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "eval.json", "eval.log"]
    assert {k: v for k, v in _hashes(trained).items() if not k.startswith("eval")} == before
    # A refused evaluation (per-class prompts on other classes) writes nothing at all.
    after = _hashes(trained)
    _refused(capsys, *argv, "data.subsample_classes=new")
    assert _hashes(trained) == after
    # Into a folder of results: refused, nothing changed.
    (line,) = _refused(capsys, *argv, "--output-dir", trained)
    assert "expected a folder without results, got one holding config.yaml" in line
    assert _hashes(trained) == after


def test_evaluate_with_other_model_settings_names_them(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _hashes(trained)
    (line,) = _refused(capsys, "--evaluate", trained / "checkpoints" / "last.pt",
                       "model.n_subprompts=3", "model.share_looks=false")
    assert "expected the model settings it was trained with, got other ones (" in line
    assert "model.n_subprompts: 2 -> 3; model.share_looks: None -> False)" in line
    assert _hashes(trained) == before


def test_evaluate_does_no_training_time_work(
    trained: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import promptmix

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("training-time work during --evaluate")

    monkeypatch.setattr(promptmix, "initialize_from_kmeans", forbidden)
    monkeypatch.setattr(train_cars, "encode_images", forbidden)  # the training images' encoding
    status, out, _ = run(capsys, "--evaluate", trained / "checkpoints" / "last.pt", "--output-dir",
                         trained.parent / "evaluated")
    assert status == train_cars.EXIT_OK and "% test top-1 on all classes (4)" in out
    # The prompts score what the run scored at its end (the random-init CLIP drawn as trained).
    final = [r for r in cars_files.read_records(trained / "metrics.jsonl") if r["event"] == "final"]
    assert out.startswith(f"{final[0]['test_accuracy']:.2f}% test top-1")


def test_a_new_run_never_replaces_an_old_one(
    trained: Path, config: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _hashes(trained)
    (line,) = _refused(capsys, "--config", config, "--data-root", data_root, "--output-dir",
                       trained)
    assert "expected a folder without a run, got one holding config.yaml, metrics.jsonl" in line
    assert "--resume" in line and _hashes(trained) == before


def test_resume_with_other_settings_names_the_keys_that_differ(
    trained: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _hashes(trained)
    (line,) = _refused(capsys, "--config", trained / "config.yaml", "--resume", "train.epochs=3",
                       "train.lr=0.5", "model.n_subprompts=3")
    assert "expected the settings it was trained with, got other ones (" in line
    assert "(model.n_subprompts: 2 -> 3; train.epochs: 1 -> 3; train.lr: 0.01 -> 0.5)" in line
    assert _hashes(trained) == before


def test_resume_from_a_truncated_checkpoint(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    for name, _ in _hashes(trained).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((trained / name).read_bytes())
    checkpoint = copy / "checkpoints" / "last.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = _hashes(copy)
    (line,) = _refused(capsys, "--config", copy / "config.yaml", "--output-dir", copy, "--resume")
    assert f"--resume {checkpoint}: expected a train_cars.py checkpoint, got a truncated" in line
    assert _hashes(copy) == before


def test_a_checkpoint_from_before_shared_looks_is_evaluated_as_it_trained_and_not_resumed(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Format 2: OffsetMixtureOfPrompts without shared looks; its null settings meant the loss's
    old defaults, so --resume refuses it in one line and --evaluate reads it with a warning."""
    import torch

    run_folder = tmp_path / "run"
    argv = ["--config", config, "--data-root", data_root, "output.plots=false"]
    assert run(capsys, *argv, "--output-dir", run_folder, "model.share_looks=false")[0] == 0
    evaluated = run(capsys, "--evaluate", run_folder / "checkpoints" / "last.pt")[1]
    checkpoint = run_folder / "checkpoints" / "last.pt"
    old = torch.load(checkpoint, weights_only=True)
    old["format"] = 2
    del old["learner"]["num_images"]  # the learner of then held its offsets alone
    for key in ("share_looks", "text_prior_weight", "subprompt_prior_weight", "prior_count",
                "label_noise"):
        del old["config"]["model"][key]
    torch.save(old, checkpoint)
    before = _hashes(run_folder)
    status, out, err = run(capsys, "--evaluate", checkpoint, "--output-dir", tmp_path / "old")
    assert status == train_cars.EXIT_OK and out.split("%")[0] == evaluated.split("%")[0]
    assert "evaluated as OffsetMixtureOfPrompts(share_looks=False), the learner it trained" in err
    (line,) = _refused(capsys, "--config", run_folder / "config.yaml", "--resume",
                       "train.epochs=2")
    assert f"--resume {checkpoint}: expected a checkpoint of format 3, got format 2" in line
    assert "start a new run" in line and _hashes(run_folder) == before


def test_a_finished_run_is_not_resumed(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (line,) = _refused(capsys, "--config", trained / "config.yaml", "--resume")
    assert "expected an unfinished run, got all 1 epochs done; evaluate it with" in line


def test_files_are_replaced_whole(tmp_path: Path) -> None:
    """A write that fails midway leaves the old file, and no temporary file behind."""
    path = tmp_path / "config.yaml"
    cars_files.write_text(path, "old\n")

    def half(file: object) -> None:
        file.write(b"ne")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cars_files.atomic_write(path, half)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
