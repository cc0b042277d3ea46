-- Sets, restores (only if missing) or removes one agent's budget, bumping
-- the budgets' version when anything changed.
-- KEYS: 1 fleet record, 2 budgets.
-- ARGV: 1 candidate epoch, 2 grace ms, 3 now ms or '', 4 agent,
--       5 'tokens calls window_secs', 6 mode: set, restore or remove.
-- Returns: the budgets' version, and 1 if this call changed it.
local now = clock(ARGV[3])
local epoch, created, fence, cfgver = fleet(KEYS[1], now, ARGV[1], num(ARGV[2]))
local current = redis.call('HGET', KEYS[2], ARGV[4])
local changed = false
if ARGV[6] == 'set' then
  changed = current ~= ARGV[5]
  if changed then redis.call('HSET', KEYS[2], ARGV[4], ARGV[5]) end
elseif ARGV[6] == 'restore' then
  changed = not current
  if changed then redis.call('HSET', KEYS[2], ARGV[4], ARGV[5]) end
elseif ARGV[6] == 'remove' then
  changed = current ~= false
  if changed then redis.call('HDEL', KEYS[2], ARGV[4]) end
else
  return redis.error_reply('unknown mode ' .. ARGV[6])
end
if changed then
  cfgver = redis.call('HINCRBY', KEYS[1], 'cfgver', 1)
  return {cfgver, 1}
end
return {cfgver, 0}
