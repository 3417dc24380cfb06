-- Admit event types and property keys into one project's schema, atomically.
--
-- Infinario caps a project at N event types, N keys per event type and N
-- customer keys. Many workers run turns of the same project, so each "may this
-- name exist?" is decided here, once: a name is admitted if its set already
-- holds it or still has room (then it is added), and refused otherwise. Sets
-- only grow, so a refusal is final and a retried call gives the same answers.
--
-- KEYS[1]      schema:{P}:types      set: the admitted event types
-- KEYS[2]      schema:{P}:customer   set: the admitted customer property keys
-- KEYS[2+i]    schema:{P}:t:<type_i> set: the admitted property keys of type_i
--              (every key is declared by the caller, which knows the types it asks
--              about, so the script touches no undeclared key)
-- ARGV[1..3]   limits: event types, keys per event type, customer keys
-- ARGV[4]      n, how many event-type key sets follow KEYS[2]
-- ARGV[5..4+n] type_i, the event type whose keys KEYS[2+i] holds
-- then pairs   (set, name), decided in order: set 1 admits the event type
--              `name`, set 2 the customer key `name`, set 2+i the key `name` of
--              type_i (refused unless type_i is admitted, earlier in this call or before)
--
-- Returns {answers, full}: answers[j] is 1 if pair j is admitted, 0 if refused.
-- full holds {set, member, ...} for every set the call touched that is now at
-- or over its limit: with its whole membership the caller can decide every
-- later name of that set alone, since a full set never changes again.

local limits = {tonumber(ARGV[1]), tonumber(ARGV[3])}
local n = tonumber(ARGV[4])
local event_keys = tonumber(ARGV[2])
local first = 5 + n

local function limit_of(set)
  if set <= 2 then
    return limits[set]
  end
  return event_keys
end

local typed = {}  -- set index -> true once its event type is known admitted
local touched = {}
local order = {}
local answers = {}

for j = first, #ARGV - 1, 2 do
  local set = tonumber(ARGV[j])
  local name = ARGV[j + 1]
  local key = KEYS[set]
  local ok = true
  if set > 2 and not typed[set] then
    ok = redis.call('SISMEMBER', KEYS[1], ARGV[2 + set]) == 1
    typed[set] = ok
  end
  if ok and redis.call('SISMEMBER', key, name) == 0 then
    if redis.call('SCARD', key) < limit_of(set) then
      redis.call('SADD', key, name)
    else
      ok = false
    end
  end
  answers[#answers + 1] = ok and 1 or 0
  if not touched[set] then
    touched[set] = true
    order[#order + 1] = set
  end
end

local full = {}
for _, set in ipairs(order) do
  if redis.call('SCARD', KEYS[set]) >= limit_of(set) then
    local entry = {set}
    for _, member in ipairs(redis.call('SMEMBERS', KEYS[set])) do
      entry[#entry + 1] = member
    end
    full[#full + 1] = entry
  end
end

return {answers, full}
