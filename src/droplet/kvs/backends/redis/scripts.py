"""The Lua scripts that merge lattices inside Redis, and the change notices they publish.

Every Droplet key is one Redis string holding the lattice's canonical encoding
(:mod:`droplet.lattices.codec`), so a read is one ``GET`` and returns exactly
what the in-memory store would. A put runs :data:`MERGE` (``EVALSHA``), which
joins the incoming encoding with the stored one atomically, inside Redis:

- ``LWW``: the greater ``(timestamp, writer, value bytes)`` wins, Droplet's
  tie-break order; the winner's encoding is kept whole.
- ``Set`` and ``OrderedSet``: a merge-join of the two sorted element lists
  (elements are compared bytewise, like Python compares ``bytes``), so the
  result is the canonical encoding of the union.
- ``Max``: the greater number; ``Priority``: the lower priority, ties broken by
  the value's bytes.
- ``VectorClock``: a merge-join of the two sorted clocks, keeping each node's
  greater counter.
- ``SingleKeyCausal``: the versions of both sides, values joined under equal
  clocks, minus every version whose clock another one strictly dominates,
  sorted in the canonical clock order.
- ``Map`` and ``MultiKeyCausal`` (nested lattices under keys of mixed types),
  and the rare cases Lua cannot compare exactly (integers beyond 64 bits, an
  ``int`` against a ``float``, counters past 2**53) answer "fall back": the
  backend then merges in Python and writes with :data:`COMPARE_AND_SET`, which
  stores only if the key still holds what was read (an optimistic loop per
  key, retried with backoff on conflict).

Call results (``__droplet/results/...``) are written with an expiry
(``SET ... PX``) of the node's ``result_ttl``, so Redis drops them even when
the storage node that stored them stops before it deletes them.

A script that changed the key also ``PUBLISH``es a change notice (see
:func:`pack_notice`), so other storage nodes can update their waiting reads
and subscribed caches. The merge result, the write and the notice are one
atomic step, so notices of one key are published in the order of its changes.
"""

from __future__ import annotations

import hashlib
import struct

import attrs

__all__ = ["COMPARE_AND_SET", "MERGE", "Script", "pack_notice", "unpack_notice"]


@attrs.frozen
class Script:
    name: str
    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


# Shared by both scripts: bytewise comparison and the change notice.
_COMMON = r"""
local byte, sub = string.byte, string.sub
local function cmp(a, b)
  if a == b then return 0 end
  local n = #a
  if #b < n then n = #b end
  for i = 1, n do
    local x, y = byte(a, i), byte(b, i)
    if x ~= y then
      if x < y then return -1 end
      return 1
    end
  end
  if #a < #b then return -1 end
  return 1
end
local function set(key, value, ttl)
  if tonumber(ttl) > 0 then
    redis.call('SET', key, value, 'PX', ttl)
  else
    redis.call('SET', key, value)
  end
end
local function notify(enc, channel, origin, limit, dkey)
  if channel == '' then return end
  local body = ''
  if #enc <= tonumber(limit) then body = enc end
  redis.call('PUBLISH', channel,
    struct.pack('>I4', #origin) .. origin .. struct.pack('>I4', #dkey) .. dkey .. body)
end
"""

