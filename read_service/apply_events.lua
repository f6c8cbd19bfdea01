-- Apply a batch of events to one projection's views, each only if it is the next one for them.
-- Runs with ops.lua in front of it (read_service.view_store), which reads, checks and runs ops.
--
-- KEYS[1]   the projection's checkpoint key (a string holding the last applied position; missing = 0)
-- KEYS[2]   the key space's fingerprint (read_service.log_guard), beside the checkpoint
-- KEYS[3..] every key the ops write: the script touches no key it is not given here, so that a
--           call is Redis Cluster-safe when the keys share a hash tag (see read_service.keys)
-- ARGV[1]   the segments, packed in one string. A segment stands for the events at positions
--           first..last: those before `last` change nothing but the checkpoint (events the
--           projection does not handle), the event at `last` runs the ops. Each is: its op
--           count, the lengths of `first` and `last` (4-byte big-endian each), their decimal
--           digits, then its ops (as ops.lua reads them).
-- ARGV[2]   optional: the position of a fingerprint to store after the segments, and
-- ARGV[3]   the event id seen there. It is stored only for a position the checkpoint has
--           reached, and never over a higher one, so that two writers sharing a key space leave
--           the one a single writer would.
--
-- A segment is applied when the checkpoint c is in [first - 1, last - 1] (its events after c
-- are the next ones), skipped as a duplicate when c >= last, and a gap (c < first - 1) stops
-- the batch. Returns {checkpoint before, checkpoint after}.

-- Check every segment and op before running any: Redis does not roll a script back, so a
-- malformed batch must be refused while nothing has been written yet.
local function unpack_segments(blob)
  local segments = {}
  local pos = 1
  local previous = 0
  while pos <= #blob do
    local count, first_len, last_len
    count, first_len, last_len, pos = struct.unpack('>I4I4I4', blob, pos)
    local first = tonumber(string.sub(blob, pos, pos + first_len - 1))
    pos = pos + first_len
    local last_text = string.sub(blob, pos, pos + last_len - 1)
    local last = tonumber(last_text)
    pos = pos + last_len
    if first == nil or last == nil or first < 1 or last < first or first <= previous then
      return nil, 'ERR malformed segment: positions must be positive and ascending'
    end
    previous = last
    local ops
    ops, pos = unpack_ops(blob, pos, count)
    segments[#segments + 1] = {first, last, last_text, ops}
  end
  return segments
end

local ok, segments, problem = pcall(unpack_segments, ARGV[1] or '')
if not ok then
  return redis.error_reply('ERR malformed op list')
end
if segments == nil then
  return redis.error_reply(problem)
end
for _, segment in ipairs(segments) do
  local refused = check_ops(segment[4], 3)
  if refused then
    return refused
  end
end

local checkpoint = tonumber(redis.call('GET', KEYS[1]) or '0')
local before = checkpoint
for _, segment in ipairs(segments) do
  local first, last = segment[1], segment[2]
  if checkpoint < first - 1 then
    break
  end
  if checkpoint < last then
    run_merged(segment[4])
    -- Each segment moves the checkpoint itself, so that a MONITOR of Redis (the lease
    -- takeover test audits it) shows every event that writes views at its own position.
    redis.call('SET', KEYS[1], segment[3])
    checkpoint = last
  end
end
flush_merged()

local fingerprint = tonumber(ARGV[2] or '')
if fingerprint ~= nil and checkpoint >= fingerprint then
  local current = redis.call('GET', KEYS[2])
  local stored = current and tonumber(string.match(current, '^(%d+):'))
  if not (stored and stored > fingerprint) then
    redis.call('SET', KEYS[2], ARGV[2] .. ':' .. ARGV[3])
  end
end
return {before, checkpoint}
