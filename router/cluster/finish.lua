#!lua flags=allow-oom
-- The sender's end of one partition's outbox (commit.py): delete the entries whose
-- commands are final, and move the ones that expired to the dead letters.
--
-- KEYS  1 lease   2 outbox   3 dead letters   4 partial progress (hash: entry id -> marks)
-- ARGV  1 token   2 partition   3 n, id * n (done)   then m, (id, reason) * m (dead)
-- Reply {'FENCED'} (nothing written) or {'OK', entries deleted, entries dead-lettered}.
--
-- Idempotent without a round id: an entry is dead-lettered only while it is still in
-- the outbox, so a second run of the same call finds nothing left to move.
-- allow-oom: draining the outbox is how a full Redis frees memory.

local token, partition = ARGV[1], ARGV[2]
local n = tonumber(ARGV[3])
if not n then error('finish.lua: bad count ' .. tostring(ARGV[3])) end
local m = tonumber(ARGV[4 + n])
if not m or #ARGV ~= 4 + n + 2 * m then error('finish.lua: ARGV does not match its counts') end

for i, kind in ipairs({'string', 'stream', 'stream', 'hash'}) do
  local found = redis.call('TYPE', KEYS[i]).ok
  if found ~= 'none' and found ~= kind then
    error('finish.lua: ' .. KEYS[i] .. ' is a ' .. found .. ', expected a ' .. kind)
  end
end

if redis.call('GET', KEYS[1]) ~= token then return {'FENCED'} end

local deleted, moved = 0, 0
for i = 4, 3 + n do
  deleted = deleted + redis.call('XDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i])
end
for i = 5 + n, #ARGV, 2 do
  local id, reason = ARGV[i], ARGV[i + 1]
  local found = redis.call('XRANGE', KEYS[2], id, id)
  if #found == 1 then
    local fields = found[1][2]
    fields[#fields + 1] = 'reason'
    fields[#fields + 1] = reason
    fields[#fields + 1] = 'partition'
    fields[#fields + 1] = partition
    fields[#fields + 1] = 'entry'
    fields[#fields + 1] = id
    redis.call('XADD', KEYS[3], '*', unpack(fields))
    deleted = deleted + redis.call('XDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[4], id)
    moved = moved + 1
  end
end
return {'OK', deleted, moved}
