--[[ route.lua: one intake request of one project, in one atomic step.

For each message, in request order: drop it if its messageId was seen within
the dedup window (before any identity effect), resolve its customer with the
rules of Identity.resolve (router/identity.py, case for case; the differential
test in tests/test_route_lua.py keeps the two equal), and append it to its
customer's partition stream. route.py builds the arguments and documents the
stream entries.

KEYS  1 id:{P}   2 reg:{P}   3 fwd:{P}   4 nk:{P}   5 dl:{P}
      then per message i (from 0): 6+2i its dedup bucket in the current time
      slot, 7+2i the same bucket in the previous slot
ARGV  1 write key   2 ms until the current dedup slot's keys may expire
      3 max cookies per customer   4 partitions   5 inbox prefix "in:{P}:"
      6 cookie list prefix "ck:{P}:"   7 message count n
      then per message i, from 8+6i: messageId digest, flags ("a" alias,
      "u" has userId, "c" has anonymousId or previousId), userId, cookie,
      refusal reason (aliases only), body
Reply {routed, duplicates, refused, outcome per message: customer key, 0 for a
      duplicate, -1 for a refusal}

A customer's stream and cookie list are named after its key, which only this
script knows (a new customer's key comes from nk, a merge changes who owns a
cookie), so their names are built from the two prefixes instead of being
declared. They carry the project's {P} tag like every declared key, so they
hash to the same Redis Cluster slot and live on the same shard.
]]

local IDS, REG, FWD, NEXT, DEAD = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local write_key = ARGV[1]
local ttl = ARGV[2]
local max_cookies = tonumber(ARGV[3])
local partitions = tonumber(ARGV[4])
local INBOX, COOKIES = ARGV[5], ARGV[6]
local count = tonumber(ARGV[7])
local HEAD, PER = 7, 6

if #ARGV ~= HEAD + count * PER or #KEYS ~= 5 + 2 * count then
  return redis.error_reply('route.lua: ' .. #KEYS .. ' keys and ' .. #ARGV ..
    ' args do not describe ' .. count .. ' messages; call it through router.cluster.route')
end

local function inbox(k) return INBOX .. (k % partitions) end
local function cookies(k) return COOKIES .. k end

local function find(prefix, value)
  if value == nil then return nil end
  local k = redis.call('HGET', IDS, prefix .. value)
  if k then return tonumber(k) end
  return nil
end

local function is_registered(k) return redis.call('HEXISTS', REG, k) == 1 end

-- `e` collects what the message did to its customer's registered id and
-- cookies; the stream entry carries it so the partition worker can do the same.

local function give_registered(k, registered, e)
  redis.call('HSET', REG, k, registered)
  redis.call('HSET', IDS, 'r:' .. registered, k)
  e.r = registered
end

-- Identity._trim_cookies: the oldest cookies past the bound leave the list and
-- the index. Only the message's own customer ever grows, so it is the one trimmed.
local function trim(k, e)
  local list = cookies(k)
  local excess = redis.call('LLEN', list) - max_cookies
  if excess > 0 then
    for _, old in ipairs(redis.call('LPOP', list, excess)) do
      redis.call('HDEL', IDS, 'c:' .. old)
    end
    e.t = excess
  end
end

local function add_cookie(k, cookie, e)
  local list = cookies(k)
  if not redis.call('LPOS', list, cookie) then
    redis.call('RPUSH', list, cookie)
    e.a = cookie
    trim(k, e)
  end
  redis.call('HSET', IDS, 'c:' .. cookie, k)
end

-- A shared device: the cookie leaves its old owner, which hears of it in its
-- own partition, in order with its other messages.
local function move_cookie(cookie, source, target, e)
  redis.call('LREM', cookies(source), 1, cookie)
  redis.call('XADD', inbox(source), '*', 'k', source, 'c', 'drop', 'v', cookie)
  e.f = source
  add_cookie(target, cookie, e)
end

