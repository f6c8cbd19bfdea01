-- The ops of a view write, shared by apply_events.lua and settle_parked.lua: read_service.view_store
-- loads each of them with this text in front, so both check and run ops the same way.
--
-- An op list is one binary string (packed in Python, where building one string costs far less
-- than passing each op argument on its own): each op is its argument count, then each argument
-- as its length and bytes (counts and lengths are 4-byte big-endian).
-- An op's arguments are the command name, the index in KEYS of the one key it writes, then the
-- command's other arguments.
local allowed = {
  SET = true, DEL = true, HSET = true, HDEL = true, HINCRBY = true,
  ZADD = true, ZREM = true, SADD = true, SREM = true,
}

-- The ops packed in `blob` from byte `pos` on, `count` of them (all up to the end when nil);
-- returns them and the position after the last. Raises on a blob cut short.
local function unpack_ops(blob, pos, count)
  local ops = {}
  local size = #blob
  while (count == nil and pos <= size) or (count ~= nil and #ops < count) do
    local n, len
    n, pos = struct.unpack('>I4', blob, pos)
    local op = {}
    for k = 1, n do
      len, pos = struct.unpack('>I4', blob, pos)
      if pos + len - 1 > size then
        error('op list cut short')
      end
      op[k] = string.sub(blob, pos, pos + len - 1)
      pos = pos + len
    end
    ops[#ops + 1] = op
  end
  return ops, pos
end

-- nil when every op is an allowed command on a declared key from KEYS[lowest] on, else an error reply.
local function check_ops(ops, lowest)
  for _, op in ipairs(ops) do
    if #op < 2 or not allowed[string.upper(op[1])] then
      return redis.error_reply('ERR op not allowed: ' .. tostring(op[1]))
    end
    local key = tonumber(op[2])
    if key == nil or key < lowest or KEYS[key] == nil then
      return redis.error_reply('ERR op names an undeclared key')
    end
  end
  return nil
end

local function run_ops(ops)
  for _, op in ipairs(ops) do
    redis.call(op[1], KEYS[tonumber(op[2])], unpack(op, 3))
  end
end
