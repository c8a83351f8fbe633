"""``kafka-dlq run``'s configuration: a TOML file, then ``KAFKA_DLQ_*`` environment variables over it.

Every error names the key and says how to fix it. Example file::

    name = "billing"
    topics = ["payments.dlq"]
    bootstrap_servers = "127.0.0.1:19092"      # or KAFKA_DLQ_BOOTSTRAP_SERVERS
    redis_url = "redis://127.0.0.1:16379/0"    # or KAFKA_DLQ_REDIS_URL
    http_port = 9400                           # /metrics, /healthz, /readyz, the ops API; 0 or absent: off
    http_token = "..."                         # or KAFKA_DLQ_HTTP_TOKEN: guards the ops API, turns real redrives on
    keys = "text"                              # or KAFKA_DLQ_KEYS; "bytes" accepts keys that are not UTF-8

    [processors]
    payments = "billing.recovery:charge"       # module:function, async or sync
    "*" = "billing.recovery:fallback"          # any other original topic

    [policy]                                   # RetryPolicy: backoff, delays, jitter, limits
    initial_delay = 1
    max_attempts = 5

    [policy.topics.payments]                   # per original topic
    max_attempts = 10

    [classifier]
    non_retryable = ["builtins.KeyError"]
    non_retryable_patterns = ["400", "invalid card"]

    [breaker]
    failure_threshold = 20
    open_seconds = 10

    [kafka]                                    # extra librdkafka settings for every client
    "security.protocol" = "PLAINTEXT"
"""

from __future__ import annotations

import importlib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka_dlq.breaker import BreakerSettings
from kafka_dlq.classify import Classifier
from kafka_dlq.errors import ConfigError
from kafka_dlq.handler import DLQHandler, KeyFormat, Mode, Processor
from kafka_dlq.policy import RetryPolicy, TopicPolicies

__all__ = ["Connection", "RunConfig", "load_config", "load_connection", "resolve_callable"]

_TOP = {
    "name": str,
    "topics": list,
    "bootstrap_servers": str,
    "redis_url": str,
    "group_id": str,
    "poison_topic": str,
    "mode": str,
    "keys": str,
    "processor_timeout": (int, float),
    "concurrency": int,
    "max_in_flight": int,
    "lease": (int, float),
    "first_delay": (int, float),
    "max_record_bytes": int,
    "http_port": int,
    "http_host": str,
    "http_token": str,
    "processors": dict,
    "republish_to": dict,
    "policy": dict,
    "classifier": dict,
    "breaker": dict,
    "kafka": dict,
}
_ENV = {
    "KAFKA_DLQ_NAME": "name",
    "KAFKA_DLQ_TOPICS": "topics",
    "KAFKA_DLQ_BOOTSTRAP_SERVERS": "bootstrap_servers",
    "KAFKA_DLQ_REDIS_URL": "redis_url",
    "KAFKA_DLQ_GROUP_ID": "group_id",
    "KAFKA_DLQ_POISON_TOPIC": "poison_topic",
    "KAFKA_DLQ_MODE": "mode",
    "KAFKA_DLQ_KEYS": "keys",
    "KAFKA_DLQ_HTTP_PORT": "http_port",
    "KAFKA_DLQ_HTTP_TOKEN": "http_token",
}
_REQUIRED = ("name", "topics", "bootstrap_servers", "redis_url")


@dataclass(kw_only=True)
class RunConfig:
    """What ``kafka-dlq run`` needs: the handler's settings and the HTTP endpoint's."""

    handler: dict[str, Any]
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    http_token: str | None = field(default=None, repr=False)
    """The ops API's bearer token (kept out of the repr, so out of logs); None: real redrives are off."""
    source: str = "<defaults>"
    processors: dict[str, str] = field(default_factory=dict)

    def build(self) -> DLQHandler:
        return DLQHandler(**self.handler)


def resolve_callable(spec: str, key: str) -> Callable[..., Any]:
    """``"package.module:function"`` to the function; errors name the config key."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"config key {key!r}: {spec!r} is not 'module:function' (e.g. 'billing.recovery:charge')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"config key {key!r}: cannot import module {module_name!r} ({exc}): check PYTHONPATH"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"config key {key!r}: module {module_name!r} has no {attr!r}")
    if not callable(target):
        raise ConfigError(f"config key {key!r}: {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def _check_types(data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        expected = _TOP.get(key)
        if expected is None:
            known = ", ".join(sorted(_TOP))
            raise ConfigError(f"config key {key!r} is unknown: remove it or use one of {known}")
        if isinstance(value, bool) or not isinstance(value, expected):  # type: ignore[arg-type]
            raise ConfigError(f"config key {key!r}: expected {_describe(expected)}, got {type(value).__name__}")


def _describe(expected: Any) -> str:
    names = {str: "text", list: "a list", dict: "a table", int: "a whole number", float: "a number"}
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var, key in _ENV.items():
        if var in env and env[var] != "":
            text = env[var]
            if key == "topics":
                out[key] = [t.strip() for t in text.split(",") if t.strip()]
            elif key == "http_port":
                try:
                    out[key] = int(text)
                except ValueError:
                    raise ConfigError(f"environment variable {var}: {text!r} is not a port number") from None
            else:
                out[key] = text
    return out


def _policy(table: Mapping[str, Any], key: str) -> RetryPolicy:
    try:
        return RetryPolicy(**table)
    except TypeError as exc:
        raise ConfigError(f"config key {key!r}: {exc}: see RetryPolicy's fields") from None
    except ConfigError as exc:
        raise ConfigError(f"config key {key!r}: {exc}") from None


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    file = Path(path)
    try:
        return tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(file)!r} does not exist: check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(file)!r} is not valid TOML: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Connection:
    """What an operator command takes from a ``kafka-dlq run`` config file: where the handler's Kafka and Redis
    are, its name and group, and the ``[kafka]`` client settings. Any of them may be missing."""

    name: str | None = None
    bootstrap_servers: str | None = None
    redis_url: str | None = None
    group_id: str | None = None
    kafka: Mapping[str, Any] = field(default_factory=dict)

    @property
    def handler_group(self) -> str | None:
        """The handler's consumer group, found as ``DLQHandler`` finds it: ``group_id``, else ``kafka-dlq-<name>``."""
        return self.group_id or (f"kafka-dlq-{self.name}" if self.name else None)


