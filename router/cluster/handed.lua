-- A partition's owner gives it back with nothing in flight (worker.py hand_back):
-- leave the next owner a mark that it need not wait before sending, but only while
-- the lease still holds this owner's token. A mark from an owner whose lease had
-- already run out could tell a later owner to skip the wait it does need.
--
-- KEYS  1 lease   2 handed mark
-- ARGV  1 token
-- Reply 1 when the mark is set, 0 when the lease is no longer this owner's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
