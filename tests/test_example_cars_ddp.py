"""``examples/train_cars.py`` under ``torchrun`` with two CPU processes (gloo backend)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cars_fixtures import (
    EXAMPLES,
    cars_files,
    old_config,
    one_torch_thread,
    step_records,
    train_cars,
    write_original,
)

pytestmark = pytest.mark.distributed

# Terms the global batch determines: with marginal entropy and the diversity term's classes
# gathered across processes, two processes with 4 images each must report what one process with
# those 8 images reports, total loss included (and the learner's prior, the same in both).
GLOBAL_BATCH_TERMS = ("loss", "ce", "mixture", "diversity", "entropy", "prior", "tau", "lr")


def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    write_original(tmp_path)
    config = old_config(tmp_path / "old.yaml")
    common = [
        "--config",
        str(config),
        "--data-root",
        str(tmp_path),
        "train.epochs=1",
        "model.entropy_mode=marginal",
        "output.plots=false",
        "train.device=cpu",  # the same on machines with and without GPUs
    ]

    distributed_output = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLES / "train_cars.py"),
        *common,
        "--output-dir",
        str(distributed_output),
    ]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]

    single_output = tmp_path / "single"
    with one_torch_thread():
        status = train_cars.main([*common, "--output-dir", str(single_output)])
    assert status == train_cars.EXIT_OK

    log = (distributed_output / "train.log").read_text()
    assert "2 process(es)" in log
    assert result.stdout.count("% test top-1") == 1  # the result, once: from the main process
    saved = cars_files.read_checkpoint(distributed_output / "checkpoints" / "last.pt", "test")
    assert len(saved["rng"]) == 2 and saved["epoch"] == 1
    first_distributed = step_records(distributed_output)[0]
    first_single = step_records(single_output)[0]
    for term in GLOBAL_BATCH_TERMS:
        assert math.isclose(first_distributed[term], first_single[term], rel_tol=1e-5), term
    epochs = [
        r
        for r in cars_files.read_records(distributed_output / "metrics.jsonl")
        if r["event"] == "epoch"
    ]
    assert len(epochs) == 1 and 0 <= epochs[0]["test_accuracy"] <= 100
