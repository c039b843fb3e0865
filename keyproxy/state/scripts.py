"""The Lua scripts of the Valkey/Redis state store (keyproxy.state.redis).

`TAKE` decides a request: it reads the server's clock (`TIME`), checks every limit the
request touches, and writes only if all admit (a refused request consumes nothing).
`REFRESH` extends held concurrency slots; `RELEASE` gives them back. Redis runs each script
atomically, so a decision is exact under any number of concurrent takers.
"""

# KEYS: one per limit. ARGV: units, holder, then per limit (kind, a, b):
#   counter 'c': cap, ttl ms         rate 'r': interval ms, burst         slot 's': limit, lease ms
#   lease 'l': 0, 0 (it must exist; nothing is taken from it)
# Returns {all allowed (1/0), then per limit: allowed, remaining, reset ms, retry-after ms}.
TAKE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local units = tonumber(ARGV[1])
local holder = ARGV[2]
local out = {1}
local new_tats = {}
for i, key in ipairs(KEYS) do
  local kind, a, b = ARGV[3 * i], tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  local allowed, remaining, reset, retry
  if kind == 'c' then
    local used = tonumber(redis.call('GET', key) or '0')
    local pttl = redis.call('PTTL', key)
    if pttl < 0 then pttl = b end
    allowed = used + units <= a
    remaining = allowed and (a - used - units) or math.max(0, a - used)
    reset = pttl
    retry = allowed and 0 or pttl
  elseif kind == 'r' then
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local new_tat = tat + units * a
    local allow_at = new_tat - b * a
    allowed = allow_at <= now
    if allowed then
      remaining = math.floor((now - allow_at) / a + 1e-9)
      reset, retry = new_tat - now, 0
    else
      remaining, reset, retry = 0, tat - now, allow_at - now
    end
    new_tats[i] = new_tat
  elseif kind == 'l' then
    allowed = redis.call('EXISTS', key) == 1
    remaining, reset, retry = 0, 0, 0
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local held = redis.call('ZCARD', key)
    allowed = held < a
    remaining = allowed and (a - held - 1) or 0
    reset, retry = 0, 0
    if not allowed then
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      reset = tonumber(first[2]) - now
      retry = reset
    end
  end
  if not allowed then out[1] = 0 end
  out[#out + 1] = allowed and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
if out[1] == 0 then return out end
for i, key in ipairs(KEYS) do
  local kind, b = ARGV[3 * i], tonumber(ARGV[3 * i + 2])
  if kind == 'c' then
    redis.call('INCRBY', key, units)
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, math.ceil(b)) end
  elseif kind == 'r' then
    local keep = math.ceil(new_tats[i] - now) + 1
    redis.call('SET', key, string.format('%.3f', new_tats[i]), 'PX', keep)
  elseif kind == 's' then
    redis.call('ZADD', key, now + b, holder)
    if redis.call('PTTL', key) < b then redis.call('PEXPIRE', key, math.ceil(b)) end
  end
end
return out
"""

# KEYS: slot sets. ARGV: per key (holder, lease ms). Returns per key 1 if the slot was lost.
REFRESH = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
for i, key in ipairs(KEYS) do
  local holder, lease = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  local score = redis.call('ZSCORE', key, holder)
  -- Lapsed or not, the request still runs: it is counted again.
  redis.call('ZADD', key, now + lease, holder)
  if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, math.ceil(lease)) end
  if score and tonumber(score) > now then out[i] = 0 else out[i] = 1 end
end
return out
"""

# KEYS: slot sets. ARGV: the holder in each.
RELEASE = """
for i, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[i]) end
return 0
"""

# The watch registry of heartbeat leases, so that any replica can record a lapsed one's end.
# Three keys: the records (a hash: lease key -> record), how long each is kept (a sorted set:
# lease key -> ms on the server's clock), and when each lease is due to lapse (a sorted set,
# moved by RENEW). The leases' own keys share their hash tag, so all are in one slot.

# KEYS: records, kept, due. ARGV: lease key, record, ms to keep it, ms until the lease lapses.
WATCH = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
return 0
"""

# KEYS: records, kept, due. ARGV: lease key.
UNWATCH = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 0
"""

# KEYS: the lease, due. ARGV: ms, lease key. Extends a live lease (never brings back a lapsed
# one) and, if it is watched, when it is due. Returns 1 if renewed.
RENEW = """
if redis.replicate_commands then redis.replicate_commands() end
if not redis.call('SET', KEYS[1], '1', 'PX', ARGV[1], 'XX') then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[1]), ARGV[2])
return 1
"""

# KEYS: records, kept, due. ARGV: the prefix of the leases' own keys, the most records to
# hand out, ms a handed-out record waits before it is handed out again. Returns lease key,
# record, lease key, record, ...
# Forgets records kept long enough (a bounded number per call), then looks only at leases
# due by now: one still alive is put back where it lapses; a lapsed one's record is handed
# out and is due again after the claim time, unless its taker forgets it (UNWATCH) first:
# a taker that dies before it recorded the end leaves it to the next one.
LAPSED = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local most = tonumber(ARGV[2])
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, most)) do
  redis.call('HDEL', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
end
local out = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, most)) do
  local left = redis.call('PTTL', ARGV[1] .. member)
  if left > 0 then
    redis.call('ZADD', KEYS[3], now + left, member)
  else
    local record = redis.call('HGET', KEYS[1], member)
    if record then
      out[#out + 1] = member
      out[#out + 1] = record
      redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), member)
    else
      redis.call('ZREM', KEYS[3], member)
    end
  end
end
return out
"""

__all__ = ["LAPSED", "REFRESH", "RELEASE", "RENEW", "TAKE", "UNWATCH", "WATCH"]
