"""A channel made through the admin API is polled by a poller already running.

The poller re-reads the active channels from PostgreSQL, so nothing is
restarted between the API call and the first message on the raw queue.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx

from services.poller.worker import Poller
from shared.catalog import Catalog
from shared.models import RawEmail
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import AMQP_URL
from tests.support.browser import admin_api
from tests.support.dovecot import Dovecot
from tests.support.queues import drain


def test_a_channel_created_through_the_api_is_polled_without_a_restart(
    settings: Settings, catalog: Catalog, dovecot: Dovecot
) -> None:
    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    dovecot.add_user(user, password)
    general = catalog.add_campaign("general", "General")
    poller = Poller(settings.model_copy(update={"poll_interval_seconds": 1}))
    stop = threading.Event()
    thread = threading.Thread(target=poller.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert poller.ready.wait(10), "the poller did not connect"

        with admin_api(settings) as api:
            created = api.admin.post(
                "/api/channels",
                json={
                    "name": "support",
                    "address": f"{user}@example.test",
                    "default_campaign_id": general.id,
                    "active": True,
                    "inbound": {
                        "type": "imap",
                        "host": dovecot.host,
                        "port": dovecot.imap_port,
                        "security": "none",
                        "username": user,
                    },
                    "secrets": {"inbound_password": password},
                },
            )
            assert 201 == created.status_code, created.text
            dovecot.append(
                user,
                b"From: ann@customer.example\r\nTo: support@example.test\r\n"
                b"Subject: hello from the API test\r\n\r\nHi!\r\n",
            )
            taken = drain(
                AMQP_URL,
                [Topology(prefix=settings.broker_prefix).raw_queue],
                until=lambda t: len(t) >= 1,
                timeout=30,
            )
            shown = _polled(api.reader, created.json()["id"])
    finally:
        stop.set()
        thread.join(10)

    assert 1 == len(taken)
    raw = RawEmail.model_validate_json(taken[0].body)
    assert created.json()["id"] == raw.channel_id
    assert raw.raw.data is not None
    assert b"Subject: hello from the API test" in raw.raw.data
    assert shown["last_poll_ok_at"] is not None
    assert (None, 0) == (shown["last_poll_error"], shown["consecutive_failures"])


def _polled(
    client: httpx.Client, channel_id: int, timeout: float = 10
) -> dict[str, object]:
    """The channel as the API shows it, once a poll has succeeded."""
    deadline = time.monotonic() + timeout
    while True:
        shown: dict[str, object] = client.get(f"/api/channels/{channel_id}").json()
        if shown["last_poll_ok_at"] or time.monotonic() > deadline:
            return shown
        time.sleep(0.2)
