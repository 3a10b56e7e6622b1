-- sse-gateway disconnect on a Redis Cluster: the block alone (disconnect.lua's first half).
--
-- KEYS[1]  the target's block key: SSE:block:{brand_id} or SSE:block:{brand_id}:{player_id}
-- ARGV[1]  block milliseconds, 0 for none
-- ARGV[2]  what the block key holds (JSON: reason, requested_by, at)
--
-- Returns the block key's PTTL afterwards (-2: no block, -1: a block without expiry).
-- On a cluster the index (SSE:blocks) is on another slot, so the gateway updates it in a
-- command of its own before this script, and publishes the control message after it.
-- A block is lengthened, never shortened; a key without expiry (set by hand) is left alone.
local block_ms = tonumber(ARGV[1])
if block_ms == nil or block_ms < 0 then
  return redis.error_reply('ERR sse-gateway disconnect: block milliseconds must be >= 0')
end
if block_ms > 0 then
  local left = redis.call('PTTL', KEYS[1])
  if left ~= -1 and left < block_ms then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', block_ms)
  end
end
return redis.call('PTTL', KEYS[1])
