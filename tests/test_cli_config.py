"""``--config FILE`` for the operator commands: the connection settings of ``kafka-dlq run``'s file, nothing else."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kafka_dlq.cli import app
from kafka_dlq.config import Connection, load_config, load_connection
from kafka_dlq.errors import ConfigError
from tests.helpers import seed
from tests.test_redrive import CLEAN_ENV, dead_letter

APP_ONLY = """
name = "billing"
topics = ["payments.dlq"]

[processors]
payments = "billing_app_not_installed_here.recovery:charge"

[classifier]
rule = "billing_app_not_installed_here.rules:classify"

[kafka]
"client.id" = "ops"
"socket.timeout.ms" = 30000
"""
"""A handler's file as an operator finds it: no Kafka or Redis in it, and processors the operator cannot import."""


def test_given_a_file_of_processors_that_do_not_import_when_loading_the_connection_then_nothing_is_imported(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(APP_ONLY)

    found = load_connection(path, env={})

    assert found == Connection(name="billing", kafka={"client.id": "ops", "socket.timeout.ms": 30000})


def test_given_no_required_key_when_loading_the_connection_then_the_gaps_stay_empty_for_flags_to_fill(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('redis_url = "redis://r:6379/0"\n')

    assert load_connection(path, env={}) == Connection(redis_url="redis://r:6379/0")
    with pytest.raises(ConfigError, match="missing"):  # kafka-dlq run's own loader still requires them
        load_config(path, env={})


def test_given_variables_when_loading_the_connection_then_they_win_over_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "billing"\nbootstrap_servers = "file:9092"\ngroup_id = "from-file"\n')
    env = {"KAFKA_DLQ_NAME": "other", "KAFKA_DLQ_BOOTSTRAP_SERVERS": "env:9092", "KAFKA_DLQ_REDIS_URL": "redis://e"}

    found = load_connection(path, env=env)

    assert (found.name, found.bootstrap_servers, found.redis_url, found.group_id) == (
        "other",
        "env:9092",
        "redis://e",
        "from-file",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bootstrap_servers = 9092\n", "config key 'bootstrap_servers': expected text, got int"),
        ('name = ["a"]\n', "config key 'name': expected text, got list"),
        ("group_id = true\n", "config key 'group_id': expected text, got bool"),
        ('kafka = "x"\n', "config key 'kafka': expected a table"),
        ('[kafka]\n"client.id" = ["a"]\n', "config key 'kafka.client.id': expected text, a number or true/false"),
        ("name = \n", "is not valid TOML"),
    ],
)
def test_given_a_connection_key_of_the_wrong_type_when_loading_then_the_error_names_it(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_connection(path, env={})


def test_given_a_global_config_of_an_app_the_operator_lacks_when_peeking_then_flags_fill_the_gaps(
    kafka_bootstrap, new_topic, tmp_path
):
    dlq, orders = new_topic(1), new_topic(1)
    seed(kafka_bootstrap, dlq, [dead_letter(orders, i) for i in range(2)])
    path = tmp_path / "run.toml"
    path.write_text(APP_ONLY)
    env = {**CLEAN_ENV, "KAFKA_DLQ_CONFIG": str(path)}
    runner = CliRunner()

    peeked = runner.invoke(app, ["peek", dlq, "--bootstrap", kafka_bootstrap, "--json"], env=env)
    dry = runner.invoke(app, ["redrive", dlq, "--dry-run", "--bootstrap", kafka_bootstrap, "--json"], env=env)
    stats = runner.invoke(app, ["stats", dlq, "--bootstrap", kafka_bootstrap, "--json"], env=env)
    no_kafka = runner.invoke(app, ["peek", dlq], env=env)

    assert peeked.exit_code == 0, peeked.output
    assert len(json.loads(peeked.stdout)["records"]) == 2
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["sent"] == {orders: 2}
    assert stats.exit_code == 0, stats.output
    assert json.loads(stats.stdout)["group"] == "kafka-dlq-billing"  # the file names the handler
    other = runner.invoke(app, ["stats", dlq, "--bootstrap", kafka_bootstrap, "--name", "refunds", "--json"], env=env)
    assert other.exit_code == 0, other.output
    assert json.loads(other.stdout)["group"] == "kafka-dlq-refunds"  # a flag naming another handler wins
    assert no_kafka.exit_code == 1 and "no Kafka" in no_kafka.output  # what is needed is checked once merged


def test_given_a_config_without_redis_when_listing_pending_then_the_flag_fills_it(redis_url, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(APP_ONLY)

    result = CliRunner().invoke(
        app, ["pending", "--config", str(path), "--redis-url", redis_url, "--json"], env=CLEAN_ENV
    )

    assert result.exit_code == 0, result.output
