#!lua flags=allow-oom
-- One round of one partition, committed whole or not at all (commit.py).
--
-- KEYS  1 lease   2 round   3 inbox   4 states   5 timers   6 outbox   7 dead letters
--       8.. inboxes of other partitions that receive hand-offs
-- ARGV  1 token   2 round   3 consumer group, then eight sections, each a count n
--       followed by its items:
--         acks      id * n                         input entries this round consumed
--         states    (customer, state) * n
--         deleted   customer * n                   applied after states: a delete wins
--         timers    (deadline, customer) * n
--         untimed   customer * n                   applied after timers: a removal wins
--         outbox    (m, field, value * m) * n
--         handoffs  (KEYS position, m, field, value * m) * n
--         dead      (m, field, value * m) * n
-- Reply {'FENCED'} (the lease holds another token or none; nothing written),
--       {'DUP'} (this round or a later one is committed; nothing written), or
--       {'OK', inputs acked, outbox entry id, ...}.
--
-- Idempotence: the client library may run a script a second time after the first run
-- succeeded (it retries on a connection error), so a round carries an id and
-- round:{P}:<p> keeps the last one as "token:round". Ids from a newer token are always
-- greater, so a new owner never needs to know where the old one stopped.
--
-- Nothing is written before every argument is parsed and every key's type checked: a
-- Redis script is not rolled back when it fails halfway.
--
-- allow-oom: under maxmemory the intake is the one to refuse (route.lua); a commit
-- consumes its inputs, so it must run to let memory drain.

local token, round_id = ARGV[1], ARGV[2]
local group = ARGV[3]
local pos = 4

local function count()
  local n = tonumber(ARGV[pos])
  if not n or n < 0 or n ~= math.floor(n) then
    error('commit.lua: bad count at ARGV[' .. pos .. ']: ' .. tostring(ARGV[pos]))
  end
  pos = pos + 1
  return n
end

local function take(n)
  if pos + n - 1 > #ARGV then error('commit.lua: ARGV ends inside a section') end
  local items = {}
  for i = 1, n do items[i] = ARGV[pos + i - 1] end
  pos = pos + n
  return items
end

local function entries(with_key)
  local list = {}
  for i = 1, count() do
    local entry = {}
    if with_key then
      entry.key = tonumber(ARGV[pos])
      pos = pos + 1
      if not entry.key or entry.key < 8 or entry.key > #KEYS then
        error('commit.lua: a hand-off names KEYS[' .. tostring(entry.key) .. ']')
      end
    end
    local m = count()
    if m == 0 then error('commit.lua: a stream entry needs at least one field') end
    entry.fields = take(2 * m)
    list[i] = entry
  end
  return list
end

-- Decimal digits only: they are compared as numbers and stored as text.
if not string.match(token, '^[1-9]%d*$') then error('commit.lua: bad token ' .. token) end
if not string.match(round_id, '^[1-9]%d*$') then error('commit.lua: bad round id ' .. round_id) end
local round = tonumber(round_id)
local acks = take(count())
local states = take(2 * count())
local deleted = take(count())
local timers = take(2 * count())
for i = 1, #timers, 2 do
  if not tonumber(timers[i]) then error('commit.lua: bad deadline ' .. timers[i]) end
end
local untimed = take(count())
local outbox = entries(false)
local handoffs = entries(true)
local dead = entries(false)
if pos <= #ARGV then error('commit.lua: ' .. (#ARGV - pos + 1) .. ' ARGV left over') end

local expected = {'string', 'string', 'stream', 'hash', 'zset', 'stream', 'stream'}
for i = 1, #KEYS do
  local kind = redis.call('TYPE', KEYS[i]).ok
  local want = expected[i] or 'stream'
  if kind ~= 'none' and kind ~= want then
    error('commit.lua: ' .. KEYS[i] .. ' is a ' .. kind .. ', expected a ' .. want)
  end
end

if redis.call('GET', KEYS[1]) ~= token then return {'FENCED'} end

local last = redis.call('GET', KEYS[2])
if last then
  local last_token, last_round = string.match(last, '^(%d+):(%d+)$')
  last_token, last_round = tonumber(last_token), tonumber(last_round)
  if not last_token then error('commit.lua: ' .. KEYS[2] .. ' holds ' .. last) end
  if last_token > tonumber(token) then
    -- Tokens only grow, and this one holds the lease: the fence counter was reset.
    error('commit.lua: ' .. KEYS[2] .. ' was written under token ' .. last_token ..
          ', newer than ' .. token .. '; was the fence counter deleted?')
  end
  if last_token == tonumber(token) and last_round >= round then return {'DUP'} end
end

-- Lua's unpack() is bounded by its stack: pass long lists in slices.
local SLICE = 512
local function each_slice(items, width, call)
  local step = SLICE * width
  for i = 1, #items, step do
    call(unpack(items, i, math.min(i + step - 1, #items)))
  end
end

local acked = 0
each_slice(acks, 1, function(...)
  acked = acked + redis.call('XACK', KEYS[3], group, ...)
  -- An acknowledged input is never read again; keeping it would only hold memory.
  redis.call('XDEL', KEYS[3], ...)
end)
each_slice(states, 2, function(...) redis.call('HSET', KEYS[4], ...) end)
each_slice(deleted, 1, function(...) redis.call('HDEL', KEYS[4], ...) end)
each_slice(timers, 2, function(...) redis.call('ZADD', KEYS[5], ...) end)
each_slice(untimed, 1, function(...) redis.call('ZREM', KEYS[5], ...) end)

local reply = {'OK', acked}
for _, entry in ipairs(outbox) do
  reply[#reply + 1] = redis.call('XADD', KEYS[6], '*', unpack(entry.fields))
end
for _, entry in ipairs(handoffs) do
  redis.call('XADD', KEYS[entry.key], '*', unpack(entry.fields))
end
for _, entry in ipairs(dead) do
  redis.call('XADD', KEYS[7], '*', unpack(entry.fields))
end

redis.call('SET', KEYS[2], token .. ':' .. round_id)
return reply
