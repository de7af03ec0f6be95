"""The current Flask app context, found in one call on a cached read's path.

A read that the read cache answers costs under a microsecond, and Flask's
public way to find the current app context (the ``flask.globals.app_ctx``
proxy) would add a quarter to it. Flask keeps the context in
a context variable, ``flask.globals._cv_app`` (Flask 2.2 and later), which is
private to Flask: this module is the one place that reads it, only where it is
there, and takes the public way everywhere else. Both give the same answer;
the suite runs both (``tests/test_app_context.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask.globals import app_ctx


def public_context(default: Any) -> Any:
    """The current :class:`~flask.ctx.AppContext`, or ``default``: Flask's public way."""
    try:
        return app_ctx._get_current_object()  # type: ignore[attr-defined]
    except RuntimeError:  # "Working outside of application context"
        return default


#: ``current_context(None)``: the current :class:`~flask.ctx.AppContext`, or None.
current_context: Callable[[Any], Any]

try:
    from flask.globals import _cv_app
except ImportError:  # a Flask without it
    current_context = public_context
    FAST = False
else:
    current_context = _cv_app.get  # a C method: no Python frame on the read's path
    FAST = True
