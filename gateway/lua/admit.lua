-- Admission: auth check, config version, spend known, GCRA (requests and
-- tokens), concurrency slot, FIFO queue and budget reservation, all-or-nothing
-- in one call. The pure reference of the limiter math is openledger/gateway/gcra.py.
-- Prepended: money.lua (money, money_sum, money_cmp, money_add, money_sub).
--
-- KEYS: 1 apikey  2 agent config  3 inflight zset  4 reserved hash  5 spend hash
--       6 rl:req  7 rl:tok  8 queue stream  9 stats
-- ARGV: 1 agent ref  2 config version  3 request id  4 now µs ("" = Redis TIME)
--       5 requests/s  6 burst  7 tokens/s  8 token burst  9 token cost
--       10 max concurrency (0 = none)  11 in-flight ttl µs  12 reserve (base units)
--       13 budget (base units, "" = none)  14 hard (1/0)  15 current period id
--       16 queue max depth  17 queue entry id ("" = first attempt)  18 queue deadline µs
-- Returns {code, a, b} (codes: AdmitCode in openledger/gateway/scripts.py):
--   1 admitted {1, budget remaining ("" none), now, request backlog µs, token backlog µs}
--     (backlog: how far the limiter's TAT is ahead of now, "" when unlimited; for x-ratelimit-*)
--  -1 unknown or revoked key      -2 stale config version
--  -3 rate limited {-3, retry after µs, 1 requests | 2 tokens}
--  -4 token cost above the token burst (can never pass)
--  -5 budget exhausted {-5, remaining}
--  -6 queued {-6, entry id}       -7 queue full
--  -8 still waiting (queued, no slot for this entry yet)
--  -9 spend unknown: the Agent has a budget but no spend record (Redis lost it;
--     the operator is rebuilding it from the ledger)

local function fmt_us(x) return string.format('%.0f', x) end -- times in µs, never money

if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local version = redis.call('HGET', KEYS[2], 'version')
if version ~= ARGV[2] then return {-2} end

local reserve = money(ARGV[12], 'reserve')
local budget = ARGV[13] ~= '' and money(ARGV[13], 'budget') or nil
local entry = ARGV[17]
local spent = '0'
if budget then
  local spend = redis.call('HMGET', KEYS[5], 'period', 'spent')
  if not spend[1] then
    if entry ~= '' then redis.call('XDEL', KEYS[8], entry) end
    return {-9}
  end
  -- A later period of the same kind began: nothing spent in it yet. Anything else (this period,
  -- or a record a gateway with a clock or config behind this one wrote) counts in full.
  if not (#spend[1] == #ARGV[15] and ARGV[15] > spend[1]) then spent = money_sum(spend[2] or '0', 'spent') end
end

local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Reclaim slots and reservations of requests whose gateway died (ttl passed).
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 32)
for _, id in ipairs(expired) do
  local amount = redis.call('HGET', KEYS[4], id)
  if amount then
    local total = money_sum(redis.call('HGET', KEYS[4], '_total') or '0', 'reserved total')
    redis.call('HDEL', KEYS[4], id)
    redis.call('HSET', KEYS[4], '_total', money_sub(total, money_sum(amount, 'reservation')))
  end
  redis.call('ZREM', KEYS[3], id)
end

-- GCRA for requests and tokens (see gcra.py): decide both before writing either.
local function gcra(key, rate, burst, cost)
  if rate <= 0 or cost <= 0 then return true, nil, 0 end
  if cost > burst then return false, nil, -1 end
  local interval = 1000000 / rate
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local need = (tat - now) + interval * cost
  local tolerance = interval * burst
  if need > tolerance then return false, nil, math.ceil(need - tolerance) end
  return true, now + math.ceil(need), 0
end

local function leave_queue()
  if entry ~= '' then redis.call('XDEL', KEYS[8], entry) end
end

local ok_r, tat_r, wait_r = gcra(KEYS[6], tonumber(ARGV[5]), tonumber(ARGV[6]), 1)
local ok_t, tat_t, wait_t = gcra(KEYS[7], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]))
if not ok_t and wait_t == -1 then leave_queue() return {-4} end
if not (ok_r and ok_t) then
  leave_queue()
  redis.call('HINCRBY', KEYS[9], 'rate_limited', 1)
  if not ok_r then return {-3, wait_r, 1} end
  return {-3, wait_t, 2}
end

-- Concurrency with a FIFO of waiters; expired waiters at the head are dropped.
local max_conc = tonumber(ARGV[10])
if max_conc > 0 then
  local head = redis.call('XRANGE', KEYS[8], '-', '+', 'COUNT', 32)
  local waiting = {}
  for _, e in ipairs(head) do
    local deadline = tonumber(e[2][2])
    if deadline < now and e[1] ~= entry then
      redis.call('XDEL', KEYS[8], e[1])
    else
      table.insert(waiting, e[1])
    end
  end
  local free = max_conc - redis.call('ZCARD', KEYS[3])
  local depth = redis.call('XLEN', KEYS[8])
  local admitted = false
  if entry == '' then
    admitted = free > depth
  else
    for rank, id in ipairs(waiting) do
      if id == entry then admitted = rank <= free break end
    end
  end
  if not admitted then
    if entry ~= '' then return {-8} end
    if depth >= tonumber(ARGV[16]) then
      redis.call('HINCRBY', KEYS[9], 'queue_full', 1)
      return {-7}
    end
    local id = redis.call('XADD', KEYS[8], '*', 'd', ARGV[18], 'r', ARGV[3])
    return {-6, id}
  end
end

-- Budget: spent this period + reservations in flight + this reservation.
local reserved = money_sum(redis.call('HGET', KEYS[4], '_total') or '0', 'reserved total')
local remaining = ''
if budget then
  local committed = money_add(spent, reserved)
  local after = money_add(committed, reserve)
  if ARGV[14] == '1' and money_cmp(after, budget) > 0 then
    leave_queue()
    redis.call('HINCRBY', KEYS[9], 'budget_rejected', 1)
    return {-5, money_sub(budget, committed)}
  end
  remaining = money_sub(budget, after)
end

-- Commit.
leave_queue()
if tat_r then redis.call('SET', KEYS[6], fmt_us(tat_r), 'PX', math.ceil((tat_r - now) / 1000) + 1000) end
if tat_t then redis.call('SET', KEYS[7], fmt_us(tat_t), 'PX', math.ceil((tat_t - now) / 1000) + 1000) end
redis.call('ZADD', KEYS[3], fmt_us(now + tonumber(ARGV[11])), ARGV[3])
redis.call('HSET', KEYS[4], ARGV[3], reserve, '_total', money_add(reserved, reserve))
return {1, remaining, fmt_us(now), tat_r and fmt_us(tat_r - now) or '', tat_t and fmt_us(tat_t - now) or ''}
