"""Choosing a message's campaign from its channel's filters.

Filters run in position order. One matches when its field (sender, subject or
body) contains its value, does not contain it, or matches it as a regular
expression, all ignoring case. A match sets the campaign; a filter with
``stop`` ends the evaluation there, one without lets later matches override
it. A regular expression that is invalid or runs past its time budget counts
as no match, and the decision says so rather than the router failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import regex

from services.router.parsing import ParsedEmail
from shared.catalog import Filter
from shared.models import MatchField, RouteDecision

REGEX_TIMEOUT_SECONDS = 0.05
DEFAULT_REASON = "no filter matched; default campaign"

_REGEX_FLAGS = regex.IGNORECASE | regex.FULLCASE
_QUOTE_LIMIT = 80
_PREPARED_LIMIT = 1024


# Where each field's text sits in the per-message list of texts.
_SLOTS = {MatchField.SENDER: 0, MatchField.SUBJECT: 1, MatchField.BODY: 2}


@dataclass(frozen=True)
class _Rule:
    """A filter ready to test: value case-folded or compiled, phrases written."""

    filter: Filter
    field: MatchField
    slot: int
    # A regex rule has a pattern, or none when the regex is invalid; the
    # others test whether the folded needle is in the folded text.
    is_regex: bool
    negated: bool
    needle: str
    pattern: regex.Pattern[str] | None
    # What the decision says when the filter matches, or why it cannot.
    phrase: str


# Prepared rules by id() of a filter tuple; the tuple is kept alongside so
# that its id cannot be reused by another object while the entry exists.
_prepared: dict[int, tuple[tuple[Filter, ...], tuple[_Rule, ...]]] = {}


def choose(
    filters: Sequence[Filter], parsed: ParsedEmail, default_campaign_id: int
) -> tuple[int, RouteDecision]:
    """The campaign for a message, and the decision explaining it."""
    # The loop runs once per filter per message, so the plain tests are
    # inline and each text is case-folded only when a filter first needs it.
    texts = (parsed.sender_text, parsed.headers.subject, parsed.body_text)
    folded: list[str | None] = [None, None, None]
    problems: list[str] = []
    chosen: tuple[_Rule, str] | None = None
    for rule in _rules(filters):
        if rule.is_regex:
            found = _search(rule, texts[rule.slot], problems)
            if found is None:
                continue
        else:
            text = folded[rule.slot]
            if text is None:
                text = folded[rule.slot] = texts[rule.slot].casefold()
            if (rule.needle in text) is rule.negated:
                continue
            found = rule.phrase

        chosen = (rule, found)
        if rule.filter.stop:
            break

    if chosen is None:
        reason = "; ".join([DEFAULT_REASON, *problems])
        return default_campaign_id, RouteDecision(reason=reason)

    rule, found = chosen
    reason = "; ".join([f"filter {rule.filter.id}: {found}", *problems])
    decision = RouteDecision(
        filter_id=rule.filter.id,
        field=rule.filter.field,
        value=rule.filter.value,
        reason=reason,
    )
    return rule.filter.campaign_id, decision


def _search(rule: _Rule, text: str, problems: list[str]) -> str | None:
    """What a regex rule matched, as a phrase for the decision; None if nothing."""
    item = rule.filter
    if rule.pattern is None:
        problems.append(f"filter {item.id}: {rule.phrase}; counted as no match")
        return None
    try:
        match = rule.pattern.search(text, timeout=REGEX_TIMEOUT_SECONDS)
    except TimeoutError:
        problems.append(
            f"filter {item.id}: regex {_quote(item.value)} took over "
            f"{REGEX_TIMEOUT_SECONDS * 1000:.0f} ms on the {rule.field.value}; "
            "counted as no match"
        )
        return None
    if match is None:
        return None
    return f"{rule.phrase} at {_quote(match.group())}"


def _rules(filters: Sequence[Filter]) -> tuple[_Rule, ...]:
    """Rules in position order, prepared once per filter tuple.

    The routing table hands over the same tuple for every message of a
    channel, so its identity is the cache key; other sequences (a list may
    change under us) are prepared afresh, which is cheap because compiled
    patterns are cached by value.
    """
    if not isinstance(filters, tuple):
        return _prepare(filters)

    entry = _prepared.get(id(filters))
    if entry is not None and entry[0] is filters:
        return entry[1]

    rules = _prepare(filters)
    if len(_prepared) >= _PREPARED_LIMIT:
        _prepared.clear()
    _prepared[id(filters)] = (filters, rules)
    return rules


def _prepare(filters: Sequence[Filter]) -> tuple[_Rule, ...]:
    ordered = sorted(filters, key=lambda f: (f.position, f.id))
    rules = []
    for item in ordered:
        field = MatchField(item.field)
        slot = _SLOTS[field]
        value = _quote(item.value)
        if item.operator == "regex":
            pattern, error = _compile(item.value)
            phrase = error or f"{field.value} matches {value}"
            rules.append(_Rule(item, field, slot, True, False, "", pattern, phrase))
        elif item.operator == "not_contains":
            phrase = f"{field.value} does not contain {value}"
            needle = item.value.casefold()
            rules.append(_Rule(item, field, slot, False, True, needle, None, phrase))
        else:
            phrase = f"{field.value} contains {value}"
            needle = item.value.casefold()
            rules.append(_Rule(item, field, slot, False, False, needle, None, phrase))
    return tuple(rules)


@lru_cache(maxsize=4096)
def _compile(value: str) -> tuple[regex.Pattern[str] | None, str]:
    try:
        return regex.compile(value, _REGEX_FLAGS), ""
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        return None, f"invalid regex {_quote(value)} ({exc})"


def _quote(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _QUOTE_LIMIT:
        text = text[: _QUOTE_LIMIT - 3] + "..."
    return repr(text)
