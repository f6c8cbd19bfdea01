-- Apply a batch of events to one projection's views, each only if it is the next one for them.
--
-- KEYS[1]   the projection's checkpoint key (a string holding the last applied position; missing = 0)
-- KEYS[2..] every key the ops write: the script touches no key it is not given here, so that a
--           call is Redis Cluster-safe when the keys share a hash tag (see read_service.keys)
-- ARGV      segments, three arguments each: first, last, ops
--           A segment stands for the events at positions first..last: those before `last` change
--           nothing but the checkpoint (events the projection does not handle), the event at
--           `last` runs the ops. `ops` is one binary string (packed in Python, where building one
--           string costs far less than passing each op argument on its own): each op is its
--           argument count, then each argument as its length and bytes (lengths are 4-byte
--           big-endian). An op's arguments are the command name, the index in KEYS of the one key
--           it writes, then the command's other arguments.
--
-- A segment is applied when the checkpoint c is in [first - 1, last - 1] (its events after c
-- are the next ones), skipped as a duplicate when c >= last, and a gap (c < first - 1) stops
-- the batch. Returns {checkpoint before, checkpoint after}.
local allowed = {
  SET = true, DEL = true, HSET = true, HDEL = true, HINCRBY = true,
  ZADD = true, ZREM = true, SADD = true, SREM = true,
}

local function unpack_ops(blob)
  local ops = {}
  local pos = 1
  local size = #blob
  while pos <= size do
    local n, len
    n, pos = struct.unpack('>I4', blob, pos)
    local op = {}
    for k = 1, n do
      len, pos = struct.unpack('>I4', blob, pos)
      if pos + len - 1 > size then
        return nil
      end
      op[k] = string.sub(blob, pos, pos + len - 1)
      pos = pos + len
    end
    ops[#ops + 1] = op
  end
  return ops
end

-- Check every segment and op before running any: Redis does not roll a script back, so a
-- malformed batch must be refused while nothing has been written yet.
local segments = {}
local previous = 0
local i = 1
while i <= #ARGV do
  local first, last = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if first == nil or last == nil or ARGV[i + 2] == nil or first < 1 or last < first or first <= previous then
    return redis.error_reply('ERR malformed segment: positions must be positive and ascending')
  end
  previous = last
  local ok, ops = pcall(unpack_ops, ARGV[i + 2])
  if not ok or ops == nil then
    return redis.error_reply('ERR malformed op list')
  end
  for _, op in ipairs(ops) do
    if #op < 2 or not allowed[string.upper(op[1])] then
      return redis.error_reply('ERR op not allowed: ' .. tostring(op[1]))
    end
    local key = tonumber(op[2])
    if key == nil or key < 2 or KEYS[key] == nil then
      return redis.error_reply('ERR op names an undeclared key')
    end
  end
  segments[#segments + 1] = {first, last, ARGV[i + 1], ops}
  i = i + 3
end

local checkpoint = tonumber(redis.call('GET', KEYS[1]) or '0')
local before = checkpoint
for _, segment in ipairs(segments) do
  local first, last = segment[1], segment[2]
  if checkpoint < first - 1 then
    break
  end
  if checkpoint < last then
    for _, op in ipairs(segment[4]) do
      redis.call(op[1], KEYS[tonumber(op[2])], unpack(op, 3))
    end
    -- Each segment moves the checkpoint itself, so that a MONITOR of Redis (the lease
    -- takeover test audits it) shows every event that writes views at its own position.
    redis.call('SET', KEYS[1], segment[3])
    checkpoint = last
  end
end
return {before, checkpoint}
