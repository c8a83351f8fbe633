"""The operator's view of a handler's pending retries in Redis, and what they may do to them.

``kafka-dlq pending`` counts and lists the entries of a handler's schedule (see ``schedule.py`` for the key layout);
``retry-now``, ``park`` and ``drop`` act on selected entries, safely while handlers run:

- Every change is one Lua script over the schedule's keys, atomic with the handlers' claims.
- Only entries that are not claimed are touched: ``due`` ones, and ``in-flight`` ones whose lease has expired
  (their handler is gone; the next claim would treat them as due). An entry a handler holds under a live lease is
  refused and reported as ``in_flight``: its processor is running, and dropping or parking it under it would let it
  leave twice. Run the command again once it is back in ``due`` (after that attempt fails) or gone (recovered).
- ``retry-now`` makes entries due now. ``drop`` removes them, marks them done (a re-read dead letter is not
  scheduled again) and records each in ``history:dropped`` with who dropped it and when. ``park`` takes the entries
  the way a handler claims them (a lease under an operator's token), writes each to the poison topic (native
  headers, reason ``manual``) and only once the broker has it, finishes them as parked, recorded in
  ``history:parked`` with who and when; an entry whose write fails goes back to ``due`` as it was.

>>> async with PendingRetries("redis://127.0.0.1:16379/0", "billing") as pending:       # doctest: +SKIP
...     summary = await pending.summary(Selection(original_topic="payments"))
...     result = await pending.drop(Selection(ids=("payments.dlq/0/17",)), note="customer deleted")
"""

from __future__ import annotations

import asyncio
import fnmatch
import getpass
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from redis.exceptions import RedisError

from kafka_dlq.errors import ConfigError, TopicNotFoundError
from kafka_dlq.formats import MAX_MESSAGE_BYTES, encode_native
from kafka_dlq.kafka import AsyncProducer
from kafka_dlq.kafka.inspect import describe_topics
from kafka_dlq.outcomes import Reason
from kafka_dlq.schedule import Entry, RedisSchedule, ScheduleError, decode_entry

__all__ = ["ActionResult", "PendingEntry", "PendingRetries", "PendingSummary", "Selection", "operator_name"]

Progress = Callable[[int, int], object]

DUE, IN_FLIGHT = "due", "in_flight"
OK, MISSING = "ok", "missing"
_CHUNK = 500
_PARK_LEASE_MS = 120_000
"""The operator's lease while parking; longer than the producer's delivery timeout, so a write settles (delivered
or failed) while the lease still holds and no handler can claim the entry meanwhile."""
_DELIVERY_TIMEOUT_MS = 60_000
_DUE_BUCKETS = (("overdue", 0), ("1m", 60_000), ("1h", 3_600_000), ("1d", 86_400_000))

# Each script: KEYS as named; an entry is "taken" when due, or in flight under an expired lease (as _CLAIM in
# schedule.py would take it back). A live lease means a handler runs it: refused as 'in_flight'.

# KEYS: due, inflight, claims.  ARGV: now_ms, ids...  Returns a status per id.
_RETRY_NOW = """
local now = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local status = 'missing'
  if redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], now, id)
    status = 'ok'
  else
    local lease = redis.call('ZSCORE', KEYS[2], id)
    if lease and tonumber(lease) <= now then
      redis.call('ZREM', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
      redis.call('ZADD', KEYS[1], now, id)
      status = 'ok'
    elseif lease then
      status = 'in_flight'
    end
  end
  table.insert(out, status)
end
return out
"""

# KEYS: due, inflight, body, claims, done, history:dropped, finished.
# ARGV: now_ms, done_keep_ms, history_max, history_ttl_s, then pairs (id, history_item).  Returns a status per id.
_DROP = """
local now = tonumber(ARGV[1])
local out = {}
local dropped = 0
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  local status = 'missing'
  local take = false
  if redis.call('ZSCORE', KEYS[1], id) then
    take = true
  else
    local lease = redis.call('ZSCORE', KEYS[2], id)
    if lease and tonumber(lease) <= now then take = true elseif lease then status = 'in_flight' end
  end
  if take then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZADD', KEYS[5], now, id)
    redis.call('LPUSH', KEYS[6], ARGV[i + 1])
    dropped = dropped + 1
    status = 'ok'
  end
  table.insert(out, status)
end
if dropped > 0 then
  -- As the handler's finish trims done: an entry forgotten by done is forgotten by finished too.
  local old = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 1000)
  for _, old_id in ipairs(old) do
    redis.call('ZREM', KEYS[5], old_id)
    redis.call('HDEL', KEYS[7], old_id)
  end
  redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[3]) - 1)
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[4]))
end
return out
"""

