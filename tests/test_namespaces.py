"""Two apps on ONE state server (or one Redis), told apart only by SHAREDSTATE_NAMESPACE.

Each app in these tests has the same socket (so the same server and key) or the
same Redis URL; only the namespace differs. Keys, locks and atomic blocks of one
namespace must not touch the other's; with the same namespace they are shared,
which the control half shows (so the test can fail).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_sharedstate import LockTimeout, SharedState

import workers
from conftest import _redis, free_port, server_pids

ctx = multiprocessing.get_context("spawn")


@pytest.fixture(params=["manager", "manager-tcp", "redis"])
def one_server(request: pytest.FixtureRequest, run_dir: str) -> dict[str, Any]:
    """The config every app of the test shares: one socket, one port or one Redis URL."""
    if request.param == "redis":
        request.getfixturevalue("redis_url")
        # A lease longer than the test: the holder's lock and block must not run out.
        return {
            "SHAREDSTATE_BACKEND": "redis",
            "SHAREDSTATE_REDIS_URL": _redis["url"],
            "SHAREDSTATE_LEASE": 60.0,
            "SHAREDSTATE_KEY": "one key for every app of the test",
        }
    config: dict[str, Any] = {
        "SHAREDSTATE_BACKEND": "manager",
        "SHAREDSTATE_SOCKET": os.path.join(run_dir, "shared.sock"),
    }
    if request.param == "manager-tcp":
        config["SHAREDSTATE_PORT"] = free_port()
    return config


@pytest.fixture
def apps() -> Iterator[list[SharedState]]:
    """SharedStates a test makes; their connections are closed at the end."""
    made: list[SharedState] = []
    yield made
    for shared in made:
        shared.state().backend.close()


def app_on(
    made: list[SharedState], config: dict[str, Any], namespace: str, timeout: float
) -> SharedState:
    app = Flask(f"app_{len(made)}")
    app.config.update(config, SHAREDSTATE_NAMESPACE=namespace, SHAREDSTATE_TIMEOUT=timeout)
    shared = SharedState(app)
    made.append(shared)
    return shared


def test_namespaces_on_one_server_do_not_interfere(
    one_server: dict[str, Any], run_dir: str, apps: list[SharedState]
) -> None:
    """Another namespace on the same server sees none of a holder's keys, and is not
    held up by its lock or its open atomic block; the same namespace is."""
    tag = os.path.basename(run_dir)  # Redis is shared by the whole session
    mine, theirs = f"alpha-{tag}", f"beta-{tag}"
    results, leave = ctx.Queue(), ctx.Event()
    holder = ctx.Process(
        target=workers.hold_in_namespace,
        args=({**one_server, "SHAREDSTATE_NAMESPACE": mine}, results, leave),
    )
    holder.start()
    try:
        what, holder_server = results.get(timeout=60)
        assert what == "inside"  # it holds "L" and a block that claimed "k" and "n"

        # The other namespace, on the same server: nothing of the holder's is seen
        # or waited for. (A wait would end in LockTimeout after 5 s, not pass.)
        other = app_on(apps, one_server, theirs, timeout=5.0)
        if holder_server is not None:
            assert workers.server_pid(other) == holder_server
            assert server_pids(run_dir) == [holder_server]
        assert other.get("k") is None and len(other.dict) == 0
        assert other.lock("L").acquire(blocking=False)
        assert other.incr("n") == 1
        with other.atomic(timeout=5.0):
            other.dict["k"] = "theirs"
        assert other.get_many(["k", "n"]) == {"k": "theirs", "n": 1}
        other.lock("L").release()

        # The control: an app with the holder's namespace shares all three.
        same = app_on(apps, one_server, mine, timeout=1.0)
        assert same.get_many(["k", "n"]) == {"k": "mine", "n": 0}
        assert same.lock("L").acquire(blocking=False) is False
        with pytest.raises(LockTimeout):
            same.incr("n")  # "n" is claimed by the holder's block
        with pytest.raises(LockTimeout):
            with same.atomic(timeout=0.5):  # the namespace's block slot is taken
                same.dict["k"]

        other.dict.clear()  # clears its own namespace only
        leave.set()
        what, seen = results.get(timeout=60)
        assert what == "after"
        assert seen == {"k": "mine!", "n": 1}  # the holder's block, untouched by theirs
        assert len(other.dict) == 0
        assert same.get_many(["k", "n"]) == {"k": "mine!", "n": 1}
    finally:
        leave.set()
        holder.join(30)
        if holder.is_alive():
            holder.kill()
            holder.join(10)
    assert holder.exitcode == 0
