-- Apply the state changes of a batch of events to one slot, each event exactly once, atomically.
-- Redelivered events (at-least-once Kafka delivery) find their dedup key and change nothing; the
-- changes of the new ones are summed here and written once per field.
-- KEYS[1..n]   dedup keys of the n events (SET NX with a TTL)
-- KEYS[n+1..]  keys that receive changes (all under one hash tag, so Cluster can run it)
-- ARGV[1]      dedup TTL in seconds
-- ARGV[2]      n
-- ARGV[3]      JSON: for each event, [counters, entries]:
--              counters: [[k, {field: amount, ...}], ...]: HINCRBY KEYS[k] field amount
--                        (integers: exact, so counters are the same whatever order the events
--                        arrive in)
--              entries:  [[k, member, score, keep], ...]: ZADD KEYS[k] score member, then keep
--                        the `keep` highest-scored members of KEYS[k] (the latest by event time,
--                        whatever order they arrived in)
-- Returns, for each event, 1 if this call applied it, 0 if it had been applied before.
local n = tonumber(ARGV[2])
local changes = cjson.decode(ARGV[3])
local sums, order, keep, applied = {}, {}, {}, {}
for i = 1, n do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[1]) then
    applied[i] = 1
    for _, c in ipairs(changes[i][1]) do
      local k = c[1]
      local total = sums[k]
      if not total then
        total = {}
        sums[k] = total
        order[#order + 1] = k
      end
      for field, amount in pairs(c[2]) do
        total[field] = (total[field] or 0) + amount
      end
    end
    for _, e in ipairs(changes[i][2]) do
      redis.call('ZADD', KEYS[e[1]], e[3], e[2])
      keep[e[1]] = e[4]
    end
  else
    applied[i] = 0
  end
end
for _, k in ipairs(order) do
  for field, amount in pairs(sums[k]) do
    redis.call('HINCRBY', KEYS[k], field, string.format('%d', amount))
  end
end
for k, count in pairs(keep) do
  redis.call('ZREMRANGEBYRANK', KEYS[k], 0, -(count + 1))
end
return applied
