"""The HTTP ops API against the real broker: the token guards it, dry runs count, real redrives move exactly the
selected records, bad input is a 4xx that says why, and generated requests from its own OpenAPI document never
make it fail (schemathesis)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlencode

import httpx
import pytest
import requests
import schemathesis
from confluent_kafka import Consumer, TopicPartition
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.applications import Starlette

from kafka_dlq.errors import ConfigError
from kafka_dlq.handler import DLQHandler
from kafka_dlq.kafka.admin import create_topics
from kafka_dlq.testing import free_port
from kafka_dlq.web.api import OpsApi
from kafka_dlq.web.app import create_app, running
from tests.helpers import read_all, seed
from tests.test_handler import dead_letter

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def served(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` served by uvicorn on a free loopback port, and a client for it."""
    port = free_port()
    async with running(app, port=port), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client


async def dlq_with(
    kafka_bootstrap: str, new_topic: Callable[..., str], records: list[tuple[str, bytes]]
) -> tuple[str, str]:
    """A DLQ topic holding a native dead letter per ``(error class, key)``, all from one original topic (empty)."""
    home = await asyncio.to_thread(new_topic, 1, None, "home")
    dlq = await asyncio.to_thread(new_topic, 2, None, "api.dlq")
    letters = [dead_letter(home, key, b'{"n": 1}', error_class=error) for error, key in records]
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, letters)
    return dlq, home


async def records_in(kafka_bootstrap: str, topic: str, expected: int | None = None) -> list[bytes | None]:
    messages = await asyncio.to_thread(read_all, kafka_bootstrap, topic, idle=1.5, expected=expected)
    return sorted(msg.key() for msg in messages)


# ---------------------------------------------------------------- the token


async def test_without_the_right_token_a_redrive_is_401_and_nothing_moves(kafka_bootstrap, new_topic):
    dlq, home = await dlq_with(kafka_bootstrap, new_topic, [("builtins.KeyError", b"k%d" % i) for i in range(3)])
    body = {"topic": dlq, "dry_run": False}

    async with served(create_app(bootstrap_servers=kafka_bootstrap, token=TOKEN)) as api:
        missing = await api.post("/api/redrive", json=body)
        wrong = await api.post("/api/redrive", json=body, headers={"Authorization": "Bearer not-the-token-at-all"})
        basic = await api.post("/api/redrive", json=body, headers={"Authorization": f"Basic {TOKEN}"})
        reading = await api.get("/api/stats", params={"topic": dlq})
        # What a run of that group would still send: everything, so the refused calls committed nothing.
        still = await api.post("/api/redrive", json={"topic": dlq}, headers=AUTH)

    for response in (missing, wrong, basic, reading):
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="kafka-dlq"')
        assert "token" in response.json()["error"]
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert await records_in(kafka_bootstrap, home) == []
    assert still.status_code == 200 and still.json()["sent"] == {home: 3}


async def test_without_a_token_configured_reading_is_open_and_real_redrives_are_off(kafka_bootstrap, new_topic):
    dlq, home = await dlq_with(kafka_bootstrap, new_topic, [("builtins.KeyError", b"k1")])

    async with served(create_app(bootstrap_servers=kafka_bootstrap)) as api:
        real = await api.post("/api/redrive", json={"topic": dlq, "dry_run": False}, headers=AUTH)
        dry = await api.post("/api/redrive", json={"topic": dlq})
        stats = await api.get("/api/stats", params={"topic": dlq})

    assert real.status_code == 403
    assert "http_token" in real.json()["error"]
    assert dry.status_code == 200 and dry.json()["sent"] == {home: 1}
    assert stats.status_code == 200 and stats.json()["records"] == 1
    assert await records_in(kafka_bootstrap, home) == []


def test_a_short_token_is_refused_at_set_up():
    with pytest.raises(ConfigError, match="at least 16"):
        create_app(bootstrap_servers="127.0.0.1:9092", token="short")


# ---------------------------------------------------------------- redrive


