"""The evaluation protocols and the demo of ``examples/train_cars.py``."""

from __future__ import annotations

import functools
import json
import math
import shlex
import statistics
from pathlib import Path

import pytest
import torch
from cars_fixtures import (
    cars_config,
    cars_data,
    cars_demo,
    cars_files,
    cars_grid,
    cars_plots,
    run,
    train_cars,
)

# data_root and config: the small dataset and one-epoch config of tests/conftest.py.
pytestmark = pytest.mark.usefixtures("single_thread")


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


def test_base_to_new_grid_trains_on_base_and_tests_new_as_its_own_problem(
    data_root: Path, config: Path, tmp_path: Path
) -> None:
    argv = ["base-to-new", "--config", str(config), "--data-root", str(data_root)]
    argv += ["--output-dir", str(tmp_path), "--shots", "2", "--seeds", "1,2"]
    assert cars_grid.main([*argv, "output.plots=false"]) == 0
    base, new = [], []
    for seed in (1, 2):
        folder = tmp_path / "base_to_new" / f"shots2_seed{seed}"
        trained = cars_files.read_records(folder / "base" / "metrics.jsonl")
        assert {r["event"] for r in trained} >= {"step", "epoch", "final"}
        evaluated = json.loads((folder / "new" / "eval.json").read_text())
        assert not (folder / "new" / "metrics.jsonl").exists()  # no training on the new classes
        assert (evaluated["classes"], evaluated["num_classes"]) == ("new", 2)  # its own 2-way task
        base.append(cars_grid.final_accuracy(folder / "base"))
        new.append(evaluated["test_accuracy"])
    table = (tmp_path / "base_to_new.md").read_text()
    b, n = statistics.mean(base), statistics.mean(new)
    expected_h = 2 * b * n / (b + n) if b + n else 0.0
    row = next(line for line in table.splitlines() if line.startswith("| promptmix"))
    assert row.split("|")[-2].strip() == f"{expected_h:.2f}"  # H of the seed means
    assert cars_grid.mean_std(base) in row
    assert "(published: Zhou et al., CVPR 2022, Table 1)" in table


def test_the_grid_continues_a_run_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(train_cars, "main", lambda argv: calls.append(argv) or 0)
    started = tmp_path / "few_shot" / "shots1_seed1"
    (started / "checkpoints").mkdir(parents=True)
    (started / "checkpoints" / "last.pt").write_bytes(b"")
    argv = ["few-shot", "--data-root", "cars", "--output-dir", str(tmp_path), "--shots", "1,2"]
    assert cars_grid.main([*argv, "--seeds", "1"]) == 0
    assert [("--resume" in call, call[call.index("--output-dir") + 1]) for call in calls] == [
        (True, str(started)), (False, str(tmp_path / "few_shot" / "shots2_seed1"))]


def test_class_specific_prompts_cannot_be_evaluated_on_new_classes(
    data_root: Path, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", config, "--data-root", data_root, "output.plots=false"]
    base = tmp_path / "base"
    assert run(capsys, *argv, "--output-dir", base, "data.subsample_classes=base")[0] == 0
    checkpoint = base / "checkpoints" / "last.pt"
    status, _, err = run(capsys, *argv, "--evaluate", checkpoint, "data.subsample_classes=new")
    assert status == train_cars.EXIT_USAGE
    assert "model.class_specific=false" in err and not (base / "eval").exists()


def _fake_run(folder: Path, accuracy: float, finished: bool = True) -> None:
    folder.mkdir(parents=True)
    lines = [{"event": "epoch", "epoch": 1, "step": 1, "test_accuracy": accuracy - 1}]
    lines += [{"event": "final", "epoch": 2, "step": 2, "test_accuracy": accuracy}] * finished
    (folder / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in lines))


def test_few_shot_table_is_mean_and_std_over_seeds(tmp_path: Path) -> None:
    for shots, seed, accuracy in [(1, 1, 50.0), (1, 2, 54.0), (2, 1, 60.0), (2, 2, 60.0)]:
        _fake_run(tmp_path / "few_shot" / f"shots{shots}_seed{seed}", accuracy)
    _fake_run(tmp_path / "few_shot" / "shots4_seed1", 70.0, finished=False)
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
    data_root: Path, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cars_fixtures import cars_clip

    monkeypatch.setattr(cars_clip, "weights_cached", lambda name, tag: False)
    monkeypatch.setattr(cars_clip, "hub_reachable", lambda timeout=3.0: False)
    status, _, err = run(capsys, "--config", config, "--data-root", data_root, "--output-dir",
                         tmp_path / "out", "model.clip_name=ViT-B-32", "model.pretrained=openai")
    assert status == train_cars.EXIT_USAGE
    (error,) = [line for line in err.splitlines() if "error" in line.lower()]
    assert "model.clip_name=ViT-B-32 model.pretrained=openai" in error
    assert "model.pretrained=/path/to/open_clip_model.safetensors" in error
    assert not (tmp_path / "out").exists()


