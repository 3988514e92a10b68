-- Settlement of one admitted request: charge the actual cost, release the
-- concurrency slot and the reservation, correct the token limiter to the
-- actual count and XADD the usage event — atomically, exactly once per request
-- id (a repeated call finds no reservation and does nothing).
--
-- KEYS: 1 inflight zset  2 reserved hash  3 spent  4 rl:tok  5 usage stream
-- ARGV: 1 request id  2 cost (budget quanta)  3 spent ttl s  4 token delta
--       5 tokens/s (0 = unlimited)  6 emit (1/0)  7.. usage event field, value…
-- Returns 1 when settled now, 0 when it had already been settled.

local amount = redis.call('HGET', KEYS[2], ARGV[1])
if not amount then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[2], '_total', -tonumber(amount))
redis.call('ZREM', KEYS[1], ARGV[1])

local cost = tonumber(ARGV[2])
if cost > 0 then
  redis.call('INCRBY', KEYS[3], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end

local delta = tonumber(ARGV[4])
local rate = tonumber(ARGV[5])
if delta ~= 0 and rate > 0 then
  local tat = redis.call('GET', KEYS[4])
  if tat then
    local ttl = redis.call('PTTL', KEYS[4])
    local shift = delta * 1000000 / rate
    local new_tat = math.ceil(tonumber(tat) + shift)
    redis.call('SET', KEYS[4], string.format('%.0f', new_tat), 'PX', math.max(1000, ttl + math.ceil(shift / 1000)))
  end
end

if ARGV[6] == '1' then
  local fields = {}
  for i = 7, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('XADD', KEYS[5], '*', unpack(fields))
end
return 1