async def test_a_real_redrive_with_the_token_moves_exactly_the_matching_records(kafka_bootstrap, new_topic):
    timeouts = [b"t1", b"t2", b"t3"]
    dlq, home = await dlq_with(
        kafka_bootstrap,
        new_topic,
        [("builtins.TimeoutError", key) for key in timeouts] + [("builtins.KeyError", b"x%d" % i) for i in range(3)],
    )
    body = {"topic": dlq, "dry_run": False, "error_classes": ["TimeoutError"], "rate": 500}

    async with served(create_app(bootstrap_servers=kafka_bootstrap, token=TOKEN)) as api:
        first = await api.post("/api/redrive", json=body, headers=AUTH)
        again = await api.post("/api/redrive", json=body, headers=AUTH)

    assert first.status_code == 200, first.text
    report = first.json()
    assert report["dry_run"] is False
    assert (report["sent"], report["skipped"], report["read"]) == ({home: 3}, 3, 6)
    assert report["rate_limit"] == 500
    assert again.json()["sent"] == {}  # exactly once: the same call again finds nothing left
    moved = await asyncio.to_thread(read_all, kafka_bootstrap, home, idle=1.5, expected=3)
    assert sorted(msg.key() for msg in moved) == timeouts
    assert all(dict(msg.headers())["dlq.redrive.count"] == b"1" for msg in moved)


async def test_a_real_redrive_with_a_relative_time_needs_a_group_and_then_resumes(
    kafka_bootstrap, new_topic, unique_name
):
    dlq, home = await dlq_with(kafka_bootstrap, new_topic, [("builtins.KeyError", b"k%d" % i) for i in range(3)])
    body = {"topic": dlq, "dry_run": False, "since": "1h"}
    group = unique_name("api-replay")

    async with served(create_app(bootstrap_servers=kafka_bootstrap, token=TOKEN)) as api:
        refused = await api.post("/api/redrive", json=body, headers=AUTH)
        dry = await api.post("/api/redrive", json={**body, "dry_run": True}, headers=AUTH)
        first = await api.post("/api/redrive", json={**body, "group": group}, headers=AUTH)
        again = await api.post("/api/redrive", json={**body, "group": group}, headers=AUTH)

    assert refused.status_code == 422 and refused.json()["field"] == "since"
    assert "relative to now" in refused.json()["error"] and '"group"' in refused.json()["error"]
    assert dry.status_code == 200 and dry.json()["sent"] == {home: 3}
    assert first.status_code == 200 and first.json()["sent"] == {home: 3} and first.json()["group"] == group
    assert again.json()["sent"] == {}  # the same call again resumes: the group is named, not derived from "1h"
    assert await records_in(kafka_bootstrap, home) == [b"k0", b"k1", b"k2"]


