-- Settle a parked aggregate (read_service.parking): apply the ops of its re-projected events and
-- update or remove its parked record, only if nothing moved since they were computed.
--
-- KEYS[1]   the projection's checkpoint key
-- KEYS[2..] every key the ops write, the parked hash among them (Redis Cluster-safe, as in
--           apply_events.lua: they share the projection's hash tag)
-- ARGV[1]   the checkpoint the ops were computed at
-- ARGV[2]   the index in KEYS of the parked hash
-- ARGV[3]   the aggregate's field in it
-- ARGV[4]   the record the ops were computed from
-- ARGV[5]   the ops, packed as in apply_events.lua
-- Returns 1 when applied, 0 when the checkpoint or the record moved (nothing written).
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

local parked = KEYS[tonumber(ARGV[2])]
if parked == nil then
  return redis.error_reply('ERR the parked hash is not among the keys')
end
local ok, ops = pcall(unpack_ops, ARGV[5] or '')
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
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] or redis.call('HGET', parked, ARGV[3]) ~= ARGV[4] then
  return 0
end
for _, op in ipairs(ops) do
  redis.call(op[1], KEYS[tonumber(op[2])], unpack(op, 3))
end
return 1
