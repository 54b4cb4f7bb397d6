"""Credentials never show: ``protocol.redact_url`` and every place a URL is logged or shown
(the queue client's errors and repr, the event-bus writer's outage log)."""

from __future__ import annotations

import logging

import httpx
import pytest

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import EventBusConfig, redact_url
from ray_worker.errors import QueueUnavailableError


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # A password holding '@': the userinfo ends at the LAST '@'.
        ("redis://:p@ss@h", "redis://:***@h"),
        # A password holding '/': urlsplit would end the netloc there.
        ("redis://:ab/cd@h", "redis://:***@h"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://user:p:w?x#y@host/0", "redis://user:***@host/0"),
        (
            "rediss://default:s3cr3t@redis.example:6380/2",
            "rediss://default:***@redis.example:6380/2",
        ),
        ("http://alice:pw@bella:8080", "http://alice:***@bella:8080"),
        ("https://tok3n@bella.example/", "https://***@bella.example/"),
        ("user:pw@host:6379", "user:***@host:6379"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "pieces"),
    [
        ("redis://:p@ss@h", ["p@", "ss"]),
        ("redis://:ab/cd@h", ["ab", "cd"]),
        ("redis://u:x/yy@zz@h:1/0", ["x/", "yy", "zz"]),
    ],
)
def test_no_piece_of_the_password_survives(url: str, pieces: list[str]) -> None:
    shown = redact_url(url)
    for piece in pieces:
        assert piece not in shown


def test_eventbus_config_repr_hides_the_password() -> None:
    config = EventBusConfig(url="redis://:p@ss@h:6379/0", topic="t")
    assert repr(config) == "EventBusConfig(url='redis://:***@h:6379/0', topic='t')"
    assert str(config) == repr(config)


async def test_queue_client_hides_the_queue_url_credentials() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused to http://alice:s3cret@bella:8080")

    url = "http://alice:s3cret@bella:8080"
    client = QueueClient(url, "key", transport=httpx.MockTransport(refuse))
    try:
        assert "s3cret" not in repr(client)
        assert client.shown_url == "http://alice:***@bella:8080"
        with pytest.raises(QueueUnavailableError) as info:
            await client.eventbus()
        assert "s3cret" not in str(info.value)
        assert "alice:***@bella:8080" in str(info.value)
    finally:
        await client.aclose()


def test_queue_client_rejects_a_bad_url_without_showing_it() -> None:
    with pytest.raises(ValueError, match=r"\*\*\*") as info:
        QueueClient("ftp://bob:hunter2@bella", "key")
    assert "hunter2" not in str(info.value)


async def test_publisher_outage_log_hides_the_password(caplog: pytest.LogCaptureFixture) -> None:
    from ray_worker.config import PublisherOptions
    from ray_worker.errors import EventBusUnavailableError
    from ray_worker.eventbus.redis_check import ping
    from ray_worker.eventbus.redis_writer import StreamWriter

    url = "redis://:p@ss/w0rd@127.0.0.1:1/0"
    with pytest.raises(EventBusUnavailableError) as info:
        await ping(url, timeout_s=0.5)
    assert "w0rd" not in str(info.value)
    assert "p@ss" not in str(info.value)
    caplog.set_level(logging.WARNING, logger="ray_worker.eventbus.redis_writer")
    publisher = StreamWriter("redis://:p@ss@127.0.0.1:1/0", PublisherOptions(connect_timeout_s=0.2))
    try:
        await publisher.publish([("s", {"name": "x"})])
        await publisher.flush(1.0)
    finally:
        await publisher.aclose(0.1)
    assert caplog.records, "the outage was logged"
    for record in caplog.records:
        assert "p@ss" not in record.getMessage()