def wait_for_a_commit(bootstrap: str, group: str, topic: str, partitions: int, deadline: float) -> bool:
    """Whether ``group`` commits an offset on ``topic`` within ``deadline`` seconds; polled with one consumer (a new
    one per poll spends most of its time connecting on a loaded machine)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})  # never subscribes: joins no group
    try:
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            wanted = [TopicPartition(topic, p) for p in range(partitions)]
            if any(tp.offset > 0 for tp in consumer.committed(wanted, timeout=10)):
                return True
            time.sleep(0.05)
        return False
    finally:
        consumer.close()


async def test_one_real_redrive_runs_at_a_time(kafka_bootstrap, new_topic, unique_name):
    dlq, home = await dlq_with(kafka_bootstrap, new_topic, [("builtins.KeyError", b"k%d" % i) for i in range(12)])
    group = unique_name("one-at-a-time")
    # 12 records at 1 a second, one transaction each: once the first has committed, about 11 s of the run are left
    # to see it running and to be refused beside it, however loaded the machine.
    body = {"topic": dlq, "dry_run": False, "rate": 1, "group": group}

    async with served(create_app(bootstrap_servers=kafka_bootstrap, token=TOKEN)) as api:
        first = asyncio.create_task(api.post("/api/redrive", json=body, headers=AUTH))
        # The first redrive is running once it has committed a batch (the broker has nothing to wait on: polled).
        assert await asyncio.to_thread(wait_for_a_commit, kafka_bootstrap, group, dlq, 2, 60)
        assert not first.done()
        second = await api.post("/api/redrive", json=body, headers=AUTH)
        done = await first

    assert second.status_code == 409 and "running" in second.json()["error"]
    assert second.headers["Retry-After"] == "5"
    assert done.status_code == 200 and done.json()["sent"] == {home: 12}


async def test_a_real_redrive_in_the_handlers_own_group_is_refused(kafka_bootstrap, new_topic):
    dlq, home = await dlq_with(kafka_bootstrap, new_topic, [("builtins.KeyError", b"k0")])
    api = OpsApi(bootstrap_servers=kafka_bootstrap, token=TOKEN, group="kafka-dlq-billing")
    body = {"topic": dlq, "dry_run": False, "group": "kafka-dlq-billing"}

    async with served(Starlette(routes=api.routes())) as client:
        refused = await client.post("/api/redrive", json=body, headers=AUTH)

    assert refused.status_code == 422 and refused.json()["field"] == "group"
    assert "handler's own consumer group" in refused.json()["error"]
    assert await records_in(kafka_bootstrap, home) == []


async def test_a_dry_run_returns_counts_and_samples_and_sends_nothing(kafka_bootstrap, new_topic):
    dlq, home = await dlq_with(
        kafka_bootstrap,
        new_topic,
        [("builtins.TimeoutError", b"t%d" % i) for i in range(4)] + [("builtins.KeyError", b"x1")],
    )

    async with served(create_app(bootstrap_servers=kafka_bootstrap, token=TOKEN)) as api:
        everything = await api.post("/api/redrive", json={"topic": dlq, "sample": 2}, headers=AUTH)
        elsewhere = await api.post(
            "/api/redrive", json={"topic": dlq, "to": "replay", "error_classes": ["KeyError"]}, headers=AUTH
        )

    counts = everything.json()
    assert (counts["dry_run"], counts["read"], counts["selected"], counts["sent"]) == (True, 5, 5, {home: 5})
    assert len(counts["samples"]) == 2 and all(s["destination"] == home for s in counts["samples"])
    assert elsewhere.json()["sent"] == {"replay": 1} and elsewhere.json()["skipped"] == 4
    assert await records_in(kafka_bootstrap, home) == []


# ---------------------------------------------------------------- stats and peek


async def test_stats_and_peek_return_the_seeded_records(kafka_bootstrap, new_topic):
    dlq, home = await dlq_with(
        kafka_bootstrap,
        new_topic,
        [("builtins.TimeoutError", b"t%d" % i) for i in range(3)] + [("builtins.KeyError", b"x1")],
    )

    async with served(create_app(bootstrap_servers=kafka_bootstrap, token=TOKEN)) as api:
        stats = await api.get("/api/stats", params={"topic": dlq, "group": "nobody"}, headers=AUTH)
        peeked = await api.get("/api/peek", params={"topic": dlq, "error_class": "KeyError"}, headers=AUTH)
        two = await api.get("/api/peek", params={"topic": dlq, "limit": 2, "max_bytes": 3}, headers=AUTH)
        keyed = await api.get("/api/peek", params=[("topic", dlq), ("key", "t0"), ("key", "t2")], headers=AUTH)

    counts = stats.json()
    assert (counts["records"], counts["undecodable"]) == (4, 0)
    assert counts["by_original_topic"] == {home: 4}
    assert counts["by_error_class"] == {"builtins.TimeoutError": 3, "builtins.KeyError": 1}
    assert (counts["group"], counts["lag"]) == ("nobody", 4)
    view = peeked.json()
    assert (view["scanned"], view["matched"]) == (4, 1)
    record = view["records"][0]
    assert (record["key"], record["value"], record["error"]["class"]) == ("x1", {"n": 1}, "builtins.KeyError")
    assert record["original"]["topic"] == home
    assert two.json()["matched"] == 2 and two.json()["records"][0]["value"].startswith('{"n... (')
    assert sorted(r["key"] for r in keyed.json()["records"]) == ["t0", "t2"]


async def test_a_value_holding_nan_is_shown_not_a_server_error(kafka_bootstrap, new_topic):
    dlq = await asyncio.to_thread(new_topic, 1, None, "nan.dlq")
    await asyncio.to_thread(seed, kafka_bootstrap, dlq, [dead_letter("home", b"k", b'{"x": NaN, "y": -Infinity}')])

    async with served(create_app(bootstrap_servers=kafka_bootstrap)) as api:
        peeked = await api.get("/api/peek", params={"topic": dlq})

    assert peeked.status_code == 200
    assert peeked.json()["records"][0]["value"] == {"x": "nan", "y": "-inf"}


# ---------------------------------------------------------------- bad input


BAD_QUERIES = [
    ("/api/stats", {}, "'topic' is required"),
    ("/api/stats", {"topic": ".."}, "Kafka topic name"),
    ("/api/peek", {"topic": "t", "limit": "0"}, "at least 1"),
    ("/api/peek", {"topic": "t", "limit": "ten"}, "whole number"),
    ("/api/peek", {"topic": "t", "limit": ["1", "2"]}, "more than once"),
    ("/api/peek", {"topic": "t", "errorclass": "X"}, "unknown query parameter 'errorclass'"),
    ("/api/peek", {"topic": "t", "since": "yesterday"}, "is not a time"),
    ("/api/peek", {"topic": "t", "since": "2h", "until": "3h"}, "time range is empty"),
    ("/api/peek", {"topic": "t", "offsets": "9-3"}, "swap its ends"),
    ("/api/peek", {"topic": "t", "partition": "-1"}, "at least 0"),
    ("/api/peek", {"topic": "t", "error_pattern": "(unclosed"}, "not a regular expression"),
    ("/api/peek", {"topic": "t", "header": "=v"}, "has no name"),
]
BAD_BODIES = [
    (b"", 400, "body is empty"),
    (b"{", 400, "not JSON"),
    (b'{"topic": "t", "rate": NaN}', 400, "NaN is not a JSON value"),
    (b'["t"]', 422, "must be a JSON object"),
    (b'{"dry_run": true}', 422, "'topic' is required"),
    (b'{"topic": "t", "dryrun": false}', 422, "unknown field 'dryrun'"),
    (b'{"topic": "t", "dry_run": "no"}', 422, "true or false"),
    (b'{"topic": "t", "rate": 0}', 422, "above 0"),
    (b'{"topic": "t", "max_redrives": true}', 422, "whole number"),
    (b'{"topic": "t", "guarantee": "maybe"}', 422, "'exactly-once'"),
    (b'{"topic": "t", "partitions": 1}', 422, "a list"),
    (b'{"topic": "t", "keys": ["\\ud800"]}', 422, "lone surrogate"),
]


async def test_bad_input_is_a_4xx_that_says_what_is_wrong(kafka_bootstrap):
    async with served(create_app(bootstrap_servers=kafka_bootstrap, token=TOKEN)) as api:
        for path, params, says in BAD_QUERIES:
            response = await api.get(path, params=params, headers=AUTH)
            assert response.status_code == 422, (path, params, response.text)
            assert says in response.json()["error"], (path, params, response.text)
        for content, status, says in BAD_BODIES:
            response = await api.post(
                "/api/redrive", content=content, headers={**AUTH, "Content-Type": "application/json"}
            )
            assert response.status_code == status, (content, response.text)
            assert says in response.json()["error"], (content, response.text)
        text = await api.post("/api/redrive", content=b"topic=t", headers={**AUTH, "Content-Type": "text/plain"})
        huge = await api.post("/api/redrive", json={"topic": "t", "keys": ["k" * 4000] * 20}, headers=AUTH)
        missing = await api.get("/api/peek", params={"topic": "no-such-topic-here"}, headers=AUTH)
    assert text.status_code == 415 and "application/json" in text.json()["error"]
    assert huge.status_code == 413
    assert missing.status_code == 404 and "no-such-topic-here" in missing.json()["error"]


# ---------------------------------------------------------------- beside a handler


async def test_beside_a_handler_the_api_reads_its_cluster_and_the_probes_stay_open(
    kafka_bootstrap, redis_url, new_topic, unique_name
):
    dlq, _ = await dlq_with(kafka_bootstrap, new_topic, [("builtins.KeyError", b"k1")])
    await asyncio.to_thread(create_topics, kafka_bootstrap, {f"{dlq}.poison": 1})
    handler = DLQHandler(name=unique_name("api"), topics=[dlq], bootstrap_servers=kafka_bootstrap, redis_url=redis_url)

    async with handler, served(create_app(handler, token=TOKEN)) as api:
        probes = [await api.get(path) for path in ("/metrics", "/healthz", "/openapi.json")]
        stats = await api.get("/api/stats", params={"topic": dlq}, headers=AUTH)

    assert [probe.status_code for probe in probes] == [200, 200, 200]
    document = probes[2].json()
    assert {"/metrics", "/readyz", "/api/redrive"} <= set(document["paths"])
    assert document["paths"]["/api/stats"]["get"]["security"] == [{"bearer": []}]
    assert stats.status_code == 200
    assert stats.json()["group"] == handler.group_id  # the handler's group, by default


# ---------------------------------------------------------------- generated requests (schemathesis)


class LiveServer:
    """An app served by uvicorn on its own thread and loop: schemathesis is synchronous, so its test is too."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listening = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running(self.app, port=self.port):
            self._listening.set()
            await self._stop.wait()

    def __enter__(self) -> LiveServer:
        self._thread.start()
        assert self._listening.wait(30), "the app did not start listening"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(params=["open", "locked"])
