"""The ``redis`` backend: the same operations, with the same guarantees, on Redis.

Layout of a namespace ``ns`` (the ``{ns}`` hash tag keeps it in one cluster slot):

* ``{ns}:k:KEY``: a value. ``int`` as decimal text (``incr`` is ``INCRBY``, so
  64-bit), ``float`` as text that always has a ``.``, ``e`` or ``n`` in it (it
  reads back as a float; ``incr`` adds in Lua's doubles, as Python does, where
  ``INCRBYFLOAT``'s long doubles would round differently), anything else as a
  *signed pickle*: the pickle (which always starts with byte ``0x80``) followed
  by 32 bytes of HMAC-SHA256, keyed with the app's key, of the Redis key's name
  and the pickle. A pickle whose signature does not match is refused and never
  unpickled: whoever can write the app's Redis keys cannot run code in its
  workers. Time to live is Redis's.
* ``{ns}:lock:NAME``: a lock, holding its owner's token, with a lease (``PX``)
  so that a dead holder's lock expires; released only by its own token. While
  a live process holds it, one thread per process renews the lease.
* ``{ns}:txn``: the namespace's atomic block, a hash of its ``owner`` token (one
  per block) and a ``c:KEY`` field for each key it has read (claimed), expiring
  with the lease. Every single-step write is a Lua script (``redis_scripts.py``)
  that first checks the claims, exactly as the state server's store does, so
  writes to a claimed key wait and nothing is lost. A block whose commit or
  abort failed (Redis unreachable: nothing tells Redis, as a closed connection
  tells the state server) is aborted again by the lease-renewal thread, and by
  this process's next write that a claim holds up, until it succeeds or the
  lease has run out anyway: its claims end once Redis answers, not a lease later.
* ``{ns}:defaults``: the names of the ``defaults=`` already applied. Defaults
  are applied on every new connection: a restarted (empty) Redis gets them
  back before the first command that follows, and a default deleted later is
  not set again.

A *session* is a token per thread and process, as a connection is for the
state server; each of its atomic blocks is that token and a count. Nothing
here imports the extension; ``redis`` is imported only when this backend is
chosen.

Time bound: every reply is awaited at most ``SHAREDSTATE_TIMEOUT`` (the socket
timeout), and so is connecting. An operation is one reply on an open
connection; a lock or atomic wait adds the wait asked for.
"""

from __future__ import annotations

import hmac
import os
import pickle
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import AtomicBlockLost, ConfigError, LockNotOwned, LockTimeout
from ..server.catalogue import OPERATIONS
from .base import Backend, Packed, unpack
from .redis_client import connect, redact, redis_version, refused, unavailable
from .redis_packing import pack, packs_like
from .redis_scripts import SCRIPTS

#: Bytes of HMAC-SHA256 after each pickle.
SIGNATURE_SIZE = 32


class _Session:
    """One thread's token, as a connection is for the state server.

    What a session holds when its thread or process ends is given back when
    the lease runs out: Redis cannot tell that a client is gone.
    """

    __slots__ = ("token", "pid", "held", "blocks", "block")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.token = f"{self.pid}-{uuid.uuid4().hex}"
        #: names of the locks this thread took and has not released (some may be lost)
        self.held: set[str] = set()
        #: atomic blocks begun; the open one's token (None: none open)
        self.blocks = 0
        self.block: str | None = None

    def begin(self) -> str:
        """A new atomic block's token: never the owner of an earlier block's claims,
        so aborting a failed block again can never drop a later block's. (It becomes
        the open block once its first read succeeds: one that failed, say held up by
        another task's block on this thread, must not take that block's abort.)"""
        self.blocks += 1
        return f"{self.token}.{self.blocks}"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else str(max(1, int(seconds * 1000)))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


#: The longest pause, in seconds, between a get_or_set waiter's polls for the value.
CLAIM_POLL = 0.05

#: Seconds between aborts of failed atomic blocks (orphans), while there are some.
ORPHAN_RETRY = 1.0


