"""The router's cached view of channels, their filters and campaign keys.

Reloaded from PostgreSQL every few seconds, and at once when a message names
a channel the cache does not know, so configuration changes reach a running
router without a restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.catalog import Catalog, Channel, Filter


@dataclass(frozen=True)
class ChannelRoutes:
    channel: Channel
    filters: tuple[Filter, ...]


class RoutingTable:
    def __init__(self, catalog: Catalog, max_age_seconds: float = 5.0):
        self.catalog = catalog
        self.max_age_seconds = max_age_seconds
        self._channels: dict[int, ChannelRoutes] = {}
        self._campaign_keys: dict[int, str] = {}
        self._loaded_at = float("-inf")

    def _reload(self) -> None:
        filters: dict[int, list[Filter]] = {}
        for item in self.catalog.filters():
            filters.setdefault(item.channel_id, []).append(item)
        self._channels = {
            c.id: ChannelRoutes(c, tuple(filters.get(c.id, ())))
            for c in self.catalog.channels()
        }
        self._campaign_keys = {c.id: c.key for c in self.catalog.campaigns()}
        self._loaded_at = time.monotonic()

    def refresh_if_stale(self) -> None:
        if time.monotonic() - self._loaded_at > self.max_age_seconds:
            self._reload()

    def channel(self, channel_id: int) -> ChannelRoutes | None:
        if channel_id not in self._channels:
            self._reload()
        return self._channels.get(channel_id)

    def campaign_key(self, campaign_id: int) -> str | None:
        if campaign_id not in self._campaign_keys:
            self._reload()
        return self._campaign_keys.get(campaign_id)