# KEYS: due, inflight, body, claims.  ARGV: now_ms, lease_ms, token, ids...
# Returns per id: status, body ('' unless taken), due score to restore ('' unless taken).
_TAKE = """
local now = tonumber(ARGV[1])
local deadline = now + tonumber(ARGV[2])
local out = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local status = 'missing'
  local due = redis.call('ZSCORE', KEYS[1], id)
  local take = false
  if due then
    take = true
  else
    local lease = redis.call('ZSCORE', KEYS[2], id)
    if lease and tonumber(lease) <= now then take = true; due = tostring(now) elseif lease then status = 'in_flight' end
  end
  local body = false
  if take then body = redis.call('HGET', KEYS[3], id) end
  if body then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', KEYS[2], deadline, id)
    redis.call('HSET', KEYS[4], id, ARGV[3])
    table.insert(out, 'ok'); table.insert(out, body); table.insert(out, due)
  else
    table.insert(out, status); table.insert(out, ''); table.insert(out, '')
  end
end
return out
"""

# KEYS: inflight, body, claims, done, history:parked, finished.
# ARGV: now_ms, done_keep_ms, history_max, history_ttl_s, token, then pairs (id, history_item).
# Returns per id 'ok', or 'lost' when the operator's claim is no longer held (its lease expired).
_PARKED = """
local now = tonumber(ARGV[1])
local out = {}
local parked = 0
for i = 6, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[5] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZADD', KEYS[4], now, id)
    redis.call('LPUSH', KEYS[5], ARGV[i + 1])
    parked = parked + 1
    table.insert(out, 'ok')
  else
    table.insert(out, 'lost')
  end
end
if parked > 0 then
  -- As the handler's finish trims done: an entry forgotten by done is forgotten by finished too.
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 1000)
  for _, old_id in ipairs(old) do
    redis.call('ZREM', KEYS[4], old_id)
    redis.call('HDEL', KEYS[6], old_id)
  end
  redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[3]) - 1)
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[4]))
end
return out
"""

# KEYS: due, inflight, claims.  ARGV: token, then pairs (id, due_ms).  Puts taken entries back where they were.
_RELEASE = """
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[3], id) == ARGV[1] then
    redis.call('ZREM', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    redis.call('ZADD', KEYS[1], ARGV[i + 1], id)
  end
end
return 1
"""


