"""Mutation testing of `promptmix.functional`: does the test suite notice a wrong formula?

Each mutant changes one operator or number in one file of `src/promptmix/functional/`
(`+`/`-`, `*`/`/`, `**`→`*`, comparisons flipped or made strict/loose, `and`/`or`, a dropped
`not` or unary minus, an integer `n`→`n + 1`, a float `x`→`2x` or `0`→`1`); docstrings, strings,
annotations and `__all__` are left alone. For each mutant a forked child (torch already
imported, so it starts in milliseconds) puts the mutated copy of the package first on `sys.path`
and runs the tests that cover the maths with `pytest -x` (without the slow `compile` and
`distributed` markers); a failing run, an error or a timeout
kills the mutant. Reproducible: the mutants are enumerated in a fixed order, the tests run under
the deterministic `ci` hypothesis profile, and `--sample N --seed S` picks the same subset.

    PYTHONPATH=src python benchmarks/mutation.py                 # every mutant
    PYTHONPATH=src python benchmarks/mutation.py --sample 120    # a fixed random subset

Prints each survivor (file:line, the change) and the score `killed / total`.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "promptmix"
TESTS = [
    "tests/test_functional.py",
    "tests/test_sinkhorn.py",
    "tests/test_reliability.py",
    "tests/test_entropy.py",
    "tests/test_assignment.py",
    "tests/test_diversity.py",
    "tests/test_diagnostics.py",
    "tests/test_objective.py",
    "tests/test_schedule.py",
    "tests/test_kmeans.py",
    "tests/test_usage.py",
    "tests/test_anchor.py",
    "tests/test_consistency.py",
    "tests/test_text_to_text.py",
    "tests/test_dispersion.py",
]

SWAPS: dict[type, type] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.And: ast.Or, ast.Or: ast.And,
}


@dataclass(frozen=True)
class Mutant:
    path: Path
    index: int  # the index-th mutable node of the file, in `ast.walk` order
    line: int
    change: str


def _skipped(tree: ast.AST) -> set[int]:
    """Nodes never mutated: docstrings, annotations, `__all__` and module-level mode lists."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        elif (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and (node.targets[0].id.isupper() or node.targets[0].id == "__all__")
        ):
            annotations = [node.value]
        for annotation in annotations:
            if annotation is not None:
                skip.update(id(child) for child in ast.walk(annotation))
    return skip


def _candidates(tree: ast.AST):
    skip = _skipped(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
            yield node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in SWAPS:
            yield node, f"{type(node.ops[0]).__name__} -> {SWAPS[type(node.ops[0])].__name__}"
        elif isinstance(node, ast.BoolOp):
            yield node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            yield node, f"drop {type(node.op).__name__}"
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            yield node, f"{node.value!r} -> {_changed(node.value)!r}"


def _changed(value: float) -> float:
    if isinstance(value, int):
        return value + 1
    return 1.0 if value == 0 else 2 * value


def mutants() -> list[Mutant]:
    found = []
    for path in sorted((PACKAGE / "functional").glob("*.py")):
        tree = ast.parse(path.read_text())
        for index, (node, change) in enumerate(_candidates(tree)):
            found.append(Mutant(path, index, node.lineno, change))
    return found


def mutated_source(mutant: Mutant) -> str:
    tree = ast.parse(mutant.path.read_text())
    node = list(_candidates(tree))[mutant.index][0]
    if isinstance(node, ast.BinOp):
        node.op = SWAPS[type(node.op)]()
    elif isinstance(node, ast.Compare):
        node.ops[0] = SWAPS[type(node.ops[0])]()
    elif isinstance(node, ast.BoolOp):
        node.op = SWAPS[type(node.op)]()
    elif isinstance(node, ast.UnaryOp):
        node.op = ast.UAdd()
    else:
        node.value = _changed(node.value)
    return ast.unparse(tree)


def run(mutant: Mutant, workdir: Path, timeout: float) -> str:
    """'killed', 'survived' or 'timeout', from a forked child running the tests."""
    shutil.rmtree(workdir / "promptmix", ignore_errors=True)
    shutil.copytree(PACKAGE, workdir / "promptmix")
    target = workdir / "promptmix" / mutant.path.relative_to(PACKAGE)
    target.write_text(mutated_source(mutant))
    pid = os.fork()
    if pid == 0:  # child
        import pytest

        sys.path.insert(0, str(workdir))
        for name in [m for m in sys.modules if m == "promptmix" or m.startswith("promptmix.")]:
            del sys.modules[name]
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        code = pytest.main(
            ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=",
             "-m", "not compile and not distributed",
             "--rootdir", str(ROOT), *[str(ROOT / t) for t in TESTS]]
        )
        os._exit(int(code))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=None, help="test N mutants, not all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="FILE:LINE",
        help="only the mutants on these lines, e.g. estep.py:127 (to re-test survivors)",
    )
    args = parser.parse_args()
    os.environ["HYPOTHESIS_PROFILE"] = "ci"
    os.environ.pop("CI", None)
    import pytest  # noqa: F401  (imported once, before forking)
    import torch

    torch.set_num_threads(1)
    import open_clip  # noqa: F401  (the test modules import it; pay for it once)

    every = mutants()
    chosen = every
    if args.only:
        chosen = [m for m in every if f"{m.path.name}:{m.line}" in args.only]
    elif args.sample is not None and args.sample < len(every):
        chosen = sorted(random.Random(args.seed).sample(every, args.sample), key=every.index)
    print(f"{len(every)} mutants in promptmix.functional; testing {len(chosen)}", flush=True)
    results: dict[str, int] = {"killed": 0, "survived": 0, "timeout": 0}
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for number, mutant in enumerate(chosen, 1):
            outcome = run(mutant, Path(tmp), args.timeout)
            results[outcome] += 1
            if outcome == "survived":
                where = mutant.path.relative_to(ROOT)
                print(f"  survived: {where}:{mutant.line} {mutant.change}", flush=True)
            if number % 10 == 0:
                print(f"  [{number}/{len(chosen)}] {results} "
                      f"{time.monotonic() - start:.0f} s", flush=True)
    killed = results["killed"] + results["timeout"]
    print(f"killed {killed}/{len(chosen)} = {killed / len(chosen):.1%} "
          f"({results['timeout']} by timeout); {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
