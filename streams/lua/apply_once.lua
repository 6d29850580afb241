-- Apply the state changes of a batch of events to one slot, each event exactly once, atomically.
-- An event is known by the position of the input it derives from (a Kafka topic-partition and
-- offset) and its id: the slot keeps, per stream, the last offset it applied and the ids it
-- applied at that offset. The score step reads a stream in order and emits what each input makes
-- in that order, so an event below the mark, or at it with a known id, was applied before (a
-- redelivered input makes its outputs again, with the same ids). That is two fields per stream
-- and slot, whatever the traffic. An event without a position falls back to a dedup key with a
-- TTL. The changes of the new events are summed here and written once per field.
-- KEYS[1]      the slot's applied positions: stream -> last offset, stream .. '@' -> '|id|id|'
-- KEYS[2..]    dedup keys of the events without a position, then the keys that receive changes
--              (all under one hash tag, so Cluster can run it)
-- ARGV[1]      dedup TTL in seconds
-- ARGV[2]      JSON: for each event, [guard, counters, entries]:
--              guard:    [stream, offset, id], or the index in KEYS of its dedup key (SET NX, TTL)
--              counters: [[k, {field: amount, ...}], ...]: HINCRBY KEYS[k] field amount
--                        (integers: exact, so counters are the same whatever order the events
--                        arrive in)
--              entries:  [[k, member, score, keep], ...]: ZADD KEYS[k] score member, then keep
--                        the `keep` highest-scored members of KEYS[k] (the latest by event time,
--                        whatever order they arrived in)
-- Returns, for each event, 1 if this call applied it, 0 if it had been applied before.
local events = cjson.decode(ARGV[2])
local sums, order, keep, applied = {}, {}, {}, {}
local marks, moved = {}, {}
for i, ev in ipairs(events) do
  local guard, fresh = ev[1], false
  if type(guard) == 'table' then
    local stream, offset, id = guard[1], guard[2], '|' .. guard[3] .. '|'
    local mark = marks[stream]
    if mark == nil then
      local found = redis.call('HMGET', KEYS[1], stream, stream .. '@')
      mark = {tonumber(found[1] or '-1'), found[2] or '|'}
      marks[stream] = mark
    end
    if offset > mark[1] then
      fresh = true
      mark[1], mark[2] = offset, id
      moved[stream] = true
    elseif offset == mark[1] and not string.find(mark[2], id, 1, true) then
      fresh = true
      mark[2] = mark[2] .. string.sub(id, 2)
      moved[stream] = true
    end
  else
    fresh = redis.call('SET', KEYS[guard], '1', 'NX', 'EX', ARGV[1])
  end
  if fresh then
    applied[i] = 1
    for _, c in ipairs(ev[2]) do
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
    for _, e in ipairs(ev[3]) do
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
for stream in pairs(moved) do
  redis.call('HSET', KEYS[1], stream, string.format('%d', marks[stream][1]), stream .. '@', marks[stream][2])
end
return applied
