-- sse-gateway publish: append an event to a player's history and publish it, in one call.
--
-- KEYS[1]  the player's channel, SSE::{brand_id}::{player_id}. The history stream has the
--          same name (keys and channels are separate namespaces), so both hash to the same
--          Redis Cluster slot.
-- ARGV[1]  event type, [A-Za-z0-9_.:-]{1,64}, not connected/heartbeat/error/close
-- ARGV[2]  event data as JSON text
-- ARGV[3]  history size (SSE_HISTORY_SIZE, default 100): how many events a client may miss
--          and still recover. The stream keeps one more entry than that, so that the id of
--          the last event such a client saw is still there to prove nothing is missing.
-- ARGV[4]  history TTL in seconds after the last event (SSE_HISTORY_TTL, default 86400)
--
-- Returns {id, receivers}: the new entry's id (also the SSE `id:`), and how many
-- subscribers (gateway processes) received the PUBLISH.
local id = redis.call('XADD', KEYS[1], 'MAXLEN', tonumber(ARGV[3]) + 1, '*',
                      't', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local envelope = '{"type":' .. cjson.encode(ARGV[1]) .. ',"data":' .. ARGV[2] ..
                 ',"id":"' .. id .. '"}'
local receivers = redis.call('PUBLISH', KEYS[1], envelope)
return {id, receivers}
