"""The Sphinx docs build without a warning (the README is their user guide)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_cleanly(tmp_path: object) -> None:
    """sphinx-build -W (warnings are errors) builds the guide, API and architecture."""
    out = os.path.join(str(tmp_path), "html")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", "docs", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with open(os.path.join(out, "api.html")) as f:
        api = f.read()
    assert "SharedState.incr" in api and "SharedStateUnavailable" in api
