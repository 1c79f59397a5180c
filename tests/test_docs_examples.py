"""The student example in docs/examples works as a student would copy it: alone in a folder, plain pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def test_the_copied_plugin_example_passes_its_own_tests_outside_the_repo(tmp_path: Path) -> None:
    project = tmp_path / "my_project"
    shutil.copytree(EXAMPLES, project, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"rootdir: {project}" in out and "configfile" not in out, out  # none of this repo's pytest settings
    assert "3 passed" in out and "warnings summary" not in out, out  # e.g. no "cannot be rewritten"
