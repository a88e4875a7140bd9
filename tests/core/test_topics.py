"""Topics and grants: exact keys and `*` prefixes, compared raw — nothing widens a grant."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oa_sync_core.engine import ProjectionEngine
from oa_sync_core.projectors import DEFAULT_PROJECTORS
from oa_sync_core.testing import new_event, record_events
from oa_sync_core.topics import MAX_TOPIC_LENGTH, Grant, Topic, parse_topic

from tests.profiles import examples

RUN = "runtime/run_summary"
_KEY_ALPHABET = "abAB01./:_-@"
keys = st.text(alphabet=_KEY_ALPHABET, max_size=8)
patterns = st.builds(lambda p, w: p + ("*" if w else ""), keys, st.booleans()).filter(bool)


def test_parse_exact_and_wildcard() -> None:
    """An exact key, a prefix ending in `*`, and `*` alone for everything."""
    assert parse_topic(f"{RUN}:r1") == Topic(f"{RUN}:r1", f"{RUN}:r1", False)
    assert parse_topic(f"{RUN}:*") == Topic(f"{RUN}:*", f"{RUN}:", True)
    everything = parse_topic("*")
    assert everything.matches("")
    assert everything.matches(f"{RUN}:r1")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a" * (MAX_TOPIC_LENGTH + 1),
        "**",
        "a*b",
        "*a",
        "a b",
        f"{RUN}:r%31",
        f"{RUN}:r1?x",
        f"{RUN}:r1#",
        f"{RUN}:r\x00",
        f"{RUN}:\u0072\u0301",
        "\uff52\uff55\uff4e/*",  # fullwidth letters
        "a\\b",
        "a\n",
    ],
)
def test_parse_refuses_malformed_topics(text: str) -> None:
    """Empty, too long, a misplaced `*`, or any character outside the safe set is refused."""
    with pytest.raises(ValueError, match="topic"):
        parse_topic(text)


def test_parse_refuses_non_strings() -> None:
    """A non-string (e.g. from an untyped JWT claim) is refused, not coerced."""
    for value in (None, 1, ["a"], b"a"):
        with pytest.raises(ValueError, match="topic"):
            parse_topic(value)  # type: ignore[arg-type]
    assert parse_topic("a" * MAX_TOPIC_LENGTH).prefix == "a" * MAX_TOPIC_LENGTH


def test_matching_is_exact_and_case_sensitive() -> None:
    """Case, percent-encoding, `../` and trailing characters never reach another key."""
    grant = Grant.parse([f"{RUN}:r1", f"{RUN}:team-a/*"])
    assert grant.allows(f"{RUN}:r1")
    for other in (
        f"{RUN}:R1",
        f"{RUN}:r1 ",
        f"{RUN}:r10",
        f"{RUN}:r%31",
        f"{RUN}:team-a/../team-b/r1",  # allowed literally below, but it is not team-b's key
        f"{RUN}:team-b/r1",
        f"{RUN}:TEAM-A/r1",
        f"{RUN}:team-a%2Fr1",
        "RUNTIME/run_summary:r1",
        f"{RUN}:./r1",
    ):
        allowed = grant.allows(other)
        assert allowed == other.startswith(f"{RUN}:team-a/"), other
    # The literal key "team-a/../team-b/r1" is inside team-a's prefix; no normalisation maps it
    # to team-b's document, and team-b's real key stays out of reach.
    assert not grant.allows(f"{RUN}:team-b/r1")
    assert not grant.covers(parse_topic(f"{RUN}:team-b/*"))
    assert not grant.intersects(parse_topic(f"{RUN}:team-b/*"))
    assert not grant.covers(parse_topic(f"{RUN}:*"))
    assert grant.intersects(parse_topic(f"{RUN}:*"))
    assert grant.covers(parse_topic(f"{RUN}:team-a/x*"))


def test_empty_grant_allows_nothing_and_star_allows_everything() -> None:
    """No topics grant nothing; `*` grants every key and covers every topic."""
    assert not Grant.parse([]).allows(f"{RUN}:r1")
    assert not Grant.parse([]).intersects(parse_topic("*"))
    star = Grant.parse(["*"])
    assert star.allows(f"{RUN}:r1")
    assert star.covers(parse_topic("*"))
    with pytest.raises(ValueError, match="topic"):
        Grant.parse(["ok", "bad topic"])


def test_within_and_overlaps_table() -> None:
    """within/overlaps for every combination of exact and wildcard topics."""
    table = [
        # topic, other, within, overlaps
        ("a", "a", True, True),
        ("a", "b", False, False),
        ("ab", "a*", True, True),
        ("a", "ab*", False, False),
        ("a*", "a", False, True),
        ("ab*", "a*", True, True),
        ("a*", "ab*", False, True),
        ("a*", "b*", False, False),
        ("a*", "*", True, True),
        ("*", "a*", False, True),
    ]
    for topic, other, within, overlaps in table:
        t, o = parse_topic(topic), parse_topic(other)
        assert t.within(o) is within, (topic, other)
        assert t.overlaps(o) is overlaps, (topic, other)
        assert o.overlaps(t) is overlaps, (other, topic)


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(patterns, max_size=4), patterns, st.lists(keys, max_size=12))
def test_grant_semantics_agree_with_key_matching(
    grant_patterns: list[str], pattern: str, samples: list[str]
) -> None:
    """covers ⇒ every matching key is allowed; no overlap ⇒ no key matched by both."""
    grant = Grant.parse(grant_patterns)
    topic = parse_topic(pattern)
    candidates = [*samples, topic.prefix, *(topic.prefix + s for s in samples)]
    candidates += [t.prefix for t in grant.topics]
    for key in candidates:
        allowed = grant.allows(key)
        assert allowed == any(t.matches(key) for t in grant.topics)
        if topic.matches(key):
            if grant.covers(topic):
                assert allowed, key
            if allowed:
                assert grant.intersects(topic), key


@settings(max_examples=examples(100), deadline=None)
@given(st.from_regex(r"[A-Za-z0-9._\-:@/]{1,200}", fullmatch=True))
def test_every_document_key_is_an_exact_topic(ident: str) -> None:
    """Any id a stream may carry gives document keys that parse as exact topics of themselves."""
    for kind in ("run", "worker"):
        event = record_events([new_event(f"{kind}.started", ident)])[0]
        (doc_id,) = ProjectionEngine(DEFAULT_PROJECTORS).route([event])
        topic = parse_topic(doc_id[1])
        assert not topic.wildcard
        assert topic.matches(doc_id[1])
        assert Grant.parse([f"{doc_id[0]}:*"]).allows(doc_id[1])