-- Identity._merge for the directory: the survivor takes the merged customer's
-- cookies. The merged customer is cookie-only (the rule merges nothing else),
-- so there is no registered id to carry over. Its partition gets the hand-off
-- marker after all its earlier messages; the worker sends its state on from there.
local function merge(survivor, merged, e)
  local list = cookies(survivor)
  local theirs = redis.call('LRANGE', cookies(merged), 0, -1)
  for _, cookie in ipairs(theirs) do
    if not redis.call('LPOS', list, cookie) then redis.call('RPUSH', list, cookie) end
  end
  for _, cookie in ipairs(theirs) do redis.call('HSET', IDS, 'c:' .. cookie, survivor) end
  trim(survivor, e)
  redis.call('DEL', cookies(merged))
  -- The index already points every id at the survivor; fwd is for readers
  -- holding the old key (the worker's hand-off, an operator's question).
  redis.call('HSET', FWD, merged, survivor)
  redis.call('XADD', inbox(merged), '*', 'k', merged, 'c', 'handoff', 'v', survivor)
  e.m = merged
end

-- Identity.resolve; returns the customer key, or nil when the alias is refused.
local function resolve(alias, registered, cookie, e)
  local by_registered = find('r:', registered)
  local by_cookie = find('c:', cookie)

  if alias and by_cookie == nil and cookie ~= nil then
    local other = find('r:', cookie)
    if other ~= nil and other ~= by_registered then return nil end
  end

  if by_registered == nil and by_cookie == nil then
    local k = redis.call('INCR', NEXT)
    if registered ~= nil then give_registered(k, registered, e) end
    if cookie ~= nil then add_cookie(k, cookie, e) end
    return k
  end
  if by_cookie == nil then
    if cookie ~= nil then add_cookie(by_registered, cookie, e) end
    return by_registered
  end
  if by_registered == nil then
    if registered == nil then return by_cookie end
    if not is_registered(by_cookie) then
      give_registered(by_cookie, registered, e)
      return by_cookie
    end
    local k = redis.call('INCR', NEXT)
    give_registered(k, registered, e)
    move_cookie(cookie, by_cookie, k, e)
    return k
  end
  if by_registered == by_cookie then return by_registered end
  if not is_registered(by_cookie) then
    merge(by_registered, by_cookie, e)
  else
    move_cookie(cookie, by_cookie, by_registered, e)
  end
  return by_registered
end

local routed, duplicates, refused = 0, 0, 0
local reply = {0, 0, 0}
local expiring = {}
for i = 0, count - 1 do
  local at = HEAD + i * PER
  local digest, flags = ARGV[at + 1], ARGV[at + 2]
  local current, previous = KEYS[6 + 2 * i], KEYS[7 + 2 * i]
  if redis.call('HEXISTS', previous, digest) == 1
      or redis.call('HSETNX', current, digest, '') == 0 then
    duplicates = duplicates + 1
    reply[4 + i] = 0
  else
    if not expiring[current] then
      -- NX: the first writer of a slot sets its end; later ones must not push it out.
      redis.call('PEXPIRE', current, ttl, 'NX')
      expiring[current] = true
    end
    local registered, cookie = nil, nil
    if string.find(flags, 'u', 1, true) then registered = ARGV[at + 3] end
    if string.find(flags, 'c', 1, true) then cookie = ARGV[at + 4] end
    local body = ARGV[at + 6]
    local e = {}
    local k = resolve(string.find(flags, 'a', 1, true) ~= nil, registered, cookie, e)
    if k == nil then
      redis.call('XADD', DEAD, '*', 'code', 'alias_registered', 'reason', ARGV[at + 5],
        'w', write_key, 'b', body)
      refused = refused + 1
      reply[4 + i] = -1
    else
      local entry = {'k', k, 'w', write_key, 'b', body}
      for _, name in ipairs({'m', 'r', 'a', 'f', 't'}) do
        if e[name] ~= nil then
          entry[#entry + 1] = name
          entry[#entry + 1] = e[name]
        end
      end
      redis.call('XADD', inbox(k), '*', unpack(entry))
      routed = routed + 1
      reply[4 + i] = k
    end
  end
end
reply[1], reply[2], reply[3] = routed, duplicates, refused
return reply
