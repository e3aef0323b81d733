"""Machine-readable metrics: one JSON object per line, optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cars_checkpoint import atomic_write


def _jsonable(value: Any) -> Any:
    # Strict JSON has no NaN/Infinity; write null so every line parses with any JSON reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file, in order (empty when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


class MetricsLog:
    """Append records to ``metrics.jsonl`` (and TensorBoard) on the main process only.

    Every record has an ``"event"`` (``"step"``, ``"eval"``, ``"epoch"``, ...) and the global
    ``"step"`` it belongs to. A resumed run first drops the records written after its checkpoint
    (a crash mid-epoch leaves some), so the file reads like one uninterrupted run.

    Args:
        path: the JSON-lines file.
        tensorboard_dir: where to write TensorBoard events, or ``None``.
        enabled: ``False`` on non-main processes: every call is a no-op.
        resume_step: the checkpoint's global step when resuming; ``None`` starts a new file.
    """

    def __init__(
        self,
        path: Path,
        *,
        tensorboard_dir: Path | None = None,
        enabled: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        else:
            kept = [record for record in read_records(path) if record["step"] <= resume_step]
            lines = "".join(json.dumps(record) + "\n" for record in kept)
            atomic_write(path, lambda file: file.write(lines.encode()))
        self.file = path.open("a", encoding="utf-8")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(tensorboard_dir), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (flushed at once, so a crash loses nothing already logged)."""
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
