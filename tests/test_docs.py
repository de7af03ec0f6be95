"""The Sphinx docs build without a warning, in the Pallets theme, from the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

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


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _documented_calls(text: str) -> Iterator[tuple[str, str, str]]:
    """(line, name, argument list) of every `shared.NAME(...)` code span with no literal in it."""
    for line in text.splitlines():
        for name, arguments in re.findall(r"`@?shared\.(\w+)\(([^`\"')]*)\)`", line):
            yield line, name, arguments


def test_the_readme_writes_each_call_as_its_signature_is() -> None:
    """Every `shared.NAME(...)` in the README and docs matches inspect.signature: the names
    exist, in order; a signature (the call table, or any with `*` or `=None`) puts keyword-only
    parameters after a `*` (and only they) and gives their defaults; a call passes them by name."""
    import inspect

    from flask_sharedstate import SharedState

    pages = [_readme()]
    for folder in ("docs", os.path.join("docs", "integrations")):
        for page in sorted(os.listdir(os.path.join(ROOT, folder))):
            if page.endswith(".md"):
                with open(os.path.join(ROOT, folder, page)) as f:
                    pages.append(f.read())
    checked = 0
    for line, name, arguments in _documented_calls("\n".join(pages)):
        parameters = list(inspect.signature(getattr(SharedState, name)).parameters.values())[1:]
        actual = {p.name: p for p in parameters}
        order = [p.name for p in parameters]
        is_signature = line.startswith("| `shared.") or "*" in arguments or "=None" in arguments
        keyword_only = False
        position = -1
        # `pop(key[, default])`, as Python's own docs write an optional positional
        written = re.sub(r"\[,\s*(\w+)\]", r", \1", arguments)
        for part in filter(None, (p.strip() for p in written.split(","))):
            if part == "*":
                keyword_only = True
                continue
            word, _, default = part.partition("=")
            assert word in actual, f"{name}() has no parameter {word!r}: {line}"
            parameter = actual[word]
            assert order.index(word) > position, f"{name}(): {word} is out of order: {line}"
            position = order.index(word)
            is_keyword_only = parameter.kind is inspect.Parameter.KEYWORD_ONLY
            if is_signature:
                assert is_keyword_only == keyword_only, (
                    f"{name}(): {word} is {'' if is_keyword_only else 'not '}keyword-only: {line}"
                )
                if default:
                    assert default == repr(parameter.default), f"{name}(): {part}: {line}"
            else:
                assert default or not is_keyword_only, f"{name}(): pass {word}= by name: {line}"
        for parameter in parameters:
            if parameter.name not in written and parameter.kind is not parameter.VAR_POSITIONAL:
                assert parameter.default is not parameter.empty, (
                    f"{name}(): the required {parameter.name} is missing: {line}"
                )
        checked += 1
    assert checked >= 12  # the call table, get_or_set, cached, leader


def test_from_a_clone_lists_the_apt_packages_scripts_test_installs() -> None:
    """README's "From a clone" names exactly the Debian packages scripts/test installs."""
    with open(os.path.join(ROOT, "scripts", "test")) as f:
        installed = set(re.findall(r"missing\+=\(([\w.+-]+)\)", f.read()))
    assert installed, "scripts/test installs no apt package any more: update this test"
    readme = _readme()
    start = readme.index("### From a clone of the repository")
    section = readme[start : readme.index("<!-- quickstart-end -->", start)]
    listed = re.search(
        r"installs,\s+where\s+they\s+are\s+missing,\s+(.*?)\s+with\s+apt", section, re.S
    )
    assert listed, "the README no longer says which apt packages scripts/test installs"
    assert set(re.findall(r"`([\w.+-]+)`", listed.group(1))) == installed


def _doc(*path: str) -> str:
    with open(os.path.join(ROOT, "docs", *path)) as f:
        return f.read()


