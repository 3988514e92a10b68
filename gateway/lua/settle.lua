-- Settlement of one request: charge the actual cost, release the concurrency
-- slot and the reservation, correct the token limiter to the actual count, XADD
-- the usage event and (with an Idempotency-Key) store the outcome — atomically,
-- exactly once per request id. Idempotent by its own marker, not by the
-- reservation: a request whose reservation is gone (Redis flushed or failed over
-- mid-request, the Agent deleted) is still charged and metered once; a repeated
-- call finds the marker and changes nothing.
-- Prepended: money.lua (money, money_sum, money_cmp, money_add, money_sub).
--
-- KEYS: 1 inflight zset  2 reserved hash  3 spend hash  4 spend generation
--       5 rl:tok  6 usage stream  7 settled marker  8 idempotency record
-- ARGV: 1 request id  2 cost (base units)  3 current period id  4 marker ttl s
--       5 token delta  6 tokens/s (0 = unlimited)  7 emit (1/0)
--       8 idempotency ttl ms ("" = no record)  9 n = number of outcome fields
--       10 .. 9+2n outcome field, value… (with fp and owner)  then usage event field, value…
-- Returns {1, stream entry id ("" without an event)} when settled now
-- (SettleCode.SETTLED), {0} when it had already been settled (ALREADY_SETTLED).

if redis.call('EXISTS', KEYS[7]) == 1 then return {0} end
local cost = money(ARGV[2], 'cost')
local emit = ARGV[7] == '1'

local amount = redis.call('HGET', KEYS[2], ARGV[1])
if amount then
  local total = money_sum(redis.call('HGET', KEYS[2], '_total') or '0', 'reserved total')
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[2], '_total', money_sub(total, money_sum(amount, 'reservation')))
end
redis.call('ZREM', KEYS[1], ARGV[1])

if cost ~= '0' then
  local period = redis.call('HGET', KEYS[3], 'period')
  if not period then
    -- Spend unknown: never create it (the operator rebuilds it from the ledger and
    -- the stream); tell its rebuild that a settle ran meanwhile.
    redis.call('INCR', KEYS[4])
  elseif #period == #ARGV[3] and ARGV[3] > period then
    redis.call('HSET', KEYS[3], 'period', ARGV[3], 'spent', cost) -- a new period began
  else
    -- This period, or a settle from a gateway whose clock or config is behind (an older or
    -- other-kind period): count it in the stored period; never move the record back.
    local spent = money_sum(redis.call('HGET', KEYS[3], 'spent') or '0', 'spent')
    redis.call('HSET', KEYS[3], 'spent', money_add(spent, cost))
  end
end

local delta = tonumber(ARGV[5])
local rate = tonumber(ARGV[6])
if delta ~= 0 and rate > 0 then
  local tat = redis.call('GET', KEYS[5])
  if tat then
    local ttl = redis.call('PTTL', KEYS[5])
    local shift = delta * 1000000 / rate
    local new_tat = math.ceil(tonumber(tat) + shift)
    redis.call('SET', KEYS[5], string.format('%.0f', new_tat), 'PX', math.max(1000, ttl + math.ceil(shift / 1000)))
  end
end

local n = tonumber(ARGV[9])
local entry_id = ''
if emit then
  local fields = {}
  for i = 10 + 2 * n, #ARGV do fields[#fields + 1] = ARGV[i] end
  entry_id = redis.call('XADD', KEYS[6], '*', unpack(fields))
  local owner = redis.call('HGET', KEYS[8], 'owner')
  if ARGV[8] ~= '' and (not owner or owner == ARGV[1]) then -- another request's claim is not ours to fill
    local outcome = {'state', 'done'}
    for i = 10, 9 + 2 * n do outcome[#outcome + 1] = ARGV[i] end
    redis.call('HSET', KEYS[8], unpack(outcome))
    redis.call('PEXPIRE', KEYS[8], ARGV[8])
  end
end
redis.call('SET', KEYS[7], '1', 'EX', ARGV[4])
return {1, entry_id}