_CONNECTION = ("name", "bootstrap_servers", "redis_url", "group_id")
_CONNECTION_ENV = {var: key for var, key in _ENV.items() if key in _CONNECTION}


def load_connection(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Connection:
    """The connection settings of a ``kafka-dlq run`` config file (if any), ``KAFKA_DLQ_*`` variables over it.

    Unlike :func:`load_config` nothing is required (flags may fill the gaps; the caller checks what it needs once
    they are merged) and nothing is imported: the operator running ``peek`` or ``pending`` need not have the
    application's processors or classifier rules. Only these keys are read and type-checked; the rest of the file is
    ``kafka-dlq run``'s business.

    >>> load_connection(None, env={"KAFKA_DLQ_NAME": "billing"}).name
    'billing'
    """
    env = os.environ if env is None else env
    data = {} if path is None else _read_toml(path)
    picked: dict[str, Any] = {key: data[key] for key in _CONNECTION if key in data}
    for key, value in picked.items():
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected text, got {type(value).__name__}")
    picked.update({key: env[var] for var, key in _CONNECTION_ENV.items() if env.get(var)})
    kafka = data.get("kafka", {})
    if not isinstance(kafka, dict):
        raise ConfigError(f"config key 'kafka': expected a table of librdkafka settings, got {type(kafka).__name__}")
    for key, value in kafka.items():
        if not isinstance(value, str | int | float | bool):
            raise ConfigError(
                f"config key 'kafka.{key}': expected text, a number or true/false, got {type(value).__name__}"
            )
    return Connection(**{key: value or None for key, value in picked.items()}, kafka=dict(kafka))


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> RunConfig:
    """Read the TOML file (if any), apply ``KAFKA_DLQ_*`` variables, check everything, resolve processors."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = "<environment>"
    if path is not None:
        data = _read_toml(path)
        source = str(Path(path))
    data.update(_from_env(env))
    _check_types(data)
    missing = [key for key in _REQUIRED if not data.get(key)]
    if missing:
        hints = ", ".join(f"{k} (or {next(v for v, kk in _ENV.items() if kk == k)})" for k in missing)
        raise ConfigError(f"config is missing {hints}: set them in the file or the environment")

    handler: dict[str, Any] = {
        key: data[key]
        for key in (
            "name",
            "topics",
            "bootstrap_servers",
            "redis_url",
            "group_id",
            "poison_topic",
            "processor_timeout",
            "concurrency",
            "max_in_flight",
            "lease",
            "first_delay",
            "max_record_bytes",
        )
        if key in data
    }
    if "mode" in data:
        try:
            handler["mode"] = Mode(data["mode"])
        except ValueError:
            raise ConfigError(f"config key 'mode': {data['mode']!r} is not 'process' or 'republish'") from None
    if "keys" in data:
        try:
            handler["keys"] = KeyFormat(data["keys"])
        except ValueError:
            raise ConfigError(
                f"config key 'keys': {data['keys']!r} is not 'text' (UTF-8 keys; others are parked) or 'bytes' "
                "(any key, byte for byte)"
            ) from None
    processors: dict[str, Processor] = {}
    for topic, spec in data.get("processors", {}).items():
        if not isinstance(spec, str):
            raise ConfigError(f"config key 'processors.{topic}': expected 'module:function' text")
        fn = resolve_callable(spec, f"processors.{topic}")
        if topic == "*":
            handler["default_processor"] = fn
        else:
            processors[topic] = fn
    handler["processors"] = processors
    if "republish_to" in data:
        handler["republish_to"] = {str(k): str(v) for k, v in data["republish_to"].items()}

    policy_table = dict(data.get("policy", {}))
    per_topic = policy_table.pop("topics", {})
    default = _policy(policy_table, "policy")
    overrides = {
        topic: _policy({**policy_table, **table}, f"policy.topics.{topic}") for topic, table in per_topic.items()
    }
    handler["policies"] = TopicPolicies(default=default, topics=overrides)

    classifier = dict(data.get("classifier", {}))
    if "rule" in classifier:
        classifier["rule"] = resolve_callable(str(classifier["rule"]), "classifier.rule")
    try:
        handler["classifier"] = Classifier(**classifier)
    except TypeError as exc:
        raise ConfigError(f"config key 'classifier': {exc}: see Classifier's fields") from None
    try:
        handler["breaker"] = BreakerSettings(**data.get("breaker", {}))
    except TypeError as exc:
        raise ConfigError(f"config key 'breaker': {exc}: use failure_threshold and open_seconds") from None
    handler["kafka_config"] = dict(data.get("kafka", {}))
    port = data.get("http_port")
    token = data.get("http_token") or None
    if token is not None:
        from kafka_dlq.web.api import check_token

        try:
            check_token(token)
        except ConfigError as exc:
            raise ConfigError(f"config key 'http_token' (or KAFKA_DLQ_HTTP_TOKEN): {exc}") from None
    return RunConfig(
        handler=handler,
        http_port=port if port else None,
        http_host=data.get("http_host", "127.0.0.1"),
        http_token=token,
        source=source,
        processors={str(k): str(v) for k, v in data.get("processors", {}).items()},
    )
