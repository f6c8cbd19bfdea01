-- The ops of a view write, shared by apply_events.lua and settle_parked.lua: read_service.view_store
-- loads each of them with this text in front, so both check and run ops the same way.
--
-- An op list is one binary string (packed in Python, where building one string costs far less
-- than passing each op argument on its own). Each op is: its count n of arguments after the key
-- (1 byte), its command's code (1 byte, an index in `commands`), the index in KEYS of the one key
-- it writes (4 bytes), the length of each of its n arguments (4 bytes each), then their bytes.
-- Numbers are big-endian. The header of an op is read by one struct.unpack call: reading Redis's
-- script arguments was a third of the apply's time inside Redis when each length was read alone.
-- A run of ops of one command with the same arguments on different keys (an entity's trigram
-- sets) may come as one fan-out op instead: 255 in place of the count, then as described at
-- FAN_OUT below; it unpacks to the ops it stands for.
local commands = {'SET', 'DEL', 'HSET', 'HDEL', 'HINCRBY', 'ZADD', 'ZREM', 'SADD', 'SREM'}

-- The first byte of a fan-out op, in place of an argument count (an op takes at most 254).
local FAN_OUT = 255

-- struct formats of an op's header (after its first byte) by its argument count.
local headers = {}
local function header(n)
  local format = headers[n]
  if format == nil then
    format = '>BI4' .. string.rep('I4', n)
    headers[n] = format
  end
  return format
end

-- The ops packed in `blob` from byte `pos` on, `count` of them (all up to the end when nil);
-- returns them and the position after the last. Each op is {command name, key index, arguments...}
-- (a code out of range is left as nil, for check_ops to refuse). Raises on a blob cut short.
local function unpack_ops(blob, pos, count)
  local ops = {}
  local size = #blob
  local found = 0
  local sub = string.sub
  while (count == nil and pos <= size) or (count ~= nil and found < count) do
    local n = string.byte(blob, pos)
    if n == nil then
      error('op list cut short')
    end
    if n == FAN_OUT then
      -- A fan-out op: one command with the same m arguments on k keys (an entity's trigram
      -- sets). Its code (1 byte), m (1 byte), k (4 bytes), the k key indexes, the m lengths,
      -- then the arguments once; it stands for k ops, one per key, in that order.
      local code, m, k
      code, m, k, pos = struct.unpack('>BBI4', blob, pos + 1)
      if m < 1 or m > 2 or k < 1 or k > 200 then
        error('malformed fan-out op')
      end
      local slots = {struct.unpack('>' .. string.rep('I4', k), blob, pos)}
      pos = slots[k + 1]
      local lens = {struct.unpack('>' .. string.rep('I4', m), blob, pos)}
      pos = lens[m + 1]
      local first = sub(blob, pos, pos + lens[1] - 1)
      pos = pos + lens[1]
      local second
      if m == 2 then
        second = sub(blob, pos, pos + lens[2] - 1)
        pos = pos + lens[2]
      end
      if pos - 1 > size then
        error('op list cut short')
      end
      local name = commands[code] or false
      for s = 1, k do
        found = found + 1
        ops[found] = {name, slots[s], first, second}
      end
    else
      local op
      if n == 1 then
        local code, key, len
        code, key, len, pos = struct.unpack('>BI4I4', blob, pos + 1)
        op = {commands[code] or false, key, sub(blob, pos, pos + len - 1)}
        pos = pos + len
      elseif n == 2 then
        local code, key, len1, len2
        code, key, len1, len2, pos = struct.unpack('>BI4I4I4', blob, pos + 1)
        local second = pos + len1
        op = {commands[code] or false, key, sub(blob, pos, second - 1), sub(blob, second, second + len2 - 1)}
        pos = second + len2
      else
        local head = {struct.unpack(header(n), blob, pos + 1)}
        op = {commands[head[1]] or false, head[2]}
        pos = head[n + 3]
        for k = 1, n do
          local len = head[k + 2]
          op[k + 2] = sub(blob, pos, pos + len - 1)
          pos = pos + len
        end
      end
      if pos - 1 > size then
        error('op list cut short')
      end
      found = found + 1
      ops[found] = op
    end
  end
  return ops, pos
end

-- nil when every op is an allowed command on a declared key from KEYS[lowest] on, else an error reply.
local function check_ops(ops, lowest)
  for _, op in ipairs(ops) do
    if not op[1] then
      return redis.error_reply('ERR op not allowed')
    end
    local key = op[2]
    if key < lowest or KEYS[key] == nil then
      return redis.error_reply('ERR op names an undeclared key')
    end
  end
  return nil
end

local function run_ops(ops)
  for _, op in ipairs(ops) do
    redis.call(op[1], KEYS[op[2]], unpack(op, 3))
  end
end

-- Commands that take any number of members (or score-member, field-value pairs) after the key.
local variadic = {SADD = true, SREM = true, ZADD = true, ZREM = true, HSET = true, HDEL = true}
-- Arguments gathered in one call at most (Lua's unpack has a limit near 8,000).
local MERGED_MAX = 1000

-- Runs ops in order, except that a run of one variadic command on one key becomes one call: a
-- key's own commands keep their order (any other command on it first sends what was gathered
-- for it), and commands on different keys do not touch each other's data, so the result is the
-- ops' result. Within a batch, the trigram sets and sort indexes shared by many events then
-- cost Redis one call each rather than one per event. Call flush_merged() when done.
local gathered = {}
local function flush_key(key)
  local call = gathered[key]
  if call ~= nil then
    gathered[key] = nil
    redis.call(unpack(call))
  end
end

local function flush_merged()
  for key in pairs(gathered) do
    flush_key(key)
  end
end

local function run_merged(ops)
  for _, op in ipairs(ops) do
    local name, key = op[1], op[2]
    if variadic[name] then
      local call = gathered[key]
      if call ~= nil and call[1] ~= name then
        flush_key(key)
        call = nil
      end
      if call == nil then
        call = {name, KEYS[key]}
        gathered[key] = call
      end
      local at = #call
      for k = 3, #op do
        at = at + 1
        call[at] = op[k]
      end
      if at >= MERGED_MAX then
        flush_key(key)
      end
    else
      if name == 'DEL' then
        -- DEL may name more keys after its own: send everything gathered first.
        flush_merged()
      else
        flush_key(key)
      end
      redis.call(name, KEYS[key], unpack(op, 3))
    end
  end
end
