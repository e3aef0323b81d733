"""The public API as data, for tests/api_snapshot.json: every exported name and signature.

`tests/test_api_snapshot.py` compares the package with the committed snapshot, so a change of
the public API cannot land unannounced. After an intended change, add a line to CHANGELOG.md and
regenerate the snapshot:

    PYTHONPATH=src python tests/api_snapshot.py --write
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("api_snapshot.json")
REGENERATE = "PYTHONPATH=src python tests/api_snapshot.py --write"


def _public_modules() -> list[Any]:
    import promptmix

    names = [promptmix.__name__] + [
        info.name for info in pkgutil.walk_packages(promptmix.__path__, "promptmix.")
    ]
    return [
        importlib.import_module(name)
        for name in sorted(names)
        if not any(part.startswith("_") for part in name.split("."))
    ]


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):  # no signature (a builtin)
        return "(...)"


def _describe(obj: Any) -> dict[str, Any] | str:
    """A function's signature, or a class's with its public methods' and properties."""
    if inspect.isclass(obj):
        members: dict[str, str] = {}
        for name, member in inspect.getmembers(obj):
            if name.startswith("_"):
                continue
            static = inspect.getattr_static(obj, name)
            function = getattr(member, "__func__", member)
            owner = getattr(function, "__module__", "") or ""
            if isinstance(static, property):
                members[name] = "property"
            elif inspect.isfunction(function) and owner.startswith("promptmix"):
                members[name] = _signature(
                    static.__func__ if isinstance(static, staticmethod) else function
                )
        return {"signature": _signature(obj), "members": members}
    if callable(obj):
        return _signature(obj)
    return type(obj).__name__


def snapshot() -> dict[str, Any]:
    """`{"version", "modules": {module: {name: description}}}` of the public API."""
    import promptmix

    modules: dict[str, dict[str, Any]] = {}
    for module in _public_modules():
        names = getattr(module, "__all__", [])
        modules[module.__name__] = {
            name: _describe(getattr(module, name))
            for name in names
            if not inspect.ismodule(getattr(module, name)) and name != "__version__"
        } | {name: "module" for name in names if inspect.ismodule(getattr(module, name))}
    return {"version": promptmix.__version__, "modules": modules}


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {SNAPSHOT.name}")
    args = parser.parse_args()
    text = render(snapshot())
    if args.write:
        SNAPSHOT.write_text(text)
        print(f"wrote {SNAPSHOT}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
