"""The Sphinx docs build without a warning, in the Pallets theme, from the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The docs, built once with ``sphinx-build -W`` (warnings are errors)."""
    out = str(tmp_path_factory.mktemp("docs") / "html")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", "docs", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    yield out


def _page(html: str, name: str) -> str:
    with open(os.path.join(html, name)) as f:
        return f.read()


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page))


def test_docs_build_cleanly(html: str) -> None:
    """sphinx-build -W builds the guide, API and architecture."""
    api = _page(html, "api.html")
    assert "SharedState.incr" in api and "SharedStateUnavailable" in api
    assert "Guarantees" in _page(html, "guide.html")
    assert "architecture" in _page(html, "architecture.html").lower()


def test_pallets_theme(html: str) -> None:
    """The pages use the Pallets family's flask theme, as Flask's own docs do."""
    assert re.search(r'href="_static/flask\.css', _page(html, "index.html"))


def test_landing_page_is_the_readme_quick_start(html: str) -> None:
    """The landing page shows the README's quick start, included from the README (one copy)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start, end = "<!-- quickstart-start -->", "<!-- quickstart-end -->"
    assert start in readme and end in readme
    quick = readme.split(start, 1)[1].split(end, 1)[0]
    index = _text(_page(html, "index.html"))
    assert "pip install Flask-SharedState" in quick and "pip install Flask-SharedState" in index
    assert "shared = SharedState(app)" in index and "./scripts/test" in index
    sources = [n for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith((".md", ".rst"))]
    for name in sources:
        with open(os.path.join(ROOT, "docs", name)) as f:
            assert "pip install Flask-SharedState" not in f.read(), f"{name} copies the README"
    # The guide goes on where the quick start ends, so nothing is shown twice.
    assert "pip install Flask-SharedState" not in _text(_page(html, "guide.html"))


def test_changelog_and_license_pages(html: str) -> None:
    """The changelog and the license are pages of the docs, linked from the landing page."""
    index = _page(html, "index.html")
    assert 'href="changes.html"' in index and 'href="license.html"' in index
    changes = _text(_page(html, "changes.html"))
    assert "Unreleased" in changes and "Version 0.1.0" in changes
    license_page = _text(_page(html, "license.html"))
    assert "BSD-3-Clause" in license_page
    assert "Redistribution and use in source and binary forms" in license_page


def test_readme_names_only_files_the_repository_has() -> None:
    """Every repository path the README names in code (``scripts/test``, ``*.md``) exists."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    folders = {n for n in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, n))}
    named = set()
    for span in re.findall(r"`([^`\n]+)`", readme) + re.findall(r"```sh\n(.*?)```", readme, re.S):
        for word in re.findall(r"[\w./-]+", span):
            word = word.removeprefix("./").rstrip(".")
            if word.endswith(".md") or word.split("/")[0] in folders and "/" in word:
                named.add(word)
    named.discard("docs/_build")  # where the docs are built to
    missing = sorted(n for n in named if not os.path.exists(os.path.join(ROOT, n)))
    assert not missing, f"the README names files the repository does not have: {missing}"
    assert "scripts/test" in named and "docs/architecture.md" in named
