"""The catalogue of store operations: what every backend implements.

One entry per operation of :class:`~.store.Session` (and of the Redis
backend's ``op_<name>`` methods). Backends and the wire protocol read it
instead of keeping lists of their own:

* ``read_only``: the operation changes nothing, so a request whose reply was
  lost may be sent again;
* ``wait``: the index of the argument that is how long the operation may wait
  (for a lock, an atomic block, or a key claimed by one), or None. A client
  bounds the reply by its own timeout plus that wait.

Adding an operation means: an entry here, a method on ``Session``, an
``op_`` method (and script) on the Redis backend. ``tests/test_catalogue.py``
checks that every backend has every operation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Operation:
    name: str
    read_only: bool = False
    #: index of the argument that is a wait timeout, or None
    wait: int | None = None


def _catalogue(*operations: Operation) -> dict[str, Operation]:
    return {op.name: op for op in operations}


#: Every store operation, by name.
OPERATIONS: dict[str, Operation] = _catalogue(
    Operation("get", read_only=True),
    Operation("contains", read_only=True),
    Operation("get_many", read_only=True),
    Operation("set"),
    Operation("set_many"),
    Operation("delete"),
    Operation("pop"),
    Operation("setdefault"),
    Operation("incr"),
    Operation("compare_and_set"),
    Operation("expire"),
    Operation("ttl", read_only=True),
    Operation("length", read_only=True),
    Operation("keys", read_only=True),
    Operation("items", read_only=True),
    Operation("clear"),
    Operation("apply_defaults"),
    Operation("acquire", wait=1),
    Operation("release"),
    Operation("extend"),
    Operation("locked", read_only=True),
    # get_or_set's single flight: a key's value, or its lock (waiting for either), and
    # the value stored only while that lock is still held (then released).
    Operation("get_or_claim", wait=2),
    Operation("fill"),
    Operation("txn_read", wait=1),
    Operation("txn_commit", wait=1),
    Operation("txn_abort"),
    # Rate limits (limiter.py), each one step: a moving window's hit, a sliding-window
    # counter's hit.
    Operation("window_acquire"),
    Operation("sliding_acquire"),
)

#: The state server's own operation (not the store's): its status, for ``flask sharedstate status``.
INFO = Operation("info", read_only=True)

#: The state server's read for the workers' read caches (``backends/client_cache.py``):
#: values with their versions. Not a store operation every backend has: only the
#: state server has a version table (``memory`` is local, Redis has none).
READ_VERSIONED = Operation("read_versioned", read_only=True)

#: The state server's own operations, by name.
SERVER_OPERATIONS: dict[str, Operation] = _catalogue(INFO, READ_VERSIONED)


def lookup(name: str) -> Operation:
    """The catalogue entry of ``name``; ValueError for an operation no backend has."""
    op = OPERATIONS.get(name)
    if op is None:
        op = SERVER_OPERATIONS.get(name)
        if op is None:
            raise ValueError(f"unknown operation {name!r}")
    return op
