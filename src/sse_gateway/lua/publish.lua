-- sse-gateway publish: append an event to a player's history and publish it, in one call.
--
-- KEYS[1]  the player's channel, SSE::{brand_id}::{player_id}. The history stream has the
--          same name (keys and channels are separate namespaces), so both hash to the same
--          Redis Cluster slot.
-- ARGV[1]  event type, [A-Za-z0-9_.:-]{1,64}, not connected/heartbeat/error/close/disconnected
-- ARGV[2]  event data as JSON text
-- ARGV[3]  history size (SSE_HISTORY_SIZE, default 100): how many events a client may miss
--          and still recover. The stream keeps one more entry than that, so that the id of
--          the last event such a client saw is still there to prove nothing is missing.
-- ARGV[4]  history TTL in whole seconds after the last event (SSE_HISTORY_TTL, default 86400)
--
-- Returns {id, receivers}: the new entry's id (also the SSE `id:`), and how many
-- subscribers (gateway processes) received the PUBLISH.
--
-- Every argument is checked before the first write: an error reply ("ERR sse-gateway
-- publish: ...") means nothing was stored and nothing was published, so a retry cannot
-- store the event twice.
local function refuse(message)
  return redis.error_reply('ERR sse-gateway publish: ' .. message)
end

local function valid_id(value)
  return #value >= 1 and #value <= 64 and string.find(value, '^[%w_.-]+$') ~= nil
end

local function whole_number(value, minimum, maximum)
  if string.find(value, '^%d+$') == nil then
    return nil
  end
  local number = tonumber(value)
  if number == nil or number < minimum or number > maximum then
    return nil
  end
  return number
end

if #KEYS ~= 1 or #ARGV ~= 4 then
  return refuse('expects 1 key (the channel) and 4 arguments (type, data, size, ttl)')
end
local brand, player = string.match(KEYS[1], '^SSE::(.-)::(.*)$')
if brand == nil or not valid_id(brand) or not valid_id(player) then
  return refuse('key must be SSE::{brand_id}::{player_id}, ids [A-Za-z0-9_.-]{1,64}')
end
local event_type = ARGV[1]
if #event_type < 1 or #event_type > 64 or string.find(event_type, '^[%w_.:-]+$') == nil then
  return refuse('type must match [A-Za-z0-9_.:-]{1,64}')
end
if event_type == 'connected' or event_type == 'heartbeat' or event_type == 'error'
    or event_type == 'close' or event_type == 'session_expired'
    or event_type == 'disconnected' then
  return refuse("type '" .. event_type .. "' is reserved by the gateway")
end
if not pcall(cjson.decode, ARGV[2]) then
  return refuse('data is not JSON')
end
local size = whole_number(ARGV[3], 1, 100000)
if size == nil then
  return refuse('history size must be a whole number from 1 to 100000')
end
local ttl = whole_number(ARGV[4], 1, 31536000)
if ttl == nil then
  return refuse('history ttl must be a whole number of seconds from 1 to 31536000')
end

local id = redis.call('XADD', KEYS[1], 'MAXLEN', size + 1, '*', 't', event_type, 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ttl)
-- "ts": when it was published, Unix seconds with microseconds, by Redis's clock: the gateway
-- measures publish -> write latency from it (sse_gateway_delivery_latency_seconds). Written by
-- hand: cjson would round a number this long to 14 digits.
local now = redis.call('TIME')
local ts = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
local envelope = '{"type":' .. cjson.encode(event_type) .. ',"data":' .. ARGV[2] ..
                 ',"id":"' .. id .. '","ts":' .. ts .. '}'
local receivers = redis.call('PUBLISH', KEYS[1], envelope)
return {id, receivers}
