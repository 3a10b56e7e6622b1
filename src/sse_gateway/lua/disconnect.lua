-- sse-gateway disconnect (POST /v1/disconnect): store a block, then tell every gateway.
--
-- KEYS[1]  the target's block key: SSE:block:{brand_id} or SSE:block:{brand_id}:{player_id}
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
-- DEL its key. A key without expiry (set by hand) is left alone.
local block_ms = tonumber(ARGV[3])
if block_ms == nil or block_ms < 0 then
  return redis.error_reply('ERR sse-gateway disconnect: block milliseconds must be >= 0')
end
if block_ms > 0 then
  local left = redis.call('PTTL', KEYS[1])
  if left ~= -1 and left < block_ms then
    redis.call('SET', KEYS[1], ARGV[4], 'PX', block_ms)
  end
end
local receivers = redis.call('PUBLISH', ARGV[1], ARGV[2])
return {receivers, redis.call('PTTL', KEYS[1])}
