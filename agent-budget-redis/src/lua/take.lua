-- One lease operation, atomically (protocol::take is its twin in Rust).
-- KEYS: 1 fleet record, 2 budgets, 3 the window's record
-- ARGV: 1 node, 2 candidate epoch, 3 grace ms, 4 now ms or '', 5 agent,
--       6 window length ms, 7 window index,
--       8/9 belief, 10/11 give, 12/13 force, 14/15 want, 16/17 min
--       (tokens/calls)
-- Returns: status, now, epoch, cfgver, fence, granted t/c, taken t/c,
--          limit t/c, mine t/c. Status: ok, short, window, fenced, config, nobudget.
local now = clock(ARGV[4])
local epoch, created, fence, cfgver = fleet(KEYS[1], now, ARGV[2], num(ARGV[3]))
local lt, lc, length = budget(redis.call('HGET', KEYS[2], ARGV[5]))
if not lt then return {'nobudget', now, epoch, cfgver, fence, 0, 0, 0, 0, 0, 0, 0, 0} end
if length ~= num(ARGV[6]) then
  return {'config', now, epoch, cfgver, fence, 0, 0, 0, 0, lt, lc, 0, 0}
end
local index = num(ARGV[7])
local current = math.floor(now / length)
local status = 'ok'
if index ~= current then
  status = 'window'
elseif index * length < created and now < fence then
  status = 'fenced'
end
local mt, mc = 'n:' .. ARGV[1] .. ':t', 'n:' .. ARGV[1] .. ':c'
local r = redis.call('HMGET', KEYS[3], 't', 'c', mt, mc)
local taken_t, taken_c, mine_t, mine_c = num(r[1]), num(r[2]), num(r[3]), num(r[4])
-- 1. The node's record is what it believes it took.
local belief_t, belief_c = num(ARGV[8]), num(ARGV[9])
taken_t = add(sub(taken_t, mine_t), belief_t)
taken_c = add(sub(taken_c, mine_c), belief_c)
mine_t, mine_c = belief_t, belief_c
-- 2. Gifts, at most what it holds.
local give_t, give_c = min(num(ARGV[10]), mine_t), min(num(ARGV[11]), mine_c)
mine_t, mine_c = mine_t - give_t, mine_c - give_c
taken_t, taken_c = sub(taken_t, give_t), sub(taken_c, give_c)
-- 3. Charges, whatever the budget says.
local force_t, force_c = num(ARGV[12]), num(ARGV[13])
mine_t, mine_c = add(mine_t, force_t), add(mine_c, force_c)
taken_t, taken_c = add(taken_t, force_t), add(taken_c, force_c)
-- 4. A grant, within what is left, or nothing if less than min is left.
local grant_t, grant_c = 0, 0
if status == 'ok' then
  local left_t, left_c = sub(lt, taken_t), sub(lc, taken_c)
  local min_t, min_c = num(ARGV[16]), num(ARGV[17])
  if min_t <= left_t and min_c <= left_c then
    grant_t = min(max(num(ARGV[14]), min_t), left_t)
    grant_c = min(max(num(ARGV[15]), min_c), left_c)
    mine_t, mine_c = add(mine_t, grant_t), add(mine_c, grant_c)
    taken_t, taken_c = add(taken_t, grant_t), add(taken_c, grant_c)
  else
    status = 'short'
  end
end
redis.call('HSET', KEYS[3], 't', str(taken_t), 'c', str(taken_c), mt, str(mine_t), mc, str(mine_c))
redis.call('PEXPIRE', KEYS[3], str(max((index + 2) * length - now, 1000)))
return {status, now, epoch, cfgver, fence, grant_t, grant_c, taken_t, taken_c, lt, lc, mine_t, mine_c}
