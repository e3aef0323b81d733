"""What a run leaves on disk, written so that nothing is ever lost.

* Every file is written atomically (:func:`atomic_write`: a temporary file, then ``os.replace``);
  the two streams, ``train.log`` and ``metrics.jsonl``, are only ever appended to.
* A run's folder is checked before anything is written (:func:`check_writable`), and a training
  run never starts in a folder that holds another run (:meth:`RunFolder.check_new`).
* Log records are kept in memory until the run has a folder (:class:`RunLog`), so a command that
  is refused writes nothing.
* Checkpoints hold plain tensors and numbers only, so they load with ``weights_only=True``: a
  foreign file is refused, never executed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from cars import Stopped, UsageError
from cars.config import check_resumable, command
from cars.distributed import Runtime, all_gather_objects

logger = logging.getLogger(__name__)

#: Version of the checkpoint layout; 2: settings with ``null`` library defaults, safe loading;
#: 3: promptmix's recipe (OffsetMixtureOfPrompts with shared looks, the loss's new defaults).
CHECKPOINT_FORMAT = 3
#: Format 2, written before the recipe: ``--evaluate`` reads it, ``--resume`` refuses it.
OLD_FORMAT = 2


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` so that readers see the old file or the complete new one, never a part.

    ``write`` fills a temporary file in the same folder, which is flushed, synced and renamed
    over ``path``; on any error (a kill included) ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if os.name == "posix":  # make the rename itself durable
        descriptor = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of a text file."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def check_writable(path: Path, flag: str) -> None:
    """Refuse (before anything is written) a folder that cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: expected a folder, got a file")
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: expected a folder, got a file at {existing}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: expected a folder we may write, got read-only {existing}")


class RunFolder:
    """The files of one run under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.log = self.root / "train.log"
        self.metrics = self.root / "metrics.jsonl"
        self.checkpoint = self.root / "checkpoints" / "last.pt"
        self.plots = self.root / "plots"
        self.tensorboard = self.root / "tensorboard"

    def holds_run(self) -> list[str]:
        """The files of a run already in the folder."""
        files = (self.config, self.metrics, self.checkpoint)
        return [str(path.relative_to(self.root)) for path in files if path.exists()]

    def check_new(self, flag: str) -> None:
        """Refuse to start a new run over another one."""
        check_writable(self.root, flag)
        if self.holds_run():
            raise UsageError(
                f"{flag} {self.root}: expected a folder without a run, got one holding "
                f"{', '.join(self.holds_run())}; continue it with --resume, or choose another "
                "--output-dir"
            )


def open_run(folder: RunFolder, cfg: DictConfig, resume: Path | None) -> dict[str, Any] | None:
    """The checkpoint ``--resume`` continues (``None``: a new run), once the folder may be
    written and, when resuming, the settings are those it was trained with."""
    if resume is None:
        folder.check_new("--output-dir")
        return None
    checkpoint = read_checkpoint(resume, "--resume")
    check_resumable(checkpoint, cfg, resume)
    check_writable(folder.root, "--output-dir")
    return checkpoint


def interrupted(epoch: int, step: int, saved: tuple[int, int], folder: RunFolder) -> Stopped:
    """Ctrl-C during training: one line with the step reached and the command that resumes."""
    return Stopped(f"interrupted at epoch {epoch}, step {step} (the checkpoint holds epoch "
                   f"{saved[0]}, step {saved[1]}); resume with: "
                   f"{command('--config', folder.config, '--resume')}", 130)


def fresh_folder(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first that does not exist."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


def evaluation_folder(checkpoint: Path, which: str, output_dir: Path | None) -> Path:
    """Where ``--evaluate`` writes: ``--output-dir``, else a new ``RUN/eval/<classes>/``.

    Raises:
        UsageError: ``--output-dir`` holds results (of a run or of an evaluation).
    """
    if output_dir is None:
        run = checkpoint.parent
        run = run.parent if run.name == "checkpoints" else run
        folder = fresh_folder(run / "eval" / which)
        check_writable(folder, "--evaluate")
        return folder
    check_writable(output_dir, "--output-dir")
    held = RunFolder(output_dir).holds_run()
    held += ["eval.json"] if (output_dir / "eval.json").exists() else []
    if held:
        raise UsageError(
            f"--output-dir {output_dir}: expected a folder without results, got one holding "
            f"{', '.join(held)}; leave out --output-dir to evaluate into a new folder"
        )
    return output_dir


# --- Checkpoints -------------------------------------------------------------------------------


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` of ``state`` through :func:`atomic_write`."""
    atomic_write(path, lambda file: torch.save({"format": CHECKPOINT_FORMAT, **state}, file))


