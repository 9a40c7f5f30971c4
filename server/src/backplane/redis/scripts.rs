//! Redis backplane, Lua scripts (data-flow steps 4–5): append, read, trim and unlock in one call.

use super::keys::{log_key, meta_key};
use chorus_protocol::DocId;
use redis::Cmd;

/// Shared by every script that writes: the epoch of a log whose meta and stream both exist,
/// or a new epoch (ARGV[1]) with a fresh, empty stream if either is missing.
const ENSURE_LUA: &str = r#"
local function ensure()
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  if epoch and redis.call('EXISTS', KEYS[2]) == 1 then return epoch end
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'floor', '0-0')
  redis.call('XGROUP', 'CREATE', KEYS[2], 'chorus', '$', 'MKSTREAM')
  redis.call('XGROUP', 'DESTROY', KEYS[2], 'chorus')
  return ARGV[1]
end
local function last_id()
  if redis.call('EXISTS', KEYS[2]) == 0 then return '0-0' end
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return info[i + 1] end
  end
  return '0-0'
end
"#;

/// KEYS: meta, log, and with webhooks on the undelivered set. ARGV: new epoch, then
/// (update, origin) pairs. Returns {epoch, id...}. The webhook mark goes in the same atomic
/// call as the entries (see `backplane::webhook_store`).
pub(super) const APPEND_LUA: &str = r#"
local epoch = ensure()
local out = {epoch}
if #KEYS >= 3 then
  redis.call('SADD', KEYS[3], string.match(KEYS[1], '^chorus:{(.*)}:meta$'))
end
for i = 2, #ARGV, 2 do
  out[#out + 1] = redis.call('XADD', KEYS[2], '*', 'e', epoch, 'u', ARGV[i], 'o', ARGV[i + 1])
end
return out
"#;

/// KEYS: meta, log. ARGV: after. Returns {epoch or '0', floor, last, entries}. Read-only: a
/// missing log reads as epoch 0 (no log yet); the next write creates one.
pub(super) const READ_LUA: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then return {'0', '0-0', '0-0', {}} end
local floor = redis.call('HGET', KEYS[1], 'floor') or '0-0'
return {epoch, floor, last_id(), redis.call('XRANGE', KEYS[2], '(' .. ARGV[1], '+')}
"#;

/// KEYS: meta, log. ARGV: before. Removes entries below `before`; the newest removed id
/// becomes the floor (which only moves forward).
pub(super) const TRIM_LUA: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 0 or ARGV[1] == '0-0' then return 0 end
local newest = redis.call('XREVRANGE', KEYS[2], '(' .. ARGV[1], '-', 'COUNT', 1)
if #newest == 0 then return 0 end
local removed = redis.call('XTRIM', KEYS[2], 'MINID', ARGV[1])
local id = newest[1][1]
local floor = redis.call('HGET', KEYS[1], 'floor') or '0-0'
local fm, fs = string.match(floor, '(%d+)-(%d+)')
local im, is = string.match(id, '(%d+)-(%d+)')
if tonumber(im) > tonumber(fm) or (tonumber(im) == tonumber(fm) and tonumber(is) > tonumber(fs)) then
  redis.call('HSET', KEYS[1], 'floor', id)
end
return removed
"#;

/// KEYS: lock. ARGV: node. Deletes the lock only if this node holds it.
pub(super) const UNLOCK_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

pub(super) fn script(body: &str) -> String {
    format!("{ENSURE_LUA}\n{body}")
}

pub(super) fn eval(body: &str, doc: &DocId) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(body).arg(2).arg(meta_key(doc)).arg(log_key(doc));
    cmd
}

/// KEYS: meta, log, undelivered set. ARGV: epoch, last id. Clears the document's webhook mark
/// only if its log's head is still that (compare-and-clear: a racing append keeps it).
pub(super) const CLEAR_MARK_LUA: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then epoch = '0' end
if epoch ~= ARGV[1] or last_id() ~= ARGV[2] then return 0 end
redis.call('SREM', KEYS[3], string.match(KEYS[1], '^chorus:{(.*)}:meta$'))
return 1
"#;

/// KEYS: lease. ARGV: node, ttl ms. Renews the lease if this node holds it, else takes it if
/// free. Returns 1 if this node holds it now.
pub(super) const LEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;

/// KEYS: the mark set of the first slot of a run of slots on one master (the key the cluster
/// routes by). ARGV: budget, then the hash tags of the run's other slots' mark sets (a few
/// bytes each rather than whole key names). Redis ≥ 7 lets a script with
/// `allow-cross-slot-keys` read keys of other slots of its own node, but the declared keys
/// must still share a slot, hence the others in ARGV. Reads whole sets in order while
/// they fit in the budget. Returns {done, big, members}: the first `done` sets were read
/// whole; `big` = 1 if set `done` (0-based) alone is larger than the budget (read it with
/// SSCAN instead).
pub(super) const PROBE_MARKS_LUA: &str = r#"#!lua flags=allow-cross-slot-keys,no-writes
local budget = tonumber(ARGV[1])
local sets = {KEYS[1]}
for i = 2, #ARGV do sets[i] = 'chorus:{' .. ARGV[i] .. '}:undelivered' end
local out = {}
for i = 1, #sets do
  local n = redis.call('SCARD', sets[i])
  if n > 0 then
    if n > budget then
      if #out == 0 then return {i - 1, 1, out} end
      return {i - 1, 0, out}
    end
    for _, m in ipairs(redis.call('SMEMBERS', sets[i])) do out[#out + 1] = m end
    budget = budget - n
  end
end
return {#sets, 0, out}
"#;