class _LeaseRenewer:
    """Renews the leases of the locks this process holds, and drops the claims of
    its failed atomic blocks, from one daemon thread.

    A lock is renewed (back to the full lease, every third of it) while the
    thread that took it is alive and has not released it; a lock whose holder
    thread ended, or that was lost, is dropped. A process that dies or stops
    renews nothing, so its locks expire after the lease as before. Failed
    renewals (Redis unreachable) are tried again at the next tick; a holder
    whose lease ran out meanwhile learns it from ``release`` (LockNotOwned).

    An *orphan* is an atomic block whose read, commit or abort failed (Redis
    unreachable, or no answer): its claims may still be in Redis. It is aborted
    at once, then every second (and by :meth:`flush`), until the lease it could
    have taken has run out: aborting again is a no-op, as each block has a token
    of its own, and it also drops the claims of a first read that was still on
    its way (Redis stopped) when the first abort arrived.
    """

    def __init__(
        self,
        renew: Callable[[list[tuple[str, str]]], list[bool]],
        abort: Callable[[list[str]], Any],
        lease: float,
    ) -> None:
        self._renew = renew
        self._abort = abort
        self._lease = lease
        self._interval = lease / 3
        self._reset()

    def _reset(self) -> None:
        # Also after fork: the parent's thread, locks and entries are not the child's.
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._held: dict[tuple[str, str], threading.Thread] = {}
        #: token of a failed atomic block -> when its claims have expired anyway
        self._orphans: dict[str, float] = {}
        self._urgent = False  # an orphan to abort at once
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="flask-sharedstate lease renewal", daemon=True
            )
            self._thread.start()

    def add(self, key: str, token: str) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            self._held[(key, token)] = threading.current_thread()
            self._start()

    def orphan(self, token: str) -> None:
        """The atomic block ``token`` failed and may still claim keys: abort it."""
        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            # Its claims were last given the lease before now: gone by then anyway.
            self._orphans[token] = time.monotonic() + self._lease
            self._urgent = True
            self._start()
            self._cond.notify()

    def flush(self) -> None:
        """Abort the orphans now, from the caller's thread (its write was held up)."""
        if not self._orphans or self._pid != os.getpid():
            return
        with self._cond:
            tokens = list(self._orphans)
        try:
            self._abort(tokens)
        except Exception:  # noqa: S110 - Redis unreachable: the thread tries again
            pass

    def discard(self, key: str, token: str) -> None:
        if self._pid != os.getpid():
            self._reset()
        with self._cond:
            self._held.pop((key, token), None)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                if not self._urgent:
                    cond.wait(
                        min(self._interval, ORPHAN_RETRY) if self._orphans else self._interval
                    )
                self._urgent = False
                now = time.monotonic()
                for token, deadline in list(self._orphans.items()):
                    if deadline <= now:
                        del self._orphans[token]
                for item, thread in list(self._held.items()):
                    if not thread.is_alive():
                        del self._held[item]
                if not self._held and not self._orphans:
                    self._thread = None
                    return
                batch = list(self._held)
                orphans = list(self._orphans)
            if batch:  # (first: a lock's lease matters more than a claim's)
                try:
                    renewed = self._renew(batch)
                except Exception:  # Redis unreachable: try again next tick
                    renewed = [True] * len(batch)
                with cond:
                    for item, ok in zip(batch, renewed, strict=True):
                        if not ok:
                            self._held.pop(item, None)
            if orphans:
                try:
                    self._abort(orphans)
                except Exception:  # noqa: S110 - Redis unreachable: try again next tick
                    pass