def read_checkpoint(path: Path, flag: str) -> dict[str, Any]:
    """A checkpoint of ``train_cars.py``, or one line saying what ``path`` is instead."""
    if not path.is_file():
        got = "a folder" if path.is_dir() else "nothing (no such file)"
        raise UsageError(f"{flag} {path}: expected a train_cars.py checkpoint, got {got}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever a foreign or cut file makes torch raise
        raise UsageError(
            f"{flag} {path}: expected a train_cars.py checkpoint, got {describe(path, error)}"
        ) from None
    if isinstance(checkpoint, dict) and checkpoint.get("format") == OLD_FORMAT:
        return _before_the_recipe(checkpoint, path, flag)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        got = (
            f"format {checkpoint.get('format')}"
            if isinstance(checkpoint, dict)
            else type(checkpoint).__name__
        )
        raise UsageError(
            f"{flag} {path}: expected a train_cars.py checkpoint of format {CHECKPOINT_FORMAT}, "
            f"got {got}"
        )
    return checkpoint


def _before_the_recipe(checkpoint: dict[str, Any], path: Path, flag: str) -> dict[str, Any]:
    """A format-2 checkpoint, for ``--evaluate``: its offset learner is the one without shared
    looks (``share_looks=False``: exactly the prompts it trained). ``--resume`` is refused: the
    settings it left ``null`` meant the loss's old defaults (EM pull 10, entropy 1)."""
    if flag != "--evaluate":
        raise UsageError(
            f"{flag} {path}: expected a checkpoint of format {CHECKPOINT_FORMAT}, got format "
            f"{OLD_FORMAT}, written before promptmix's recipe changed (shared looks, new loss "
            "defaults), so its null settings no longer mean what it trained with; start a new "
            f"run (--evaluate {path} still reads it)"
        )
    model = checkpoint["config"]["model"]
    if model.get("learner") == "offset":
        model["share_looks"] = False
        # A buffer of the new learner that only weighs its prior: not used by an evaluation.
        checkpoint["learner"]["num_images"] = torch.tensor(float(len(checkpoint["classnames"])))
        logger.warning("%s: written before promptmix's shared looks (checkpoint format %d): "
                       "evaluated as OffsetMixtureOfPrompts(share_looks=False), the learner it "
                       "trained", path, OLD_FORMAT)
    return checkpoint


def check_same_images(checkpoint: dict[str, Any] | None, train_files: list[str],
                      path: Path | None) -> None:
    """Refuse to resume on other few-shot images than the checkpoint was trained on."""
    if checkpoint is not None and checkpoint["train_files"] != train_files:
        raise UsageError(f"--resume {path}: expected the few-shot images it was trained on, "
                         "got others (another dataset folder or layout)")


def check_classes(checkpoint: dict[str, Any], classnames: list[str], learner: nn.Module,
                  path: Path) -> None:
    """Refuse to evaluate per-class prompts on classes other than those they were trained on."""
    if checkpoint["classnames"] != classnames and getattr(learner, "class_specific", True):
        raise UsageError(
            f"--evaluate {path}: expected prompts that carry over to other classes, got one set "
            f"per class ({len(checkpoint['classnames'])} classes); train with "
            "model.learner=mixture model.class_specific=false for base-to-new")


def evaluation_record(path: Path, checkpoint: dict[str, Any], which: str, num_classes: int,
                      folder: Path, result: dict[str, Any]) -> dict[str, Any]:
    """What ``--evaluate`` found, for ``eval.json`` (and in one line of the log)."""
    logger.info("prompts of %s on %s classes (%d): %s", path, which, num_classes,
                result["report"].message)
    return {"checkpoint": str(path), "epoch": checkpoint["epoch"], "classes": which,
            "num_classes": num_classes, "folder": str(folder), "test_accuracy": result["accuracy"],
            "diagnostics": "on the test images"} | result["summary"]


def write_evaluation(folder: Path, settings: str, numbers: dict[str, Any],
                     run_log: RunLog) -> None:
    """An evaluation's files: ``config.yaml``, ``eval.json`` and ``eval.log``."""
    write_text(folder / "config.yaml", settings)
    write_text(folder / "eval.json", json.dumps(numbers, indent=2) + "\n")
    run_log.write_to(folder / "eval.log")


class Checkpoints:
    """Saves a run's state to ``path`` and restores it: the learned parameters, every part with
    a ``state_dict`` (loss, optimiser, schedules), each process's random generators, and what
    identifies the run (``identity``: its settings, classes and images)."""

    def __init__(self, path: Path, learner: nn.Module, parts: dict[str, Any],
                 runtime: Runtime, identity: dict[str, Any]):
        self.path, self.learner, self.parts = path, learner, parts
        self.runtime, self.identity = runtime, identity
        self.saved = (0, 0)

    def save(self, epoch: int, step: int) -> None:
        """Write the checkpoint of ``epoch`` (all processes take part; the main one writes)."""
        rng = all_gather_objects(capture_rng_state(), self.runtime)
        if self.runtime.is_main:
            parts = {name: part.state_dict() for name, part in self.parts.items()}
            state = {"epoch": epoch, "step": step, "rng": rng, **self.identity, **parts}
            save_checkpoint(state | {"learner": trainable_state_dict(self.learner)}, self.path)
        self.saved = (epoch, step)

    def restore(self, checkpoint: dict[str, Any], path: Path) -> tuple[int, int]:
        """Load ``checkpoint`` into the learner, the parts and the generators: ``(epoch, step)``."""
        load_trainable_state_dict(self.learner, checkpoint["learner"], path)
        for name, part in self.parts.items():
            part.load_state_dict(checkpoint[name])
        restore_rng_state(checkpoint["rng"][self.runtime.rank % len(checkpoint["rng"])])
        self.saved = (checkpoint["epoch"], checkpoint["step"])
        return self.saved


def describe(path: Path, error: Exception) -> str:
    """What a file that ``torch.load`` refused is, in a few words."""
    head = path.read_bytes()[:1024]
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return "a truncated checkpoint (its end is missing: a copy or a save cut short)"
    with contextlib.suppress(UnicodeDecodeError):
        head.decode("utf-8")
        return "a text file"
    reason = f"{type(error).__name__}: {error}".strip().splitlines()[0][:120]
    return f"a file torch cannot read ({reason})"


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without its frozen parameters: what training changed."""
    frozen = {name for name, parameter in module.named_parameters() if not parameter.requires_grad}
    return {name: value for name, value in module.state_dict().items() if name not in frozen}


def load_trainable_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Load a :func:`trainable_state_dict`, after checking that it fits ``module``."""
    own = trainable_state_dict(module)
    wrong = [
        f"{name} {tuple(state[name].shape) if name in state else 'missing'}"
        for name in own
        if name not in state or state[name].shape != own[name].shape
    ]
    if wrong or set(state) - set(own):
        raise UsageError(
            f"{path}: expected learned parameters of shapes "
            f"{', '.join(f'{n} {tuple(t.shape)}' for n, t in own.items())}, got {', '.join(wrong)}"
        )
    module.load_state_dict(state, strict=False)


def capture_rng_state() -> dict[str, Any]:
    """The global generators' states, as tensors and numbers (safe to load)."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(python_state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: the generators continue from where they were."""
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A seed for one purpose, e.g. ``(seed, epoch)``, independent across different ``parts``.

    Examples:
        >>> derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
        True
    """
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# --- Metrics and logs --------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    # Strict JSON has no NaN: write null, so every line parses with any JSON reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` (and TensorBoard), on the main process only.

    A resumed run first drops the records written after its checkpoint (a run stopped mid-epoch
    leaves some; the resumed run writes them again, identically), so the file reads like one run.
    """

    def __init__(self, path: Path, *, tensorboard: Path | None, resume_step: int | None,
                 enabled: bool = True):
        self.enabled, self.writer = enabled, None
        if not enabled:  # another process of torchrun: every call does nothing
            return
        if resume_step is not None:
            kept = [record for record in read_records(path) if record["step"] <= resume_step]
            write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(tensorboard), purge_step=purge)

    @classmethod
    def of_run(cls, folder: RunFolder, tensorboard: bool, runtime: Runtime,
               resumed_at: tuple[int, int] | None) -> MetricsLog:
        """The log of a run in ``folder``; ``resumed_at``: the ``(epoch, step)`` it continues
        from, whose later records are dropped (the resumed run writes them again, identically)."""
        kept = None if resumed_at is None else (resumed_at[1] if resumed_at[0] else -1)
        return cls(folder.metrics, resume_step=kept, enabled=runtime.is_main,
                   tensorboard=folder.tensorboard if tensorboard else None)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record``, flushed at once."""
        if not self.enabled:
            return
        self.file.write(json.dumps(_jsonable(record)) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{record['event']}/{key}", value, record["step"])

    def close(self) -> None:
        """Close the files."""
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def summary(report: Any) -> dict[str, Any]:
    """The numbers of promptmix's ``CollapseReport`` that a metrics record keeps."""
    return {
        "mean_cosine": report.mean_cosine,
        "dominant_share": report.dominant_share, "collapsed": len(report.collapsed_classes),
        "effective_subprompts": report.effective_subprompts,
    }