def operator_name() -> str:
    """Who is acting, for the history: ``user@host``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingEntry:
    """One entry of the schedule, as the operator sees it. Times are epoch milliseconds."""

    id: str
    """The dead letter's coordinates, ``dlq-topic/partition/offset``."""
    state: str
    """``due`` (waiting for its time) or ``in_flight`` (claimed by a handler)."""
    at: int
    """When it is due (``due``), or when its handler's lease ends (``in_flight``)."""
    original_topic: str
    error_class: str | None
    message: str | None
    attempts: int
    handler_failures: int
    first_failure: int | None
    last_failure: int | None

    @property
    def dlq_topic(self) -> str:
        return self.id.rsplit("/", 2)[0]

    @staticmethod
    def of(entry_id: str, state: str, at: int, entry: Entry) -> PendingEntry:
        dead_letter = entry.dead_letter
        return PendingEntry(
            id=entry_id,
            state=state,
            at=at,
            original_topic=dead_letter.original.topic,
            error_class=dead_letter.failure.error_class,
            message=dead_letter.failure.message,
            attempts=dead_letter.attempts,
            handler_failures=entry.handler_failures,
            first_failure=dead_letter.first_failure,
            last_failure=dead_letter.last_failure,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """Which entries: all conditions given must hold. ``error_class`` may be a shell pattern (``*Timeout*``).

    An action on an empty selection needs ``everything=True``: acting on the whole schedule is never an accident.
    """

    ids: tuple[str, ...] = ()
    original_topic: str | None = None
    error_class: str | None = None
    dlq_topic: str | None = None
    state: str | None = None
    """``due`` or ``in_flight``."""
    due_before: int | None = None
    """Epoch ms: entries due (or leased) before then."""
    limit: int | None = None
    """At most this many entries, soonest due first."""
    everything: bool = False

    def __post_init__(self) -> None:
        if self.state not in (None, DUE, IN_FLIGHT):
            raise ConfigError(f"state {self.state!r} is not 'due' or 'in_flight'")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit {self.limit} is negative")

    @property
    def filtered(self) -> bool:
        return bool(
            self.ids
            or self.original_topic is not None
            or self.error_class is not None
            or self.dlq_topic is not None
            or self.state is not None
            or self.due_before is not None
        )

    def matches(self, entry: PendingEntry) -> bool:
        if self.original_topic is not None and entry.original_topic != self.original_topic:
            return False
        if self.error_class is not None and not fnmatch.fnmatchcase(entry.error_class or "", self.error_class):
            return False
        if self.dlq_topic is not None and entry.dlq_topic != self.dlq_topic:
            return False
        if self.state is not None and entry.state != self.state:
            return False
        return self.due_before is None or entry.at < self.due_before


@dataclass(frozen=True, kw_only=True)
class PendingSummary:
    """Counts over the selected entries (``totals`` over the whole schedule), and the first of them."""

    name: str
    totals: dict[str, int]
    matched: int
    by_state: dict[str, int]
    by_original_topic: dict[str, int]
    by_error_class: dict[str, int]
    by_due: dict[str, int]
    """Due entries by when they are due: ``overdue`` (now or past), within ``1m``, ``1h``, ``1d``, or ``later``."""
    next_due: int | None
    expired_leases: int
    """In-flight entries whose lease has run out (their handler stopped; they return to due on the next claim)."""
    entries: list[PendingEntry]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class ActionResult:
    """What an action did, per entry id."""

    action: str
    by: str
    at: int
    done: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)
    """Refused: a handler holds it under a live lease."""
    missing: list[str] = field(default_factory=list)
    """Not in the schedule any more (recovered, parked or dropped since it was selected), or never was."""
    failed: dict[str, str] = field(default_factory=dict)
    """Not done, and why (a park whose write failed; the entry is back in due)."""

    @property
    def ok(self) -> bool:
        return not (self.in_flight or self.missing or self.failed)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class PendingRetries:
    """The pending retries of handler ``name``: counts, listing and operator actions.

    ``kafka_config`` (``bootstrap.servers`` at least) is needed to park; ``poison_topic`` overrides the handler's
    default of ``<dlq topic>.poison``; ``by`` names the operator in the history (default ``user@host``).
    """

    def __init__(
        self,
        redis_url: str,
        name: str,
        *,
        kafka_config: Mapping[str, Any] | None = None,
        poison_topic: str | None = None,
        by: str | None = None,
    ) -> None:
        self.schedule = RedisSchedule(redis_url, name)
        self.name = name
        self.kafka_config = dict(kafka_config or {})
        self.poison_topic = poison_topic
        self._by = by
        prefix = self.schedule.keys["due"].rsplit(":", 1)[0]
        # Not in RedisSchedule.keys (yet): same hash tag, so Redis Cluster keeps it with the others.
        self.dropped_key = f"{prefix}:history:dropped"
        self._scripts: dict[str, Any] = {}

    @property
    def by(self) -> str:
        """Who acts, as the history records it."""
        if self._by is None:
            self._by = operator_name()
        return self._by

    async def start(self) -> None:
        if self._by is None:
            # The login name may come from the password database: file I/O, so not on the loop.
            self._by = await asyncio.to_thread(operator_name)
        await self.schedule.start()
        client = self.schedule.client
        for name, source in (
            ("retry_now", _RETRY_NOW),
            ("drop", _DROP),
            ("take", _TAKE),
            ("parked", _PARKED),
            ("release", _RELEASE),
        ):
            self._scripts[name] = client.register_script(source)

    async def stop(self) -> None:
        await self.schedule.stop()

    async def __aenter__(self) -> PendingRetries:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- reading

    async def select(self, selection: Selection, progress: Progress | None = None) -> list[PendingEntry]:
        """The entries ``selection`` picks, soonest due first (a snapshot: handlers keep working meanwhile)."""
        where = await (self._locate(selection.ids) if selection.ids else self._scan(progress))
        entries: list[PendingEntry] = []
        ids = list(where)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            try:
                bodies = await self.schedule.client.hmget(self.schedule.keys["body"], chunk)
            except RedisError as exc:
                raise ScheduleError(f"reading the schedule of {self.name!r} failed: {exc}") from exc
            for entry_id, body in zip(chunk, bodies, strict=True):
                if body is None:
                    continue  # it left between the two reads
                state, at = where[entry_id]
                entry = PendingEntry.of(entry_id, state, at, decode_entry(body))
                if selection.matches(entry):
                    entries.append(entry)
        entries.sort(key=lambda e: (e.at, e.id))
        return entries if selection.limit is None else entries[: selection.limit]

    async def _scan(self, progress: Progress | None) -> dict[str, tuple[str, int]]:
        """Every entry id with its state and time; in-flight wins over due (an entry claimed during the scan)."""
        client, keys = self.schedule.client, self.schedule.keys
        try:
            totals = await self.schedule.pending()
            where: dict[str, tuple[str, int]] = {}
            for state, key in ((DUE, keys["due"]), (IN_FLIGHT, keys["inflight"])):
                async for member, score in client.zscan_iter(key, count=1000):
                    where[_str(member)] = (state, int(score))
                    if progress is not None and len(where) % 1000 == 0:
                        progress(len(where), totals["total"])
        except RedisError as exc:
            raise ScheduleError(f"reading the schedule of {self.name!r} failed: {exc}") from exc
        if progress is not None:
            progress(len(where), max(totals["total"], len(where)))
        return where

    async def _locate(self, ids: Iterable[str]) -> dict[str, tuple[str, int]]:
        keys = self.schedule.keys
        wanted = list(dict.fromkeys(ids))
        pipe = self.schedule.client.pipeline(transaction=False)
        for entry_id in wanted:
            pipe.zscore(keys["due"], entry_id)
            pipe.zscore(keys["inflight"], entry_id)
        try:
            scores = await pipe.execute()
        except RedisError as exc:
            raise ScheduleError(f"reading the schedule of {self.name!r} failed: {exc}") from exc
        where = {}
        for index, entry_id in enumerate(wanted):
            due, lease = scores[2 * index], scores[2 * index + 1]
            if lease is not None:
                where[entry_id] = (IN_FLIGHT, int(lease))
            elif due is not None:
                where[entry_id] = (DUE, int(due))
        return where

    async def summary(
        self, selection: Selection | None = None, *, show: int = 20, progress: Progress | None = None
    ) -> PendingSummary:
        """Counts of the selected entries by state, original topic, error class and due time; the first ``show``."""
        selection = selection or Selection()
        entries = await self.select(selection, progress)
        now = _now_ms()
        by_state: dict[str, int] = {DUE: 0, IN_FLIGHT: 0}
        by_topic: dict[str, int] = {}
        by_error: dict[str, int] = {}
        by_due = {name: 0 for name, _ in _DUE_BUCKETS} | {"later": 0}
        next_due: int | None = None
        expired = 0
        for entry in entries:
            by_state[entry.state] += 1
            by_topic[entry.original_topic] = by_topic.get(entry.original_topic, 0) + 1
            error = entry.error_class or "(none)"
            by_error[error] = by_error.get(error, 0) + 1
            if entry.state == IN_FLIGHT:
                expired += entry.at <= now
                continue
            next_due = entry.at if next_due is None else min(next_due, entry.at)
            wait = entry.at - now
            by_due[next((name for name, upto in _DUE_BUCKETS if wait <= upto), "later")] += 1
        return PendingSummary(
            name=self.name,
            totals=await self.schedule.pending(),
            matched=len(entries),
            by_state=by_state,
            by_original_topic=dict(sorted(by_topic.items(), key=lambda item: (-item[1], item[0]))),
            by_error_class=dict(sorted(by_error.items(), key=lambda item: (-item[1], item[0]))),
            by_due=by_due,
            next_due=next_due,
            expired_leases=expired,
            entries=entries[:show],
        )

    # ---------------------------------------------------------------- actions

    async def _chosen(self, selection: Selection, progress: Progress | None) -> tuple[list[PendingEntry], list[str]]:
        """The selected entries, and the ids asked for that are not in the schedule."""
        if not selection.filtered and not selection.everything:
            raise ConfigError("no entries selected: give ids or filters, or select everything explicitly")
        entries = await self.select(selection, progress)
        found = {entry.id for entry in entries}
        missing = [entry_id for entry_id in dict.fromkeys(selection.ids) if entry_id not in found]
        if selection.ids and selection.filtered:
            # Ids that exist but fail another filter are not "missing": they were not selected.
            located = await self._locate(missing)
            missing = [entry_id for entry_id in missing if entry_id not in located]
        return entries, missing

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        # Every script here changes the schedule: written as the handler's own writes are, so with AOF on (and
        # WAITAOF there) an answer means it is on disk. WAITAOF goes on the script's own connection; sent apart, on
        # another pooled connection, it would wait for none of these writes.
        return await self.schedule.write_script(self._scripts[script], keys, args, what=script)

    @staticmethod
    def _sort(result: ActionResult, ids: Sequence[str], statuses: Sequence[Any]) -> None:
        for entry_id, raw in zip(ids, statuses, strict=True):
            status = _str(raw)
            {OK: result.done, IN_FLIGHT: result.in_flight}.get(status, result.missing).append(entry_id)

    async def retry_now(self, selection: Selection, progress: Progress | None = None) -> ActionResult:
        """Make the selected entries due now (in-flight ones are refused)."""
        entries, missing = await self._chosen(selection, progress)
        result = ActionResult(action="retry-now", by=self.by, at=_now_ms(), missing=missing)
        keys = self.schedule.keys
        for start in range(0, len(entries), _CHUNK):
            ids = [entry.id for entry in entries[start : start + _CHUNK]]
            statuses = await self._run("retry_now", [keys["due"], keys["inflight"], keys["claims"]], [_now_ms(), *ids])
            self._sort(result, ids, statuses)
        return result

    async def drop(
        self, selection: Selection, *, note: str | None = None, progress: Progress | None = None
    ) -> ActionResult:
        """Remove the selected entries for good, recording each (who, when, note) in ``history:dropped``."""
        entries, missing = await self._chosen(selection, progress)
        result = ActionResult(action="drop", by=self.by, at=_now_ms(), missing=missing)
        s, keys = self.schedule, self.schedule.keys
        for start in range(0, len(entries), _CHUNK):
            chunk = entries[start : start + _CHUNK]
            now = _now_ms()
            args: list[Any] = [now, s.done_keep_ms, s.history_max, s.history_ttl]
            for entry in chunk:
                args += [entry.id, self._history(entry, now, "dropped", note)]
            statuses = await self._run(
                "drop",
                [
                    keys["due"],
                    keys["inflight"],
                    keys["body"],
                    keys["claims"],
                    keys["done"],
                    self.dropped_key,
                    keys["finished"],
                ],
                args,
            )
            self._sort(result, [entry.id for entry in chunk], statuses)
        return result

    def _history(self, entry: PendingEntry, now: int, what: str, note: str | None) -> str:
        item: dict[str, Any] = {
            "id": entry.id,
            "at": now,
            "topic": entry.original_topic,
            "error_class": entry.error_class,
            "attempts": entry.attempts,
            "by": self.by,
            what: True,
        }
        if what == "parked":
            item["reason"] = Reason.MANUAL.value
            item["detail"] = note or "parked by an operator"
        elif note:
            item["note"] = note
        return json.dumps(item, separators=(",", ":"))

    async def dropped(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest entries of ``history:dropped``."""
        items = await self.schedule.client.lrange(self.dropped_key, 0, limit - 1)
        return [json.loads(item) for item in items]

    async def park(
        self, selection: Selection, *, note: str | None = None, progress: Progress | None = None
    ) -> ActionResult:
        """Write the selected entries to their poison topic with reason ``manual``, then remove them."""
        if "bootstrap.servers" not in self.kafka_config:
            raise ConfigError("parking writes to Kafka: give the bootstrap servers (KAFKA_DLQ_BOOTSTRAP_SERVERS)")
        entries, missing = await self._chosen(selection, progress)
        result = ActionResult(action="park", by=self.by, at=_now_ms(), missing=missing)
        if not entries:
            return result
        await self._check_poison_topics({self._poison_for(entry.dlq_topic) for entry in entries})
        producer = AsyncProducer(
            {
                **self.kafka_config,
                "message.timeout.ms": _DELIVERY_TIMEOUT_MS,
                "message.max.bytes": 64 * 1024 * 1024,
            },
            name=f"{self.name}-operator-park",
        )
        async with producer:
            for start in range(0, len(entries), _CHUNK):
                await self._park_chunk(producer, entries[start : start + _CHUNK], note, result)
        return result

    def _poison_for(self, dlq_topic: str) -> str:
        return self.poison_topic or f"{dlq_topic}.poison"

    async def _check_poison_topics(self, topics: set[str]) -> None:
        found = await asyncio.to_thread(describe_topics, self.kafka_config, sorted(topics))
        missing = sorted(name for name, info in found.items() if info is None)
        if missing:
            raise TopicNotFoundError(
                f"poison topic(s) {', '.join(missing)} do not exist: create them (the handler parks there too) "
                "or name another with --poison-topic"
            )

    async def _park_chunk(
        self, producer: AsyncProducer, chunk: Sequence[PendingEntry], note: str | None, result: ActionResult
    ) -> None:
        keys = self.schedule.keys
        token = f"operator-{uuid.uuid4().hex}"
        ids = [entry.id for entry in chunk]
        reply = await self._run(
            "take",
            [keys["due"], keys["inflight"], keys["body"], keys["claims"]],
            [_now_ms(), _PARK_LEASE_MS, token, *ids],
        )
        taken: list[tuple[PendingEntry, Entry, str]] = []
        for index, entry in enumerate(chunk):
            raw_status, body, raw_due = reply[3 * index : 3 * index + 3]
            status, due = _str(raw_status), _str(raw_due)
            if status == OK:
                taken.append((entry, decode_entry(body), due))  # the body as stored: bytes, not text
            else:
                {IN_FLIGHT: result.in_flight}.get(status, result.missing).append(entry.id)
        if not taken:
            return
        detail = f"manual park by {self.by}" + (f": {note}" if note else "")
        sends = [self._produce(producer, self._poison_for(entry.dlq_topic), body, detail) for entry, body, _ in taken]
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        now = _now_ms()
        s = self.schedule
        finish: list[Any] = [now, s.done_keep_ms, s.history_max, s.history_ttl, token]
        back: list[Any] = [token]
        finished: list[str] = []
        for (entry, _, due), outcome in zip(taken, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                result.failed[entry.id] = f"not written to the poison topic ({outcome}); it is due again as before"
                back += [entry.id, due]
            else:
                finish += [entry.id, self._history(entry, now, "parked", note)]
                finished.append(entry.id)
        if len(back) > 1:
            await self._run("release", [keys["due"], keys["inflight"], keys["claims"]], back)
        if finished:
            statuses = await self._run(
                "parked",
                [
                    keys["inflight"],
                    keys["body"],
                    keys["claims"],
                    keys["done"],
                    keys["history:parked"],
                    keys["finished"],
                ],
                finish,
            )
            for entry_id, raw in zip(finished, statuses, strict=True):
                if _str(raw) == OK:
                    result.done.append(entry_id)
                else:
                    result.failed[entry_id] = (
                        "written to the poison topic, but the operator's lease ran out first: a handler may "
                        "retry it too"
                    )

    async def _produce(self, producer: AsyncProducer, topic: str, entry: Entry, detail: str) -> None:
        dead_letter = entry.dead_letter
        message = dead_letter.failure.message or ""
        text = f"{message} [parked: {detail}]" if message else f"[parked: {detail}]"
        data = text.encode("utf-8", "replace")[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")
        parked = replace(dead_letter, reason=Reason.MANUAL, failure=replace(dead_letter.failure, message=data))
        encoded = encode_native(parked)
        await producer.produce(topic, encoded.value, key=encoded.key, headers=encoded.headers)
