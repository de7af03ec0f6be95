"""The ``redis`` backend: the same operations, with the same guarantees, on Redis.

Layout of a namespace ``ns`` (the ``{ns}`` hash tag keeps it in one cluster slot):

* ``{ns}:k:KEY``: a value. ``int`` as decimal text (``incr`` is ``INCRBY``, so
  64-bit), ``float`` as text that always has a ``.``, ``e`` or ``n`` in it (it
  reads back as a float; ``incr`` adds in Lua's doubles, as Python does, where
  ``INCRBYFLOAT``'s long doubles would round differently), anything else as a
  pickle (which always starts with byte ``0x80``). Time to live is Redis's.
* ``{ns}:lock:NAME``: a lock, holding its owner's token, with a lease (``PX``)
  so that a dead holder's lock expires; released only by its own token.
* ``{ns}:txn``: the namespace's atomic block, a hash of its ``owner`` token and
  a ``c:KEY`` field for each key it has read (claimed), expiring with the
  lease. Every single-step write is a Lua script that first checks the claims,
  exactly as the state server's store does, so writes to a claimed key wait
  and nothing is lost.

A *session* is a token per thread and process, as a connection is for the
state server. Nothing here imports the extension; ``redis`` is imported only
when this backend is chosen.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

from ..errors import ConfigError, LockTimeout, SharedStateUnavailable
from ..server.catalogue import OPERATIONS
from .base import Backend, Packed

_BLOCKED_CHECK = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = FIRST, #KEYS do
    if redis.call('HEXISTS', KEYS[1], 'c:' .. KEYS[i]) == 1 then return {'blocked'} end
  end
end
"""


def _script(body: str, first: int = 2) -> str:
    """A single-step write: first answer 'blocked' if an open atomic block claims a key."""
    return _BLOCKED_CHECK.replace("FIRST", str(first)) + body