def collapse_line(report: Any, share: torch.Tensor, cosine: torch.Tensor) -> str | None:
    """One short line when classes collapse: how many, and the worst three by dominant share
    and sub-prompt cosine (``None`` when no class does)."""
    if not report.collapsed:
        return None
    worst = sorted(report.collapsed_classes,
                   key=lambda c: -max(share[c].nan_to_num(1.0), cosine[c].nan_to_num(1.0)))[:3]
    named = ", ".join(f"{c} (share {share[c]:.2f}, |cos| {cosine[c]:.2f})" for c in worst)
    return (f"collapse in {len(report.collapsed_classes)}/{len(share)} classes, worst {named}; "
            "each class in train.log")


def progress(batches: Any, epoch: int, *, show: bool) -> Iterator[Any]:
    """The batches of ``epoch`` under a progress bar (on stderr; ``show``: on a terminal)."""
    return tqdm(batches.epoch(epoch), total=len(batches), desc=f"epoch {epoch}", leave=False,
                disable=None if show else True)


def log_start(metrics: MetricsLog, on_test: dict[str, Any], on_train: dict[str, Any]) -> None:
    """The start's record (step 0): its test accuracy and diagnostics, to see what training adds."""
    logger.info("step 0, the start: test top-1 %.2f%%", on_test["accuracy"])
    metrics.write({"event": "eval", "epoch": 0, "step": 0, "test_accuracy": on_test["accuracy"]}
                  | on_train["summary"])


