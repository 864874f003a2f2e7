"""Validating a channel through the admin API, against a real Dovecot."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from shared.settings import Settings
from tests.support.browser import AdminApi, admin_api
from tests.support.dovecot import Dovecot

UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"


@pytest.fixture(scope="module")
def running_api(database_url: str, secret_key: str) -> Iterator[AdminApi]:
    settings = Settings(
        database_url=database_url, secret_keys=secret_key, amqp_url=UNREACHABLE_BROKER
    )
    # The test servers listen on 127.0.0.1, which validation refuses unless
    # private addresses are allowed.
    settings = settings.model_copy(update={"validate_allow_private_addresses": True})
    with admin_api(settings) as running:
        yield running


@pytest.fixture
def api(running_api: AdminApi, clean_db: str) -> AdminApi:
    """The module's API server, on a database emptied for this test."""
    return running_api


def imap_channel(dovecot: Dovecot, user: str, password: str) -> dict[str, Any]:
    return {
        "name": "support",
        "address": f"{user}@example.test",
        "inbound": {
            "type": "imap",
            "host": dovecot.host,
            "port": dovecot.imap_port,
            "security": "none",
            "username": user,
        },
        "secrets": {"inbound_password": password},
    }


def test_a_channel_whose_mailbox_works_is_active_once_validated(
    api: AdminApi, dovecot: Dovecot
) -> None:
    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    dovecot.add_user(user, password)
    created = api.admin.post(
        "/api/channels", json=imap_channel(dovecot, user, password)
    ).json()

    validated = api.admin.post(f"/api/channels/{created['id']}/validate")

    assert 200 == validated.status_code, validated.text
    assert ("inactive", "active") == (created["status"], validated.json()["status"])
    assert "validated; not polled yet" == validated.json()["status_detail"]
    assert (True, "ok") == (
        validated.json()["validation"]["ok"],
        validated.json()["validation"]["inbound"]["kind"],
    )
    assert validated.json()["last_validated_at"] is not None


def test_a_wrong_password_leaves_the_channel_inactive_and_says_so(
    api: AdminApi, dovecot: Dovecot
) -> None:
    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    dovecot.add_user(user, password)
    wrong = "wrong-" + uuid.uuid4().hex
    created = api.admin.post(
        "/api/channels", json=imap_channel(dovecot, user, wrong)
    ).json()

    validated = api.admin.post(f"/api/channels/{created['id']}/validate")
    listed = api.reader.get("/api/channels", params={"status": "inactive"}).json()

    assert 200 == validated.status_code, validated.text
    assert "inactive" == validated.json()["status"]
    assert validated.json()["status_detail"].startswith(
        "validation failed: inbound auth_failure"
    )
    assert ["support"] == [c["name"] for c in listed]
    assert wrong not in validated.text
