-- Settle a parked aggregate (read_service.parking): apply the ops of its re-projected events and
-- update or remove its parked record, only if nothing moved since they were computed. Runs with
-- ops.lua in front of it (read_service.view_store), as apply_events.lua does.
--
-- KEYS[1]   the projection's checkpoint key
-- KEYS[2..] every key the ops write, the parked hash among them (Redis Cluster-safe, as in
--           apply_events.lua: they share the projection's hash tag)
-- ARGV[1]   the checkpoint the ops were computed at
-- ARGV[2]   the index in KEYS of the parked hash
-- ARGV[3]   the aggregate's field in it
-- ARGV[4]   the record the ops were computed from
-- ARGV[5]   the ops, packed as ops.lua reads them
-- Returns 1 when applied, 0 when the checkpoint or the record moved (nothing written).
local parked = KEYS[tonumber(ARGV[2])]
if parked == nil then
  return redis.error_reply('ERR the parked hash is not among the keys')
end
local ok, ops = pcall(unpack_ops, ARGV[5] or '', 1, nil)
if not ok then
  return redis.error_reply('ERR malformed op list')
end
local refused = check_ops(ops, 2)
if refused then
  return refused
end
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] or redis.call('HGET', parked, ARGV[3]) ~= ARGV[4] then
  return 0
end
run_ops(ops)
return 1
