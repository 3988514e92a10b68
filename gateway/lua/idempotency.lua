-- The Idempotency-Key record of one Agent's key: claim it before admission,
-- release an unfinished claim when the request was not metered. settle.lua
-- stores the outcome (state "done") atomically with the usage event.
--
-- KEYS: 1 record (hash: state running|done, fp = body fingerprint, owner = request id,
--       then the stored outcome: status, ctype, body, event, remaining)
-- ARGV: 1 "claim" | "release"  2 fingerprint  3 request id  4 running ttl ms
-- Returns (IdempotencyCode in openledger/gateway/scripts.py):
--   claim:   {1} claimed (run the request)   {2, outcome…} done: replay this outcome
--            {-1} in progress (another request holds the key)   {-2} same key, other body
--   release: {1} released   {0} not ours or already done (kept)

local state = redis.call('HMGET', KEYS[1], 'state', 'fp', 'owner')
if ARGV[1] == 'release' then
  if state[1] == 'running' and state[3] == ARGV[3] then
    redis.call('DEL', KEYS[1])
    return {1}
  end
  return {0}
end
if not state[1] then
  redis.call('HSET', KEYS[1], 'state', 'running', 'fp', ARGV[2], 'owner', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1}
end
if state[2] ~= ARGV[2] then return {-2} end
if state[1] == 'running' then return {-1} end
-- A write, so that a durability wait issued after this call also covers the stored outcome.
redis.call('HINCRBY', KEYS[1], 'replays', 1)
return {2, redis.call('HGET', KEYS[1], 'status'), redis.call('HGET', KEYS[1], 'ctype'),
        redis.call('HGET', KEYS[1], 'body'), redis.call('HGET', KEYS[1], 'event'),
        redis.call('HGET', KEYS[1], 'remaining')}
