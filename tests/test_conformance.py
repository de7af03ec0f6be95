"""The API contract, run once for every backend (see the ``backend`` fixture)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import pytest
from flask import Flask

from flask_sharedstate import LockTimeout, SharedState


class Unpicklable:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("no pickling here")


@contextlib.contextmanager
def held_elsewhere(
    app: Any, holding: Callable[[], contextlib.AbstractContextManager[Any]]
) -> Iterator[None]:
    """While the body runs, another thread holds what ``holding()`` enters."""
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with app.app_context(), holding():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert inside.wait(10)
        yield
    finally:
        leave.set()
        thread.join(10)


# -- shared.dict ------------------------------------------------------------------


def mapping_workout(d: MutableMapping[str, Any]) -> list[Any]:
    """Code written against the MutableMapping interface; returns what it saw."""
    seen: list[Any] = []
    d["a"] = 1
    d.update({"b": [2]}, c="three")
    d.update([("e", 5)])
    seen.append(d.setdefault("a", 99))
    seen.append(d.setdefault("d", None))
    seen.append(d.pop("b"))
    seen.append(d.pop("b", "gone"))
    seen.append(d.get("zz", "fallback"))
    del d["e"]
    seen.append(sorted(d.keys()))
    seen.append(sorted(d.items(), key=repr))
    seen.append(sorted(map(repr, d.values())))
    seen.append(("c" in d, "b" in d, len(d), sorted(iter(d))))
    seen.append(d == {"a": 1, "c": "three", "d": None})
    seen.append(dict(d))
    key, value = d.popitem()
    seen.append((key in d, len(d), {"a": 1, "c": "three", "d": None}[key] == value))
    d.clear()
    seen.append((len(d), list(d)))
    return seen


def test_dict_behaves_as_a_mutable_mapping(shared: SharedState) -> None:
    """Code written against collections.abc.MutableMapping sees shared.dict answer
    exactly as a plain dict does."""
    assert isinstance(shared.dict, MutableMapping)
    assert mapping_workout(shared.dict) == mapping_workout({})


def test_set_get_delete(shared: SharedState) -> None:
    """Item assignment, lookup, deletion and KeyError behave as a dict's."""
    d = shared.dict
    d["a"] = {"x": [1, 2]}
    assert d["a"] == {"x": [1, 2]}
    assert "a" in d and "b" not in d
    del d["a"]
    assert "a" not in d
    with pytest.raises(KeyError):
        d["a"]
    with pytest.raises(KeyError):
        del d["a"]


def test_len_iteration_views(shared: SharedState) -> None:
    """len, iteration, keys, values and items see every key once."""
    d = shared.dict
    d.update({"a": 1, "b": "two"}, c=[3])
    assert len(d) == 3
    assert sorted(d) == ["a", "b", "c"]
    assert sorted(d.keys()) == ["a", "b", "c"]
    assert sorted(map(str, d.values())) == ["1", "[3]", "two"]
    assert dict(d.items()) == {"a": 1, "b": "two", "c": [3]}
    assert d == {"a": 1, "b": "two", "c": [3]}
    assert d.copy() == {"a": 1, "b": "two", "c": [3]}


def test_get_setdefault_pop_popitem_clear(shared: SharedState) -> None:
    """The MutableMapping methods keep dict semantics."""
    d = shared.dict
    assert d.get("missing") is None
    assert d.get("missing", 7) == 7
    assert d.setdefault("k", [1]) == [1]
    assert d.setdefault("k", [2]) == [1]
    assert d.pop("k") == [1]
    assert d.pop("k", "gone") == "gone"
    with pytest.raises(KeyError):
        d.pop("k")
    d["only"] = 1
    assert d.popitem() == ("only", 1)
    with pytest.raises(KeyError):
        d.popitem()
    d.update(a=1, b=2)
    d.clear()
    assert len(d) == 0


def test_values_are_copies_outside_atomic(shared: SharedState) -> None:
    """Mutating a value read outside atomic does not change the shared one."""
    shared.dict["cart"] = ["apple"]
    shared.dict["cart"].append("pear")
    assert shared.dict["cart"] == ["apple"]


