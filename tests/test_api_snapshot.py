"""CI fails on an unannounced change of the public API.

`tests/api_snapshot.json` holds every exported name and public signature as of the last release
plus the changes announced since in CHANGELOG.md. A change of the API (a new, removed or renamed
name, argument, default or argument kind) fails here until the snapshot is regenerated, which the
failure message says to do together with a CHANGELOG line.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import promptmix

sys.path.insert(0, str(Path(__file__).parent))
import api_snapshot

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_matches_the_committed_snapshot() -> None:
    committed = api_snapshot.SNAPSHOT.read_text()
    current = api_snapshot.render(api_snapshot.snapshot())
    if current != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                current.splitlines(keepends=True),
                "tests/api_snapshot.json (committed)",
                "the package now",
                n=1,
            )
        )
        raise AssertionError(
            "The public API changed without being announced:\n\n"
            f"{diff}\n"
            "If this change is intended, describe it in CHANGELOG.md (under [Unreleased], with "
            "'Changed' or 'Removed' for anything that breaks callers, which needs a new major "
            f"version) and regenerate the snapshot with:\n\n    {api_snapshot.REGENERATE}\n"
        )


def test_the_snapshot_sees_signature_changes() -> None:
    """A renamed argument or a changed default shows in the snapshot."""
    described = api_snapshot.snapshot()["modules"]["promptmix"]
    loss = described["MixtureOfPromptsLoss"]
    assert "tau: 'float | TemperatureSchedule' = 0.3" in loss["signature"]
    assert "logit_scale" in loss["members"]["forward"]
    assert described["functional"] == "module"


def test_the_changelog_announces_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert re.search(
        rf"^## \[{re.escape(promptmix.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$",
        changelog,
        flags=re.MULTILINE,
    ), f"CHANGELOG.md has no section for version {promptmix.__version__}"
    snapshot_version = api_snapshot.snapshot()["version"]
    assert snapshot_version == promptmix.__version__
