"""The Lua scripts of the Valkey/Redis state store (keyproxy.state.redis).

`TAKE` decides a request: it reads the server's clock (`TIME`), checks every limit the
request touches, and writes only if all admit (a refused request consumes nothing).
`REFRESH` extends held concurrency slots; `RELEASE` gives them back. Redis runs each script
atomically, so a decision is exact under any number of concurrent takers.
"""

# KEYS: one per limit. ARGV: units, holder, then per limit (kind, a, b):
#   counter 'c': cap, ttl ms         rate 'r': interval ms, burst         slot 's': limit, lease ms
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
  else
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

__all__ = ["REFRESH", "RELEASE", "TAKE"]
