-- Send one failed command from the dead letters back through its customer's partition
-- (``dead-letters replay``): the partition's owner turns the input entry into an
-- outbox command, in the customer's order, encoded in today's dialect.
--
-- KEYS  1 dead letters (dl:{P})   2 the customer's partition input (in:{P}:<k mod partitions>)
-- ARGV  1 the dead letter's stream id   2 its customer key k, as the caller read it
-- Reply {'OK', the input entry's id}, or {'GONE'}: no such dead letter, nothing written.
--
-- Idempotent: the dead letter leaves dl:{P} in the same step that adds the input entry,
-- so a second run of the same call (a retry after a lost answer) finds it gone.
-- The caller names the input stream (a script touches only the keys it is given) and
-- passes k so the script can check that it chose the partition of this letter's customer.

local id, customer = ARGV[1], ARGV[2]
if #ARGV ~= 2 then error('replay.lua: expected 2 arguments, got ' .. #ARGV) end

for i = 1, 2 do
  local found = redis.call('TYPE', KEYS[i]).ok
  if found ~= 'none' and found ~= 'stream' then
    error('replay.lua: ' .. KEYS[i] .. ' is a ' .. found .. ', expected a stream')
  end
end

local found = redis.call('XRANGE', KEYS[1], id, id)
if #found == 0 then return {'GONE'} end

local fields = {}
local list = found[1][2]
for i = 1, #list, 2 do fields[list[i]] = list[i + 1] end
if fields['kind'] ~= 'failed' or not fields['command'] then
  error('replay.lua: dead letter ' .. id .. ' is not a failed command; only those are replayed')
end
if fields['k'] ~= customer then
  error('replay.lua: dead letter ' .. id .. ' belongs to customer ' .. tostring(fields['k'])
    .. ', not ' .. customer .. '; the input stream was chosen for the wrong customer')
end

local added = redis.call('XADD', KEYS[2], '*', 'k', customer, 'c', 'replay',
  'command', fields['command'])
redis.call('XDEL', KEYS[1], id)
return {'OK', added}
