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
from torch import nn
from tqdm.auto import tqdm

from cars import UsageError
from cars.distributed import Runtime, all_gather_objects

#: Version of the checkpoint layout; 2: settings with ``null`` library defaults, safe loading.
CHECKPOINT_FORMAT = 2


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
