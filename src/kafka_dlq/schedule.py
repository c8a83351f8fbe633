"""The handler's durable retry schedule in Redis.

Per handler (namespace ``kafka-dlq:{name}``), every key under one hash tag so Redis Cluster keeps them together:

- ``due``      sorted set: entry id -> due time (epoch ms)
- ``inflight`` sorted set: entry id -> lease deadline (epoch ms); a lease that expires goes back to ``due``
- ``body``     hash: entry id -> the entry (JSON)
- ``claims``   hash: entry id -> the token of the claim that holds it
- ``done``     sorted set: entry id -> when it left (recovered or parked), so a re-read dead letter is not redone
- ``history:recovered`` / ``history:parked`` / ``history:dropped``: capped lists with a TTL, newest first
  (``dropped``: what an operator removed with ``kafka-dlq pending drop``, with who and when)
- ``finished`` hash: entry id -> the token of the claim that last finished it, so a finish sent again (its reply
  lost with its connection) is known as done, not as a lost claim
- ``repeats``  hash: fingerprint -> failures after redrive (repeat offenders); ``repeats:seen`` sorted set:
  fingerprint + dead letter id, scored by when first counted (trimmed to the TTL), so one dead letter read twice
  counts once
- ``written``  counter bumped after each durable write, on the same connection (see ``write_script``)

An entry id is the dead letter's coordinates (``dlq topic/partition/offset``), never a hash of its value.
Every change of state is one Lua script, atomic with every other instance's claims.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo
from redis.exceptions import NoScriptError, RedisError, ResponseError

from kafka_dlq.errors import KafkaDLQError
from kafka_dlq.outcomes import Outcome
from kafka_dlq.records import DeadLetter, DlqCoordinates, Failure, OriginalRecord
from kafka_dlq.slices import Slices

__all__ = ["Claimed", "Entry", "RedisSchedule", "ScheduleError", "check_waitaof", "connect_redis"]


class ScheduleError(KafkaDLQError):
    """Redis did not take or give a schedule change (connection lost, script refused ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """A dead letter waiting in the schedule, with what the handler knows of its retries."""

    dead_letter: DeadLetter
    handler_failures: int = 0
    """Failures in this handler (the backoff's step); ``dead_letter.attempts`` counts all, upstream included."""
    last_delay: float | None = None

    @property
    def id(self) -> str:
        dlq = self.dead_letter.dlq
        assert dlq is not None, "scheduled dead letters are read from Kafka"
        return str(dlq)


@dataclass(frozen=True, slots=True)
class Claimed:
    entry: Entry
    token: str
    claimed_at_ms: int = field(default=0)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


_BODY_V1 = b"\x01"
"""The first byte of an entry body in the binary layout (a JSON body, the earlier layout, starts with ``{``)."""
_META = _HISTORY = json.JSONEncoder(separators=(",", ":"))
_loads = json.loads


def _text_bytes(text: str | None) -> bytes | None:
    # surrogatepass: a message may hold lone surrogates (from a surrogateescape'd path); they come back as they were.
    return None if text is None else text.encode("utf-8", "surrogatepass")


def encode_entry(entry: Entry) -> bytes:
    """The entry as its body in Redis: ``\x01``, a JSON list of the small fields and the lengths of the large
    ones, a newline, then the large ones byte for byte (key, value, header values, error message, stack trace).

    The record's bytes are written as they are, not in base64 inside JSON: about a third less to send and store,
    and neither side spends time on it. JSON escapes every newline in its text, so the first newline ends it.
    """
    dl, orig, failure = entry.dead_letter, entry.dead_letter.original, entry.dead_letter.failure
    assert dl.dlq is not None
    message, stacktrace = _text_bytes(failure.message), _text_bytes(failure.stacktrace)
    blobs = [orig.key, orig.value, *(value for _, value in orig.headers), message, stacktrace]
    meta = [
        orig.topic,
        orig.partition,
        orig.offset,
        orig.timestamp,
        [name for name, _ in orig.headers],
        [-1 if blob is None else len(blob) for blob in blobs],
        failure.error_class,
        dl.attempts,
        dl.first_failure,
        dl.last_failure,
        dl.redrive_count,
        dl.group,
        dl.source_format,
        dl.dlq.topic,
        dl.dlq.partition,
        dl.dlq.offset,
        dict(dl.extra),
        entry.handler_failures,
        entry.last_delay,
    ]
    return b"".join((_BODY_V1, _META.encode(meta).encode(), b"\n", *(blob for blob in blobs if blob)))


def decode_entry(body: str | bytes) -> Entry:
    """An entry from its body in Redis, in either layout: the binary one :func:`encode_entry` writes, or the JSON
    one of earlier versions (base64 for bytes), which entries scheduled before an upgrade still have."""
    if isinstance(body, bytes) and body[:1] == _BODY_V1:
        return _decode_binary(body)
    return _decode_json(body)


def _decode_binary(body: bytes) -> Entry:
    end = body.index(b"\n")
    (
        topic,
        partition,
        offset,
        timestamp,
        names,
        lengths,
        error_class,
        attempts,
        first,
        last,
        redrives,
        group,
        source_format,
        dlq_topic,
        dlq_partition,
        dlq_offset,
        extra,
        handler_failures,
        last_delay,
    ) = _loads(body[1:end])
    blobs: list[bytes | None] = []
    at = end + 1
    for length in lengths:
        if length < 0:
            blobs.append(None)
        else:
            blobs.append(body[at : at + length])
            at += length
    if at != len(body) or len(blobs) != len(names) + 4:
        raise ValueError(f"entry body of {len(body)} bytes does not match its lengths")
    message, stacktrace = blobs[-2], blobs[-1]
    return Entry(
        dead_letter=DeadLetter(
            original=OriginalRecord(
                topic=topic,
                partition=partition,
                offset=offset,
                timestamp=timestamp,
                key=blobs[0],
                value=blobs[1],
                headers=tuple(zip(names, blobs[2:-2], strict=True)),
            ),
            failure=Failure(
                error_class=error_class,
                message=None if message is None else message.decode("utf-8", "surrogatepass"),
                stacktrace=None if stacktrace is None else stacktrace.decode("utf-8", "surrogatepass"),
            ),
            attempts=attempts,
            first_failure=first,
            last_failure=last,
            redrive_count=redrives,
            group=group,
            source_format=source_format,
            dlq=DlqCoordinates(topic=dlq_topic, partition=dlq_partition, offset=dlq_offset),
            extra=extra,
        ),
        handler_failures=handler_failures,
        last_delay=last_delay,
    )


def _decode_json(text: str | bytes) -> Entry:
    data = json.loads(text)
    topic, partition, offset, timestamp, key, value = data["o"]
    attempts, first, last, redrives = data["a"]
    return Entry(
        dead_letter=DeadLetter(
            original=OriginalRecord(
                topic=topic,
                partition=partition,
                offset=offset,
                timestamp=timestamp,
                key=_unb64(key),
                value=_unb64(value),
                headers=tuple((name, _unb64(v)) for name, v in data["h"]),
            ),
            failure=Failure(error_class=data["f"][0], message=data["f"][1], stacktrace=data["f"][2]),
            attempts=attempts,
            first_failure=first,
            last_failure=last,
            redrive_count=redrives,
            group=data["g"],
            source_format=data["s"],
            dlq=DlqCoordinates(topic=data["d"][0], partition=data["d"][1], offset=data["d"][2]),
            extra=data["x"],
        ),
        handler_failures=data["hf"],
        last_delay=data["ld"],
    )


# Scripts that take many entries take one argument per entry, its fields before a newline and separated by
# spaces (entry ids are DLQ coordinates, "topic/partition/offset", and Kafka topic names hold neither), then its
# body: three or six arguments per entry made packing the command a good part of the handler's time.
_ENTRY_HEAD = """
local function entry(arg)
  local nl = string.find(arg, '\\n', 1, true)
  local out = {}
  for part in string.gmatch(string.sub(arg, 1, nl - 1), '%S+') do table.insert(out, part) end
  table.insert(out, string.sub(arg, nl + 1))
  return out
end
"""

# KEYS: due, inflight, body, claims, done.  ARGV: n, claim_limit, now_ms, lease_deadline_ms, token, then n entries
# ("due_ms id\nbody"). Returns one flag per entry: 0 left alone (scheduled already, or recently finished), 1 added
# to due, 2 added and claimed at once (in flight under ``token`` until the deadline, as the claim script leaves it):
# the first ``claim_limit`` new entries due by ``now_ms`` are claimed, the others wait in due. Sent again after a
# dropped connection, the script answers 2 again for what its first run claimed (the token is the call's own).
_SCHEDULE = (
    _ENTRY_HEAD
    + """
local out = {}
local n, limit, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local claimed = 0
for i = 1, n do
  local e = entry(ARGV[5 + i])
  local due, id, body = tonumber(e[1]), e[2], e[3]
  if redis.call('HEXISTS', KEYS[3], id) == 0 and not redis.call('ZSCORE', KEYS[5], id) then
    redis.call('HSET', KEYS[3], id, body)
    if claimed < limit and due <= now then
      claimed = claimed + 1
      redis.call('ZADD', KEYS[2], ARGV[4], id)
      redis.call('HSET', KEYS[4], id, ARGV[5])
      out[i] = 2
    else
      redis.call('ZADD', KEYS[1], due, id)
      out[i] = 1
    end
  elseif redis.call('HGET', KEYS[4], id) == ARGV[5] then
    out[i] = 2  -- claimed by this very call, sent before (its reply lost): the claim is the caller's
  else
    out[i] = 0
  end
end
return out
"""
)

# KEYS: due, inflight, body, claims.  ARGV: now_ms, lease_ms, limit, token.
# Returns {next_due_ms_or_-1, id1, body1, id2, body2, ...}.
_CLAIM = """
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZADD', KEYS[1], now, id)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
local deadline = now + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local body = redis.call('HGET', KEYS[3], id)
  if body then
    redis.call('ZADD', KEYS[2], deadline, id)
    redis.call('HSET', KEYS[4], id, ARGV[4])
    table.insert(out, id)
    table.insert(out, body)
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local lease = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local next_due = -1
if nxt[2] then next_due = tonumber(nxt[2]) end
if lease[2] and (next_due == -1 or tonumber(lease[2]) < next_due) then next_due = tonumber(lease[2]) end
table.insert(out, 1, next_due)
return out
"""

# KEYS: due, inflight, body, claims, finished.  ARGV: now_ms, lease_deadline_ms, token, then pairs (id,
# finish_token). Claims each entry that is due and whose last finish was made by finish_token (so its body is the
# one that finish wrote); returns one 1/0 per pair.
_RECLAIM = """
local now = tonumber(ARGV[1])
local out = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) <= now and redis.call('HGET', KEYS[5], id) == ARGV[i + 1]
      and redis.call('HEXISTS', KEYS[3], id) == 1 then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    redis.call('HSET', KEYS[4], id, ARGV[3])
    table.insert(out, 1)
  else
    table.insert(out, 0)
  end
end
return out
"""

# KEYS: inflight, claims.  ARGV: id, token, new lease deadline (epoch ms). 1: renewed; 0: the claim is not ours.
_RENEW = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"""

# KEYS: due, inflight, body, claims, done, history:recovered, history:parked, finished.
# ARGV: now_ms, history_max, history_ttl_s, done_keep_ms, n, then n entries ("outcome due_ms token id\npayload";
# outcome 'retry', 'recovered' or 'parked'; the payload is the new body for a retry, the history item otherwise).
# Returns one 1/0 per entry: 1 when done by this call or by an earlier one with the same token (a finish sent again
# after its connection dropped); 0 when the claim is no longer ours (its lease expired and another instance took
# it), and nothing changed for that entry.
_FINISH = (
    _ENTRY_HEAD
    + """
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[5])
local out = {}
local left = false
for i = 1, n do
  local e = entry(ARGV[5 + i])
  local outcome, due, token, id, payload = e[1], e[2], e[3], e[4], e[5]
  if redis.call('HGET', KEYS[4], id) ~= token then
    if redis.call('HGET', KEYS[8], id) == token then out[i] = 1 else out[i] = 0 end
  else
    out[i] = 1
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HSET', KEYS[8], id, token)
    if outcome == 'retry' then
      redis.call('HSET', KEYS[3], id, payload)
      redis.call('ZADD', KEYS[1], due, id)
    else
      left = true
      redis.call('HDEL', KEYS[3], id)
      redis.call('ZADD', KEYS[5], now, id)
      local history = KEYS[6]
      if outcome == 'parked' then history = KEYS[7] end
      redis.call('LPUSH', history, payload)
    end
  end
