"""End to end: mail in a real Dovecot mailbox, routed by separate service processes.

Every message appended to the mailbox must be accounted for exactly once:
published to the campaign its filters choose, kept in quarantine with a
reason, or recognised by the router as a byte-for-byte duplicate of one it
routed already (the corpus holds a few identical files).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import db
from shared.catalog import Catalog, Channel
from shared.metrics import Outcome, Stage
from shared.models import Flag, RoutedEmail
from shared.settings import Settings
from shared.topology import Topology
from tests.conftest import AMQP_URL, CORPUS
from tests.support.dovecot import Dovecot
from tests.support.mail import samples
from tests.support.processes import Service, free_port, service_env
from tests.support.queues import drain

CAMPAIGNS = ("general", "vip", "refunds", "sales")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def corpus_files() -> list[Path]:
    return sorted(CORPUS.rglob("*.eml")) if CORPUS.is_dir() else []


def setup_channel(
    catalog: Catalog, dovecot: Dovecot, protocol: str
) -> tuple[Channel, str, str]:
    user = f"u{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    dovecot.add_user(user, password)
    for key in CAMPAIGNS:
        catalog.add_campaign(key, key.title())
    port = dovecot.imap_port if protocol == "imap" else dovecot.pop3_port
    channel = catalog.add_channel(
        f"support-{protocol}",
        address=f"{user}@example.test",
        default_campaign="general",
        inbound={
            "type": protocol,
            "host": "127.0.0.1",
            "port": port,
            "security": "none",
            "username": user,
        },
        secrets={"inbound_password": password},
    )
    catalog.add_filter(channel.id, "sender", "@vip.example", "vip")
    catalog.add_filter(channel.id, "subject", "refund", "refunds")
    catalog.add_filter(channel.id, "body", "purchase order", "sales")
    return catalog.set_active(channel.id, True), user, password


@pytest.fixture
def services(settings: Settings) -> Iterator[list[Service]]:
    ARTIFACTS.mkdir(exist_ok=True)
    env = service_env(settings)
    running = [
        Service(name, env, ARTIFACTS, metrics_port=free_port())
        for name in ("router", "sender", "poller")
    ]
    yield running
    for service in running:
        service.stop()


def account_for(
    settings: Settings,
    services: list[Service],
    expected_total: int,
    timeout: float,
) -> tuple[list[RoutedEmail], list[dict[str, Any]], list[str]]:
    """Collect routed, quarantined and duplicate messages until all are seen."""
    topology = Topology(prefix=settings.broker_prefix)
    queues = [topology.campaign_queue(key) for key in CAMPAIGNS]
    routed: list[RoutedEmail] = []
    deadline = time.monotonic() + timeout
    quarantined: list[dict[str, Any]] = []
    duplicates: list[str] = []
    while time.monotonic() < deadline:
        routed += [
            RoutedEmail.model_validate_json(m.body)
            for m in drain(AMQP_URL, queues, until=lambda _t: False, timeout=0.5)
        ]
        with db.connect(settings.database_url.get_secret_value()) as conn:
            quarantined = conn.execute(
                "SELECT id, stage, reason, body FROM quarantine ORDER BY id"
            ).fetchall()
        router = next(s for s in services if s.name == "router")
        duplicates = [
            line["source"]
            for line in router.lines()
            if line.get("outcome") == "duplicate"
        ]
        if len(routed) + len(quarantined) + len(duplicates) >= expected_total:
            break
        assert all(s.alive() for s in services), [s.text()[-3000:] for s in services]
    return routed, quarantined, duplicates


def source_of(entry: dict[str, Any]) -> str:
    source = json.loads(bytes(entry["body"]))["source"]
    if source["protocol"] == "imap":
        return f"imap:{source['folder']}:{source['uidvalidity']}:{source['uid']}"
    return f"pop3:{source['uidl']}"


def check_generated(routed: list[RoutedEmail], tag: str, count: int) -> None:
    expected = {s.message_id: s for s in samples(count, tag)}
    got = {r.headers.message_id.strip("<>"): r for r in routed}

    assert set(expected) <= set(got)
    for message_id, sample in expected.items():
        route = got[message_id]
        assert (message_id, sample.campaign) == (message_id, route.campaign_key)
        field = route.decision.field.value if route.decision.field else None
        assert (message_id, sample.field) == (message_id, field)


def test_every_message_in_an_imap_mailbox_is_routed_once_or_quarantined(
    catalog: Catalog,
    dovecot: Dovecot,
    settings: Settings,
    services: list[Service],
) -> None:
    channel, user, password = setup_channel(catalog, dovecot, "imap")
    generated = samples(40, "imap")
    for sample in generated:
        dovecot.append(user, sample.to_bytes())
    large = samples(1, "large")[0]
    dovecot.append(user, large.to_bytes(attachment=b"\x00" * (21 * 1024 * 1024)))
    files = corpus_files()
    for path in files:
        dovecot.append(user, path.read_bytes())
    total = len(generated) + 1 + len(files)

    routed, quarantined, duplicates = account_for(settings, services, total, 180)

    sources = [r.source.key() for r in routed]
    sources += [source_of(q) for q in quarantined]
    sources += duplicates
    assert [] == [key for key, n in Counter(sources).items() if n > 1]
    assert total == len(set(sources))
    assert len(routed) == len({r.id for r in routed})
    assert all(q["reason"] for q in quarantined)
    check_generated(routed, "imap", 40)

    withheld = next(
        r for r in routed if r.headers.message_id == f"<{large.message_id}>"
    )
    assert Flag.ATTACHMENT_OVER_LIMIT in withheld.flags
    assert [True] == [a.withheld for a in withheld.attachments]
    assert withheld.raw.is_claim_check

    for service in services:
        assert [] == service.errors(), service.name
    assert channel.id == routed[0].channel_id
    check_metrics(services, channel.id, routed, quarantined, duplicates)
    texts = [s.text() for s in services] + [s.get("/metrics")[1] for s in services]
    texts += [r.model_dump_json() for r in routed]
    assert [] == [t[:200] for t in texts if password in t]


def scrape(service: Service) -> list[tuple[str, dict[str, str], float]]:
    status, text = service.get("/metrics")
    assert 200 == status
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("mailroom_")
    ]


def value(
    found: list[tuple[str, dict[str, str], float]], name: str, **labels: str
) -> float:
    return sum(v for n, lbl, v in found if n == name and labels.items() <= lbl.items())


def check_metrics(
    services: list[Service],
    channel_id: int,
    routed: list[RoutedEmail],
    quarantined: list[dict[str, Any]],
    duplicates: list[str],
) -> None:
    """Every service's /metrics: probes, label sets, bounds, and true counts."""
    by_name = {s.name: scrape(s) for s in services}
    allowed = {
        "stage": {m.value for m in Stage},
        "outcome": {m.value for m in Outcome},
        "channel_id": {str(channel_id)},
    }

    for service in services:
        assert (200, 200) == (service.get("/livez")[0], service.get("/readyz")[0])
        found = by_name[service.name]
        print(f"{service.name}: {len(found)} mailroom series")
        assert len(found) <= 150
        for _name, labels, _value in found:
            for key, values in allowed.items():
                assert labels.get(key, next(iter(values))) in values, labels

    poller, router = by_name["poller"], by_name["router"]
    published = value(poller, "mailroom_messages_total", outcome="published")
    handled = value(router, "mailroom_messages_total", stage="router")
    assert len(routed) + len(quarantined) + len(duplicates) == published
    assert published == handled
    assert len(routed) == value(router, "mailroom_messages_total", outcome="routed")
    assert len(duplicates) == value(
        router, "mailroom_messages_total", outcome="duplicate"
    )
    last_poll = value(
        poller,
        "mailroom_channel_last_successful_poll_timestamp_seconds",
        channel_id=str(channel_id),
    )
    assert time.time() - 120 < last_poll <= time.time()
    assert 0 == value(poller, "mailroom_channel_consecutive_failures")
    assert 0 < value(router, "mailroom_publish_confirm_seconds_count")


def test_every_message_in_a_pop3_mailbox_is_routed_and_the_mailbox_ends_empty(
    catalog: Catalog,
    dovecot: Dovecot,
    settings: Settings,
    services: list[Service],
) -> None:
    _channel, user, _password = setup_channel(catalog, dovecot, "pop3")
    generated = samples(25, "pop3")
    for sample in generated:
        dovecot.append(user, sample.to_bytes())
    files = corpus_files()
    for path in files:
        dovecot.append(user, path.read_bytes())
    total = len(generated) + len(files)

    routed, quarantined, duplicates = account_for(settings, services, total, 180)
    deadline = time.monotonic() + 30
    while dovecot.message_count(user) and time.monotonic() < deadline:
        time.sleep(0.5)

    sources = [r.source.key() for r in routed] + [source_of(q) for q in quarantined]
    sources += duplicates
    assert total == len(sources)
    assert total == len(set(sources))
    check_generated(routed, "pop3", 25)
    assert 0 == dovecot.message_count(user)
    for service in services:
        assert [] == service.errors(), service.name
