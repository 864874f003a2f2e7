"""Reading what the services published, as a campaign system would."""

from __future__ import annotations

import time
from collections.abc import Callable

import amqp

from shared import broker


def drain(
    url: str,
    queues: list[str],
    *,
    until: Callable[[list[amqp.Message]], bool],
    timeout: float,
) -> list[amqp.Message]:
    """Take messages from the queues until ``until`` holds or time runs out.

    Each message is acknowledged once taken, so a second drain does not see it.
    """
    taken: list[amqp.Message] = []
    connection = broker.connect(url, attempts=3)
    deadline = time.monotonic() + timeout
    try:
        channel = connection.channel()
        while time.monotonic() < deadline and not until(taken):
            got_any = False
            for queue in queues:
                message = channel.basic_get(queue)
                if message is not None:
                    channel.basic_ack(message.delivery_tag)
                    taken.append(message)
                    got_any = True
            if not got_any:
                time.sleep(0.1)
    finally:
        connection.release()
    return taken


def count(url: str, queue: str) -> int:
    """Messages ready in a queue."""
    connection = broker.connect(url, attempts=3)
    try:
        channel = connection.channel()
        _name, ready, _consumers = channel.queue_declare(queue, passive=True)
        return int(ready)
    finally:
        connection.release()
