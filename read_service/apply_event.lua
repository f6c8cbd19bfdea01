-- Apply one event's view changes if, and only if, the event is the next one for the view.
--
-- KEYS[1]   the view's checkpoint key (a string holding the last applied position; missing = 0)
-- ARGV[1]   the event's position (a positive integer, in canonical decimal form)
-- ARGV[2..] the ops, each written as its argument count n followed by n arguments
--           (the command name, then its arguments), so that binary values pass untouched
--
-- Returns {outcome, checkpoint}: outcome 1 = applied, 0 = duplicate (position <= checkpoint),
-- -1 = gap (position > checkpoint + 1); checkpoint is the value after the call.
--
-- The keys the ops write are not declared in KEYS, so this script cannot run on Redis Cluster.
local checkpoint = tonumber(redis.call('GET', KEYS[1]) or '0')
local position = tonumber(ARGV[1])
if position == nil or position < 1 then
  return redis.error_reply('ERR position must be a positive integer')
end
if position <= checkpoint then
  return {0, checkpoint}
end
if position ~= checkpoint + 1 then
  return {-1, checkpoint}
end

local allowed = {
  SET = true, DEL = true, HSET = true, HDEL = true, HINCRBY = true,
  ZADD = true, ZREM = true, SADD = true, SREM = true,
}
local last = #ARGV

-- Check every op before running any: Redis does not roll a script back, so a malformed
-- list must be refused while nothing has been written yet.
local i = 2
while i <= last do
  local n = tonumber(ARGV[i])
  if n == nil or n < 2 or i + n > last then
    return redis.error_reply('ERR malformed op list')
  end
  if not allowed[string.upper(ARGV[i + 1])] then
    return redis.error_reply('ERR op not allowed: ' .. ARGV[i + 1])
  end
  i = i + n + 1
end

i = 2
while i <= last do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
redis.call('SET', KEYS[1], ARGV[1])
return {1, position}