def live_api(request, kafka_bootstrap, new_topic) -> Iterator[tuple[schemathesis.BaseSchema, str]]:
    """The OpenAPI document of a live app, and a topic of dead letters it reads: ``open`` has no token (reading
    open, real redrives off), ``locked`` has one that schemathesis does not (every /api call refused)."""
    dlq = new_topic(2, None, "fuzz.dlq")
    seed(kafka_bootstrap, dlq, [dead_letter("home", b"k%d" % i, b'{"i": %d}' % i) for i in range(20)])
    app = create_app(bootstrap_servers=kafka_bootstrap, token=None if request.param == "open" else TOKEN)
    with LiveServer(app) as server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=CONFIG), dlq


# A body too large for the API (413) is rejected too, though schemathesis does not count it so by default.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 409, 413, 415, 422, 429]}}}
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]


FREE_TEXT = {"since", "until", "offsets", "error_pattern", "header", "headers"}
"""Parameters whose rules a JSON Schema cannot state (a time, a range, a regular expression): generated text
almost always breaks them, and the call stops at 422 before reading anything."""


def on_topic(case: schemathesis.Case, topic: str) -> schemathesis.Case | None:
    """The case aimed at ``topic`` without its free text, so that it reads records (not a 404 or a 422); None when
    it names no topic."""
    if isinstance(case.query, dict) and "topic" in case.query:
        query = {name: value for name, value in case.query.items() if name not in FREE_TEXT}
        return case.operation.Case(query={**query, "topic": topic}, media_type=case.media_type)
    if isinstance(case.body, dict) and "topic" in case.body:
        body = {name: value for name, value in case.body.items() if name not in FREE_TEXT}
        return case.operation.Case(body={**body, "topic": topic}, media_type=case.media_type)
    return None


def call(case: schemathesis.Case) -> None:
    try:
        case.call_and_validate(checks=CHECKS)
    except requests.RequestException:
        # uvicorn answers a request line past h11's limit (16 KiB) with 400 and closes the connection without reading
        # the rest, which the client may see as a reset instead: refused before the app, so not the app's failure.
        if len(urlencode(case.query or {}, doseq=True)) < 16 * 1024:
            raise


def test_generated_requests_never_make_the_api_fail(live_api):
    # Not schemathesis' pytest plugin (it does not run on this pytest): its Python API, per operation and mode.
    schema, dlq = live_api
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if len(operation.query) or len(operation.body):  # nothing to get wrong in a request without parameters
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                call(case)
                aimed = on_topic(case, dlq)
                if aimed is not None:
                    call(aimed)

            try:
                check()
            except BaseException as exc:
                exc.add_note(f"operation {operation.label}, {mode.value} data")
                raise
