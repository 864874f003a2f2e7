"""Trying a channel's filters on a message without routing it.

The message is parsed and routed by the router's own code, so the answer is
the one the router would give; nothing is published or stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import regex

from services.router.filters import REGEX_TIMEOUT_SECONDS, choose
from services.router.parsing import ParsedEmail, parse_email
from shared.catalog import Channel, Filter
from shared.models import MatchField, RouteDecision

EXCERPT_CHARS = 60
# choose() needs a campaign for unmatched mail; a channel without a default
# gets this one, which no campaign has, so the answer can say so.
NO_CAMPAIGN = 0


@dataclass(frozen=True)
class DryRun:
    campaign_id: int | None
    decision: RouteDecision
    filter: Filter | None
    matched_text: str | None
    parsed: ParsedEmail


def dry_run(
    channel: Channel, filters: list[Filter], raw: bytes, *, attachment_limit: int
) -> DryRun:
    """Where ``raw`` would go; raises MessageRejected when it is not mail."""
    parsed = parse_email(raw, attachment_limit=attachment_limit)
    default = channel.default_campaign_id or NO_CAMPAIGN
    campaign_id, decision = choose(filters, parsed, default)

    chosen = next((f for f in filters if f.id == decision.filter_id), None)
    if chosen is None and channel.default_campaign_id is None:
        decision = decision.model_copy(
            update={
                "reason": decision.reason
                + "; the channel has no default campaign, so it cannot be active"
            }
        )
    return DryRun(
        campaign_id=None if campaign_id == NO_CAMPAIGN else campaign_id,
        decision=decision,
        filter=chosen,
        matched_text=_matched_text(chosen, parsed) if chosen else None,
        parsed=parsed,
    )


def _matched_text(item: Filter, parsed: ParsedEmail) -> str:
    text = {
        MatchField.SENDER: parsed.sender_text,
        MatchField.SUBJECT: parsed.headers.subject,
        MatchField.BODY: parsed.body_text,
    }[MatchField(item.field)]

    if item.operator == "contains":
        start = text.casefold().find(item.value.casefold())
        if start >= 0:
            return _excerpt(text, start, start + len(item.value))
    if item.operator == "regex":
        try:
            match = regex.search(
                item.value, text, regex.IGNORECASE, timeout=REGEX_TIMEOUT_SECONDS
            )
        except (TimeoutError, regex.error):
            match = None
        if match is not None:
            return _excerpt(text, match.start(), match.end())
    # not_contains matched on the absence of its value: the text is the proof.
    return _excerpt(text, 0, 0)


def _excerpt(text: str, start: int, end: int) -> str:
    """The matched span with some context, on one line."""
    left = max(0, start - EXCERPT_CHARS)
    right = min(len(text), max(end, start) + EXCERPT_CHARS)
    snippet = " ".join(text[left:right].split())
    return f"{'…' if left else ''}{snippet}{'…' if right < len(text) else ''}"