MERGE = Script("merge", _COMMON + r"""
-- KEYS[1]: the Redis key. ARGV: incoming canonical encoding, its type-header
-- length, type name, channel, origin, inline notice limit, Droplet key,
-- expiry in ms (0: none).
-- Returns {0} unchanged, {1, encoding} changed, {2} fall back to
-- compare-and-set, {3, stored header} the key holds another type.
local key, inc, hlen, tname = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local cur = redis.call('GET', key)
local function store(enc)
  set(key, enc, ARGV[8])
  notify(enc, ARGV[4], ARGV[5], ARGV[6], ARGV[7])
  return {1, enc}
end
if not cur then return store(inc) end
if cur == inc then return {0} end
if sub(cur, 1, hlen) ~= sub(inc, 1, hlen) then return {3, sub(cur, 1, 64)} end
local p = hlen + 1

-- a signed 64-bit big-endian integer after its tag, compared as a number
local function cmp_i64(a, b)
  if a == b then return 0 end
  local x, y = (byte(a, 1) + 128) % 256, (byte(b, 1) + 128) % 256
  if x ~= y then
    if x < y then return -1 end
    return 1
  end
  return cmp(sub(a, 2), sub(b, 2))
end
-- a number field at p: 'i' or 'f' plus 8 bytes; nil for big ints
local function cmp_num(a, b, pos)
  local ta, tb = sub(a, pos, pos), sub(b, pos, pos)
  if ta ~= tb or (ta ~= 'i' and ta ~= 'f') then return nil end
  local ra, rb = sub(a, pos + 1, pos + 8), sub(b, pos + 1, pos + 8)
  if ta == 'i' then return cmp_i64(ra, rb) end
  local fa, fb = struct.unpack('>d', ra), struct.unpack('>d', rb)
  if fa == fb then return 0 end
  if fa < fb then return -1 end
  return 1
end
-- a length-prefixed field ('s' or 'b') at pos: its bytes and the next position
local function field(s, pos)
  local n = struct.unpack('>I4', s, pos + 1)
  return sub(s, pos + 5, pos + 4 + n), pos + 5 + n
end

-- a list of 'b'-tagged byte strings at pos: its items and the next position
local function elements(s, pos)
  local n = struct.unpack('>I4', s, pos + 1)
  local out = {}
  pos = pos + 5
  for i = 1, n do
    out[i], pos = field(s, pos)
  end
  return out, pos
end
local function encode_elements(list)
  local parts = {'l', struct.pack('>I4', #list)}
  for k = 1, #list do
    parts[#parts + 1] = 'b' .. struct.pack('>I4', #list[k]) .. list[k]
  end
  return table.concat(parts)
end
-- the union of two sorted lists of distinct byte strings, sorted
local function union(a, b)
  local out, i, j, na, nb = {}, 1, 1, #a, #b
  while i <= na and j <= nb do
    local c = cmp(a[i], b[j])
    if c == 0 then
      out[#out + 1] = a[i]; i = i + 1; j = j + 1
    elseif c < 0 then
      out[#out + 1] = a[i]; i = i + 1
    else
      out[#out + 1] = b[j]; j = j + 1
    end
  end
  for k = i, na do out[#out + 1] = a[k] end
  for k = j, nb do out[#out + 1] = b[k] end
  return out
end
-- a vector clock (a dict of node -> 'i' counter) at pos; nil when a counter is
-- not a 64-bit int below 2^53 (Lua numbers are doubles)
local function clock(s, pos)
  if sub(s, pos, pos) ~= 'd' then return nil end
  local n = struct.unpack('>I4', s, pos + 1)
  local c = {nodes = {}, counts = {}, raw = {}, count = {}, total = 0}
  local q = pos + 5
  for i = 1, n do
    local node
    node, q = field(s, q)
    if sub(s, q, q) ~= 'i' then return nil end
    local hi, lo = struct.unpack('>I4', s, q + 1), struct.unpack('>I4', s, q + 5)
    if hi >= 2097152 then return nil end
    local count = hi * 4294967296 + lo
    c.nodes[i], c.counts[i], c.raw[i], c.count[node] = node, count, sub(s, q, q + 8), count
    c.total = c.total + count
    q = q + 9
  end
  c.text, c.stop = sub(s, pos, q - 1), q
  return c
end

if tname == 'LWW' then
  local c = cmp_num(inc, cur, p)
  if c == nil then return {2} end
  if c == 0 then
    local wi, pi = field(inc, p + 9)
    local wc, pc = field(cur, p + 9)
    c = cmp(wi, wc)
    if c == 0 then c = cmp(field(inc, pi), field(cur, pc)) end
  end
  if c > 0 then return store(inc) end
  return {0}
elseif tname == 'Max' then
  local c = cmp_num(inc, cur, p)
  if c == nil then return {2} end
  if c > 0 then return store(inc) end
  return {0}
elseif tname == 'Priority' then
  local c = cmp_num(inc, cur, p)
  if c == nil then return {2} end
  if c == 0 then c = cmp(field(inc, p + 9), field(cur, p + 9)) end
  if c < 0 then return store(inc) end
  return {0}
elseif tname == 'Set' or tname == 'OrderedSet' then
  local a, pa = elements(cur, p)
  local b = elements(inc, p)
  local out = union(a, b)
  if #out == #a then return {0} end
  return store(sub(cur, 1, hlen) .. encode_elements(out))
elseif tname == 'VectorClock' then
  local a = clock(cur, p)
  local b = clock(inc, p)
  if a == nil or b == nil then return {2} end
  local out, i, j = {}, 1, 1
  while i <= #a.nodes or j <= #b.nodes do
    local c
    if i > #a.nodes then c = 1 elseif j > #b.nodes then c = -1
    else c = cmp(a.nodes[i], b.nodes[j]) end
    if c == 0 then
      if b.counts[j] > a.counts[i] then out[#out + 1] = {b.nodes[j], b.raw[j]}
      else out[#out + 1] = {a.nodes[i], a.raw[i]} end
      i = i + 1; j = j + 1
    elseif c < 0 then
      out[#out + 1] = {a.nodes[i], a.raw[i]}; i = i + 1
    else
      out[#out + 1] = {b.nodes[j], b.raw[j]}; j = j + 1
    end
  end
  local parts = {sub(cur, 1, hlen), 'd', struct.pack('>I4', #out)}
  for k = 1, #out do
    parts[#parts + 1] = 's' .. struct.pack('>I4', #out[k][1]) .. out[k][1] .. out[k][2]
  end
  local enc = table.concat(parts)
  if enc == cur then return {0} end
  return store(enc)
elseif tname == 'SingleKeyCausal' then
  -- versions: [[clock, [values]], ...]; equal clocks join their values, a version
  -- goes only when another's clock strictly dominates it (see lattices/causal.py)
  local byclock, order = {}, {}
  for _, s in ipairs({cur, inc}) do
    local n = struct.unpack('>I4', s, p + 1)
    local pos = p + 5
    for _ = 1, n do
      local c = clock(s, pos + 5)
      if c == nil then return {2} end
      local vals
      vals, pos = elements(s, c.stop)
      local seen = byclock[c.text]
      if seen == nil then
        c.values = vals
        byclock[c.text] = c
        order[#order + 1] = c
      else
        seen.values = union(seen.values, vals)
      end
    end
  end
  table.sort(order, function(x, y)
    if x.total ~= y.total then return x.total > y.total end
    return cmp(x.text, y.text) < 0  -- any fixed order: ties cannot dominate each other
  end)
  local kept = {}
  for _, v in ipairs(order) do
    local dominated = false
    for _, k in ipairs(kept) do
      if k.total > v.total then
        local covers = true
        for idx, node in ipairs(v.nodes) do
          if (k.count[node] or 0) < v.counts[idx] then covers = false; break end
        end
        if covers then dominated = true; break end
      end
    end
    if not dominated then kept[#kept + 1] = v end
  end
  table.sort(kept, function(x, y)  -- clock_order: entries compared in turn
    local n = math.min(#x.nodes, #y.nodes)
    for idx = 1, n do
      local c = cmp(x.nodes[idx], y.nodes[idx])
      if c ~= 0 then return c < 0 end
      if x.counts[idx] ~= y.counts[idx] then return x.counts[idx] < y.counts[idx] end
    end
    return #x.nodes < #y.nodes
  end)
  local parts = {sub(cur, 1, hlen), 'l', struct.pack('>I4', #kept)}
  for _, v in ipairs(kept) do
    parts[#parts + 1] = 'l' .. struct.pack('>I4', 2) .. v.text .. encode_elements(v.values)
  end
  local enc = table.concat(parts)
  if enc == cur then return {0} end
  return store(enc)
end
return {2}
""")