#: KEYS[1] is always the namespace's atomic block: a hash of its 'owner' token and a
#: 'c:KEY' field for each key it has claimed, expiring with the lease.
SCRIPTS = {
    # KEYS: txn, key...; ARGV: ttl ms or '', value...
    "set": _script("""
for i = 2, #KEYS do
  if ARGV[1] == '' then redis.call('SET', KEYS[i], ARGV[i])
  else redis.call('SET', KEYS[i], ARGV[i], 'PX', ARGV[1]) end
end
return {'ok'}
"""),
    # KEYS: txn, key
    "pop": _script("""
local v = redis.call('GET', KEYS[2])
if v then redis.call('DEL', KEYS[2]) end
return {'ok', v}
"""),
    # KEYS: txn, key; ARGV: value, ttl ms or ''
    "setdefault": _script("""
local v = redis.call('GET', KEYS[2])
if v then return {'ok', v} end
if ARGV[2] == '' then redis.call('SET', KEYS[2], ARGV[1])
else redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return {'ok', ARGV[1]}
"""),
    # KEYS: txn, key; ARGV: delta (as encode() writes it), ttl ms or ''
    "incr": _script("""
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], '0', 'NX', 'PX', ARGV[2]) end
if not string.find(ARGV[1], '[%.eEn]') then
  local r = redis.pcall('INCRBY', KEYS[2], ARGV[1])
  if type(r) == 'number' then
    -- Lua numbers are doubles: past 2^53 return Redis's exact text instead.
    if r < 9007199254740992 and r > -9007199254740992 then return {'ok', r} end
    return {'ok', redis.call('GET', KEYS[2])}
  end
end
local v = redis.call('GET', KEYS[2])
if not v then
  redis.call('SET', KEYS[2], ARGV[1])
  return {'ok', ARGV[1]}
end
local current = string.byte(v, 1) ~= 128 and tonumber(v)
if not current then return {'TypeError'} end
if not string.find(ARGV[1], '[%.eEn]') and not string.find(v, '[%.eEn]') then
  return {'ValueError'}  -- both integers, yet INCRBY failed: past 64 bits
end
-- Float arithmetic in Lua's doubles, as Python does it (INCRBYFLOAT's long
-- doubles round differently), written with enough digits to read back exactly;
-- the text stays one that INCRBYFLOAT and other clients understand.
local r = string.format('%.17g', current + tonumber(ARGV[1]))
if not string.find(r, '[%.eEn]') then r = r .. '.0' end
redis.call('SET', KEYS[2], r, 'KEEPTTL')
return {'ok', r}
"""),
    # KEYS: txn, key; ARGV: expected, new
    "compare_and_set": _script("""
local v = redis.call('GET', KEYS[2])
if not v then return {'ok', 0} end
local same = v == ARGV[1]
if not same and string.byte(v, 1) ~= 128 and string.byte(ARGV[1], 1) ~= 128 then
  same = tonumber(v) ~= nil and tonumber(v) == tonumber(ARGV[1])
end
if not same then return {'ok', 0} end
redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
return {'ok', 1}
"""),
    # KEYS: txn, key; ARGV: ttl ms or ''
    "expire": _script("""
if redis.call('EXISTS', KEYS[2]) == 0 then return {'ok', 0} end
if ARGV[1] == '' then redis.call('PERSIST', KEYS[2])
else redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
return {'ok', 1}
"""),
    # KEYS: txn, key...
    "delete": _script("""
local n = 0
for i = 2, #KEYS do n = n + redis.call('DEL', KEYS[i]) end
return {'ok', n}
"""),
    # KEYS: txn, applied, key...; ARGV: name..., value...
    "apply_defaults": """
local n = #KEYS - 2
local fresh = {}
for i = 1, n do
  if redis.call('SISMEMBER', KEYS[2], ARGV[i]) == 0 then fresh[#fresh + 1] = i end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, i in ipairs(fresh) do
    if redis.call('HEXISTS', KEYS[1], 'c:' .. KEYS[2 + i]) == 1 then return {'blocked'} end
  end
end
for _, i in ipairs(fresh) do
  redis.call('SADD', KEYS[2], ARGV[i])
  redis.call('SET', KEYS[2 + i], ARGV[n + i], 'NX')
end
return {'ok'}
""",
    # KEYS: lock; ARGV: token, lease ms
    "acquire": """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return {'reentrant'} end
if v then return {'busy'} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {'ok'}
""",
    # KEYS: lock; ARGV: token
    "release": """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'notheld'} end
redis.call('DEL', KEYS[1])
return {'ok'}
""",
    # KEYS: txn, key...; ARGV: token, lease ms, session id or ''
    "txn_read": """
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[3] ~= '' and owner ~= ARGV[3] then return {'lost'} end
if owner and owner ~= ARGV[1] then return {'blocked'} end
if not owner then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local out = {'ok'}
for i = 2, #KEYS do
  redis.call('HSET', KEYS[1], 'c:' .. KEYS[i], '1')
  out[#out + 1] = redis.call('GET', KEYS[i]) or ''
end
return out
""",
    # KEYS: txn, key...; ARGV: token, session id or '', (value or '', ttl)...
    "txn_commit": """
local owner = redis.call('HGET', KEYS[1], 'owner')
if ARGV[2] ~= '' and owner ~= ARGV[2] then return {'lost'} end
if owner and owner ~= ARGV[1] then return {'blocked'} end
for i = 2, #KEYS do
  local v = ARGV[2 * i - 1]
  local t = ARGV[2 * i]
  if v == '' then redis.call('DEL', KEYS[i])
  elseif t == 'keep' then redis.call('SET', KEYS[i], v, 'KEEPTTL')
  elseif t == '' then redis.call('SET', KEYS[i], v)
  else redis.call('SET', KEYS[i], v, 'PX', t) end
end
if owner == ARGV[1] then redis.call('DEL', KEYS[1]) end
return {'ok'}
""",
    # KEYS: txn; ARGV: token
    "txn_abort": """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return {'ok'}
""",
}


