-- Apply a set of counter increments exactly once per event id, atomically.
-- Redelivered events (at-least-once Kafka delivery) find their dedup key and change nothing.
-- KEYS[1]      dedup key of the event (SET NX with a TTL)
-- KEYS[2..]    hashes that receive increments (same hash tag as KEYS[1], so Cluster can run it)
-- ARGV[1]      dedup TTL in seconds
-- ARGV[2..]    triplets: key index (2-based into KEYS), field, integer amount (HINCRBY: exact,
--              so counters are the same whatever order the events arrive in)
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
for i = 2, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
return 1