def log_final(metrics: MetricsLog, epoch: int, step: int, on_test: dict[str, Any],
              on_train: dict[str, Any], averaged: bool) -> None:
    """The final prompts' record (``averaged``: PromptSRC's average of them)."""
    metrics.write({"event": "final", "epoch": epoch, "step": step, "test_accuracy":
                   on_test["accuracy"], "prompt_average": averaged} | on_train["summary"])


def log_epoch(metrics: MetricsLog, epoch: int, epochs: int, step: int, tau: float,
              means: dict[str, float], on_train: dict[str, Any], test_accuracy: float | None,
              *, seconds: float) -> None:
    """An epoch's record (mean loss terms, training accuracy and diagnostics, test accuracy),
    its line on the terminal and, when classes collapse, one short warning (details: DEBUG)."""
    done = {"event": "epoch", "epoch": epoch, "step": step, "tau": tau}
    done |= {f"train_{term}": mean for term, mean in means.items()}
    done |= on_train["summary"] | {"train_accuracy": on_train["accuracy"]}
    line = (f"epoch {epoch}/{epochs}: loss {means['loss']:.4f} (ce {means['ce']:.4f}, prior "
            f"{means['prior']:.4f})")
    if test_accuracy is not None:
        done["test_accuracy"] = test_accuracy
        line += f", test top-1 {test_accuracy:.2f}%"
    logger.info("%s, tau %.3f [%.1fs]", line, tau, seconds)
    if on_train["responsibilities"].shape[1] > 1:  # one prompt per class cannot collapse
        logger.debug("epoch %d: %s", epoch, on_train["report"].message)
        if on_train["collapse"]:
            logger.warning("epoch %d: %s", epoch, on_train["collapse"])
    metrics.write(done)