COMPARE_AND_SET = Script("compare-and-set", _COMMON + r"""
-- KEYS[1]: the Redis key. ARGV: SHA-1 of the expected value ('' = absent),
-- the new value, channel, origin, inline notice limit, Droplet key, expiry in
-- ms (0: none).
-- Returns 1 when written, 0 when the key changed since it was read.
local cur = redis.call('GET', KEYS[1])
local seen = ''
if cur then seen = redis.sha1hex(cur) end
if seen ~= ARGV[1] then return 0 end
set(KEYS[1], ARGV[2], ARGV[7])
notify(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return 1
""")

_U32 = struct.Struct(">I")


def pack_notice(origin: bytes, key: bytes, encoding: bytes = b"") -> bytes:
    """A change notice as the scripts publish it (the Python twin, for tests)."""
    return _U32.pack(len(origin)) + origin + _U32.pack(len(key)) + key + encoding


def unpack_notice(data: bytes) -> tuple[bytes, bytes, bytes]:
    """``(origin, droplet key, encoding or b"" when too large to inline)``.

    Raises:
        ValueError: not a notice.
    """
    if len(data) < 8:
        raise ValueError("change notice too short")
    (n,) = _U32.unpack_from(data, 0)
    origin = data[4:4 + n]
    pos = 4 + n
    if len(origin) != n or pos + 4 > len(data):
        raise ValueError("truncated change notice")
    (m,) = _U32.unpack_from(data, pos)
    key = data[pos + 4:pos + 4 + m]
    if len(key) != m:
        raise ValueError("truncated change notice")
    return origin, key, data[pos + 4 + m:]