def test_resume_without_a_checkpoint_fails_before_reading_images(
    data_root: Path, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(train_cars, "load_few_shot", no_data)
    status, _, err = run(capsys, "--config", config, "--data-root", data_root, "--output-dir",
                         tmp_path, "--resume")
    assert status == train_cars.EXIT_USAGE
    assert f"--resume {tmp_path / 'checkpoints' / 'last.pt'}: expected a train_cars.py " in err


def test_demo_world_classes_of_one_colour_differ_only_by_whole_looks() -> None:
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


def test_demo_rows_follow_their_recipes() -> None:
    world = cars_demo.World(Path("/nonexistent/demo"), None, [])
    one, uncured, defaults = (world.rows[name].model for name in cars_demo.RECIPES)
    assert list(world.rows) == ["one prompt", "uncured", "defaults"]
    assert {row.learner for row in (one, uncured, defaults)} == {"offset"}  # one learner
    assert (one.n_subprompts, one.mixture_loss_weight, one.entropy_loss_weight) == (1, 0.0, 0.0)
    assert (one.label_noise, one.share_looks, one.subprompt_prior_weight) == (0.0, False, 0.0)
    assert (one.init, uncured.init, defaults.init) == ("text", "text", "kmeans")
    assert (uncured.em_tau_end, uncured.entropy_loss_weight) == (0.05, 0.0)
    assert (uncured.share_looks, uncured.subprompt_prior_weight) == (False, 0.0)  # no prior
    # defaults: nothing but the world's K and the one init call, everything else promptmix's
    recipe = ("mixture_loss_weight", "em_tau_end", "sinkhorn_iterations", "label_noise",
              "share_looks", "text_prior_weight", "subprompt_prior_weight", "prior_count")
    assert all(defaults[key] is None for key in recipe) and defaults.n_subprompts == 2


def test_one_prompt_row_trains_plain_cross_entropy_from_the_text() -> None:
    """The demo's CoOp row: its prompt starts at the text feature, its prior is 0 and its loss
    is the plain cross-entropy of the mixture's logits."""
    from cars_fixtures import cars_clip

    cfg = cars_demo.World(Path("/nonexistent/demo"), None, []).rows["one prompt"]
    random_init = cars_config.load(None, ["model.clip_name=tiny-random", "model.pretrained=null"])
    clip = cars_clip.load_clip(random_init.model, torch.device("cpu"))  # not the demo's weights
    names = ["Acura TL Sedan 2012", "Volvo 240 Sedan 1993", "AM General Hummer SUV 2000"]
    learner = train_cars.build_learner(cfg, clip, names)
    assert torch.allclose(learner(), learner.text_features, atol=1e-6)
    assert learner.prior_loss() == 0
    loss_fn = train_cars.build_loss(cfg, clip, names, 1, 10, sync=False)
    images, labels = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1), torch.arange(6) % 3
    out = loss_fn(images, learner(), labels, prior=learner.prior_loss(), logit_scale=20.0)
    plain = torch.nn.functional.cross_entropy(loss_fn.logits(images, learner(), logit_scale=20.0),
                                              labels)
    torch.testing.assert_close(out["loss"], plain)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.pretrained=openai", "model.pretrained"),
        ("data.root=/data/cars", "data.root"),
        ("model.init=text", "model.init"),
        ("model.mixture_loss_weight=3", "model.mixture_loss_weight"),
        ("model.label_noise=0.2", "model.label_noise"),
        ("model.learner=mixture", "model.learner"),
    ],
)
def test_demo_refuses_the_settings_it_would_ignore(
    override: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "--demo", "--output-dir", tmp_path / "demo", override)
    assert status == train_cars.EXIT_USAGE and out == ""
    assert err == f"train_cars.py: error: {key}: expected no override with --demo (the demo " \
        "sets it: its own data, tiny CLIP, folders and the rows' recipes), got one\n"
    assert not (tmp_path / "demo").exists()


