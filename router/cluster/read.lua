#!lua flags=allow-oom
-- A partition owner's read of its inbox (inbox.py), fenced like its commits: a worker
-- that lost the lease must not move new entries into the partition's pending list
-- after the new owner has replayed it, or they would wait there until the next takeover.
--
-- KEYS  1 lease   2 inbox
-- ARGV  1 token   2 group   3 consumer (the partition's name)   4 count
--       5 start: '>' for new entries, or an id to page through the pending ones after it
-- Reply {'FENCED'} or {'OK', cursor, id, {field, value, ...}, ...}. The cursor is the id
-- of the last entry returned; when a '>' read finds nothing, the stream's newest entry
-- (or 0-0): every entry after it is new.
--
-- allow-oom: reading frees memory once the round commits.

if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'FENCED'} end

local found = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
                         'STREAMS', KEYS[2], ARGV[5])
local reply = {'OK', '0-0'}
local gone = {}
if found and found[1] then
  for _, entry in ipairs(found[1][2]) do
    if entry[2] then
      reply[#reply + 1] = entry[1]
      reply[#reply + 1] = entry[2]
    else
      -- Deleted while pending: nothing to replay, and it would come back on every recovery.
      gone[#gone + 1] = entry[1]
    end
    reply[2] = entry[1]
  end
end
if #gone > 0 then redis.call('XACK', KEYS[2], ARGV[2], unpack(gone)) end
if ARGV[5] == '>' and reply[2] == '0-0' then
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if newest[1] then reply[2] = newest[1][1] end
end
return reply
