-- sse-gateway disconnect (POST /v1/disconnect): store a block, then tell every gateway.
--
-- KEYS[1]  the target's block key: SSE:block:{brand_id} or SSE:block:{brand_id}:{player_id}
-- KEYS[2]  the index of blocks, SSE:blocks: a sorted set of block keys, scored by when each
--          ends (Redis' clock, ms; +inf: never). Gateways read it whole when they (re)connect,
--          so that they know every block in force without asking Redis for each new stream.
-- ARGV[1]  the control channel, SSE::control
-- ARGV[2]  the control message (JSON)
-- ARGV[3]  block milliseconds, 0 for none
-- ARGV[4]  what the block key holds (JSON: reason, requested_by, at)
--
-- Returns {receivers, pttl}: how many subscribers (gateway processes) received the message,
-- and the block key's PTTL afterwards (-2: no block, -1: a block without expiry).
--
-- One script, so the block is in place before any gateway closes a stream: a client that
-- reconnects at once is refused. A block is lengthened, never shortened: a short block given
-- later (a kick with block_seconds 60) must not end a self-exclusion early; to lift one,
-- DEL its key. A key without expiry (set by hand) is left alone, and indexed as never ending.
local block_ms = tonumber(ARGV[3])
if block_ms == nil or block_ms < 0 then
  return redis.error_reply('ERR sse-gateway disconnect: block milliseconds must be >= 0')
end
if block_ms > 0 then
  local time = redis.call('TIME')
  local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local left = redis.call('PTTL', KEYS[1])
  if left == -1 then
    redis.call('ZADD', KEYS[2], '+inf', KEYS[1])
  elseif left < block_ms then
    redis.call('SET', KEYS[1], ARGV[4], 'PX', block_ms)
    redis.call('ZADD', KEYS[2], now_ms + block_ms, KEYS[1])
  end
  -- Blocks that ended leave the index here: it holds only what is (nearly) in force.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now_ms)
end
local receivers = redis.call('PUBLISH', ARGV[1], ARGV[2])
return {receivers, redis.call('PTTL', KEYS[1])}
