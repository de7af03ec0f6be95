"""The operation catalogue is the one list of what a backend implements."""

from __future__ import annotations

import inspect

import pytest

from flask_sharedstate.backends.redis import RedisBackend
from flask_sharedstate.server import catalogue
from flask_sharedstate.server.store import OPERATIONS, Session


@pytest.mark.parametrize("name", sorted(catalogue.OPERATIONS))
def test_every_backend_implements_every_operation(name: str) -> None:
    """The store (memory and manager) and Redis each have every catalogued operation."""
    assert callable(getattr(Session, name))
    assert OPERATIONS[name] is getattr(Session, name)
    assert callable(getattr(RedisBackend, "op_" + name))


@pytest.mark.parametrize("name", sorted(catalogue.OPERATIONS))
def test_wait_argument_is_named_timeout(name: str) -> None:
    """The argument the catalogue calls a wait is the operation's ``timeout`` parameter."""
    entry = catalogue.OPERATIONS[name]
    if entry.wait is None:
        return
    for function in (getattr(Session, name), getattr(RedisBackend, "op_" + name)):
        parameters = list(inspect.signature(function).parameters)[1:]  # without self
        assert parameters[entry.wait] == "timeout"


def test_no_backend_has_an_operation_outside_the_catalogue() -> None:
    """Operations are added through the catalogue, not on one backend alone."""
    extra = {name[3:] for name in dir(RedisBackend) if name.startswith("op_")} - set(
        catalogue.OPERATIONS
    )
    assert not extra
    assert set(OPERATIONS) == set(catalogue.OPERATIONS)


def test_unknown_operation_is_refused() -> None:
    """lookup() names an operation no backend has."""
    with pytest.raises(ValueError, match="unknown operation 'nope'"):
        catalogue.lookup("nope")
    assert catalogue.lookup("info").read_only
