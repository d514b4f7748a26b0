//! The Lua scripts the store runs. Each touches one key, so it runs
//! atomically on the node that owns the key's cluster slot, and reads time
//! from Redis's own `TIME`, so the sidecars' clocks do not matter.

/// Takes tokens from a token bucket.
///
/// `KEYS[1]`: the bucket (a hash: `t` tokens, `l` the last refill in
/// microseconds of Redis's clock). `ARGV`: capacity, fill amount, interval
/// in microseconds, `1` for continuous fill, tokens wanted, tokens needed.
/// Grants `min(wanted, available)` when at least the needed number is
/// there, nothing otherwise. Returns `{granted, wait}`: tokens granted (as
/// text, they may be fractional) and, with nothing granted, microseconds
/// until the needed number will be there (`-1`: never). An absent bucket
/// is full; a bucket that would be full again is left to expire.
pub const TAKE_TOKENS: &str = r#"
local capacity = tonumber(ARGV[1])
local fill = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local continuous = ARGV[4] == '1'
local want = tonumber(ARGV[5])
local need = tonumber(ARGV[6])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local state = redis.call('HMGET', KEYS[1], 't', 'l')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = capacity
  last = now
end
if now > last and fill > 0 then
  if continuous then
    tokens = math.min(capacity, tokens + fill * (now - last) / interval)
    last = now
  else
    local steps = math.floor((now - last) / interval)
    if steps > 0 then
      tokens = math.min(capacity, tokens + fill * steps)
      last = last + steps * interval
    end
  end
end
local granted = 0
local wait = 0
if tokens >= need and tokens > 0 then
  granted = math.min(want, tokens)
  tokens = tokens - granted
elseif need > capacity or fill <= 0 then
  wait = -1
elseif continuous then
  wait = math.ceil((need - tokens) * interval / fill)
else
  wait = last + math.ceil((need - tokens) / fill) * interval - now
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'l', tostring(last))
local full_in = 0
if fill > 0 then
  full_in = math.ceil((capacity - tokens) * interval / fill / 1000)
end
redis.call('PEXPIRE', KEYS[1], full_in + 1000)
return {string.format('%.17g', granted), wait}
"#;

/// Takes a slot of a count of flows in flight.
///
/// `KEYS[1]`: the count (a sorted set of holders scored by when their slot
/// lapses, in milliseconds of Redis's clock). `ARGV`: most slots, holder,
/// ttl in milliseconds. Lapsed slots are dropped first. Returns 1 when
/// taken, 0 when all are held.
pub const TAKE_SLOT: &str = r#"
local max = tonumber(ARGV[1])
local ttl = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < max then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
  return 1
end
return 0
"#;
