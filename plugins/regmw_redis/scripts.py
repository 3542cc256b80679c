"""The Lua scripts regmw runs in Redis, as constants (no package data to lose on install).

Each script does one job atomically on the server, so no client ever acts on
a value another client changed between a GET and a SET (the Go registry's
GET-then-SET leases are the failure this avoids). Times come from the
server's ``TIME`` where expiry is compared across clients, so clock skew
between registry hosts cannot extend or shorten a lease. Redis 7 replicates
script *effects*, so ``TIME`` before a write is allowed.
"""
from __future__ import annotations

#: Take or extend a read-only lock. KEYS: lock, fencing counter. ARGV: owner, ttl_ms.
#: SET NX PX first; when the key exists, only its owner may extend it.
#: Returns the new fencing token, or false when another owner holds the lock.
SET_READ_ONLY = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return false
  end
  redis.call('SET', KEYS[1], ARGV[1], 'XX', 'PX', ARGV[2])
end
return redis.call('INCR', KEYS[2])
"""

#: Compare-and-delete. KEYS: lock. ARGV: owner. Returns 1 if deleted.
RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Extend a lock held by its owner. KEYS: lock. ARGV: owner, ttl_ms. Returns 1, or 0 if not ours.
RENEW_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: Take a slot of a counting semaphore. KEYS: holders zset, fencing counter.
#: ARGV: owner, max_holders, ttl_ms. Members are owners scored by their expiry
#: (server ms); expired ones are dropped first, so a dead holder frees its slot.
#: Returns the fencing token, or false when all slots are held.
ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return false
  end
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return redis.call('INCR', KEYS[2])
"""

#: Extend a held slot. KEYS: holders zset. ARGV: owner, ttl_ms.
#: Returns 1, or 0 when the slot was lost (expired, or removed by someone).
RENEW_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires or tonumber(expires) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

#: Count live holders of a semaphore. KEYS: holders zset.
COUNT_SLOTS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

#: The hot path: everything admission needs, in one round trip.
#:
#: KEYS: [read-only lock key (when ARGV[1] == '1')], rate-limit counter keys...,
#:       prefetch keys...
#: ARGV: check_lock ('1'/'0'), n_limits, then per limit: amount, expiry_ms.
#:
#: Rate limits are fixed windows with ``limits``' semantics and key names
#: (INCRBY; the first hit of a window sets its expiry), so the script and
#: ``hot_path = "limits"`` count the same counters. Counting stops at the first
#: limit exceeded, as ``LimitsRateLimiter`` does.
#:
#: Returns {locked (0/1), n_counted, count_1, pttl_1, ..., prefetch values...};
#: a missing prefetch value is false (nil to the client).
ADMIT = """
local check_lock = ARGV[1] == '1'
local n_limits = tonumber(ARGV[2])
local k = 1
local out = {0, 0}
if check_lock then
  out[1] = redis.call('EXISTS', KEYS[1])
  k = 2
end
local counted = 0
local stop = false
for i = 1, n_limits do
  local key = KEYS[k]
  k = k + 1
  if not stop then
    local amount = tonumber(ARGV[1 + 2 * i])
    local expiry = tonumber(ARGV[2 + 2 * i])
    local count = redis.call('INCRBY', key, 1)
    local ttl = expiry
    if count == 1 then
      redis.call('PEXPIRE', key, expiry)
    else
      ttl = redis.call('PTTL', key)
      if ttl < 0 then
        redis.call('PEXPIRE', key, expiry)
        ttl = expiry
      end
    end
    out[#out + 1] = count
    out[#out + 1] = ttl
    counted = counted + 1
    if count > amount then
      stop = true
    end
  end
end
out[2] = counted
for i = k, #KEYS do
  out[#out + 1] = redis.call('GET', KEYS[i])
end
return out
"""
