#!lua flags=allow-oom
-- Partition leases of one project (leases.py). A lease is a string key holding its
-- fencing token, with a PX expiry: only the holder of the token renews or deletes it,
-- and every commit checks it (commit.lua).
--
-- allow-oom: under maxmemory the workers must keep their leases, or the senders could
-- not drain the outbox whose entries fill the memory (finish.lua is fenced too).
--
-- ARGV[1] names the operation:
--   keep     KEYS workers, lease...  ARGV op, worker, ttl_ms, token (one per lease)
--            heartbeat, drop dead workers, renew the leases whose token still matches.
--            Returns {live workers, 1|0 per lease}.
--   acquire  KEYS fence, lease...    ARGV op, ttl_ms, want
--            take up to `want` of the leases that are free, in KEYS order, each with
--            a new token. Returns {key position, token, ...} (positions count leases from 1).
--   release  KEYS lease...           ARGV op, token (one per lease)
--            delete the leases whose token still matches. Returns {1|0 per lease}.
--   leave    KEYS workers            ARGV op, worker
--            drop the worker's heartbeat.
local op = ARGV[1]

if op == 'keep' then
  local ttl = tonumber(ARGV[3])
  -- The server's clock, not the workers': every host agrees on who is alive.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local reply = {redis.call('ZCARD', KEYS[1])}
  for i = 2, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[i + 2] then
      redis.call('PEXPIRE', KEYS[i], ttl)
      reply[i] = 1
    else
      reply[i] = 0
    end
  end
  return reply
end

if op == 'acquire' then
  local ttl, want = tonumber(ARGV[2]), tonumber(ARGV[3])
  local reply = {}
  for i = 2, #KEYS do
    if #reply >= 2 * want then break end
    -- A lease whose holder died is still here until its TTL ends: it is not free.
    if redis.call('EXISTS', KEYS[i]) == 0 then
      local token = redis.call('INCR', KEYS[1])
      redis.call('SET', KEYS[i], token, 'PX', ttl)
      reply[#reply + 1] = i - 1
      reply[#reply + 1] = token
    end
  end
  return reply
end

if op == 'release' then
  local reply = {}
  for i = 1, #KEYS do
    if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
      redis.call('DEL', KEYS[i])
      reply[i] = 1
    else
      reply[i] = 0
    end
  end
  return reply
end

if op == 'leave' then
  return redis.call('ZREM', KEYS[1], ARGV[2])
end

return redis.error_reply('lease.lua: unknown operation ' .. tostring(op))
