-- Apply a set of state changes exactly once per event id, atomically.
-- Redelivered events (at-least-once Kafka delivery) find their dedup key and change nothing.
-- KEYS[1]      dedup key of the event (SET NX with a TTL)
-- KEYS[2..]    keys that receive changes (same hash tag as KEYS[1], so Cluster can run it)
-- ARGV[1]      dedup TTL in seconds
-- ARGV[2]      the changes, a JSON array of string triplets [op, a, b]: one argument, so that
--              the client encodes a score's dozens of changes in one C call; op is
--              "<n>":  HINCRBY KEYS[n] a b (integers: exact, so counters are the same whatever
--                      order the events arrive in)
--              "z<n>": ZADD KEYS[n] b a (member a at score b: event time)
--              "t<n>": keep the a highest-scored members of KEYS[n] (the latest by event time,
--                      whatever order they arrived in)
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local ops = cjson.decode(ARGV[2])
for i = 1, #ops do
  local op, a, b = ops[i][1], ops[i][2], ops[i][3]
  local c = string.sub(op, 1, 1)
  if c == 'z' then
    redis.call('ZADD', KEYS[tonumber(string.sub(op, 2))], b, a)
  elseif c == 't' then
    redis.call('ZREMRANGEBYRANK', KEYS[tonumber(string.sub(op, 2))], 0, -(tonumber(a) + 1))
  else
    redis.call('HINCRBY', KEYS[tonumber(op)], a, b)
  end
end
return 1
