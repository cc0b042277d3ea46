-- Every budget, with the version they are at, read atomically.
-- KEYS: 1 fleet record, 2 budgets. ARGV: 1 candidate epoch, 2 grace ms,
-- 3 now ms or ''. Returns: version, then agent, budget, agent, budget...
local now = clock(ARGV[3])
local epoch, created, fence, cfgver = fleet(KEYS[1], now, ARGV[1], num(ARGV[2]))
local out = {cfgver}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all do out[i + 1] = all[i] end
return out
