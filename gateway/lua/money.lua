-- Exact money arithmetic on decimal strings, prepended to admit.lua and settle.lua.
-- An amount is a string of digits in base units (any size below 10^78, the
-- ledger's NUMERIC(78,0)); it never becomes a Lua number (a double, exact only
-- to 2^53). Sums are done in limbs of 14 digits: each limb and each limb sum
-- stays below 2^53, so every step is exact.

local MONEY_DIGITS = 78
local LIMB = 14
local LIMB_BASE = 100000000000000 -- 10^14

-- A validated, normalised sum read back from Redis (spent, reserved total): digits
-- only, any length (a period's spend may add up past 10^78).
local function money_sum(s, what)
  if type(s) ~= 'string' or not string.find(s, '^%d+$') then
    error({err = 'ERR money: ' .. what .. ' must be a decimal string of base units, got ' .. tostring(s)})
  end
  s = string.gsub(s, '^0+', '')
  if s == '' then return '0' end
  return s
end

-- A validated, normalised amount (no leading zeros, below 10^78), or a script error
-- naming it. Call before any write: a Redis script is not rolled back by an error.
local function money(s, what)
  s = money_sum(s, what)
  if #s > MONEY_DIGITS then
    error({err = 'ERR money: ' .. what .. ' must be below 10^78 base units'})
  end
  return s
end

-- -1, 0 or 1 as a <, = or > b (normalised amounts). Compared limb by limb from
-- the most significant end (string < would follow the server's collation locale).
local function money_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  for i = 1, #a, LIMB do
    local x, y = tonumber(string.sub(a, i, i + LIMB - 1)), tonumber(string.sub(b, i, i + LIMB - 1))
    if x ~= y then return x < y and -1 or 1 end
  end
  return 0
end

local function limbs(s)
  local out = {}
  local i = #s
  while i > 0 do
    local j = math.max(1, i - LIMB + 1)
    out[#out + 1] = tonumber(string.sub(s, j, i))
    i = j - 1
  end
  return out
end

local function unlimbs(t)
  local n = #t
  while n > 1 and t[n] == 0 do n = n - 1 end
  local parts = {string.format('%d', t[n])}
  for k = n - 1, 1, -1 do parts[#parts + 1] = string.format('%014d', t[k]) end
  return table.concat(parts)
end

local function money_add(a, b)
  local x, y, out = limbs(a), limbs(b), {}
  local carry = 0
  for k = 1, math.max(#x, #y) do
    local v = (x[k] or 0) + (y[k] or 0) + carry
    if v >= LIMB_BASE then v, carry = v - LIMB_BASE, 1 else carry = 0 end
    out[k] = v
  end
  if carry > 0 then out[#out + 1] = carry end
  return unlimbs(out)
end

-- a - b, or '0' when b > a (a reserved total never goes below zero).
local function money_sub(a, b)
  if money_cmp(a, b) <= 0 then return '0' end
  local x, y, out = limbs(a), limbs(b), {}
  local borrow = 0
  for k = 1, #x do
    local v = x[k] - (y[k] or 0) - borrow
    if v < 0 then v, borrow = v + LIMB_BASE, 1 else borrow = 0 end
    out[k] = v
  end
  return unlimbs(out)
end