class RedisBackend(Backend):
    name = "redis"

    def __init__(
        self,
        url: str,
        namespace: str,
        timeout: float,
        lease: float,
        key: bytes | None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import redis
        except ImportError:
            raise ConfigError(
                "SHAREDSTATE_BACKEND = 'redis' needs the redis client:"
                " pip install 'Flask-SharedState[redis]'"
            ) from None
        if not key:
            raise ConfigError(
                "SHAREDSTATE_BACKEND = 'redis' signs the values it stores, so that whoever"
                " can write to Redis cannot run code in the app: set SHAREDSTATE_KEY (e.g."
                " secrets.token_hex(32)), or SECRET_KEY, to the same value on every machine"
                " of the app."
            )
        self._redis = redis
        from redis.sentinel import MasterNotFoundError

        #: errors after which not even a read is sent again
        self._final = (redis.TimeoutError, redis.AuthenticationError, MasterNotFoundError)
        self.address = redact(url)
        self._namespace = namespace
        self._timeout = timeout
        self._lease = lease
        self._lease_ms = _ms(lease)
        self._sign_key = hmac.digest(key, b"flask-sharedstate redis values", "sha256")
        self.client: Any
        # No silent retries: a write whose reply was lost must not be applied twice.
        # Each reply, and connecting, is bounded by the timeout; new connections
        # apply the defaults (_connected) before their first command.
        self.client = connect(url, options or {}, timeout, self._connected)
        tag = "{" + namespace + "}:"
        self._prefix = tag + "k:"
        self._lock_prefix = tag + "lock:"
        self._txn = tag + "txn"
        self._applied = tag + "defaults"
        self._scripts = {name: self.client.register_script(body) for name, body in SCRIPTS.items()}
        #: one server's connection pool, for the direct path (_send); None: a cluster
        self._pool: Any = None
        #: whether _send packs commands itself (redis_packing); None: not checked yet
        self.packed: bool | None = None
        self._get_connection: Callable[[], Any] = lambda: None
        if isinstance(self.client, redis.Redis):
            pool = self._pool = self.client.connection_pool
            if redis_version() < (5, 3):  # (the command's name is required there, unused)
                self._get_connection = lambda: pool.get_connection("EVALSHA")
            else:  # (and deprecated since: redis-py warns of any argument)
                self._get_connection = pool.get_connection
        self._local = threading.local()
        self._defaults: list[tuple[str, Packed]] = []
        self._renewer = _LeaseRenewer(self._renew, self._abort_blocks, lease)

    # -- the interface ---------------------------------------------------------

    def set_defaults(self, defaults: list[tuple[str, Packed]]) -> None:
        # Applied by every new connection (none is open at init_app): see _connected.
        self._defaults = list(defaults)
        self.close()

    def close(self) -> None:
        if isinstance(self.client, self._redis.Redis):
            self.client.connection_pool.disconnect()
        else:  # a cluster: every node's connections
            self.client.disconnect()

    def call(self, op: str, *args: Any) -> Any:
        entry = OPERATIONS.get(op)
        if entry is None:
            raise ValueError(f"unknown operation {op!r}")
        method = getattr(self, "op_" + op)
        redis = self._redis
        for attempt in (1, 2):
            try:
                return method(*args)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # A read is safe to send again, on a new connection, after a dropped
                # one (Redis restarting); not after a timeout: that would double it.
                # (Nor after refused credentials, nor after every sentinel was asked.)
                if attempt == 1 and entry.read_only and not isinstance(exc, self._final):
                    continue
                raise unavailable(exc, self.address, op, self._timeout, self._namespace) from None
            except redis.ResponseError as exc:
                if not refused(exc):  # an ACL user's missing permission
                    raise
                raise unavailable(exc, self.address, op, self._timeout, self._namespace) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- connections ------------------------------------------------------------------

    def _connected(self, connection: Any) -> None:
        """The hook for a new connection, after redis-py's handshake: apply the defaults.

        A connection is new after Redis restarted (redis-py reconnects without a
        word), so the defaults come back before the first command that needs
        them. They are set only where absent and never twice (``{ns}:defaults``),
        so applying them on every new connection costs one round trip and no reset.
        """
        self._apply_defaults(connection)

    def _apply_defaults(self, connection: Any) -> None:
        """Apply the defaults on a new connection (after its handshake)."""
        if not self._defaults:
            return
        items = self._defaults
        keys = [self._txn, self._applied, *[self._key(k) for k, _ in items]]
        args = [*[k for k, _ in items], *[self._encode(k, v) for k, v in items]]
        try:
            # On this connection itself: the pool would open another one (and recurse).
            self._poll(
                lambda: _raw_eval(connection, SCRIPTS["apply_defaults"], keys, args),
                "apply_defaults",
                None,
                flush=False,  # (the pool would open another connection, and recurse)
            )
        except (self._redis.exceptions.AskError, self._redis.exceptions.TryAgainError):
            # A cluster node that does not own the namespace's slot (MOVED), or not
            # all of it any more (ASK, TRYAGAIN: a migration, so the defaults were
            # applied before and move with the slot): the slot owner's connections
            # apply them.
            return
        except BaseException:
            # (Also CLUSTERDOWN, from the owner just after it restarted, maybe empty:
            # not a connection to keep without the defaults. The command that opened
            # it was not run; the cluster client sends it again until the timeout.)
            connection.disconnect()
            raise

    # -- sessions and script calls ----------------------------------------------

    def _session(self) -> _Session:
        session: _Session | None = getattr(self._local, "session", None)
        if session is None or session.pid != os.getpid():  # a forked child is another
            session = self._local.session = _Session()
        return session

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _eval(self, name: str, keys: list[str], args: Any) -> Any:
        """Run a script: one EVALSHA; loaded first only when Redis answers NOSCRIPT.

        On one server, EVALSHA is sent on a pooled connection (:meth:`_send`);
        on a cluster it goes to ``execute_command``, as redis-py's
        ``Script.__call__`` does after its per-call copies and checks.
        """
        script = self._scripts[name]
        if self._pool is None:
            command: Any = self.client.execute_command
            try:
                return command("EVALSHA", script.sha, len(keys), *keys, *args)
            except self._redis.exceptions.NoScriptError:  # a new, restarted or flushed Redis
                self.client.script_load(script.script)
                return command("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return self._send("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._redis.exceptions.NoScriptError:  # a new, restarted or flushed Redis
            self.client.script_load(script.script)  # (its SHA1 is the same)
            return self._send("EVALSHA", script.sha, len(keys), *keys, *args)

    def _send(self, *command: Any) -> Any:
        """One command on a connection of the pool: its reply, as read.

        What redis-py's ``execute_command`` does, without what it adds for
        commands the backend does not send (retries: there are none; reply
        callbacks; per-command metrics). The pool's ``get_connection`` is kept
        whole: fork safety (a child opens its own connections), Sentinel's
        master discovery, and its check that an idle connection has nothing to
        read (else it reconnects), which also notices one that Redis closed
        (a restart) before a write is sent on it. A connection that failed in
        any way but a Redis error reply (whose reply was read whole) is
        disconnected before it goes back to the pool: no later command can
        read a reply that was not its own.

        The command is packed by :func:`~.redis_packing.pack` where it writes what
        redis-py's packer would (:attr:`packed`), else by redis-py.
        """
        pool = self._pool
        connection = self._get_connection()
        try:
            packed = self.packed
            if packed is None:  # (once: on a live connection of the installed redis-py)
                packed = self.packed = packs_like(connection)
            if packed:
                connection.send_packed_command((pack(command),))
            else:
                connection.send_command(*command)
            return connection.read_response()
        except self._redis.ResponseError:
            raise
        except BaseException:
            connection.disconnect()
            raise
        finally:
            pool.release(connection)

    def _run(self, name: str, keys: list[str], args: Any, timeout: float | None = None) -> Any:
        """Run a script; while it answers 'blocked', wait and try again until the timeout."""
        return self._poll(lambda: self._eval(name, keys, args), name, timeout)

    def _poll(
        self,
        send: Callable[[], Any],
        name: str,
        timeout: float | None,
        reply: Any = None,
        flush: bool = True,
    ) -> Any:
        """``send()`` until its reply is not ``{'blocked'}``; ``reply``: a first one, if had.

        Held up, it first aborts this process's failed blocks (whose claims may be
        what holds it up) rather than wait for the lease-renewal thread to.
        """
        deadline = None
        pause = 0.001
        wait = self._timeout if timeout is None else timeout
        if reply is None:
            reply = send()
        while type(reply) is list and reply[0] == b"blocked":
            now = time.monotonic()
            if deadline is None:
                deadline = now + wait
                if flush:
                    self._renewer.flush()
            if now >= deadline:
                what = "an atomic block" if name.startswith("txn") else "a write to a key"
                raise LockTimeout(f"{what} held by an atomic block waited {wait:g}s")
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.05)
            reply = send()
        return reply

    def _write(self, name: str, keys: list[str], *args: Any) -> Any:
        """A single-step write: its script's answer, a value (never a table).

        The scripts answer a table only to refuse: ``{'blocked'}`` (an atomic
        block claims a key: wait and send it again, as the store waits on its
        condition), or an error of ``incr``. One EVALSHA when nothing is claimed.
        """
        keys = [self._txn, *keys]
        reply = self._eval(name, keys, args)
        if type(reply) is not list:
            return reply
        reply = self._poll(lambda: self._eval(name, keys, args), name, None, reply)
        if type(reply) is not list:
            return reply
        if reply[0] == b"TypeError":
            raise TypeError(
                f"cannot incr key {keys[1][len(self._prefix) :]!r}: not an int or float"
            )
        if reply[0] == b"ValueError":
            raise ValueError(
                f"cannot incr key {keys[1][len(self._prefix) :]!r}: Redis integers are 64-bit,"
                " and the result would not fit"
            )
        raise AssertionError(f"unexpected answer of script {name!r}: {reply!r}")

    def _scan(self) -> list[str]:
        match = _glob_escape(self._prefix) + "*"
        cut = len(self._prefix)
        return [k.decode()[cut:] for k in self.client.scan_iter(match=match, count=1000)]

    # -- values: numbers as text, anything else a signed pickle ---------------------

    def _signature(self, key: str, pickle: bytes) -> bytes:
        name = self._key(key).encode()
        message = len(name).to_bytes(4, "big") + name + pickle
        return hmac.digest(self._sign_key, message, "sha256")

    def _encode(self, key: str, value: Packed) -> bytes:
        if type(value) is bytes:
            return value + self._signature(key, value)
        if type(value) is float:
            return repr(value).encode()
        return str(value).encode()

    def _decode(self, key: str, raw: Any) -> Packed | None:
        """Undo :meth:`_encode`; None (or b"", absent in a script's reply) is absent.

        :raises ValueError: the value is neither a number nor a pickle signed
            with this app's key for this key; it is not unpickled.
        """
        if raw is None or raw == b"":
            return None
        if type(raw) is int:  # an integer reply, from INCRBY
            return raw
        data = bytes(raw)
        if data[0] == 0x80:
            pickle, signature = data[:-SIGNATURE_SIZE], data[-SIGNATURE_SIZE:]
            if len(data) > SIGNATURE_SIZE and hmac.compare_digest(
                signature, self._signature(key, pickle)
            ):
                return pickle
        else:
            try:
                text = data.decode("ascii")
                return float(text) if any(c in text for c in ".eEn") else int(text)
            except ValueError:
                pass
        raise ValueError(
            f"the value of key {key!r} in Redis ({self.address}, namespace"
            f" {self._namespace!r}) is not signed with this app's key, so it was not"
            " unpickled: something other than this app wrote it (or an app with another"
            " SHAREDSTATE_KEY or SECRET_KEY, or it was copied from another key). Delete the"
            " key, or give every app sharing the namespace the same SHAREDSTATE_KEY."
        )

    # -- the operations (as in server/store.py's Session) -------------------------

    def op_get(self, key: str) -> Packed | None:
        if self._pool is None:
            return self._decode(key, self.client.get(self._key(key)))
        return self._decode(key, self._send("GET", self._prefix + key))

    def op_contains(self, key: str) -> bool:
        return bool(self.client.exists(self._key(key)))

    def op_get_many(self, keys: list[str]) -> list[Packed | None]:
        if not keys:
            return []
        values = self.client.mget([self._key(k) for k in keys])
        return [self._decode(k, v) for k, v in zip(keys, values, strict=True)]

    # set and incr send a ttl only when there is one: one argument fewer to pack
    # and for the script to read.

    def op_set(self, key: str, value: Packed, ttl: float | None = None) -> None:
        if ttl is None:
            self._write("set", [self._key(key)], self._encode(key, value))
        else:
            self._write("set", [self._key(key)], self._encode(key, value), _ms(ttl))

    def op_set_many(self, items: list[tuple[str, Packed]], ttl: float | None = None) -> None:
        if items:
            keys = [self._key(k) for k, _ in items]
            values: list[Any] = [self._encode(k, v) for k, v in items]
            if ttl is not None:
                values.append(_ms(ttl))
            self._write("set", keys, *values)

    def op_delete(self, key: str) -> bool:
        return bool(self._write("delete", [self._key(key)]))

    def op_pop(self, key: str) -> Packed | None:
        return self._decode(key, self._write("pop", [self._key(key)]))

    def op_setdefault(self, key: str, value: Packed, ttl: float | None = None) -> Packed | None:
        reply = self._write("setdefault", [self._key(key)], self._encode(key, value), _ms(ttl))
        return self._decode(key, reply)

    def op_incr(self, key: str, delta: int | float = 1, ttl: float | None = None) -> Packed | None:
        if ttl is None:
            reply = self._write("incr", [self._key(key)], self._encode(key, delta))
        else:
            reply = self._write("incr", [self._key(key)], self._encode(key, delta), _ms(ttl))
        return self._decode(key, reply)

    def op_compare_and_set(self, key: str, expected: Packed, new: Packed) -> bool:
        # Signatures are deterministic: equal pickles are equal signed pickles.
        reply = self._write(
            "compare_and_set",
            [self._key(key)],
            self._encode(key, expected),
            self._encode(key, new),
        )
        return bool(reply)

    def op_expire(self, key: str, seconds: float | None) -> bool:
        return bool(self._write("expire", [self._key(key)], _ms(seconds)))

    def op_ttl(self, key: str) -> float | None:
        remaining = self.client.pttl(self._key(key))
        if remaining == -2:
            raise KeyError(key)
        return None if remaining == -1 else remaining / 1000

    def op_length(self) -> int:
        return len(self._scan())

    def op_keys(self) -> list[str]:
        return self._scan()

    def op_items(self) -> list[tuple[str, Packed]]:
        keys = self._scan()
        values = self.op_get_many(keys)
        return [(k, v) for k, v in zip(keys, values, strict=True) if v is not None]

    def op_clear(self) -> None:
        keys = self._scan()
        for start in range(0, len(keys), 500):
            self._write("delete", [self._key(k) for k in keys[start : start + 500]])

    def op_apply_defaults(self, items: list[tuple[str, Packed]]) -> None:
        keys = [self._txn, self._applied, *[self._key(k) for k, _ in items]]
        args = [*[k for k, _ in items], *[self._encode(k, v) for k, v in items]]
        self._run("apply_defaults", keys, args)

    # -- locks ----------------------------------------------------------------------

    def op_acquire(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pause = 0.001
        key = self._lock_prefix + name
        while True:
            session = self._session()
            status = self._eval("acquire", [key], [session.token, self._lease_ms])[0]
            if status == b"ok":
                session.held.add(name)
                self._renewer.add(key, session.token)
                return True
            if status == b"reentrant":
                raise RuntimeError(
                    f"lock {name!r} is already held by this client; it is not reentrant"
                )
            now = time.monotonic()
            if timeout <= 0:
                return False
            if now >= deadline:
                raise LockTimeout(f"lock {name!r} waited {timeout:g}s")
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.05)

    def op_release(self, name: str) -> None:
        session = self._session()
        key = self._lock_prefix + name
        self._renewer.discard(key, session.token)
        reply = self._eval("release", [key], [session.token])
        held = name in session.held
        session.held.discard(name)
        if reply[0] != b"ok":
            raise self._not_held(name, held)

    def op_extend(self, name: str, additional: float | None = None) -> bool:
        session = self._session()
        extra = "" if additional is None else str(int(additional * 1000))
        key = self._lock_prefix + name
        reply = self._eval("extend", [key], [session.token, self._lease_ms, extra])
        if reply[0] != b"ok":
            self._renewer.discard(key, session.token)
            raise self._not_held(name, name in session.held)
        return True

    # -- get_or_set's single flight ------------------------------------------------

    def op_get_or_claim(self, key: str, lock: str, timeout: float) -> tuple[bool, Packed | None]:
        # Polled, as acquire is: Redis cannot park a request. The pause grows to
        # CLAIM_POLL at most, so a waiter sees the value that long after it is stored.
        deadline = time.monotonic() + timeout
        pause = 0.002
        lock_key = self._lock_prefix + lock
        keys = [self._key(key), lock_key]
        while True:
            session = self._session()
            reply = self._eval("get_or_claim", keys, [session.token, self._lease_ms])
            if type(reply) is not list:
                return True, self._decode(key, reply)
            status = reply[0]
            if status == b"ok":
                session.held.add(lock)
                self._renewer.add(lock_key, session.token)
                return False, None
            if status == b"reentrant":
                raise RuntimeError(
                    f"lock {lock!r} is already held by this client; it is not reentrant"
                )
            now = time.monotonic()
            if now >= deadline:
                raise LockTimeout(f"the value of {key!r} (lock {lock!r}) waited {timeout:g}s")
            # A crowd of waiters spreads its polls out rather than sending them together.
            time.sleep(min(pause * (0.5 + random.random()), deadline - now))
            pause = min(pause * 2, CLAIM_POLL)

    def op_fill(self, key: str, value: Packed, ttl: float | None, lock: str) -> bool:
        session = self._session()
        lock_key = self._lock_prefix + lock
        try:
            reply = self._write(
                "fill",
                [lock_key, self._key(key)],
                session.token,
                self._encode(key, value),
                _ms(ttl),
            )
        finally:
            self._renewer.discard(lock_key, session.token)
            session.held.discard(lock)
        return bool(reply)

    def _not_held(self, name: str, taken: bool) -> RuntimeError:
        if not taken:
            return RuntimeError(f"lock {name!r} is not held by this client")
        return LockNotOwned(
            f"lock {name!r} was no longer held by this client: its lease of"
            f" {self._lease:g}s (SHAREDSTATE_LEASE) ran out before it was renewed (the"
            " process was stopped or could not reach Redis, or Redis restarted), and"
            " another process may have taken it meanwhile. Work done under the lock"
            " may have overlapped with another holder's."
        )

    def _renew(self, batch: list[tuple[str, str]]) -> list[bool]:
        """One round trip for every lock this process holds: renewed, or lost."""
        keys = [key for key, _ in batch]
        reply = self._eval("renew", keys, [self._lease_ms, *[token for _, token in batch]])
        return [bool(ok) for ok in reply]

    def op_locked(self, name: str) -> bool:
        return bool(self.client.exists(self._lock_prefix + name))

    # -- atomic blocks ------------------------------------------------------------------

    def op_txn_read(
        self, keys: list[str], timeout: float, session_id: str | None = None
    ) -> tuple[str, list[Packed | None]]:
        # The block's token, returned as its session id: its own, not the thread's.
        _check_process(session_id)
        session = self._session()
        token = session_id or session.begin()
        data_keys = [self._key(k) for k in keys]
        try:
            reply = self._run(
                "txn_read",
                [self._txn, *data_keys],
                [token, self._lease_ms, session_id or ""],
                timeout,
            )
        except LockTimeout:  # another block held it up: this one claimed nothing more
            raise
        except BaseException:  # the read may have run (its reply lost), or run late
            self._renewer.orphan(token)
            raise
        if reply[0] == b"lost":
            raise _lost()
        try:
            values = [self._decode(k, v) for k, v in zip(keys, reply[1:], strict=True)]
        except BaseException:  # (a value not signed with this app's key)
            if not session_id:  # the caller never learns the token: end the block here
                self._abort_block(token)
            raise
        if not session_id:
            session.block = token
        return token, values

    def op_txn_commit(
        self,
        writes: list[tuple[str, Packed | None, Any]],
        timeout: float,
        session_id: str | None = None,
    ) -> None:
        _check_process(session_id)
        session = self._session()
        if session.block == session_id:
            session.block = None  # ended here, whatever happens
        # A block that read nothing claims nothing, so its token is one no block has.
        args: list[Any] = [session_id or session.token + ".0", session_id or ""]
        for key, value, ttl in writes:
            args.append(b"" if value is None else self._encode(key, value))
            args.append("keep" if ttl == "keep" else _ms(ttl))
        keys = [self._txn, *[self._key(k) for k, _, _ in writes]]
        try:
            reply = self._run("txn_commit", keys, args, timeout)
        except BaseException:
            # Unsent (Redis unreachable), or its reply lost: its claims may be there
            # until the lease. Abort it, once Redis answers: a no-op if it did run, and
            # if it is still on its way, it finds its claims gone and writes nothing.
            if session_id:
                self._renewer.orphan(session_id)
            raise
        if reply[0] == b"lost":
            raise _lost()

    def op_window_acquire(
        self, key: str, limit: int, expiry: float, amount: int, now: float
    ) -> bool:
        # A list of times cannot be signed in Lua: an atomic block of its own, two
        # round trips, with the same claims as any other.
        session = self._session()
        outer = session.block  # (a block of the caller's, if any, is still its own)
        if outer is not None:
            # Inside this thread's open block, which holds the namespace's block slot:
            # a block of its own would wait for it (and take the slot when its lease
            # ran out). The hit joins it and is written now; unlike the store's one-step hit,
            # it claims the limit's key until the block ends (two round trips need it).
            try:
                _, (packed,) = self.op_txn_read([key], self._timeout, outer)
                entries = [] if packed is None else unpack(packed)
                if type(entries) is not list:
                    raise TypeError(f"key {key!r} does not hold a moving window")
                fresh = [t for t in entries if t > now - expiry]
                if len(fresh) + amount > limit:
                    return False
                hits = pickle.dumps([float(now)] * amount + fresh, protocol=pickle.HIGHEST_PROTOCOL)
                args = [outer, self._encode(key, hits), _ms(expiry)]
                if self._eval("txn_set", [self._txn, self._key(key)], args)[0] == b"lost":
                    raise _lost()
            except AtomicBlockLost:
                # That block is over (its lease ran out): no later hit of this thread joins it.
                if session.block == outer:
                    session.block = None
                raise
            return True
        try:
            session_id, (packed,) = self.op_txn_read([key], self._timeout)
            try:
                entries = [] if packed is None else unpack(packed)
                if type(entries) is not list:
                    raise TypeError(f"key {key!r} does not hold a moving window")
                fresh = [t for t in entries if t > now - expiry]
                if len(fresh) + amount > limit:
                    self._abort_block(session_id)
                    return False
                hits = pickle.dumps([float(now)] * amount + fresh, protocol=pickle.HIGHEST_PROTOCOL)
                self.op_txn_commit([(key, hits, float(expiry))], self._timeout, session_id)
                return True
            except BaseException:
                self._abort_block(session_id)
                raise
        finally:
            session.block = outer

    def op_sliding_acquire(
        self, previous: str, current: str, limit: int, amount: int, weight: float, ttl: float
    ) -> bool:
        keys = [self._key(previous), self._key(current)]
        reply = self._run(
            "sliding_acquire", [self._txn, *keys], [limit, amount, repr(weight), _ms(ttl)]
        )
        if reply[0] == b"TypeError":
            raise TypeError(f"key {previous!r} or {current!r} does not hold a counter")
        return bool(reply[1])

    def op_txn_abort(self) -> None:
        session = self._session()
        token, session.block = session.block, None
        if token is not None:  # (else none open, or its first read failed: an orphan)
            self._abort_block(token)

    def _abort_block(self, token: str) -> None:
        try:
            self._abort_blocks([token])
        except BaseException:
            self._renewer.orphan(token)  # dropped once Redis answers
            raise

    def _abort_blocks(self, tokens: list[str]) -> None:
        """Drop the claims of the blocks ``tokens`` (those that still hold any)."""
        self._eval("txn_abort", [self._txn], tokens)


def _raw_eval(connection: Any, script: str, keys: list[str], args: list[Any]) -> Any:
    """EVAL on one connection, bypassing the pool (for the new-connection hook)."""
    connection.send_command("EVAL", script, len(keys), *keys, *args)
    return connection.read_response()


def _check_process(session_id: str | None) -> None:
    """A block's token is its process's (``pid-...``): a child forked inside the block
    must not read, commit or end it, as a child's connection to the state server
    would not (the parent goes on with it)."""
    if session_id and not session_id.startswith(f"{os.getpid()}-"):
        raise AtomicBlockLost(
            "this atomic block was begun by another process (this one was forked inside"
            " it), which still holds it; nothing of it was written here. Begin a block of"
            " this process's own."
        )


def _lost() -> RuntimeError:
    return AtomicBlockLost(  # (a RuntimeError, as this was before)
        "the atomic block lost its claim on the keys it read (its lease ran out:"
        " SHAREDSTATE_LEASE, or Redis restarted); nothing of it was written. Run the"
        " block again, or raise SHAREDSTATE_LEASE above the block's running time."
    )
