-- One step of the ordered walk of a search term's trigram sets (read_service.search).
--
-- KEYS[1] is the term's rarest trigram set, KEYS[2..n] its other trigram sets: sorted sets
-- of entity ids (16 bytes each), each scored by the entity's rank (its default sort key). The
-- walk reads KEYS[1] in score order (ties by id, as the sort index orders them) from just after the
-- position (ARGV[2], ARGV[3]) and keeps the ids found in every other set, until ARGV[5]
-- ids are kept, ARGV[6] ids are walked, or the range up to ARGV[4] is exhausted. Its work
-- follows the page and the density of the term, not the size of the sets.
--
-- ARGV[1] '1' to walk downwards, else upwards
-- ARGV[2] score to start at ('-inf' or '+inf' for an end of the set), inclusive
-- ARGV[3] id at that score to start after ('' for none): ids at the start score up to it
--         (down to it, walking downwards) are skipped
-- ARGV[4] score to stop at, inclusive ('+inf' or '-inf' for none)
-- ARGV[5] ids to keep; ARGV[6] ids to walk at most; ARGV[7] ids read per range call
--
-- Replies {done, last score, last id, walked, id1, score1, id2, score2, ...}: done is 1 when
-- the range is exhausted; the last walked (score, id) is where the next step starts after;
-- walked is how many ids of KEYS[1] the step read.
local down = ARGV[1] == '1'
local start = ARGV[2]
local after = ARGV[3]
local stop = ARGV[4]
local wanted = tonumber(ARGV[5])
local budget = tonumber(ARGV[6])
local chunk = tonumber(ARGV[7])
local start_n = tonumber(start)
local offset = 0
local walked = 0
local kept = {}
local last_score, last_id = start, after
local done = 0

-- Byte order of two ids (-1, 0, 1). Lua's own string comparison follows the server's
-- collation locale, which need not be byte order for binary ids.
local byte = string.byte
local function compare(a, b)
  if a == b then
    return 0
  end
  for i = 1, math.min(#a, #b) do
    local x, y = byte(a, i), byte(b, i)
    if x ~= y then
      return x < y and -1 or 1
    end
  end
  return #a < #b and -1 or 1
end

local function skipped(id, score)
  if after == '' or tonumber(score) ~= start_n then
    return false
  end
  if down then
    return compare(id, after) >= 0
  end
  return compare(id, after) <= 0
end

while #kept < 2 * wanted and walked < budget do
  local count = math.min(chunk, budget - walked)
  local reply
  if down then
    reply = redis.call('ZREVRANGEBYSCORE', KEYS[1], start, stop, 'WITHSCORES', 'LIMIT', offset, count)
  else
    reply = redis.call('ZRANGEBYSCORE', KEYS[1], start, stop, 'WITHSCORES', 'LIMIT', offset, count)
  end
  local n = #reply / 2
  local ids, scores = {}, {}
  for i = 1, n do
    local id, score = reply[2 * i - 1], reply[2 * i]
    if not skipped(id, score) then
      ids[#ids + 1] = id
      scores[#scores + 1] = score
    end
  end
  walked = walked + n
  -- Membership in the other sets, one ZMSCORE per set for the ids still standing.
  for k = 2, #KEYS do
    if #ids == 0 then
      break
    end
    local found = redis.call('ZMSCORE', KEYS[k], unpack(ids))
    local kept_ids, kept_scores = {}, {}
    for i = 1, #ids do
      if found[i] then
        kept_ids[#kept_ids + 1] = ids[i]
        kept_scores[#kept_scores + 1] = scores[i]
      end
    end
    ids, scores = kept_ids, kept_scores
  end
  for i = 1, #ids do
    kept[#kept + 1] = ids[i]
    kept[#kept + 1] = scores[i]
  end
  if n > 0 then
    local score = reply[2 * n]
    if tonumber(score) == start_n then
      -- Every id of this chunk ties at the start score: move past them by offset.
      offset = offset + n
    else
      start, start_n, offset = score, tonumber(score), 0
    end
    after = reply[2 * n - 1]
    last_score, last_id = score, after
  end
  if n < count then
    done = 1
    break
  end
  chunk = math.min(chunk * 2, 1024)
end

local out = {done, last_score, last_id, walked}
for i = 1, #kept do
  out[#out + 1] = kept[i]
end
return out