def evaluation_line(numbers: dict[str, Any]) -> str:
    """An evaluation in one line for stdout."""
    return (f"{numbers['test_accuracy']:.2f}% test top-1 on {numbers['classes']} classes "
            f"({numbers['num_classes']}); written to {numbers['folder']}")


def result_line(result: dict[str, Any]) -> str:
    """A finished run in one line for stdout: the test accuracy, at step 0 too, and collapse."""
    final, start, report = result["final"], result["start"], result["train"]["report"]
    return (f"{final['accuracy']:.2f}% test top-1"
            + (f" ({start['accuracy']:.2f}% at step 0)" if start else "")
            + f"; dominant share {report.dominant_share:.2f}, effective K "
            f"{report.effective_subprompts:.2f}, {len(report.collapsed_classes)} collapsed "
            f"classes; run in {result['folder']}")


FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


class RunLog(logging.Handler):
    """Keeps every record of the command, and writes them into log files once a run has a folder.

    A refused command therefore writes no log; a run's ``train.log`` starts with what was logged
    before its folder existed (the records from :meth:`mark` on) and gets the ``DEBUG`` details
    the terminal does not show.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.files: dict[Path, logging.FileHandler] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for handler in self.files.values():
            handler.emit(record)

    def mark(self) -> int:
        """The position from which a later :meth:`write_to` starts."""
        return len(self.records)

    def write_to(self, path: Path, since: int = 0) -> None:
        """Append the records from ``since`` on, and every later one, to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(FORMAT)
        for record in self.records[since:]:
            handler.emit(record)
        self.files[path] = handler

    def stop(self, path: Path) -> None:
        """Stop writing to ``path``."""
        handler = self.files.pop(path, None)
        if handler is not None:
            handler.close()

    def close(self) -> None:
        for path in list(self.files):
            self.stop(path)
        super().close()


class _Terminal(logging.StreamHandler):
    """Writes above a tqdm progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own convention
            self.handleError(record)


def _ours(record: logging.LogRecord) -> bool:
    """Our records at any level; other libraries' warnings and errors only."""
    return record.name.startswith(("train_cars", "cars")) or record.levelno >= logging.WARNING


@contextlib.contextmanager
def logging_to(rank: int) -> Iterator[RunLog]:
    """Log to stderr (``INFO``; other ``torchrun`` processes: warnings) and to a :class:`RunLog`."""
    root = logging.getLogger()
    terminal = _Terminal(sys.stderr)
    terminal.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    terminal.setFormatter(FORMAT)
    run_log = RunLog()
    handlers: list[logging.Handler] = [terminal] + ([run_log] if rank == 0 else [])
    previous = root.level
    root.setLevel(logging.DEBUG)
    for handler in handlers:
        handler.addFilter(_ours)
        root.addHandler(handler)
    try:
        yield run_log
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous)
