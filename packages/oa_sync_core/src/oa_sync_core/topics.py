"""Topics and grants: which documents a subscription or a token covers.

A topic is an exact document key (``runtime/run_summary:r1``) or a prefix ending in ``*``
(``runtime/run_summary:*``); ``*`` alone covers everything. The same syntax expresses what a
token grants (its ``oa_topics`` claim). Matching is plain, case-sensitive string comparison
on the raw key — no normalisation, percent-decoding or path resolution — so a topic can never
reach a key it does not spell out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Final, cast

__all__ = ["MAX_TOPIC_LENGTH", "Grant", "Topic", "parse_topic"]

MAX_TOPIC_LENGTH: Final = 256
_TOPIC = re.compile(r"[A-Za-z0-9._\-/:@]*\*?")


@dataclasses.dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic: ``prefix`` plus whether it is a wildcard."""

    text: str
    prefix: str
    wildcard: bool

    def matches(self, doc_key: str) -> bool:
        """Whether this topic covers a document key."""
        if self.wildcard:
            return doc_key.startswith(self.prefix)
        return doc_key == self.prefix

    def within(self, other: Topic) -> bool:
        """Whether every key this topic covers is covered by ``other``."""
        if other.wildcard:
            return self.prefix.startswith(other.prefix)
        return not self.wildcard and self.prefix == other.prefix

    def overlaps(self, other: Topic) -> bool:
        """Whether some key is covered by both topics."""
        if self.wildcard and other.wildcard:
            return self.prefix.startswith(other.prefix) or other.prefix.startswith(self.prefix)
        if self.wildcard:
            return other.prefix.startswith(self.prefix)
        if other.wildcard:
            return self.prefix.startswith(other.prefix)
        return self.prefix == other.prefix


def parse_topic(text: str) -> Topic:
    """Parse a topic or grant pattern.

    Raises:
        ValueError: empty, too long, a ``*`` anywhere but at the end, or characters outside
            ``A-Z a-z 0-9 . _ - / : @``.
    """
    if not isinstance(cast(object, text), str) or not text or len(text) > MAX_TOPIC_LENGTH:
        raise ValueError(f"a topic is 1 to {MAX_TOPIC_LENGTH} characters")
    if not _TOPIC.fullmatch(text):
        raise ValueError(
            f"topic {text!r} has characters outside [A-Za-z0-9._-/:@] or a misplaced '*'"
        )
    if text.endswith("*"):
        return Topic(text, text[:-1], True)
    return Topic(text, text, False)


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """The topics a token may read (its ``oa_topics`` claim)."""

    topics: tuple[Topic, ...]

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> Grant:
        """Parse grant patterns; raises ValueError on a malformed one."""
        return cls(tuple(parse_topic(p) for p in patterns))

    def allows(self, doc_key: str) -> bool:
        """Whether the grant covers one document."""
        return any(t.matches(doc_key) for t in self.topics)

    def covers(self, topic: Topic) -> bool:
        """Whether the grant covers every document of ``topic``."""
        return any(topic.within(t) for t in self.topics)

    def intersects(self, topic: Topic) -> bool:
        """Whether the grant covers at least one possible document of ``topic``."""
        return any(topic.overlaps(t) for t in self.topics)
