-- A node's heartbeat: the fleet's time, epoch and budgets' version.
-- KEYS: 1 fleet record. ARGV: 1 candidate epoch, 2 grace ms, 3 now ms or ''.
local now = clock(ARGV[3])
local epoch, created, fence, cfgver = fleet(KEYS[1], now, ARGV[1], num(ARGV[2]))
return {now, epoch, cfgver}
