-- Shared by every script of agent-budget-redis (prepended to each).
-- Counts are Lua doubles, exact up to 2^53; every count is kept within
-- MAX = 2^52 - 1, so a sum of two is exact before it is clamped.
local MAX = 4503599627370495
local function num(s)
  local n = tonumber(s)
  if n == nil or n ~= n or n < 0 then return 0 end
  if n > MAX then return MAX end
  return math.floor(n)
end
local function str(n) return string.format('%.0f', n) end
local function add(a, b)
  local s = a + b
  if s > MAX then return MAX end
  return s
end
local function sub(a, b)
  if b >= a then return 0 end
  return a - b
end
local function min(a, b) if a < b then return a end return b end
local function max(a, b) if a > b then return a end return b end
-- The fleet's timeline: the server's TIME in ms, unless the caller gives one.
local function clock(given)
  if given ~= '' then return num(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- The fleet's record: made, with a fence, if missing (first start, or a
-- Redis that lost its data). Returns epoch, created, fence, cfgver.
local function fleet(key, now, candidate, grace)
  local f = redis.call('HMGET', key, 'epoch', 'created', 'fence', 'cfgver')
  if not f[1] then
    local fence = add(now, grace)
    redis.call('HSET', key, 'epoch', candidate, 'created', str(now), 'fence', str(fence), 'cfgver', '0')
    return candidate, now, fence, 0
  end
  return f[1], num(f[2]), num(f[3]), num(f[4])
end
-- An agent's budget, stored as 'tokens calls window_secs'.
local function budget(cfg)
  if not cfg then return nil end
  local t, c, w = string.match(cfg, '^(%d+) (%d+) (%d+)$')
  if not t then return nil end
  return num(t), num(c), max(min(num(w) * 1000, MAX), 1)
end