def test_a_demo_setting_some_rows_refuse_is_one_line_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "--demo", "--output-dir", tmp_path / "demo",
                           "model.prior_count=2", "train.seed=-1")
    assert status == train_cars.EXIT_USAGE and out == ""
    assert err.splitlines() == [
        "train_cars.py: error: train.seed: expected an integer >= 0, got -1",
        "train_cars.py: error: model.prior_count: expected null unless model.learner=offset, "
        "model.init=kmeans and shared looks (the shrinkage of initialize_from_kmeans's "
        "shared-look start), got 2.0 (in the demo's 'one prompt' and 'uncured' rows)",
    ]
    assert not (tmp_path / "demo").exists()


def test_demo_compares_three_rows_and_its_checkpoint_can_be_evaluated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    short = functools.partial(cars_demo.pretrain_tiny_clip, steps=3, images_per_look=2)
    monkeypatch.setattr(cars_demo, "pretrain_tiny_clip", short)
    docs, output = tmp_path / "docs", tmp_path / "out"
    status, out, _ = run(capsys, "--demo", "--output-dir", output, "--write-docs", docs,
                         "train.epochs=1", "output.plot_classes=[0]")
    assert status == train_cars.EXIT_OK
    table = (docs / "demo_results.md").read_text().splitlines()
    assert table[0].startswith("| run | accuracy | dominant share | effective K |")
    assert "accuracy at step 0" in table[0]
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "one prompt", "uncured", "defaults"]
    assert out.startswith("\n".join(table))  # the results on stdout
    assert table == (output / "results.md").read_text().splitlines()
    assert "Galleries of the classes where uncured and defaults differ most" in out
    # The data and the CLIP stay under the demo's folder, and the printed command works.
    saved = cars_config.load(output / "defaults" / "config.yaml")
    assert Path(saved.data.root) == (output / "data").resolve()
    assert Path(saved.model.pretrained) == (output / "tiny_clip.pt").resolve()
    (command,) = [line for line in out.splitlines() if line.startswith("evaluate")]
    evaluate = shlex.split(command.split(": ", 1)[1])[2:]
    assert evaluate == ["--evaluate", str(output / "defaults" / "checkpoints" / "last.pt")]
    before = _hashes(output / "defaults")
    status, out, _ = run(capsys, *evaluate)
    assert status == train_cars.EXIT_OK and "% test top-1 on all classes (8)" in out
    assert _hashes(output / "defaults", skip="eval") == before  # the run is untouched
    assert json.loads((output / "defaults" / "eval" / "all" / "eval.json").read_text())
    # The docs' copies: the log without clock times or this machine's folders.
    log = (docs / "demo.log").read_text()
    assert "pre-trained the tiny CLIP contrastively" in log and str(tmp_path) not in log
    assert "root:" not in log  # library chatter filtered out
    for name in ("galleries.png", "uncured_training_curves.png", "defaults_similarity.png"):
        assert (docs / name).stat().st_size > 5000


def _hashes(folder: Path, skip: str = "") -> dict[str, int]:
    return {
        str(path.relative_to(folder)): hash(path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not (skip and skip in path.relative_to(folder).parts)
    }


def test_differing_classes_are_those_where_the_rows_disagree() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])

    def row(shares: list[float], predictions: list[int]) -> dict:
        return {"test_labels": labels,
                "train": {"class_share": torch.tensor(shares)},
                "final": {"predictions": torch.tensor(predictions)}}

    uncured = row([1.0, 0.5, 0.5], [0, 0, 1, 1, 0, 0])
    defaults = row([0.5, 0.5, 0.5], [0, 0, 1, 1, 2, 2])
    classes, why = cars_demo.differing_classes(uncured, defaults)
    assert classes == [0, 2]
    assert "class 0: dominant share 1.00 vs 0.50" in why and "test accuracy 0% vs 100%" in why


def test_gallery_rows_say_how_many_images_they_show(tmp_path: Path, data_root: Path) -> None:
    samples = cars_data.load_stanford_cars(data_root).train[:4]  # class 0: 4 images
    gamma = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]])
    figure = cars_plots.plt.figure()
    cars_plots._draw_gallery(figure, samples, gamma, 0, top_n=2, title="t")
    labels = [axis.get_ylabel() for axis in figure.axes if axis.get_ylabel()]
    assert labels == ["sub-prompt 0\n2 of 3 shown", "sub-prompt 1\n1 of 1 shown"]
    cars_plots.plt.close(figure)