end
if left then
  -- An entry forgotten by done is forgotten by finished too (a bounded batch each time: finishes are frequent).
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[4]), 'LIMIT', 0, 1000)
  for _, id in ipairs(old) do
    redis.call('ZREM', KEYS[5], id)
    redis.call('HDEL', KEYS[8], id)
  end
  for _, history in ipairs({KEYS[6], KEYS[7]}) do
    redis.call('LTRIM', history, 0, tonumber(ARGV[2]) - 1)
    redis.call('EXPIRE', history, tonumber(ARGV[3]))
  end
end
return out
"""
)

# KEYS: repeats, repeats:seen.  ARGV: fingerprint, dead letter id, ttl_s, now_ms. Counts the dead letter once per
# fingerprint however often it is sent (a batch read again, a resend after a dropped connection); returns the count.
# repeats:seen is scored by when each pair was first counted and trimmed to the TTL on every call: bounded by the
# dead letters of the last TTL, as repeats itself is.
_COUNT_REPEAT = """
local seen = ARGV[1] .. ' ' .. ARGV[2]
local now = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]) * 1000)
local count
if redis.call('ZADD', KEYS[2], 'NX', now, seen) == 1 then
  count = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
else
  count = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return count
"""


_FINISH_BATCH = 256
"""Finishes sent in one script call at most: packing the call and reading its reply are each one loop step."""
_WAKE_CHUNK = 64
"""Finished claims whose waiting attempts are woken in one loop iteration."""
_WAITAOF_TIMEOUT_MS = 5000
_SOCKET_TIMEOUT = 2 * _WAITAOF_TIMEOUT_MS / 1000
"""The schedule client's reply timeout: longer than a WAITAOF may wait, so a slow fsync is answered by the server
(and checked), not cut short by the client."""


def check_waitaof(reply: Any, timeout_ms: int = _WAITAOF_TIMEOUT_MS) -> None:
    """Raise ``ScheduleError`` unless a ``WAITAOF 1 0 <timeout>`` reply says the local AOF has the write.

    The reply is ``[numlocal, numreplicas]``; ``numlocal`` is 0 when the fsync did not happen within the timeout,
    which means the write is acknowledged but not yet durable: the caller must not treat it as done.

    >>> check_waitaof([1, 0])  # in the local AOF (and on no replica: none was asked for)
    """
    try:
        local = int(reply[0])
    except (TypeError, ValueError, IndexError, KeyError):
        local = -1
    if local < 1:
        raise ScheduleError(
            f"Redis did not confirm the write in its append-only file within {timeout_ms} ms "
            f"(WAITAOF answered {reply!r}): check the server's disk and its appendfsync setting"
        )


def connect_redis(
    url: str, max_connections: int = 32, *, retries: int = 0, socket_timeout: float | None = None
) -> aioredis.Redis:
    """An asyncio Redis client for ``url``; ``retries``: times a command is sent again on a new connection after
    its connection failed (a pooled connection left from before a Redis restart fails its first command);
    ``socket_timeout``: seconds to wait for a reply (redis-py's default, 5 s, when None).

    Only a failed connection is a reason to send again, never a reply that was slow to come (redis-py's
    ``TimeoutError``, which its ``Retry`` resends by default): the server may well have run the command, and a
    command sent twice would count twice.

    The library version is given, not looked up: redis-py otherwise reads package metadata from disk for every new
    connection, which is file I/O on the event loop. The protocol is RESP2, named: redis-py 8.2 negotiates RESP3
    when none is given, whose replies have other types (every reply this module reads is written for RESP2).
    """
    info = DriverInfo(name="redis-py", lib_version=redis.__version__)
    retry = None
    if retries:
        retry = Retry(
            ExponentialWithJitterBackoff(cap=1.0, base=0.05),
            retries,
            supported_errors=(redis.exceptions.ConnectionError,),
        )
    timeout = {} if socket_timeout is None else {"socket_timeout": socket_timeout}
    # A bounded pool that waits for a free connection: hundreds of concurrent retries share a few connections
    # instead of opening one each (and meeting the pool's "Too many connections").
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=30, driver_info=info, retry=retry, protocol=2, **timeout
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def _now_ms() -> int:
    return int(time.time() * 1000)


class RedisSchedule:
    """The schedule of one handler. ``async with RedisSchedule(url, name) as schedule: ...``"""

    def __init__(
        self,
        redis_url: str,
        name: str,
        *,
        history_max: int = 10_000,
        history_ttl: float = 7 * 24 * 3600,
        done_keep: float = 24 * 3600,
    ) -> None:
        self.redis_url = redis_url
        self.name = name
        prefix = f"kafka-dlq:{{{name}}}"
        self.keys = {
            part: f"{prefix}:{part}"
            for part in (
                "due",
                "inflight",
                "body",
                "claims",
                "done",
                "history:recovered",
                "history:parked",
                "history:dropped",
                "repeats",
                "repeats:seen",
                "finished",
                "written",
            )
        }
        self.history_max = history_max
        self.history_ttl = int(history_ttl)
        self.done_keep_ms = int(done_keep * 1000)
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._finishing: list[tuple[bytes, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.waitaof = False
        self.aof_enabled = False
        self.server_version = ""

    async def start(self) -> None:
        # A schedule script sent twice does no harm (a repeated add or finish finds its work done and says so; a
        # repeated repeat count counts once; a repeated claim leaves the first one's entries to come back when their
        # lease ends), so a dropped connection is retried rather than failing a finish and running its record again
        # after the lease. A slow reply is not retried (connect_redis).
        self._client = connect_redis(self.redis_url, retries=2, socket_timeout=_SOCKET_TIMEOUT)
        try:
            info = await self._client.info("server")
            persistence = await self._client.info("persistence")
        except RedisError as exc:
            await self._client.aclose()
            raise ScheduleError(
                f"Redis at {self.redis_url} did not answer: {exc}: check the URL and the server"
            ) from exc
        self.server_version = str(info.get("redis_version", ""))
        self.aof_enabled = bool(persistence.get("aof_enabled"))
        major_minor = tuple(int(p) for p in self.server_version.split(".")[:2] if p.isdigit())
        self.waitaof = self.aof_enabled and major_minor >= (7, 2)
        scripts = (
            ("schedule", _SCHEDULE),
            ("claim", _CLAIM),
            ("reclaim", _RECLAIM),
            ("renew", _RENEW),
            ("finish", _FINISH),
            ("count_repeat", _COUNT_REPEAT),
        )
        for name, source in scripts:
            self._scripts[name] = self._client.register_script(source)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> RedisSchedule:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise ScheduleError("the schedule is not started")
        return self._client

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._scripts[script](keys=list(keys), args=list(args))
        except (RedisError, ResponseError) as exc:
            raise ScheduleError(f"Redis schedule {script} failed: {exc}") from exc

    async def _write(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.write_script(self._scripts[script], keys, args, what=script)

    async def write_script(self, source: AsyncScript, keys: Sequence[str], args: Sequence[Any], *, what: str) -> Any:
        """Run ``source`` (a script registered on :attr:`client`) that changes the schedule; return only once the
        change is durable. ``what`` names it in errors.

        With AOF on and a server that has WAITAOF (7.2+), ``WAITAOF 1 0 <timeout>`` follows the script on the same
        connection, in one non-transactional pipeline: WAITAOF waits for the writes of the connection it is sent
        on, so sent on another pooled connection it would wait for nothing. Its reply is checked
        (:func:`check_waitaof`). Between them an ``INCR`` of the ``written`` key: a pipeline sent again after its
        connection dropped finds the script's work done and writes nothing, and WAITAOF on the new connection would
        then answer at once, for no write; the INCR always writes, after the first send's writes, so the WAITAOF
        covers those too.
        """
        if not self.waitaof:
            try:
                return await source(keys=list(keys), args=list(args))
            except RedisError as exc:
                raise ScheduleError(f"Redis schedule {what} failed: {exc}") from exc
        for _ in range(2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(source.sha, len(keys), *keys, *args)
            pipe.incr(self.keys["written"])
            pipe.execute_command("WAITAOF", 1, 0, _WAITAOF_TIMEOUT_MS)
            try:
                result, _, waited = await pipe.execute(raise_on_error=False)
            except RedisError as exc:
                raise ScheduleError(f"Redis schedule {what} failed: {exc}") from exc
            if isinstance(result, NoScriptError):
                # The server lost its script cache (a restart): load it and send the pair again; the script did
                # not run, so nothing is written twice.
                try:
                    source.sha = await self.client.script_load(source.script)
                except RedisError as exc:
                    raise ScheduleError(f"Redis schedule {what} failed: {exc}") from exc
                continue
            if isinstance(result, Exception):
                raise ScheduleError(f"Redis schedule {what} failed: {result}") from result
            if isinstance(waited, Exception):
                if "appendonly is disabled" in str(waited):
                    # An operator turned AOF off at run time: there is no file to wait for any more.
                    self.waitaof = self.aof_enabled = False
                    return result
                raise ScheduleError(f"Redis WAITAOF failed: {waited}") from waited
            check_waitaof(waited)
            return result
        raise ScheduleError(f"Redis schedule {what} failed: the server keeps forgetting the script")

    async def add(self, entries: Iterable[tuple[Entry, int]]) -> int:
        """Schedule ``(entry, due_ms)`` pairs; an id already scheduled or recently finished is left alone. Returns
        how many were added."""
        added, _ = await self.add_and_claim(entries, 0, 0.0)
        return added

    async def add_and_claim(
        self,
        entries: Iterable[tuple[Entry, int]],
        limit: int,
        lease: float,
        now_ms: int | None = None,
        slices: Slices | None = None,
    ) -> tuple[int, list[Claimed]]:
        """Schedule ``(entry, due_ms)`` pairs as :meth:`add` does, and claim at once, for ``lease`` seconds, the
        first ``limit`` of those added that are due by now: one atomic script, as if :meth:`claim` had taken them
        the instant they were added, but without reading their bodies back. Returns how many were added and the
        claims, which hold the entries given here.

        The bodies are written as for any entry, so a claim taken here ends as every claim does: finished, or its
        lease expired and the entry back in due for any instance. ``slices``: the caller's loop slice, which
        encoding the bodies goes on using (a new one when None).
        """
        token = uuid.uuid4().hex
        given: list[Entry] = []
        args: list[Any] = []
        slices = slices or Slices()
        for entry, due_ms in entries:
            await slices.pause()  # encoding hundreds of bodies is CPU work: in slices
            given.append(entry)
            args.append(b"%d %s\n%s" % (due_ms, entry.id.encode(), encode_entry(entry)))
        if not given:
            return 0, []
        # Read after the encoding, which yields to the loop: the lease runs from the script, not from before it.
        now = _now_ms() if now_ms is None else now_ms
        k = self.keys
        flags = await self._write(
            "schedule",
            [k["due"], k["inflight"], k["body"], k["claims"], k["done"]],
            [len(given), limit, now, now + int(lease * 1000), token, *args],
        )
        added = sum(1 for flag in flags if int(flag))
        claimed = [Claimed(entry, token, now) for entry, flag in zip(given, flags, strict=True) if int(flag) == 2]
        return added, claimed

    async def claim(self, limit: int, lease: float, now_ms: int | None = None) -> tuple[list[Claimed], int | None]:
        """Claim up to ``limit`` due entries for ``lease`` seconds; also returns when the next one is due (ms)."""
        now = _now_ms() if now_ms is None else now_ms
        token = uuid.uuid4().hex
        k = self.keys
        reply = await self._run(
            "claim", [k["due"], k["inflight"], k["body"], k["claims"]], [now, int(lease * 1000), limit, token]
        )
        next_due = int(reply[0])
        claimed = []
        slices = Slices()
        for i in range(1, len(reply), 2):
            await slices.pause()  # as for encoding: decoding hundreds of bodies goes in slices
            claimed.append(Claimed(decode_entry(reply[i + 1]), token, now))
        return claimed, (None if next_due < 0 else next_due)

    async def reclaim(
        self, held: Sequence[tuple[Entry, str]], lease: float, now_ms: int | None = None
    ) -> list[Claimed]:
        """Claim again, for ``lease`` seconds, entries this instance rescheduled itself, from the entries it kept:
        ``(entry, token)``, the entry as its finish wrote it and the token of the claim that made that finish.

        An entry is claimed only when it is due and its last finish is still that one, so that its body in Redis
        is the entry given (another instance that claimed and rescheduled it since, or an operator who parked or
        dropped it, leaves it out); the others are for :meth:`claim`. No body is read back.
        """
        now = _now_ms() if now_ms is None else now_ms
        token = uuid.uuid4().hex
        k = self.keys
        args: list[Any] = [now, now + int(lease * 1000), token]
        for entry, finished_by in held:
            args += [entry.id, finished_by]
        flags = await self._run("reclaim", [k["due"], k["inflight"], k["body"], k["claims"], k["finished"]], args)
        return [Claimed(entry, token, now) for (entry, _), flag in zip(held, flags, strict=True) if int(flag)]

    async def renew(self, claimed: Claimed, lease: float, now_ms: int | None = None) -> Claimed | None:
        """Extend a claim's lease to ``lease`` seconds from now; None when the claim is no longer ours (its lease
        expired and another claim took the entry), and then nothing changes."""
        now = _now_ms() if now_ms is None else now_ms
        k = self.keys
        ok = await self._run(
            "renew", [k["inflight"], k["claims"]], [claimed.entry.id, claimed.token, now + int(lease * 1000)]
        )
        return Claimed(claimed.entry, claimed.token, now) if int(ok) else None

    async def finish(
        self,
        claimed: Claimed,
        outcome: Outcome,
        *,
        entry: Entry | None = None,
        due_ms: int = 0,
        history: dict[str, Any] | None = None,
    ) -> bool:
        """Move a claimed entry on: back to due (RETRY, with the updated ``entry``), or out (RECOVERED/PARKED).

        False when the claim was lost (its lease expired and another instance took it): nothing changes. Finishes
        made in the same loop iteration go to Redis together, in one script call (one round trip for hundreds).
        """
        entry_id = claimed.entry.id
        if outcome is Outcome.RETRY:
            payload = encode_entry(entry or claimed.entry)
        else:
            payload = _HISTORY.encode({"id": entry_id, "at": _now_ms(), **(history or {})}).encode()
        head = b"%s %d %s %s\n" % (outcome.value.encode(), due_ms, claimed.token.encode(), entry_id.encode())
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._finishing.append((head + payload, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_finishes())
        return await future

    async def _flush_finishes(self) -> None:
        k = self.keys
        keys = [
            *(k[part] for part in ("due", "inflight", "body", "claims", "done")),
            *(k[part] for part in ("history:recovered", "history:parked", "finished")),
        ]
        while self._finishing:
            batch, self._finishing = self._finishing[:_FINISH_BATCH], self._finishing[_FINISH_BATCH:]
            args: list[Any] = [_now_ms(), self.history_max, self.history_ttl, self.done_keep_ms, len(batch)]
            args += [arg for arg, _ in batch]
            try:
                results = await self._write("finish", keys, args)
            except ScheduleError as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            # Each future wakes an attempt, and those run together in the loop's next iteration: a few at a time.
            for index, ((_, future), ok) in enumerate(zip(batch, results, strict=True)):
                if index and index % _WAKE_CHUNK == 0:
                    await asyncio.sleep(0)
                if not future.done():
                    future.set_result(bool(ok))

    async def defer(self, claimed: Claimed, due_ms: int) -> bool:
        """Put a claimed entry back, unchanged (no attempt spent): the circuit is open."""
        return await self.finish(claimed, Outcome.RETRY, entry=claimed.entry, due_ms=due_ms)

    async def count_repeat(self, fingerprint: str, dead_letter_id: str) -> int:
        """Count one more failure of this content after a redrive, the dead letter at ``dead_letter_id`` (its DLQ
        coordinates); returns the count. The same dead letter counts once, however often it is counted (read again
        after a crash, or the command sent again after its connection dropped)."""
        k = self.keys
        # A ScheduleError, as every schedule call: the handler retries those.
        reply = await self._run(
            "count_repeat",
            [k["repeats"], k["repeats:seen"]],
            [fingerprint, dead_letter_id, self.history_ttl, _now_ms()],
        )
        return int(reply)

    async def pending(self) -> dict[str, int]:
        """How many entries wait (``due``) and are being processed (``inflight``)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.keys["due"])
        pipe.zcard(self.keys["inflight"])
        due, inflight = await pipe.execute()
        return {"due": int(due), "inflight": int(inflight), "total": int(due) + int(inflight)}

    async def history(self, which: str = "recovered", limit: int = 100) -> list[dict[str, Any]]:
        items = await self.client.lrange(self.keys[f"history:{which}"], 0, limit - 1)
        return [json.loads(item) for item in items]

    async def clear(self) -> None:
        """Delete every key of this handler: its whole schedule and history (tests, benchmarks, the demo)."""
        await self.client.delete(*self.keys.values())
