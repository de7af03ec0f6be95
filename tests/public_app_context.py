"""A pytest plugin (``-p public_app_context``) that plays a Flask without its private
``flask.globals._cv_app``, so that the tests it runs find the app context the public way."""

from __future__ import annotations

import flask.globals
import pytest

# Flask's own modules hold the variable already; only a later ``from flask.globals import
# _cv_app`` (this package's fast path) finds it gone.
del flask.globals._cv_app


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from flask_sharedstate import app_context

    way = "private _cv_app" if app_context.FAST else "public app_ctx"
    terminalreporter.write_line(f"app context found by: {way}")