def test_value_types_round_trip(shared: SharedState) -> None:
    """Numbers, bool, None, bytes, str and containers come back equal and of their type."""
    values = [0, -5, 2**80, 1.5, True, None, b"\x00raw", "text", (1, 2), {"a": {1, 2}}]
    for i, value in enumerate(values):
        shared.dict[f"v{i}"] = value
    for i, value in enumerate(values):
        got = shared.dict[f"v{i}"]
        assert got == value and type(got) is type(value)


def test_non_str_key_is_refused(shared: SharedState) -> None:
    """A non-str key raises TypeError naming the key, and writes nothing."""
    with pytest.raises(TypeError, match="must be str"):
        shared.dict[1] = "x"  # type: ignore[index]
    assert len(shared.dict) == 0


def test_unpicklable_value_writes_nothing(shared: SharedState) -> None:
    """An unpicklable value raises TypeError naming the key; the old value stays."""
    shared.dict["k"] = "old"
    with pytest.raises(TypeError, match="'k'"):
        shared.dict["k"] = Unpicklable()
    with pytest.raises(TypeError, match="'lam'"):
        shared.set("lam", lambda: 1)
    with pytest.raises(TypeError, match="'bad'"):
        shared.set_many({"fine": 1, "bad": Unpicklable()})
    assert shared.dict["k"] == "old"
    assert "fine" not in shared.dict and "lam" not in shared.dict


# -- single-step operations --------------------------------------------------------------


def test_incr(shared: SharedState) -> None:
    """incr counts from 0, by int or float deltas, and returns the new value."""
    assert shared.incr("n") == 1
    assert shared.incr("n", 10) == 11
    assert shared.incr("n", -1) == 10
    assert shared.incr("f", 0.5) == 0.5
    assert shared.dict["n"] == 10


