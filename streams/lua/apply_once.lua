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
-- ARGV[3]      JSON: time-bucket hashes to keep to a history, [[k, keep, step, [part, ...]], ...]:
--              fields '<start>:<part>' of KEYS[k] whose start lies more than `keep` seconds behind
--              the newest start ever written there ('_hi') are deleted ('_lo': where the deleting
--              has got to), and increments to them dropped, so the hash holds `keep` of history
--              whatever the order the events arrive in; '_first': no bucket starts before it (the
--              oldest start written, or the horizon once deleting passed it), so that a reader
--              of a young hash's window names only the buckets that can exist
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
local function start_of(field)
  return tonumber(string.match(field, '^(%-?%d+):'))
end
for _, pr in ipairs(cjson.decode(ARGV[3])) do
  local k, keep, step, parts = pr[1], pr[2], pr[3], pr[4]
  local fields = sums[k]
  if fields then
    local marks = redis.call('HMGET', KEYS[k], '_hi', '_lo', '_first')
    local hi, first = tonumber(marks[1]), tonumber(marks[3])
    -- a hash written before '_first' was kept: its oldest bucket is unknown, so none is bounded
    local unknown = first == nil and redis.call('EXISTS', KEYS[k]) == 1
    for field in pairs(fields) do
      local s = start_of(field)
      if s and (hi == nil or s > hi) then hi = s end
    end
    if hi then
      local horizon = math.floor((hi - keep) / step) * step
      for field in pairs(fields) do
        local s = start_of(field)
        if s and s < horizon then
          fields[field] = nil
        elseif s and not unknown and (first == nil or s < first) then
          first = s
        end
      end
      local lo = tonumber(marks[2])
      if lo == nil or (horizon - lo) / step > 20000 then
        for _, field in ipairs(redis.call('HKEYS', KEYS[k])) do
          local s = start_of(field)
          if s and s < horizon then redis.call('HDEL', KEYS[k], field) end
        end
      else
        for b = lo, horizon - step, step do
          for _, part in ipairs(parts) do
            redis.call('HDEL', KEYS[k], string.format('%d:%s', b, part))
          end
        end
      end
      if lo == nil or horizon > lo then lo = horizon end
      if unknown or first == nil or first < horizon then first = horizon end
      redis.call('HSET', KEYS[k], '_hi', string.format('%d', hi), '_lo', string.format('%d', lo),
        '_first', string.format('%d', first))
    end
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
