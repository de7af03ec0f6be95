"""The repository's commands: scripts/test-pythons says loudly what it did not test; the
processes the tests start fail on this package's own deprecations."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "test-pythons")


def _run(tmp_path: object, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, "-q"],
        env={**os.environ, "VENVS": str(tmp_path), "PYENV_ROOT": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_python_is_reported_not_hidden(tmp_path: object) -> None:
    """A Python that is not on the machine is named as NOT TESTED, in the summary too."""
    result = _run(tmp_path, PYTHONS="3.99")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Python 3.99 NOT FOUND" in result.stderr
    assert "the suite was NOT run on Python 3.99" in result.stderr
    assert "Python 3.99: NOT TESTED (interpreter not found)" in result.stdout
    assert "passed" not in result.stdout


def test_missing_python_fails_when_required(tmp_path: object) -> None:
    """REQUIRE_PYTHONS=1 turns a missing Python into a failed run."""
    result = _run(tmp_path, PYTHONS="3.98 3.99", REQUIRE_PYTHONS="1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Python 3.98: NOT TESTED" in result.stdout
    assert "Python 3.99: NOT TESTED" in result.stdout


WARN = (
    "import warnings\n"
    "warnings.warn_explicit('removed soon', {category}, 'caller.py', 1, module={module!r})\n"
)


@pytest.mark.parametrize("category", ["DeprecationWarning", "PendingDeprecationWarning"])
def test_started_processes_fail_on_this_packages_deprecations(category: str) -> None:
    """A process the tests start errors on a deprecation raised from this package's own call
    (every module of it), and not on one raised from another project's."""
    import flask_sharedstate.backends.redis_client  # noqa: F401 (a module deep in the package)

    for module in ("flask_sharedstate", "flask_sharedstate.backends.redis_client"):
        code = WARN.format(category=category, module=module)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 1, (module, result.stderr)
        assert f"{category}: removed soon" in result.stderr
    code = WARN.format(category=category, module="gunicorn.arbiter")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