class _Session:
    """One thread's token, as a connection is for the state server.

    What a session holds when its thread or process ends is given back when
    the lease runs out: Redis cannot tell that a client is gone.
    """

    __slots__ = ("token", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.token = f"{self.pid}-{uuid.uuid4().hex}"


def encode(value: Packed) -> bytes:
    if type(value) is bytes:
        return value
    if type(value) is float:
        return repr(value).encode()
    return str(value).encode()


def decode(raw: Any) -> Packed | None:
    """Undo :func:`encode`; None (or b"", a missing value in a script's reply) is absent."""
    if raw is None or raw == b"":
        return None
    if type(raw) is int:  # an integer reply, from INCRBY
        return raw
    data = bytes(raw)
    if data[0] == 0x80:
        return data
    text = data.decode()
    if any(c in text for c in ".eEn"):
        return float(text)
    return int(text)


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else str(max(1, int(seconds * 1000)))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisBackend(Backend):
    name = "redis"

    def __init__(self, url: str, namespace: str, timeout: float, lease: float) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError(
                "SHAREDSTATE_BACKEND = 'redis' needs the redis client:"
                " pip install 'Flask-SharedState[redis]'"
            ) from None
        self._redis = redis
        self.address = _redact(url)
        self._timeout = timeout
        self._lease_ms = _ms(lease)
        # No silent retries: a write whose reply was lost must not be applied twice.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=2 * timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        tag = "{" + namespace + "}:"
        self._prefix = tag + "k:"
        self._lock_prefix = tag + "lock:"
        self._txn = tag + "txn"
        self._applied = tag + "defaults"
        self._shas = {name: _sha1(body) for name, body in SCRIPTS.items()}
        self._local = threading.local()
        self._defaults: list[tuple[str, Packed]] = []
        self._defaults_pid = 0

    # -- the interface ---------------------------------------------------------

    def set_defaults(self, defaults: list[tuple[str, Packed]]) -> None:
        self._defaults = list(defaults)
        self._defaults_pid = 0  # applied on the next call, not now: init_app connects nowhere

    def close(self) -> None:
        self.client.connection_pool.disconnect()

    def call(self, op: str, *args: Any) -> Any:
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}")
        method = getattr(self, "op_" + op)
        redis = self._redis
        for attempt in (1, 2):
            try:
                if self._defaults and self._defaults_pid != os.getpid():
                    self.op_apply_defaults(self._defaults)
                    self._defaults_pid = os.getpid()
                return method(*args)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis may come back empty (restarted): give it the defaults again.
                self._defaults_pid = 0
                if attempt == 1 and OPERATIONS[op].read_only:
                    continue  # a read is safe to send again
                raise SharedStateUnavailable(
                    f"Redis at {self.address} did not answer {op!r}"
                    f" ({type(exc).__name__}: {exc}); if it was a write, it may or may"
                    " not have been applied."
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- sessions and script calls ----------------------------------------------

    def _session(self) -> _Session:
        session: _Session | None = getattr(self._local, "session", None)
        if session is None or session.pid != os.getpid():  # a forked child is another
            session = self._local.session = _Session()
        return session

    def _token(self) -> str:
        return self._session().token

    def _key(self, key: str) -> str:
        return self._prefix + key

    def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its hash (one round trip), loading it first if Redis lacks it."""
        try:
            return self.client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self._shas[name], len(keys), *keys, *args
            )
        except self._redis.exceptions.NoScriptError:
            self.client.script_load(SCRIPTS[name])
            return self.client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self._shas[name], len(keys), *keys, *args
            )

    def _run(
        self, name: str, keys: list[str], args: list[Any], timeout: float | None = None
    ) -> Any:
        """Run a script; while it answers 'blocked', wait and try again until the timeout."""
        deadline = None
        pause = 0.001
        while True:
            reply = self._eval(name, keys, args)
            status = reply[0]
            if status != b"blocked":
                return reply
            now = time.monotonic()
            if deadline is None:
                deadline = now + (self._timeout if timeout is None else timeout)
            if now >= deadline:
                what = "an atomic block" if name.startswith("txn") else "a write to a key"
                raise LockTimeout(
                    f"{what} held by an atomic block waited"
                    f" {self._timeout if timeout is None else timeout:g}s"
                )
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.05)

    def _write(self, name: str, keys: list[str], *args: Any) -> Any:
        reply = self._run(name, [self._txn, *keys], list(args))
        if reply[0] == b"TypeError":
            raise TypeError(
                f"cannot incr key {keys[0][len(self._prefix) :]!r}: not an int or float"
            )
        if reply[0] == b"ValueError":
            raise ValueError(
                f"cannot incr key {keys[0][len(self._prefix) :]!r}: Redis integers are 64-bit,"
                " and the result would not fit"
            )
        return reply

    def _scan(self) -> list[str]:
        match = _glob_escape(self._prefix) + "*"
        cut = len(self._prefix)
        return [k.decode()[cut:] for k in self.client.scan_iter(match=match, count=1000)]

    # -- the operations (as in server/store.py's Session) -------------------------

    def op_get(self, key: str) -> Packed | None:
        return decode(self.client.get(self._key(key)))

    def op_contains(self, key: str) -> bool:
        return bool(self.client.exists(self._key(key)))

    def op_get_many(self, keys: list[str]) -> list[Packed | None]:
        if not keys:
            return []
        return [decode(v) for v in self.client.mget([self._key(k) for k in keys])]

    def op_set(self, key: str, value: Packed, ttl: float | None = None) -> None:
        self._write("set", [self._key(key)], _ms(ttl), encode(value))

    def op_set_many(self, items: list[tuple[str, Packed]], ttl: float | None = None) -> None:
        if items:
            keys = [self._key(k) for k, _ in items]
            self._write("set", keys, _ms(ttl), *[encode(v) for _, v in items])

    def op_delete(self, key: str) -> bool:
        return bool(self._write("delete", [self._key(key)])[1])

    def op_pop(self, key: str) -> Packed | None:
        reply = self._write("pop", [self._key(key)])
        return decode(reply[1]) if len(reply) > 1 else None

    def op_setdefault(self, key: str, value: Packed, ttl: float | None = None) -> Packed | None:
        return decode(self._write("setdefault", [self._key(key)], encode(value), _ms(ttl))[1])

    def op_incr(self, key: str, delta: int | float = 1, ttl: float | None = None) -> Packed | None:
        reply = self._write("incr", [self._key(key)], encode(delta), _ms(ttl))
        return decode(reply[1])

    def op_compare_and_set(self, key: str, expected: Packed, new: Packed) -> bool:
        reply = self._write("compare_and_set", [self._key(key)], encode(expected), encode(new))
        return bool(reply[1])

    def op_expire(self, key: str, seconds: float | None) -> bool:
        return bool(self._write("expire", [self._key(key)], _ms(seconds))[1])

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
        args = [*[k for k, _ in items], *[encode(v) for _, v in items]]
        self._run("apply_defaults", keys, args)

    def op_acquire(self, name: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            session = self._session()
            reply = self._eval(
                "acquire", [self._lock_prefix + name], [session.token, self._lease_ms]
            )
            status = reply[0]
            if status == b"ok":
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
        reply = self._eval("release", [self._lock_prefix + name], [self._token()])
        if reply[0] != b"ok":
            raise RuntimeError(
                f"lock {name!r} is not held by this client (or its lease of"
                f" {int(self._lease_ms) / 1000:g}s ran out: SHAREDSTATE_LEASE)"
            )

    def op_locked(self, name: str) -> bool:
        return bool(self.client.exists(self._lock_prefix + name))

    def op_txn_read(
        self, keys: list[str], timeout: float, session_id: str | None = None
    ) -> tuple[str, list[Packed | None]]:
        token = self._token()
        data_keys = [self._key(k) for k in keys]
        reply = self._run(
            "txn_read",
            [self._txn, *data_keys],
            [token, self._lease_ms, session_id or ""],
            timeout,
        )
        if reply[0] == b"lost":
            raise _lost()
        return token, [decode(v) for v in reply[1:]]

    def op_txn_commit(
        self,
        writes: list[tuple[str, Packed | None, Any]],
        timeout: float,
        session_id: str | None = None,
    ) -> None:
        args: list[Any] = [self._token(), session_id or ""]
        for _, value, ttl in writes:
            args.append(b"" if value is None else encode(value))
            args.append("keep" if ttl == "keep" else _ms(ttl))
        keys = [self._txn, *[self._key(k) for k, _, _ in writes]]
        reply = self._run("txn_commit", keys, args, timeout)
        if reply[0] == b"lost":
            raise _lost()

    def op_txn_abort(self) -> None:
        self._eval("txn_abort", [self._txn], [self._token()])


def _sha1(script: str) -> str:
    import hashlib

    return hashlib.sha1(script.encode()).hexdigest()


def _lost() -> RuntimeError:
    from ..errors import AtomicBlockLost  # (a RuntimeError, as this was before)

    return AtomicBlockLost(
        "the atomic block lost its claim on the keys it read (its lease ran out:"
        " SHAREDSTATE_LEASE, or Redis restarted); nothing of it was written. Run the"
        " block again, or raise SHAREDSTATE_LEASE above the block's running time."
    )


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        user = parts.username or ""
        parts = parts._replace(netloc=f"{user}:***@{host}")
    return urlunsplit(parts)
