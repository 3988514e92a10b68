-- The stream journal's leases (journal.py), timed by Redis' own clock so that
-- gateways on hosts with different clocks agree on when a lease expired.
--
-- ARGV[1] = mode:
--   'write'  KEYS: 1 index zset  2 record hash
--            ARGV: 2 lease ms (0 = sweepable now)  3 record ttl ms  4 request id  5.. hash field, value…
--            HSET the record, give it its ttl, and (re)set its lease.
--   'renew'  KEYS: 1 index zset  2.. record hashes
--            ARGV: 2 lease ms  3 record ttl ms  4.. request ids (in KEYS' order)
--            Extend the leases that still exist (never re-creates one) and their records' ttl.
--   'expired' KEYS: 1 index zset   ARGV: 2 batch size
--            The request ids whose lease has expired.
-- Times are whole milliseconds, well inside a double's exact integers; no money here.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = ARGV[1]

if mode == 'write' then
  -- The lease first: if it fails (a script error is not rolled back) nothing is written.
  redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[4])
  local fields = {}
  for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
  if #fields > 0 then redis.call('HSET', KEYS[2], unpack(fields)) end
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 1
elseif mode == 'renew' then
  local expiry = string.format('%d', now + tonumber(ARGV[2]))
  for i = 2, #KEYS do
    if redis.call('ZSCORE', KEYS[1], ARGV[i + 2]) then
      redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i + 2])
      redis.call('PEXPIRE', KEYS[i], ARGV[3])
    end
  end
  return 1
elseif mode == 'expired' then
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now), 'LIMIT', 0, tonumber(ARGV[2]))
end
return redis.error_reply('journal.lua: unknown mode ' .. tostring(mode))
