"""The Redis registry's key layout and its Lua scripts (plain data: importing this needs no redis).

Keys, for namespace ``ns`` and a pool name ``pool``::

    {ns}:pools            set      pool names that have members
    {ns}:pool:{pool}      hash     url -> payload JSON {"metadata": ..., "weight": ...} (sorted keys)
    {ns}:leases:{pool}    zset     url -> lease expiry, epoch seconds ("inf": no lease)
    {ns}:since:{pool}     zset     url -> registered_at, epoch seconds
    {ns}:version          string   INCR'ed by every membership change
    {ns}:changes          channel  the new version is PUBLISHed after every membership change

Every write is one Lua script, so it is atomic (all of a record or nothing, the version bump with it)
and takes one round trip; conditional writes (keep ``registered_at``, renew only a live lease) need no
WATCH retry loop. Scores keep the exact double: Redis formats them with 17 significant digits and
Lua never converts the ``registered_at`` it stores. Only membership changes bump the version: a renewal
that keeps a lease a lease is invisible to other gateways until their copy of it runs out, and then they
re-read instead of expiring it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


class RedisKeys:
    """Key names of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.pools = f"{namespace}:pools"
        self.version = f"{namespace}:version"
        self.changes = f"{namespace}:changes"

    def pool(self, pool: str) -> list[str]:
        """The hash, lease zset and registered_at zset of one pool, in that order."""
        ns = self.namespace
        return [f"{ns}:pool:{pool}", f"{ns}:leases:{pool}", f"{ns}:since:{pool}"]


def encode_payload(weight: float, metadata: Mapping[str, Any]) -> str:
    """Canonical JSON of what a registration carries: equal content gives equal bytes (the scripts compare them)."""
    return json.dumps({"metadata": metadata, "weight": weight}, separators=(",", ":"), sort_keys=True, allow_nan=False)


def decode_payload(payload: str) -> tuple[float, dict[str, Any]]:
    """``(weight, metadata)`` from :func:`encode_payload`; ``ValueError`` if it is something else."""
    data = json.loads(payload)
    if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
        raise ValueError("not a registry payload")
    weight = data.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ValueError("not a registry payload")
    return float(weight), data["metadata"]


def score(value: float | None) -> str:
    """A zset score as Redis parses it exactly; ``None`` (no lease) is ``inf``."""
    return "inf" if value is None or math.isinf(value) else repr(value)


# KEYS: pools, hash, leases, since, version. ARGV: pool, url, payload, now, expiry, channel.
# Returns registered_at as stored.
REGISTER = """
local url, now = ARGV[2], tonumber(ARGV[4])
local old = redis.call('HGET', KEYS[2], url)
local old_expiry = redis.call('ZSCORE', KEYS[3], url)
local alive = old and old_expiry and tonumber(old_expiry) > now
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], url, ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], url)
if alive then
  redis.call('ZADD', KEYS[4], 'NX', ARGV[4], url)
else
  redis.call('ZADD', KEYS[4], ARGV[4], url)
end
if not alive or old ~= ARGV[3] or ((old_expiry == 'inf') ~= (ARGV[5] == 'inf')) then
  redis.call('PUBLISH', ARGV[6], redis.call('INCR', KEYS[5]))
end
return redis.call('ZSCORE', KEYS[4], url)
"""

# KEYS: hash, leases, since, version. ARGV: url, now, expiry, channel.
# Returns {payload, registered_at}, or nil if there is no live record.
HEARTBEAT = """
local url = ARGV[1]
local payload = redis.call('HGET', KEYS[1], url)
local old_expiry = redis.call('ZSCORE', KEYS[2], url)
if not payload or not old_expiry or tonumber(old_expiry) <= tonumber(ARGV[2]) then
  return nil
end
redis.call('ZADD', KEYS[2], ARGV[3], url)
if (old_expiry == 'inf') ~= (ARGV[3] == 'inf') then
  redis.call('PUBLISH', ARGV[4], redis.call('INCR', KEYS[4]))
end
return {payload, redis.call('ZSCORE', KEYS[3], url)}
"""

# KEYS: pools, hash, leases, since, version. ARGV: pool, url, now, channel.
# Returns 1 if a live record was removed.
UNREGISTER = """
local url = ARGV[2]
local old_expiry = redis.call('ZSCORE', KEYS[3], url)
local removed = redis.call('HDEL', KEYS[2], url)
redis.call('ZREM', KEYS[3], url)
redis.call('ZREM', KEYS[4], url)
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[3], KEYS[4])
end
if removed == 1 and old_expiry and tonumber(old_expiry) > tonumber(ARGV[3]) then
  redis.call('PUBLISH', ARGV[4], redis.call('INCR', KEYS[5]))
  return 1
end
return 0
"""

# KEYS: pools, hash, leases, since. ARGV: pool, now. Removes the records whose lease ended at or before now.
# No version bump: every gateway already drops an expired lease from its own view.
PRUNE = """
local urls = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[2])
for _, url in ipairs(urls) do
  redis.call('HDEL', KEYS[2], url)
  redis.call('ZREM', KEYS[3], url)
  redis.call('ZREM', KEYS[4], url)
end
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[3], KEYS[4])
end
return #urls
"""