def test_incr_refuses_non_numbers(shared: SharedState) -> None:
    """incr on a non-number value, or with a non-number delta, raises TypeError."""
    shared.dict["s"] = "text"
    with pytest.raises(TypeError, match="'s'"):
        shared.incr("s")
    with pytest.raises(TypeError):
        shared.incr("n", "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        shared.incr("n", True)
    assert shared.dict["s"] == "text" and "n" not in shared.dict


def test_get_many_set_many(shared: SharedState) -> None:
    """get_many and set_many read and write several keys at once."""
    shared.set_many({"a": 1, "b": [2]})
    assert shared.get_many(["a", "b", "c"]) == {"a": 1, "b": [2], "c": None}
    assert shared.get_many(["c"], default=0) == {"c": 0}


def test_setdefault_and_pop(shared: SharedState) -> None:
    """setdefault sets only if absent; pop removes and returns or raises."""
    assert shared.setdefault("k", 1) == 1
    assert shared.setdefault("k", 2) == 1
    assert shared.pop("k") == 1
    assert shared.pop("k", None) is None
    with pytest.raises(KeyError):
        shared.pop("k")


def test_compare_and_set(shared: SharedState) -> None:
    """compare_and_set writes only when the current value equals the expected one."""
    shared.set("flag", "off")
    assert shared.compare_and_set("flag", "off", "on") is True
    assert shared.compare_and_set("flag", "off", "broken") is False
    assert shared.get("flag") == "on"
    shared.set("n", 3)
    assert shared.compare_and_set("n", 3, 4) is True
    assert shared.compare_and_set("absent", None, 1) is False
    assert shared.get("n") == 4


def test_compare_and_set_compares_values_as_python_does(shared: SharedState) -> None:
    """compare_and_set matches a value == expected whatever its pickle, in and out of atomic."""
    shared.set("d", {"b": 2, "a": 1})  # equal to {"a": 1, "b": 2}, but pickled otherwise
    assert shared.compare_and_set("d", {"a": 1, "b": 2}, "swapped") is True
    assert shared.get("d") == "swapped"
    shared.set("flag", 1)
    assert shared.compare_and_set("flag", True, 2) is True  # 1 == True, as in Python
    assert shared.compare_and_set("flag", [2], 3) is False
    assert shared.get("flag") == 2
    shared.set("d", {"b": 2, "a": 1})
    with shared.atomic():
        assert shared.compare_and_set("d", {"a": 1, "b": 2}, "in a block") is True
    assert shared.get("d") == "in a block"


def test_compare_and_set_matches_equal_values_that_keep_changing(
    app: Flask, shared: SharedState
) -> None:
    """While another thread rewrites a key with equal values pickled two ways, every
    compare_and_set against an equal value succeeds, and none against an unequal one."""
    forms = [{"a": 1, "b": 2}, {"b": 2, "a": 1}]
    shared.set("d", forms[1])
    stop = threading.Event()

    def rewrite() -> None:
        with app.app_context():
            for i in range(5000):
                if stop.is_set():
                    return
                shared.compare_and_set("d", forms[0], forms[i % 2])

    thread = threading.Thread(target=rewrite)
    thread.start()
    try:
        for i in range(20):
            assert shared.compare_and_set("d", {"b": 2, "a": 1}, forms[i % 2]) is True
        assert shared.compare_and_set("d", forms[0], "done") is True
        # The rewriter's compare_and_set sees "done" and never writes again.
        assert shared.compare_and_set("d", forms[0], 0) is False
    finally:
        stop.set()
        thread.join(30)
    assert shared.get("d") == "done"


def test_ttl_and_expire(shared: SharedState) -> None:
    """Keys with a ttl expire and then behave as absent everywhere."""
    shared.set("short", 1, ttl=30)
    shared.set("long", 2)
    remaining = shared.ttl("short")
    assert remaining is not None and 20 < remaining <= 30  # in seconds, counting down
    assert shared.ttl("long") is None
    assert shared.expire("short", 0.2) is True
    assert shared.expire("long", 0.2) is True
    assert shared.expire("absent", 1) is False
    time.sleep(0.3)  # both deadlines lie at most 0.2 s after the calls returned
    assert "short" not in shared.dict and "long" not in shared.dict
    assert shared.get("short") is None
    assert len(shared.dict) == 0
    with pytest.raises(KeyError):
        shared.ttl("short")


def test_plain_set_clears_ttl_and_incr_keeps_it(shared: SharedState) -> None:
    """As in Redis: a plain set removes the expiry, incr keeps it."""
    shared.set("n", 1, ttl=30)
    shared.incr("n")
    assert shared.ttl("n") is not None
    shared.set("n", 5)
    assert shared.ttl("n") is None
    assert shared.expire("n", None) is True


def test_bad_ttl_is_refused(shared: SharedState) -> None:
    """A ttl that is not a positive number raises ValueError and writes nothing."""
    for bad in (0, -1, "5", True):
        with pytest.raises(ValueError):
            shared.set("k", 1, ttl=bad)  # type: ignore[arg-type]
    assert "k" not in shared.dict


# -- locks -----------------------------------------------------------------------------


def test_global_lock(shared: SharedState) -> None:
    """The global lock works as a context manager and reports its state."""
    assert not shared.lock.locked()
    with shared.lock:
        assert shared.lock.locked()
    assert not shared.lock.locked()


def test_named_locks_are_independent(shared: SharedState) -> None:
    """shared.lock(name) gives independent locks."""
    with shared.lock("cart:1"):
        assert shared.lock("cart:1").locked()
        assert not shared.lock("cart:2").locked()
        assert not shared.lock.locked()


def test_lock_is_not_reentrant(shared: SharedState) -> None:
    """Taking a lock twice from one thread raises instead of deadlocking."""
    with shared.lock:
        with pytest.raises(RuntimeError, match="not reentrant"):
            shared.lock.acquire()


def test_release_unheld_lock(shared: SharedState) -> None:
    """Releasing a lock that is not held raises RuntimeError."""
    with pytest.raises(RuntimeError, match="not held"):
        shared.lock("x").release()


def test_lock_timeout(app, shared: SharedState) -> None:  # type: ignore[no-untyped-def]
    """A lock held elsewhere raises LockTimeout after the timeout, not later."""
    with held_elsewhere(app, lambda: shared.lock("busy")):
        assert shared.lock("busy").acquire(blocking=False) is False
        start = time.monotonic()
        with pytest.raises(LockTimeout, match="busy"):
            shared.lock("busy").acquire(timeout=0.3)
        # It waited the timeout, and not for ever (the app's SHAREDSTATE_TIMEOUT is 3).
        assert 0.3 <= time.monotonic() - start < 10
    assert shared.lock("busy").acquire(timeout=1)
    shared.lock("busy").release()


def test_lock_serialises_threads(app, shared: SharedState) -> None:  # type: ignore[no-untyped-def]
    """Read-modify-write under the lock from several threads loses nothing."""
    shared.dict["n"] = 0

    def work() -> None:
        with app.app_context():
            for _ in range(50):
                with shared.lock:
                    shared.dict["n"] = shared.dict["n"] + 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert shared.dict["n"] == 200


# -- atomic -------------------------------------------------------------------------------


def test_atomic_writes_back_nested_edits(shared: SharedState) -> None:
    """Inside atomic, nested edits to values read are written back at exit."""
    shared.dict["cart"] = {"items": ["apple"]}
    with shared.atomic():
        shared.dict["cart"]["items"].append("pear")
        assert shared.dict["cart"]["items"] == ["apple", "pear"]
    assert shared.dict["cart"] == {"items": ["apple", "pear"]}


def test_atomic_decorator_forms(shared: SharedState) -> None:
    """@shared.atomic, @shared.atomic(timeout=...) and with shared.atomic() all work."""

    @shared.atomic
    def add(item: str) -> int:
        shared.dict.setdefault("list", []).append(item)
        return len(shared.dict["list"])

    @shared.atomic(timeout=2)
    def add_twice(item: str) -> None:
        add(item)
        add(item)

    assert add.__name__ == "add"
    assert add("a") == 1
    add_twice("b")
    assert shared.dict["list"] == ["a", "b", "b"]


def test_atomic_rolls_back_on_exception(shared: SharedState) -> None:
    """A block that raises writes nothing: not its sets, deletes, incrs or nested edits."""
    shared.dict.update(cart=["apple"], n=1, keep="me")
    with pytest.raises(ZeroDivisionError):
        with shared.atomic():
            shared.dict["cart"].append("pear")
            shared.dict["new"] = 1
            del shared.dict["keep"]
            shared.incr("n")
            raise ZeroDivisionError
    assert shared.dict == {"cart": ["apple"], "n": 1, "keep": "me"}


def test_atomic_sees_its_own_writes(shared: SharedState) -> None:
    """Inside a block, reads, len, iteration and incr see the block's own changes."""
    shared.dict.update(a=1, b=2)
    with shared.atomic():
        shared.dict["c"] = 3
        del shared.dict["a"]
        assert shared.incr("b", 5) == 7
        assert "a" not in shared.dict
        assert sorted(shared.dict) == ["b", "c"]
        assert len(shared.dict) == 2
        assert shared.get_many(["b", "c"]) == {"b": 7, "c": 3}
        assert shared.compare_and_set("c", 3, 30) is True
    assert shared.dict == {"b": 7, "c": 30}


def test_nested_atomic_joins_outer(shared: SharedState) -> None:
    """An inner block's writes are committed or dropped with the outer block."""
    with pytest.raises(ValueError):
        with shared.atomic():
            with shared.atomic():
                shared.dict["inner"] = 1
            assert shared.dict["inner"] == 1
            raise ValueError
    assert "inner" not in shared.dict


def test_atomic_bad_value_writes_nothing(shared: SharedState) -> None:
    """A value that cannot be stored fails the whole block: nothing is written."""
    shared.dict["a"] = [1]
    with pytest.raises(TypeError, match="'a'"):
        with shared.atomic():
            shared.dict["b"] = 2
            shared.dict["a"].append(Unpicklable())
    assert shared.dict == {"a": [1]}
    # The block released its claim: others can write again at once.
    shared.dict["a"] = [2]


def test_atomic_keeps_ttl_of_edited_values(shared: SharedState) -> None:
    """Editing a value inside atomic keeps its expiry; a plain set inside clears it."""
    shared.set("session", {"n": 0}, ttl=30)
    shared.set("other", 1, ttl=30)
    with shared.atomic():
        shared.dict["session"]["n"] += 1
        shared.dict["other"] = 2
    assert shared.get("session") == {"n": 1}
    assert shared.ttl("session") is not None
    assert shared.ttl("other") is None


def test_atomic_serialises_threads(app, shared: SharedState) -> None:  # type: ignore[no-untyped-def]
    """Atomic appends from several threads, racing plain incr, lose nothing."""
    shared.dict["items"] = []

    def append(worker: int) -> None:
        with app.app_context():
            for i in range(25):
                with shared.atomic():
                    shared.dict["items"].append((worker, i))
                    shared.incr("n")
                shared.incr("n")

    threads = [threading.Thread(target=append, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(map(tuple, shared.dict["items"]))) == 100
    assert shared.dict["n"] == 200


def test_atomic_timeout(app, shared: SharedState) -> None:  # type: ignore[no-untyped-def]
    """A block that cannot start within its timeout raises LockTimeout."""
    shared.dict["k"] = 0

    @contextlib.contextmanager
    def block_that_read_k() -> Iterator[None]:
        with shared.atomic():
            shared.dict["k"]
            yield

    with held_elsewhere(app, block_that_read_k):
        with pytest.raises(LockTimeout):
            with shared.atomic(timeout=0.2):
                shared.dict["k"]


def test_write_to_claimed_key_waits_for_the_block(app, shared: SharedState) -> None:  # type: ignore[no-untyped-def]
    """An incr on a key an open block has read is applied after the block, not lost."""
    shared.dict["n"] = 0
    inside, calling, incremented = threading.Event(), threading.Event(), threading.Event()
    got: list[int] = []

    def other() -> None:
        with app.app_context():
            inside.wait(10)
            calling.set()
            got.append(shared.incr("n"))
            incremented.set()

    thread = threading.Thread(target=other)
    thread.start()
    with shared.atomic():
        shared.dict["n"] = shared.dict["n"] + 10
        inside.set()
        assert calling.wait(10)  # the incr is on its way while the block is open
        assert not incremented.wait(0.5)  # and it waits for us
    thread.join(10)
    assert got == [11]  # applied after the block's write, on top of it
    assert shared.dict["n"] == 11


#: A single-step write, what it answers after a block changed "k" from 0 to 10 (or, for
#: expire, deleted it), and what "k" holds after both.
WRITES_AFTER_BLOCK: dict[str, tuple[Callable[[SharedState], Any], Any, Any]] = {
    "set": (lambda s: s.set("k", 5), None, 5),
    "set_many": (lambda s: s.dict.update({"k": 5, "other": 1}), None, 5),
    "delete": (lambda s: s.delete("k"), True, None),
    "pop": (lambda s: s.dict.pop("k", None), 10, None),
    "setdefault": (lambda s: s.setdefault("k", 99), 10, 10),
    "incr": (lambda s: s.incr("k"), 11, 11),
    "compare_and_set": (lambda s: s.compare_and_set("k", 10, 20), True, 20),
    "expire": (lambda s: s.expire("k", 100), False, None),
}


@pytest.mark.parametrize("op", WRITES_AFTER_BLOCK)
def test_every_write_to_a_claimed_key_waits_for_the_block(
    app, shared: SharedState, op: str
) -> None:  # type: ignore[no-untyped-def]
    """Each single-step write to a key an open block read is applied after the block."""
    write, answer, final = WRITES_AFTER_BLOCK[op]
    shared.set("k", 0)
    inside, calling, done = threading.Event(), threading.Event(), threading.Event()
    got: list[Any] = []

    def other() -> None:
        with app.app_context():
            inside.wait(10)
            calling.set()
            got.append(write(shared))
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        with shared.atomic():
            assert shared.dict["k"] == 0
            if op == "expire":
                del shared.dict["k"]
            else:
                shared.dict["k"] = 10
            inside.set()
            assert calling.wait(10)  # the write is on its way while the block is open
            assert not done.wait(0.5)  # and it waits for the block
    finally:
        inside.set()
        thread.join(10)
    assert got == [answer]  # it saw what the block wrote
    assert shared.get("k") == final


# -- defaults ---------------------------------------------------------------------------------


def test_defaults_set_if_absent(backend: str, run_dir: str) -> None:
    """defaults= sets absent keys and never resets live ones."""
    from conftest import make_app

    app = make_app(backend, run_dir, name="defaults_app")
    shared = SharedState(app, defaults={"hits": 0, "flags": {"new_ui": False}})
    try:
        assert shared.dict["hits"] == 0
        shared.incr("hits", 5)
        # A second process of the same app (modelled by a second backend
        # instance on the same address) must not reset it.
        if backend == "manager":
            app2 = make_app(backend, run_dir, name="defaults_app")
            shared2 = SharedState(app2, defaults={"hits": 0, "extra": 1})
            assert shared2.dict["hits"] == 5
            assert shared2.dict["extra"] == 1
            app2.extensions["sharedstate"].backend.close()
        assert shared.dict["hits"] == 5
        assert shared.dict["flags"] == {"new_ui": False}
    finally:
        app.extensions["sharedstate"].backend.close()


def test_deleted_default_stays_deleted(shared: SharedState, app) -> None:  # type: ignore[no-untyped-def]
    """A default the app deleted does not come back when a thread connects anew."""
    app.extensions["sharedstate"].backend.set_defaults([("d", 1)])
    assert shared.dict["d"] == 1
    del shared.dict["d"]
    app.extensions["sharedstate"].backend.close()
    assert "d" not in shared.dict


def test_lock_of_finished_thread_is_released(app, shared: SharedState) -> None:  # type: ignore[no-untyped-def]
    """A thread that ends holding a lock releases it: at once, or on Redis when its
    lease (2 s in these tests) runs out."""

    def take() -> None:
        with app.app_context():
            shared.lock("left").acquire()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(10)
    assert shared.lock("left").acquire(timeout=10)
    shared.lock("left").release()


def test_incr_with_ttl_sets_it_only_on_creation(shared: SharedState) -> None:
    """incr(ttl=...) gives a new key its ttl and leaves an existing key's ttl alone."""
    assert shared.incr("window", ttl=2.0) == 1
    created = time.monotonic()  # the window began before this
    first = shared.ttl("window")
    assert first is not None and first <= 2.0
    time.sleep(0.1)
    assert shared.incr("window", ttl=2.0) == 2  # within the window (unless stalled 1.9 s)
    second = shared.ttl("window")
    assert second is not None and second < first  # not renewed
    # Past the first window's end: a new window.
    time.sleep(max(0.0, created + 2.0 + 0.1 - time.monotonic()))
    assert shared.incr("window", ttl=2.0) == 1
    shared.set("plain", 5)
    shared.incr("plain", ttl=10)
    assert shared.ttl("plain") is None
    with shared.atomic():
        assert shared.incr("in_block", ttl=30) == 1
    remaining = shared.ttl("in_block")
    assert remaining is not None and 20 < remaining <= 30


def test_float_incr_rounds_as_python_does(shared: SharedState) -> None:
    """Float increments give exactly what Python's float addition gives."""
    for start, delta in ((2.0**53, 0.5), (0.1, 0.2), (1e300, 1e300), (7, 0.1), (-2.5, 2.5)):
        shared.set("f", start)
        assert shared.incr("f", delta) == start + delta
        assert shared.get("f") == start + delta and type(shared.get("f")) is float