def test_limiter_page_gives_what_flask_limiter_commands_need() -> None:
    """limiter.md's `flask limiter limits` carries --key, and the page installs the
    Flask-Limiter extra whose requirements the commands import (read from its metadata)."""
    from importlib import metadata

    page = _doc("integrations", "limiter.md")
    commands = re.findall(r"`(flask limiter limits[^`]*)`", page)
    assert commands and all("--key" in c for c in commands), commands
    import flask_limiter.commands as commands_module

    with open(str(commands_module.__file__)) as f:
        imported = set(re.findall(r"^\s*(?:from|import) (\w+)", f.read(), re.M))
    requirements = metadata.requires("Flask-Limiter") or []

    def name(requirement: str) -> str:
        return re.split(r"[ <>=!~;\[]", requirement)[0].lower()

    # What the commands import beyond Flask-Limiter's own requirements comes with an extra
    # (cli, from Flask-Limiter 4.1); where they need none (4.0), the page's extra is harmless.
    always = {name(r) for r in requirements if "extra ==" not in r}
    extras = {
        extra
        for requirement in requirements
        for extra in re.findall(r"extra == ['\"](\w+)['\"]", requirement)
        if name(requirement) in imported - always
    }
    assert "Flask-Limiter[cli]" in page
    if extras:
        assert any(f"Flask-Limiter[{extra}]" in page for extra in extras), extras


def test_limiter_page_says_what_a_crash_costs_without_persistence() -> None:
    """limiter.md promises exact limits and says that, without SHAREDSTATE_PERSIST_PATH, a
    state server killed mid-window forgets the counts."""
    page = " ".join(_doc("integrations", "limiter.md").split())
    assert "exact across workers" in page
    assert "without `SHAREDSTATE_PERSIST_PATH`" in page and "killed mid-window" in page


def test_api_page_documents_every_public_name(html: str) -> None:
    """The API page documents every public method and attribute of SharedState and Lock
    (read from the classes), cached()'s key= among them."""
    from flask import Flask

    from flask_sharedstate import SharedState
    from flask_sharedstate.extension import Lock

    page = _page(html, "api.html")
    shared = SharedState(Flask("api_app"))
    for owner, names, path in (
        (SharedState, dir(shared), "flask_sharedstate.SharedState"),
        (Lock, dir(Lock), "flask_sharedstate.extension.Lock"),
    ):
        public = [n for n in names if not n.startswith("_")]
        missing = [n for n in public if f'id="{path}.{n}"' not in page]
        assert not missing, f"docs/api.rst leaves out {owner.__name__}: {missing}"
    cached = _text(page)[_text(page).index("cached(") :][:2000]
    assert "key" in cached and "the key to cache under" in cached


def test_environment_variables_are_given_with_from_prefixed_env() -> None:
    """Wherever the README or docs set FLASK_SHAREDSTATE_* variables, the same paragraph
    says they need app.config.from_prefixed_env() (Flask reads none by itself)."""
    pages = {"README.md": _readme()}
    for folder in ("docs", os.path.join("docs", "integrations")):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".md"):
                with open(os.path.join(ROOT, folder, name)) as f:
                    pages[os.path.join(folder, name)] = f.read()
    found = 0
    for name, text in pages.items():
        for paragraph in re.split(r"\n\s*\n", text):
            if "FLASK_SHAREDSTATE_" in paragraph:
                found += 1
                assert "from_prefixed_env()" in paragraph, f"{name}: {paragraph[:200]}"
    assert found >= 2


def test_leadership_snippet_runs_as_written() -> None:
    """leadership.md's scheduler snippet runs as written (no name left undefined): its job
    runs under shared.leader() once the app has the snippet's SharedState; the page installs
    APScheduler in the range the tests run (pyproject.toml)."""
    from flask import Flask

    page = _doc("integrations", "leadership.md")
    block = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    namespace: dict[str, Any] = {}
    exec(compile(block, "leadership.md", "exec"), namespace)
    runs: list[int] = []
    namespace["delete_expired_rows"] = lambda: runs.append(1)
    app = Flask("leadership_app")
    app.config["SHAREDSTATE_BACKEND"] = "memory"
    namespace["shared"].init_app(app)
    try:
        namespace["cleanup"](app)  # a NameError if the snippet leaves a name undefined
    finally:
        for leadership in app.extensions["sharedstate"].leaders.values():
            leadership.stop()
    assert runs == [1]
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pinned = re.search(r'"(APScheduler[^"]*)"', f.read())
    assert pinned and f'pip install "{pinned.group(1)}"' in page
