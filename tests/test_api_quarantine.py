"""Quarantined messages through the admin API: list, inspect, replay."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from shared import broker, db, quarantine
from shared.metrics import Stage
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import AMQP_URL
from tests.support.browser import AdminApi, admin_api
from tests.support.queues import drain


@pytest.fixture
def api(settings: Settings) -> Iterator[AdminApi]:
    with admin_api(settings) as running:
        yield running


@pytest.fixture
def entry(settings: Settings) -> int:
    topology = Topology(prefix=settings.broker_prefix)
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        broker.declare(connection, topology.declare)
    finally:
        connection.release()
    with db.connect(settings.database_url.get_secret_value()) as conn:
        return quarantine.put(
            conn,
            stage=Stage.ROUTER,
            reason="not a RawEmail of a known schema version",
            body=b'{"broken": true}',
            queue=topology.raw_queue,
        )


def test_quarantined_messages_are_listed_and_shown_with_their_body(
    api: AdminApi, entry: int
) -> None:
    listed = api.reader.get("/api/quarantine").json()
    shown = api.reader.get(f"/api/quarantine/{entry}").json()

    assert [(entry, "router")] == [(e["id"], e["stage"]) for e in listed]
    assert b'{"broken": true}' == base64.b64decode(shown["body_base64"])
    assert "not a RawEmail of a known schema version" == shown["reason"]


def test_a_replayed_message_goes_back_to_its_queue_once(
    api: AdminApi, entry: int, settings: Settings
) -> None:
    refused = api.reader.post(f"/api/quarantine/{entry}/replay")
    replayed = api.admin.post(f"/api/quarantine/{entry}/replay")
    queue = Topology(prefix=settings.broker_prefix).raw_queue
    taken = drain(AMQP_URL, [queue], until=lambda t: len(t) >= 1, timeout=10)

    assert 403 == refused.status_code
    assert 200 == replayed.status_code
    assert [b'{"broken": true}'] == [bytes(m.body) for m in taken]
    assert [] == api.reader.get("/api/quarantine").json()


def test_an_unknown_entry_is_a_404_that_names_it(api: AdminApi) -> None:
    missing = api.reader.get("/api/quarantine/999999")

    assert 404 == missing.status_code
    assert "999999" in missing.json()["detail"]
