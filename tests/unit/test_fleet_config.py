"""workers, the amqp_url list and stream replication in the configuration."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gateway.amqp_urls import (
    connect_order,
    default_cluster_size,
    redacted,
    stream_filtering,
    url_problem,
)
from gateway.config import ConfigError, amqp_urls, load_settings, worker_count

SECRET = {"RABBITGATE_JWT_SECRET": "s" * 64}


def settings(**overrides: object):  # type: ignore[no-untyped-def]
    return load_settings(None, environ=SECRET, overrides=overrides)


@pytest.mark.parametrize(
    ("value", "cpus", "count"),
    [("1", 8, 1), ("4", 8, 4), ("auto", 8, 8), ("AUTO", 1, 1), (" 2 ", 8, 2), ("auto", 0, 1)],
)
def test_workers_is_a_number_or_auto(value: str, cpus: int, count: int) -> None:
    assert worker_count(value, cpus) == count


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", ""])
def test_a_bad_workers_value_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="workers"):
        settings(workers=value, redis_url="redis://127.0.0.1:6379/0")


def test_more_than_one_worker_needs_the_shared_store() -> None:
    with pytest.raises(ConfigError, match="needs redis_url") as caught:
        settings(workers="2")
    assert "\n" not in str(caught.value)
    assert worker_count(settings(workers="2", redis_url="redis://x:6379/0").workers) == 2
    assert settings(workers="1").redis_url is None  # one worker: local limits are fine


def test_amqp_url_may_list_the_nodes_of_a_cluster(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        "amqp_url:\n  - amqp://u:p@a:5672/\n  - amqp://u:p@b:5672/\n  - amqp://u:p@c:5672/\n"
    )
    from_yaml = load_settings(config, environ=SECRET)
    assert amqp_urls(from_yaml) == (
        "amqp://u:p@a:5672/",
        "amqp://u:p@b:5672/",
        "amqp://u:p@c:5672/",
    )
    from_env = load_settings(
        None, environ={**SECRET, "RABBITGATE_AMQP_URL": "amqp://a/ , amqp://b/"}
    )
    assert amqp_urls(from_env) == ("amqp://a/", "amqp://b/")


@pytest.mark.parametrize(
    ("urls", "words"),
    [
        ("amqp://a/,http://u:hunter2@b/", ("entry 2", "amqp://")),
        ("amqp://u:hunter2@a:99999/", ("amqp_url", "Port out of range")),
        ("amqp:///", ("no host",)),
        (" , ", ("empty",)),
    ],
)
def test_one_bad_entry_of_the_list_is_one_line_without_its_password(
    urls: str, words: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(amqp_url=urls)
    message = str(caught.value)
    assert "\n" not in message and "hunter2" not in message
    for word in words:
        assert word in message, message


def test_nodes_are_tried_in_random_order_the_lost_one_last() -> None:
    urls = ["amqp://a/", "amqp://b/", "amqp://c/"]
    firsts = {connect_order(urls, "amqp://a/", random.Random(seed))[0] for seed in range(50)}
    assert firsts == {"amqp://b/", "amqp://c/"}  # spread, never the node just lost
    for seed in range(20):
        order = connect_order(urls, "amqp://b/", random.Random(seed))
        assert sorted(order) == sorted(urls) and order[-1] == "amqp://b/"
    assert connect_order(["amqp://a/"], "amqp://a/") == ["amqp://a/"]


@pytest.mark.parametrize(
    ("urls", "configured", "size"),
    [(["a"], None, 1), (["a", "b"], None, 2), (["a", "b", "c", "d", "e"], None, 3), (["a"], 3, 3)],
)
def test_streams_replicate_to_the_smaller_of_3_and_the_cluster(
    urls: list[str], configured: int | None, size: int
) -> None:
    assert default_cluster_size(urls, configured) == size


def test_urls_are_checked_and_redacted() -> None:
    assert url_problem("amqps://u:p@host:5671/vhost") is None
    assert url_problem("redis://host/") is not None
    assert redacted("amqp://u:secret@h/") == "amqp://u:***@h/"
    with pytest.raises(ConfigError, match="stream_initial_cluster_size"):
        settings(stream_initial_cluster_size=0)


@pytest.mark.parametrize(
    ("version", "filters"),
    [("3.10.8", False), ("3.12.14", False), ("3.13.0", True), ("4.0.5", True), ("", False),
     (None, False), ("3.13.0-rc.1", True), ("garbage", False)],
)  # fmt: skip
def test_stream_filtering_needs_rabbitmq_3_13(version: str | None, filters: bool) -> None:
    assert stream_filtering(version) is filters
