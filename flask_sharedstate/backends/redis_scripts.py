"""The Lua scripts of the ``redis`` backend: one per operation that must be one step.

Each runs atomically in Redis, so an operation is one round trip (``EVALSHA``,
packed by the backend and sent on a pooled connection; the script is loaded
only when Redis answers NOSCRIPT). ``KEYS[1]`` of every
single-step write is the namespace's atomic block (``{ns}:txn``): a hash of its
``owner`` token and a ``c:KEY`` field for each key it has claimed. A write
first answers ``{'blocked'}`` if that block claims one of its keys; the client
waits and sends it again. Otherwise a single-step write answers its result
alone (a status, a number, a value or nil), never a table: a table is a
refusal, and a bare reply is cheaper for redis-py to read than a table.

Values are as ``backends/redis.py`` encodes them: numbers as text, anything
else a signed pickle that starts with byte ``0x80`` (which no number does), so
a script tells them apart by the first byte and never looks inside a pickle.
Signed pickles are deterministic, so comparing them byte for byte
(``compare_and_set``) compares values.
"""

from __future__ import annotations

_BLOCKED_CHECK = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = FIRST, #KEYS do
    if redis.call('HEXISTS', KEYS[1], 'c:' .. KEYS[i]) == 1 then return {'blocked'} end
  end
end
"""


def _script(body: str, first: int = 2) -> str:
    """A single-step write: first answer {'blocked'} if an open atomic block claims a key.

    With no block open that is one EXISTS, the whole price of the guarantee.
    """
    return _BLOCKED_CHECK.replace("FIRST", str(first)) + body


#: The scripts, by name. Each says its KEYS and ARGV.
SCRIPTS = {
    # KEYS: txn, key...; ARGV: value..., then ttl ms if any (one argument fewer to send)
    "set": _script("""
local ttl = ARGV[#KEYS]
for i = 2, #KEYS do
  if ttl then redis.call('SET', KEYS[i], ARGV[i - 1], 'PX', ttl)
  else redis.call('SET', KEYS[i], ARGV[i - 1]) end
end
return {ok = 'OK'}
"""),
    # KEYS: txn, key
    "pop": _script("""
local v = redis.call('GET', KEYS[2])
if v then redis.call('DEL', KEYS[2]) end
return v
"""),
    # KEYS: txn, key; ARGV: value, ttl ms or ''
    "setdefault": _script("""
local v = redis.call('GET', KEYS[2])
if v then return v end
if ARGV[2] == '' then redis.call('SET', KEYS[2], ARGV[1])
else redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
return ARGV[1]
"""),
    # KEYS: txn, key; ARGV: delta (as encode() writes it), then ttl ms if any
    "incr": _script("""
if ARGV[2] then redis.call('SET', KEYS[2], '0', 'NX', 'PX', ARGV[2]) end
if not string.find(ARGV[1], '[%.eEn]') then
  local r = redis.pcall('INCRBY', KEYS[2], ARGV[1])
  if type(r) == 'number' then
    -- Lua numbers are doubles: past 2^53 return Redis's exact text instead.
    if r < 9007199254740992 and r > -9007199254740992 then return r end
    return redis.call('GET', KEYS[2])
  end
end
local v = redis.call('GET', KEYS[2])
if not v then
  redis.call('SET', KEYS[2], ARGV[1])
  return ARGV[1]
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
return r
"""),
    # KEYS: txn, key; ARGV: expected, new
    "compare_and_set": _script("""
local v = redis.call('GET', KEYS[2])
if not v then return 0 end
local same = v == ARGV[1]
if not same and string.byte(v, 1) ~= 128 and string.byte(ARGV[1], 1) ~= 128 then
  same = tonumber(v) ~= nil and tonumber(v) == tonumber(ARGV[1])
end
if not same then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'KEEPTTL')
return 1
"""),
    # KEYS: txn, key; ARGV: ttl ms or ''
    "expire": _script("""
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if ARGV[1] == '' then redis.call('PERSIST', KEYS[2])
else redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
return 1
"""),
    # KEYS: txn, key...
    "delete": _script("""
local n = 0
for i = 2, #KEYS do n = n + redis.call('DEL', KEYS[i]) end
return n
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
    # KEYS: lock; ARGV: token, lease ms, additional ms or '' (back to the full lease)
    "extend": """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'notheld'} end
if ARGV[3] == '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 then left = 0 end
  redis.call('PEXPIRE', KEYS[1], left + tonumber(ARGV[3]))
end
return {'ok'}
""",
    # get_or_set's single flight. KEYS: key, lock; ARGV: token, lease ms. The value
    # (bare), or {'ok'} (the lock is now this token's), {'busy'} or {'reentrant'}.
    "get_or_claim": """
local v = redis.call('GET', KEYS[1])
if v then return v end
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then return {'reentrant'} end
if holder then return {'busy'} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'ok'}
""",
    # KEYS: txn, lock, key; ARGV: token, value, ttl ms or ''. Stores the value and
    # releases the lock only if the token still holds it: 1, else 0 (nothing written).
    "fill": _script(
        """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then redis.call('SET', KEYS[3], ARGV[2])
else redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3]) end
redis.call('DEL', KEYS[2])
return 1
""",
        first=3,
    ),
    # KEYS: lock...; ARGV: lease ms, token... -> 1 (renewed or longer) or 0 (lost), per lock.
    # A lease that extend() made longer than the lease is left alone.
    "renew": """
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[1]) then
      redis.call('PEXPIRE', KEYS[i], ARGV[1])
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
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
    # KEYS: txn, key; ARGV: token, value, ttl ms: a write of the open block's own, now
    # (a moving window's hit inside the block: the block claims the key, and goes on)
    "txn_set": """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return {'lost'} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return {'ok'}
""",
    # KEYS: txn; ARGV: token... (the blocks to end: a block that ended already is none of them)
    "txn_abort": """
local owner = redis.call('HGET', KEYS[1], 'owner')
for i = 1, #ARGV do
  if owner == ARGV[i] then redis.call('DEL', KEYS[1]) end
end
return {'ok'}
""",
    # KEYS: txn, previous, current; ARGV: limit, amount, weight, ttl ms
    "sliding_acquire": _script("""
local counts = {}
for i = 2, 3 do
  local v = redis.call('GET', KEYS[i])
  if v and string.byte(v, 1) == 128 then return {'TypeError'} end
  counts[i] = v and tonumber(v) or 0
end
if math.floor(counts[2] * tonumber(ARGV[3]) + counts[3]) + tonumber(ARGV[2])
    > tonumber(ARGV[1]) then
  return {'ok', 0}
end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('INCRBY', KEYS[3], ARGV[2])
else redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[4]) end
return {'ok', 1}
"""),
}
