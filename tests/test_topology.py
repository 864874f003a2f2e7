"""The broker topology on the real RabbitMQ, with classic and quorum queues."""

from __future__ import annotations

import time

import amqp
import pytest

from shared import broker
from shared.broker import Outgoing, Publisher
from shared.topology import RAW_KEY, Topology
from tests.conftest import AMQP_URL


def test_declaring_the_topology_twice_changes_nothing(broker_prefix: str) -> None:
    topology = Topology(prefix=broker_prefix)
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        broker.declare(connection, topology.declare)
        broker.declare(connection, topology.declare)
        broker.declare(connection, lambda ch: topology.declare_campaign(ch, "sales"))
        channel = connection.channel()
        declared = [
            channel.queue_declare(name, passive=True).queue
            for name in (*topology.work_queues(), topology.campaign_queue("sales"))
        ]
    finally:
        connection.release()

    assert [*topology.work_queues(), topology.campaign_queue("sales")] == declared


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_rejected_message_is_dead_lettered_not_dropped(
    broker_prefix: str, queue_type: str
) -> None:
    topology = Topology(prefix=broker_prefix, queue_type=queue_type, delivery_limit=2)
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        broker.declare(connection, topology.declare)
        Publisher(connection).publish_all(
            [Outgoing(topology.raw_exchange, RAW_KEY, b"{}", "poison-1")]
        )
        channel = connection.channel()
        message = channel.basic_get(topology.raw_queue)
        assert message is not None
        channel.basic_reject(message.delivery_tag, requeue=False)
        dead = _get_eventually(channel, f"{topology.raw_queue}.dead")
    finally:
        connection.release()

    assert "poison-1" == dead.properties["message_id"]


def test_a_quorum_queue_dead_letters_a_message_past_its_delivery_limit(
    broker_prefix: str,
) -> None:
    topology = Topology(prefix=broker_prefix, queue_type="quorum", delivery_limit=2)
    connection = broker.connect(AMQP_URL, attempts=3)
    try:
        broker.declare(connection, topology.declare)
        Publisher(connection).publish_all(
            [Outgoing(topology.raw_exchange, RAW_KEY, b"{}", "crashes-worker")]
        )
        channel = connection.channel()
        deliveries = 0
        while (message := channel.basic_get(topology.raw_queue)) is not None:
            deliveries += 1
            channel.basic_reject(message.delivery_tag, requeue=True)
            assert deliveries < 10
        dead = _get_eventually(channel, f"{topology.raw_queue}.dead")
    finally:
        connection.release()

    assert "crashes-worker" == dead.properties["message_id"]
    assert 3 == deliveries


def _get_eventually(channel: amqp.Channel, queue: str) -> amqp.Message:
    for _ in range(50):
        message = channel.basic_get(queue, no_ack=True)
        if message is not None:
            return message
        time.sleep(0.1)
    raise AssertionError(f"nothing arrived on {queue}")
