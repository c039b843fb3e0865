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
  if score and tonumber(score) > now then
    redis.call('ZADD', key, now + lease, holder)
    if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, math.ceil(lease)) end
    out[i] = 0
  else
    if score then redis.call('ZREM', key, holder) end
    out[i] = 1
  end
end
return out
"""

# KEYS: slot sets. ARGV: the holder in each.
RELEASE = """
for i, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[i]) end
return 0
"""

# The watch registry of heartbeat leases, so that any replica can record a lapsed one's end.
# KEYS: the records (a hash: lease key -> record), the deadlines (a sorted set: lease key ->
# when the record is no longer worth keeping, ms on the server's clock). ARGV: lease key,
# record, ms to keep it.
WATCH = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 0
"""

# KEYS: as WATCH's. ARGV: lease key.
UNWATCH = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""

# KEYS: as WATCH's. ARGV: the prefix of the leases' own keys, the most records to hand out.
# Drops the records kept long enough; then hands out (and removes, so one caller gets each)
# the records of watched leases whose key is gone: lapsed.
LAPSED = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, member in ipairs(old) do redis.call('HDEL', KEYS[1], member) end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
local out = {}
local most = tonumber(ARGV[2])
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if #out >= most then break end
  if redis.call('EXISTS', ARGV[1] .. member) == 0 then
    local record = redis.call('HGET', KEYS[1], member)
    if record then out[#out + 1] = record end
    redis.call('HDEL', KEYS[1], member)
    redis.call('ZREM', KEYS[2], member)
  end
end
return out
"""

__all__ = ["LAPSED", "REFRESH", "RELEASE", "TAKE", "UNWATCH", "WATCH"]
