"""Response-redaction library (gateway.redaction): detectors, field paths, formats, limits."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import threading
import zlib
from typing import Any

import brotli
import jwt as pyjwt
import pytest
import zstandard

from gateway.redaction import (
    DETECTORS,
    InvalidFieldPath,
    NotRedactable,
    RedactionReport,
    RedactionSettings,
    Redactor,
    UnknownDetector,
    scrub_text,
    scrub_value,
)
from tests.codecs import DECODERS, ENCODERS

KEY = "0123456789abcdef-pseudonym-test-key"
JWT = pyjwt.encode({"sub": "agent-1", "team": "support"}, "k" * 32, algorithm="HS256")
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAwVq3\nq83Jx0==\n-----END RSA PRIVATE KEY-----"


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(RedactionSettings())


def detect(redactor: Redactor, detector: str, text: str) -> str:
    """``text`` after the one detector, as a JSON string value."""
    plan = redactor.plan([], [detector])
    assert plan is not None
    value, _ = plan.redact_json_value({"v": text})
    return value["v"]


def jbody(plan, obj: Any, ct: str = "application/json") -> tuple[Any, RedactionReport]:
    out, report = plan.redact_body(json.dumps(obj).encode(), content_type=ct, content_encoding=None)
    return json.loads(out), report


# -- detectors: true positives and near misses ------------------------------------------------
DETECTOR_CASES: dict[str, tuple[list[str], list[str]]] = {
    "email": (
        ["Contact jane.doe+x@example.co.uk now", "mail me: Bob@Example.COM."],
        ["logo@2x.png", "user at example dot com", "a@b", "@handle"],
    ),
    "phone": (
        ["call (415) 555-2671 today", "+44 20 7946 0958", "tel: 415.555.2671", "+1 202 555 0143"],
        ["2024-01-15T10:20:30Z", "updated 1700000000123", "ORD-4155552671", "192.168.100.200",
         "550e8400-e29b-41d4-a716-446655440000", "version 1.2.3.4.5", "call 020 7946 0958"],
    ),
    "us_ssn": (
        ["SSN 123-45-6789", "ssn: 123 45 6789"],
        ["000-12-3456", "666-12-3456", "987-65-4321", "id 123456789", "078-05-1120", "123-45-67890"],
    ),
    "payment_card": (
        ["4111 1111 1111 1111", "card 4111-1111-1111-1111 exp", "amex 378282246310005", "5555555555554444",
         "ORD-4111111111111111", "qty 12 4111 1111 1111 1111 2026", "3782 822463 10005"],
        ["4111111111111112", "ORD-4111111111111112", "epoch 1700000000004", "1234567890123456",
         "2024-01-15T10:20:30.123Z", "tracking 9400 1000 0000 0000 0000 00",
         "id 40123456-7890-4126-a123-123456789012", "4111 11 1111 111 1111"],
    ),
    "iban": (
        ["DE89 3704 0044 0532 0130 00", "pay to GB82WEST12345698765432 please"],
        ["DE89370400440532013001", "XX00 1234 5678 9012 34", "ABCD1234EFGH5678IJ"],
    ),
    "ip_address": (
        ["from 10.0.0.1", "2001:db8::8a2e:370:7334", "connect to ::1 now", "fe80::1%eth0 link", "1.2.3.4:8080"],
        ["1.2.3.4.5", "v1.2.3.4", "at 12:30:45", "mac 00:1A:2B:3C:4D:5E", "999.1.1.1", "std::vector<int>"],
    ),
    "aws_access_key": (
        [AWS_ID, "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"],
        ["AKIAIOSFODNN7EXAMPL", "XAKIAIOSFODNN7EXAMPLE", "AKIA is a prefix"],
    ),
    "private_key": (
        [PEM, "key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk (truncated"],
        ["-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----", "never share your private key"],
    ),
    "jwt": (
        [JWT, f"token={JWT}&x=1"],
        ["eyJhbGciOi.bm90anNvbg.x", "eyJub3QiOiJqd3QifQ", "eyJhbGciOiJIUzI1NiJ9"],
    ),
    "bearer_token": (
        ["Authorization: Bearer abc123def456ghi", "bearer 4f2a9c1e7b"],
        ["the bearer of bad news", "Bearer authentication is used", "bearer bonds"],
    ),
    "api_key": (
        ["ghp_" + "a1B2" * 9, "sk_live_" + "a1" * 12, "sk-proj-" + "Ab1" * 15, "?api_key=abcd1234&page=2",
         "password: hunter22", "https://user:s3cret@db.internal/x", "Authorization: Basic dXNlcjpwYXNz",
         "AIza" + "Bc1" * 11 + "de", "SG." + "a" * 22 + "." + "b" * 43],
        ["550e8400-e29b-41d4-a716-446655440000", "next_page_token=abc123xyz", "tokens: 5",
         "sha256:" + "ab" * 32, "secret: true", "basic usage of the basic plan", "task-assignment-for-the-weekend-team"],
    ),
}


@pytest.mark.parametrize("detector", sorted(DETECTOR_CASES))
def test_detector_true_positives_and_near_misses(redactor: Redactor, detector: str) -> None:
    positives, negatives = DETECTOR_CASES[detector]
    for text in positives:
        out = detect(redactor, detector, text)
        assert f"[REDACTED:{detector}]" in out, (detector, text, out)
    for text in negatives:
        assert detect(redactor, detector, text) == text, (detector, text)


def test_every_detector_has_cases() -> None:
    assert set(DETECTOR_CASES) == set(DETECTORS)


def test_detector_hits_replace_only_the_sensitive_span(redactor: Redactor) -> None:
    assert detect(redactor, "email", "a bob@example.com b") == "a [REDACTED:email] b"
    assert detect(redactor, "bearer_token", "Bearer abc123def456") == "Bearer [REDACTED:bearer_token]"
    assert detect(redactor, "payment_card", "4111 1111 1111 1111 2026") == "[REDACTED:payment_card] 2026"
    assert detect(redactor, "iban", "DE89370400440532013000 AND MORE") == "[REDACTED:iban] AND MORE"
    assert detect(redactor, "private_key", PEM + "\ntail") == "[REDACTED:private_key]\ntail"
    assert detect(redactor, "api_key", "a=1&password=hunter22&b=2") == "a=1&password=[REDACTED:api_key]&b=2"


def test_phone_default_region_is_configurable() -> None:
    uk = Redactor(RedactionSettings(phone_region="gb")).plan([], ["phone"])
    assert uk is not None
    value, _ = uk.redact_json_value("call 020 7946 0958")
    assert value == "call [REDACTED:phone]"
    with pytest.raises(ValueError, match="phone region"):
        RedactionSettings(phone_region="XX")


def test_card_numbers_as_json_integers(redactor: Redactor) -> None:
    plan = redactor.plan([], ["payment_card"])
    out, report = jbody(plan, {"card": 4111111111111111, "order": 4111111111111112, "ts": 1700000000004})
    assert out == {"card": "[REDACTED:payment_card]", "order": 4111111111111112, "ts": 1700000000004}
    assert report.paths == ["$.card"]


def test_secret_named_members_are_redacted_whole(redactor: Redactor) -> None:
    plan = redactor.plan([], ["api_key"])
    doc = {"client_secret": "s3", "db-password": "x", "apiKey": "k1", "Authorization": "Digest abc",
           "next_page_token": "p2", "token_type": "bearer", "max_tokens": 100, "secretName": "public"}
    out, report = jbody(plan, doc)
    for k in ("client_secret", "db-password", "apiKey", "Authorization"):
        assert out[k] == "[REDACTED:api_key]", k
    for k in ("next_page_token", "token_type", "max_tokens", "secretName"):
        assert out[k] == doc[k], k
    assert report.counts == {"api_key": 4}


def test_overlapping_hits_are_merged_never_partly_left(redactor: Redactor) -> None:
    plan = redactor.plan([], ["all"])
    value, report = plan.redact_json_value(f"Authorization: Bearer {JWT}")
    assert value == "Authorization: Bearer [REDACTED:jwt]"
    assert report.counts == {"jwt": 1}
    value, _ = plan.redact_json_value("https://admin:hunter22@mail.example.com/")
    assert "hunter22" not in value


def test_all_and_unknown_detectors(redactor: Redactor) -> None:
    plan = redactor.plan([], ["all"])
    assert plan is not None and set(plan.detectors) == set(DETECTORS)
    with pytest.raises(UnknownDetector, match="'credit_card'"):
        redactor.plan([], ["email", "credit_card"])
    assert issubclass(UnknownDetector, ValueError)


def test_plans_are_cached_and_empty_plans_are_none(redactor: Redactor) -> None:
    assert redactor.plan([], []) is None
    a = redactor.plan(["$.a", "$..b"], ["email"])
    assert a is redactor.plan(["$.a", "$..b"], ["email"])
    assert a is not redactor.plan(["$.a"], ["email"])


@pytest.mark.parametrize("bad", ["customer.email", "$.[", "$..", "", "$.a[?(@.x"])
def test_invalid_field_paths_are_clear_errors(redactor: Redactor, bad: str) -> None:
    with pytest.raises(InvalidFieldPath, match="invalid redaction field path"):
        redactor.plan([bad], [])


# -- field paths ------------------------------------------------------------------------------
TICKETS = {
    "customer": {"email": "boss@example.com", "name": "Ann", "ssn": "123-45-6789"},
    "tickets": [
        {"id": 1, "requester": {"phone": "+1 202 555 0143", "name": "Bo"}, "meta": {"ssn": "n/a"}},
        {"id": 2, "requester": {"phone": "+1 202 555 0144", "name": "Cy"}},
    ],
    "users": [{"role": "admin", "email": "root@example.com"}, {"role": "user", "email": "u@example.com"}],
}


def test_field_paths_child_wildcard_and_recursive_descent(redactor: Redactor) -> None:
    plan = redactor.plan(["$.customer.email", "$.tickets[*].requester.phone", "$..ssn"], [])
    out, report = jbody(plan, TICKETS)
    assert out["customer"] == {"email": "[REDACTED:field]", "name": "Ann", "ssn": "[REDACTED:field]"}
    assert [t["requester"]["phone"] for t in out["tickets"]] == ["[REDACTED:field]"] * 2
    assert out["tickets"][0]["meta"]["ssn"] == "[REDACTED:field]"
    assert out["users"] == TICKETS["users"]  # no detectors: e-mails elsewhere stay
    assert report.counts == {"field": 5}
    assert sorted(report.paths) == sorted([
        "$.customer.email", "$.customer.ssn", "$.tickets[0].requester.phone",
        "$.tickets[0].meta.ssn", "$.tickets[1].requester.phone"])


def test_field_paths_indexes_filters_and_whole_subtrees(redactor: Redactor) -> None:
    plan = redactor.plan(["$.tickets[-1]", "$.users[?@.role == 'admin'].email", "$['customer']['name']"], [])
    out, report = jbody(plan, TICKETS)
    assert out["tickets"][1] == "[REDACTED:field]"
    assert out["tickets"][0] == TICKETS["tickets"][0]
    assert out["users"][0]["email"] == "[REDACTED:field]" and out["users"][1]["email"] == "u@example.com"
    assert out["customer"]["name"] == "[REDACTED:field]"
    assert sorted(report.paths) == ["$.customer.name", "$.tickets[1]", "$.users[0].email"]


def test_field_paths_index_lists_and_descendant_indexes(redactor: Redactor) -> None:
    doc = {"a": [0, 1, 2, 3], "b": {"a": [[5, 6], [7]]}, "c": [{"a": [8, 9]}]}
    out, report = jbody(redactor.plan(["$.a[0,-1]", "$..a[1]"], []), doc)
    r = "[REDACTED:field]"
    assert out == {"a": [r, r, 2, r], "b": {"a": [[5, 6], r]}, "c": [{"a": [8, r]}]}
    assert sorted(report.paths) == ["$.a[0]", "$.a[1]", "$.a[3]", "$.b.a[1]", "$.c[0].a[1]"]


def test_root_path_and_missing_paths(redactor: Redactor) -> None:
    out, _ = jbody(redactor.plan(["$"], []), {"a": 1})
    assert out == "[REDACTED:field]"
    body = json.dumps(TICKETS).encode()
    same, report = redactor.plan(["$.nope.nothing", "$..absent"], []).redact_body(
        body, content_type="application/json", content_encoding=None)
    assert same is body and not report


def test_fields_take_precedence_over_detectors(redactor: Redactor) -> None:
    plan = redactor.plan(["$.customer"], ["email", "us_ssn"])
    out, report = jbody(plan, TICKETS)
    assert out["customer"] == "[REDACTED:field]"
    assert report.counts == {"field": 1, "email": 2}  # users[*].email found by the detector
    assert set(report.paths) == {"$.customer", "$.users[0].email", "$.users[1].email"}


def test_redact_json_value_does_not_mutate_and_reuses_unchanged(redactor: Redactor) -> None:
    plan = redactor.plan(["$.customer.email"], ["phone"])
    doc = json.loads(json.dumps(TICKETS))
    snapshot = json.dumps(doc)
    new, report = plan.redact_json_value(doc)
    assert json.dumps(doc) == snapshot
    assert new["customer"]["email"] == "[REDACTED:field]"
    assert new["users"] is doc["users"]  # untouched subtrees are shared, not copied
    assert report.counts["phone"] == 2
    unchanged = {"x": ["nothing", "here"]}
    assert plan.redact_json_value(unchanged)[0] is unchanged


# -- reports ----------------------------------------------------------------------------------
def test_reports_carry_paths_and_counts_never_values(redactor: Redactor) -> None:
    plan = redactor.plan(["$..ssn"], ["all"])
    secrets = ["boss@example.com", "123-45-6789", "+1 202 555 0143", AWS_ID, JWT]
    doc = {"customer": {"email": secrets[0], "ssn": secrets[1]}, "notes": [f"call {secrets[2]}", secrets[3]],
           "auth": {"header": f"Bearer {secrets[4]}"}, "bob@example.org": "key is itself sensitive"}
    _, report = jbody(plan, doc)
    assert report.counts == {"email": 1, "field": 1, "phone": 1, "aws_access_key": 1, "jwt": 1}
    assert set(report.paths) == {"$.customer.email", "$.customer.ssn", "$.notes[0]", "$.notes[1]", "$.auth.header"}
    text = json.dumps(report.as_dict()) + repr(report)
    for s in secrets + ["bob@example.org"]:
        assert s not in text


def test_report_paths_are_capped(redactor: Redactor) -> None:
    plan = redactor.plan([], ["email"])
    _, report = jbody(plan, [f"user{i}@example.com" for i in range(150)])
    assert report.counts == {"email": 150}
    assert len(report.paths) == 100 and report.paths_dropped == 50
    assert report.paths[0] == "$[0]"
    merged = RedactionReport(max_paths=120).merge(report).merge(report)
    assert merged.counts == {"email": 300} and len(merged.paths) == 120 and merged.paths_dropped == 180


def test_odd_member_names_use_bracket_notation(redactor: Redactor) -> None:
    _, report = jbody(redactor.plan([], ["email"]), {"a b": {"it's": "x@example.com"}})
    assert report.paths == ["$['a b']['it\\'s']"]


# -- pseudonyms -------------------------------------------------------------------------------
def test_pseudonyms_are_stable_keyed_and_distinguish_values(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("AG_TEST_PSEUDO_KEY", KEY)
    settings = RedactionSettings(replacement="pseudonym", pseudonym_key_env="AG_TEST_PSEUDO_KEY")
    a = Redactor(settings).plan(["$.id"], ["email", "phone"])
    b = Redactor(settings).plan(["$.id"], ["email", "phone"])
    doc = ["ann@example.com", "Ann@Example.com", "bob@example.com", "(415) 555-2671", "+1 415 555 2671"]
    out_a, _ = a.redact_json_value(doc)
    out_b, _ = b.redact_json_value(doc)
    assert out_a == out_b  # stable across redactors with the same key
    assert all(re.fullmatch(r"\[REDACTED:(email|phone):[0-9a-f]{6}\]", v) for v in out_a)
    assert out_a[0] == out_a[1] != out_a[2]  # same address (case-insensitive), different person
    assert out_a[3] == out_a[4]  # same number, different formatting
    assert a.redact_json_value({"id": "c-1"})[0]["id"].startswith("[REDACTED:field:")

    key_file = tmp_path / "pseudo.key"
    key_file.write_text("another-key-with-enough-bytes-0123456789\n")
    other = Redactor(RedactionSettings(replacement="pseudonym", pseudonym_key_file=key_file))
    out_c, _ = other.plan([], ["email", "phone"]).redact_json_value(doc)
    assert out_c[0] != out_a[0]  # keyed: a different key gives different pseudonyms
    for v in out_a + out_c:
        assert "ann" not in v.lower() and "415" not in v


def test_pseudonym_key_is_required_and_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="pseudonym_key"):
        RedactionSettings(replacement="pseudonym")
    monkeypatch.delenv("AG_TEST_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="not set"):
        Redactor(RedactionSettings(replacement="pseudonym", pseudonym_key_env="AG_TEST_MISSING_KEY"))
    monkeypatch.setenv("AG_TEST_SHORT_KEY", "short")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Redactor(RedactionSettings(replacement="pseudonym", pseudonym_key_env="AG_TEST_SHORT_KEY"))


# -- content types ----------------------------------------------------------------------------
def test_json_variants_and_unchanged_bodies(redactor: Redactor) -> None:
    plan = redactor.plan([], ["email"])
    for ct in ("application/json", "application/problem+json; charset=utf-8", "application/vnd.api+json"):
        out, report = jbody(plan, {"deep": [[{"x": "ann@example.com — ünïcode"}]]}, ct)
        assert out == {"deep": [[{"x": "[REDACTED:email] — ünïcode"}]]}
        assert report.paths == ["$.deep[0][0].x"]
    body = b'{"a": "nothing to see",   "b": [1, 2]}'
    same, report = plan.redact_body(body, content_type="application/json", content_encoding=None)
    assert same is body and report.counts == {}
    bom = b"\xef\xbb\xbf" + json.dumps({"e": "ann@example.com"}).encode()
    out, _ = plan.redact_body(bom, content_type="application/json", content_encoding=None)
    assert out.startswith(b"\xef\xbb\xbf") and json.loads(out[3:]) == {"e": "[REDACTED:email]"}


def test_json_with_lone_surrogate_escapes_stays_valid(redactor: Redactor) -> None:
    body = b'{"s": "\\ud800 x", "e": "ann@example.com"}'
    out, _ = redactor.plan([], ["email"]).redact_body(body, content_type="application/json", content_encoding=None)
    assert json.loads(out.decode("utf-8")) == {"s": "\ud800 x", "e": "[REDACTED:email]"}


@pytest.mark.parametrize("ct", ["application/x-ndjson", "application/jsonl"])
def test_ndjson(redactor: Redactor, ct: str) -> None:
    plan = redactor.plan(["$.ssn"], ["email"])
    body = b'{"ssn": "123-45-6789", "n": 1}\r\n{"e": "ann@example.com"}\n\n{"ok": true}\n'
    out, report = plan.redact_body(body, content_type=ct, content_encoding=None)
    lines = out.split(b"\n")
    assert json.loads(lines[0]) == {"ssn": "[REDACTED:field]", "n": 1} and lines[0].endswith(b"\r")
    assert json.loads(lines[1]) == {"e": "[REDACTED:email]"}
    assert lines[2:] == [b"", b'{"ok": true}', b""]
    assert report.paths == ["line[0]:$.ssn", "line[1]:$.e"]
    assert report.counts == {"field": 1, "email": 1}
    # Without field paths a line that is not JSON is scanned as text.
    out, _ = redactor.plan([], ["email"]).redact_body(b'{"a": 1}\nnot json: bob@example.com\n', content_type=ct,
                                                      content_encoding=None)
    assert out == b'{"a": 1}\nnot json: [REDACTED:email]\n'


def test_ndjson_line_that_does_not_parse_with_fields_fails_closed(redactor: Redactor) -> None:
    plan = redactor.plan(["$.ssn"], ["email"])
    with pytest.raises(NotRedactable) as ei:
        plan.redact_body(b'{"a":1}\n{broken\n', content_type="application/x-ndjson", content_encoding=None)
    assert ei.value.reason == "invalid_json" and ei.value.code == "response_not_redactable"


@pytest.mark.parametrize("ct", ["text/plain", "text/html; charset=utf-8", "application/xml", "text/csv"])
def test_text_bodies(redactor: Redactor, ct: str) -> None:
    plan = redactor.plan([], ["email", "us_ssn"])
    body = "<p>Ann <ann@example.com>, SSN 123-45-6789 — ok</p>\n".encode()
    out, report = plan.redact_body(body, content_type=ct, content_encoding=None)
    assert out == "<p>Ann <[REDACTED:email]>, SSN [REDACTED:us_ssn] — ok</p>\n".encode()
    assert report.counts == {"email": 1, "us_ssn": 1} and report.paths == []


def test_text_with_invalid_utf8_round_trips_other_bytes(redactor: Redactor) -> None:
    plan = redactor.plan([], ["email"])
    body = b"\xff\xfe bytes ann@example.com \xc3"
    out, _ = plan.redact_body(body, content_type="text/plain", content_encoding=None)
    assert out == b"\xff\xfe bytes [REDACTED:email] \xc3"
    with pytest.raises(NotRedactable) as ei:
        plan.redact_body(body, content_type="text/plain; charset=utf-8", content_encoding=None)
    assert ei.value.reason == "undecodable"
    latin, _ = plan.redact_body("café ann@example.com".encode("latin-1"), content_type="text/plain; charset=latin-1",
                                content_encoding=None)
    assert latin == "café [REDACTED:email]".encode("latin-1")


def test_mislabelled_json_in_text_still_gets_field_paths(redactor: Redactor) -> None:
    out, report = redactor.plan(["$.ssn"], []).redact_body(
        b'{"ssn": "x"}', content_type="text/plain", content_encoding=None)
    assert json.loads(out) == {"ssn": "[REDACTED:field]"} and report.counts == {"field": 1}


def test_form_urlencoded(redactor: Redactor) -> None:
    plan = redactor.plan(["$.tag"], ["email", "api_key"])
    body = b"user=ann&email=ann%40example.com&password=hunter22&tag=a&q=caf%C3%A9+x&tag=b&&empty="
    out, report = plan.redact_body(body, content_type="application/x-www-form-urlencoded", content_encoding=None)
    assert out == (b"user=ann&email=%5BREDACTED%3Aemail%5D&password=%5BREDACTED%3Aapi_key%5D"
                   b"&tag=%5BREDACTED%3Afield%5D&q=caf%C3%A9+x&tag=%5BREDACTED%3Afield%5D&&empty=")
    assert report.counts == {"email": 1, "api_key": 1, "field": 1}
    assert sorted(report.paths) == ["$.email", "$.password", "$.tag"]


@pytest.mark.parametrize("ct", ["image/png", "application/octet-stream", "multipart/form-data; boundary=x"])
def test_unsupported_content_types_fail_closed(redactor: Redactor, ct: str) -> None:
    plan = redactor.plan([], ["email"])
    with pytest.raises(NotRedactable) as ei:
        plan.redact_body(b"\x89PNG ann@example.com", content_type=ct, content_encoding=None)
    assert ei.value.reason == "unsupported_content_type"
    assert plan.redact_body(b"", content_type=ct, content_encoding=None)[0] == b""


def test_untyped_body_is_sniffed(redactor: Redactor) -> None:
    plan = redactor.plan(["$.a"], ["email"])
    out, _ = plan.redact_body(b'{"a": 1, "b": "x@example.com"}', content_type="", content_encoding=None)
    assert json.loads(out) == {"a": "[REDACTED:field]", "b": "[REDACTED:email]"}
    out, _ = redactor.plan([], ["email"]).redact_body(b"hi x@example.com", content_type="", content_encoding=None)
    assert out == b"hi [REDACTED:email]"
    with pytest.raises(NotRedactable):
        plan.redact_body(b"\x00\xff\xfe", content_type="", content_encoding=None)


@pytest.mark.parametrize("body, ct", [
    (b"<doc><ssn>123-45-6789</ssn></doc>", "application/xml"),
    (b"name,ssn\nAda,123-45-6789\n", "text/csv"),
    (b"hi there", ""),
    (b"[not json", "text/plain"),
])
def test_field_paths_on_a_body_that_is_not_json_fail_closed(redactor: Redactor, body: bytes, ct: str) -> None:
    """Field paths cannot be looked for in XML or CSV (an agent may ask the upstream for either
    with Accept): the response is refused, not passed with the detectors alone."""
    with pytest.raises(NotRedactable) as ei:
        redactor.plan(["$.ssn"], ["email"]).redact_body(body, content_type=ct, content_encoding=None)
    assert ei.value.reason == "fields_not_applicable"


# -- encodings --------------------------------------------------------------------------------
def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()




@pytest.mark.parametrize("enc", sorted(ENCODERS))
def test_compressed_bodies_are_redacted_and_reencoded(redactor: Redactor, enc: str) -> None:
    plan = redactor.plan(["$.ssn"], ["email"])
    raw = json.dumps({"ssn": "123-45-6789", "e": "ann@example.com", "pad": "x" * 5000}).encode()
    out, report = plan.redact_body(ENCODERS[enc](raw), content_type="application/json", content_encoding=enc)
    doc = json.loads(DECODERS[enc](out))
    assert doc["ssn"] == "[REDACTED:field]" and doc["e"] == "[REDACTED:email]"
    assert report.counts == {"field": 1, "email": 1}
    clean = ENCODERS[enc](b'{"nothing": "here"}')
    assert plan.redact_body(clean, content_type="application/json", content_encoding=enc)[0] is clean


def test_raw_deflate_and_stacked_encodings(redactor: Redactor) -> None:
    plan = redactor.plan([], ["email"])
    out, _ = plan.redact_body(_raw_deflate(b"to ann@example.com"), content_type="text/plain", content_encoding="deflate")
    assert zlib.decompress(out, -zlib.MAX_WBITS) == b"to [REDACTED:email]"
    stacked = brotli.compress(gzip.compress(b"to ann@example.com"))
    out, _ = plan.redact_body(stacked, content_type="text/plain", content_encoding="gzip, br")
    assert gzip.decompress(brotli.decompress(out)) == b"to [REDACTED:email]"
    with pytest.raises(NotRedactable) as ei:
        plan.redact_body(b"x", content_type="text/plain", content_encoding="compress")
    assert ei.value.reason == "unsupported_encoding"


# -- limits and hostile input -----------------------------------------------------------------
def reason(plan, body: bytes, ct: str = "application/json", enc: str | None = None) -> str:
    with pytest.raises(NotRedactable) as ei:
        plan.redact_body(body, content_type=ct, content_encoding=enc)
    assert ei.value.code == "response_not_redactable"
    return ei.value.reason


@pytest.mark.parametrize("enc", sorted(ENCODERS))
def test_decompression_bomb_is_stopped_at_the_limit(enc: str) -> None:
    plan = Redactor(RedactionSettings(max_decoded_bytes=1 << 20)).plan([], ["email"])
    bomb = ENCODERS[enc](b" " * (8 << 20))
    assert len(bomb) < 64 << 10
    assert reason(plan, bomb, "text/plain", enc) == "decompression_limit"


def test_too_large_undecodable_and_truncated_bodies() -> None:
    plan = Redactor(RedactionSettings(max_inspect_bytes=1000)).plan([], ["email"])
    assert reason(plan, b"x" * 1001, "text/plain") == "too_large"
    assert reason(plan, gzip.compress(b"x" * 5000), "text/plain", "gzip") == "decompression_limit"
    assert reason(plan, b"definitely not gzip", "text/plain", "gzip") == "undecodable"
    assert reason(plan, gzip.compress(b"hello ann@example.com")[:-6], "text/plain", "gzip") == "undecodable"
    assert reason(plan, zstandard.ZstdCompressor().compress(b"x" * 100)[:-3], "text/plain", "zstd") == "undecodable"


def test_invalid_utf8_json_and_invalid_json(redactor: Redactor) -> None:
    assert reason(redactor.plan([], ["email"]), b'{"a": "\xff\xfe"}') == "invalid_utf8"
    assert reason(redactor.plan(["$.a"], []), b'{"a": ') == "invalid_json"
    # Without field paths an unparsable "JSON" body is still scanned as text.
    out, _ = redactor.plan([], ["email"]).redact_body(b"<html>ann@example.com", content_type="application/json",
                                                      content_encoding=None)
    assert out == b"<html>[REDACTED:email]"


@pytest.mark.parametrize("depth", [129, 600, 100_000])
def test_deep_nesting_is_refused_not_crashed(redactor: Redactor, depth: int) -> None:
    plan = redactor.plan(["$..x"], ["email"])
    body = b"[" * depth + b"]" * depth
    assert reason(plan, body) == "json_too_deep"
    assert reason(plan, b'{"a":' * depth + b"1" + b"}" * depth) == "json_too_deep"
    ok = b"[" * 120 + b'"a@example.com"' + b"]" * 120
    assert b"[REDACTED:email]" in plan.redact_body(ok, content_type="application/json", content_encoding=None)[0]


def test_deep_python_values_and_filter_paths_are_refused(redactor: Redactor) -> None:
    deep: list = []
    cur = deep
    for _ in range(50_000):
        nxt: list = []
        cur.append(nxt)
        cur = nxt
    for plan in (redactor.plan([], ["email"]), redactor.plan(["$..[?@.x]"], []), redactor.plan(["$..x"], [])):
        with pytest.raises(NotRedactable) as ei:
            plan.redact_json_value(deep)
        assert ei.value.reason == "json_too_deep"
    # A path that cannot match below the root never needs to look deeper.
    assert redactor.plan(["$.a"], []).redact_json_value(deep)[0] is deep


def test_huge_array_is_handled(redactor: Redactor) -> None:
    plan = redactor.plan(["$[5]"], ["payment_card"])
    body = b"[" + b",".join([b"0"] * 1_000_000) + b"]"
    out, report = plan.redact_body(body, content_type="application/json", content_encoding=None)
    assert report.counts == {"field": 1} and out.startswith(b'[0,0,0,0,0,"[REDACTED:field]",0')


HOSTILE = ["eyJ" * 70_000, "2eyJ" * 50_000, "http://x@y " + "a" * 200_000, "x@" + "a." * 100_000,
           "-----BEGIN " + "A " * 100_000, "a://" * 50_000 + "@", "::" * 100_000, "xoxb-1-" * 30_000,
           "password=" * 20_000, "AKIA" * 50_000]


@pytest.mark.timeout(60)
def test_hostile_strings_scan_in_linear_time(redactor: Redactor) -> None:
    """Patterns are anchored/possessive: a quadratic pattern would take minutes on these."""
    plan = redactor.plan([], ["all"])
    body = "\n".join(HOSTILE).encode()
    out, _ = plan.redact_body(body, content_type="text/plain", content_encoding=None)
    assert len(out) > 0


# -- SSE --------------------------------------------------------------------------------------
SSE_STREAM = (
    b": keep-alive comment\n\n"
    b"event: message\nid: 1\ndata: {\"user\": {\"email\": \"ann@example.com\"},\n"
    b"data:  \"ssn\": \"123-45-6789\"}\n\n"
    b"data: plain text for bob@example.com\ndata: second line\r\n\r\n"
    b"retry: 1000\n\n"
    b"data: [DONE]\n\n"
)
SSE_EXPECTED = (
    b": keep-alive comment\n\n"
    b"event: message\nid: 1\ndata: {\"user\":{\"email\":\"[REDACTED:email]\"},\"ssn\":\"[REDACTED:field]\"}\n\n"
    b"data: plain text for [REDACTED:email]\ndata: second line\r\n\r\n"
    b"retry: 1000\n\n"
    b"data: [DONE]\n\n"
)


def test_sse_whole_body(redactor: Redactor) -> None:
    plan = redactor.plan(["$..ssn"], ["email"])
    out, report = plan.redact_body(SSE_STREAM, content_type="text/event-stream", content_encoding=None)
    assert out == SSE_EXPECTED
    assert report.counts == {"email": 2, "field": 1}
    assert report.paths == ["event[1]:$.user.email", "event[1]:$.ssn"]


def test_sse_byte_by_byte_streams_each_event_when_complete(redactor: Redactor) -> None:
    sse = redactor.plan(["$..ssn"], ["email"]).sse()
    out = bytearray()
    first_event_end = SSE_STREAM.index(b"\n\n") + 2
    second_event_end = SSE_STREAM.index(b"\n\n", first_event_end) + 2
    for i in range(len(SSE_STREAM)):
        piece = sse.feed(SSE_STREAM[i:i + 1])
        out += piece
        if i + 1 == second_event_end:  # emitted as soon as its blank line arrives
            assert out.endswith(b"\"[REDACTED:field]\"}\n\n")
        elif i + 1 < first_event_end:
            assert piece == b""
    out += sse.close()
    assert bytes(out) == SSE_EXPECTED
    assert sse.report.counts == {"email": 2, "field": 1}


def test_sse_crlf_split_across_chunks_and_unterminated_tail(redactor: Redactor) -> None:
    sse = redactor.plan([], ["email"]).sse()
    assert sse.feed(b"data: a@example.com\r\n\r") == b""  # CR might begin a CRLF: wait
    assert sse.feed(b"\ndata: b@example.com") == b"data: [REDACTED:email]\r\n\r\n"
    assert sse.close() == b"data: [REDACTED:email]"


def test_sse_stream_starting_with_a_bom(redactor: Redactor) -> None:
    sse = redactor.plan([], ["email"]).sse()
    out = sse.feed(b"\xef\xbb\xbfdata: a@example.com\n\n") + sse.close()
    assert out == b"\xef\xbb\xbfdata: [REDACTED:email]\n\n"


@pytest.mark.parametrize("enc", sorted(ENCODERS))
def test_sse_compressed_stream(redactor: Redactor, enc: str) -> None:
    plan = redactor.plan([], ["email"])
    events = [b"data: {\"e\": \"ann@example.com\"}\n\n", b"data: nothing\n\n", b"data: bob@example.com\n\n"]
    wire = ENCODERS[enc](b"".join(events))
    sse = plan.sse(enc)
    out = b"".join(sse.feed(wire[i:i + 7]) for i in range(0, len(wire), 7)) + sse.close()
    assert DECODERS[enc](out) == (b"data: {\"e\":\"[REDACTED:email]\"}\n\n"
                                  b"data: nothing\n\ndata: [REDACTED:email]\n\n")


@pytest.mark.parametrize("depth", [200, 100_000])
def test_sse_deeply_nested_event_is_refused(redactor: Redactor, depth: int) -> None:
    sse = redactor.plan([], ["email"]).sse()
    assert sse.feed(b"data: {\"ok\": 1}\n\n") == b"data: {\"ok\": 1}\n\n"
    with pytest.raises(NotRedactable) as ei:
        sse.feed(b"data: " + b"[" * depth + b"]" * depth + b"\n\n")
    assert ei.value.reason == "json_too_deep"


def test_sse_event_too_large() -> None:
    sse = Redactor(RedactionSettings(max_inspect_bytes=1000)).plan([], ["email"]).sse()
    sse.feed(b"data: " + b"x" * 900)
    with pytest.raises(NotRedactable) as ei:
        sse.feed(b"y" * 200)
    assert ei.value.reason == "sse_event_too_large"


# -- async ------------------------------------------------------------------------------------
async def _redact_counting_loop_ticks(plan: Any, body: bytes) -> tuple[int, bytes, RedactionReport]:
    """Redact ``body`` with ``redact_body_async`` while counting event-loop turns."""
    done = threading.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        out, report = await plan.redact_body_async(body, content_type="application/json", content_encoding=None)
    finally:
        done.set()
        await task
    return ticks, out, report


async def test_redact_body_async_goes_off_the_loop_above_the_threshold() -> None:
    plan = Redactor(RedactionSettings(thread_threshold_bytes=64 << 10)).plan(["$..ssn"], ["all"])
    big = json.dumps([{"ssn": "1", "note": f"mail u{i}@example.com or call (415) 555-{i % 10000:04d}"}
                      for i in range(3000)]).encode()
    small = b'{"ssn": "1", "e": "a@example.com"}'

    ticks_big, out_big, _ = await _redact_counting_loop_ticks(plan, big)
    assert ticks_big > 0  # the event loop kept running while the worker process redacted
    assert out_big == plan.redact_body(big, content_type="application/json", content_encoding=None)[0]
    ticks_small, out_small, _ = await _redact_counting_loop_ticks(plan, small)
    assert ticks_small == 0  # below the threshold: inline, no hop off the loop
    assert json.loads(out_small) == {"ssn": "[REDACTED:field]", "e": "[REDACTED:email]"}


async def test_large_body_is_redacted_in_a_worker_process() -> None:
    plan = Redactor(RedactionSettings(thread_threshold_bytes=1024)).plan(["$.rows[0].id"], ["email"])
    assert plan is not None
    email = "ada@example.com"
    body = json.dumps({"rows": [{"id": i, "email": email, "note": "x" * 40} for i in range(4000)]}).encode()
    ticks, out, report = await _redact_counting_loop_ticks(plan, body)
    doc = json.loads(out)
    assert email.encode() not in out and doc["rows"][0]["id"] == "[REDACTED:field]"
    assert report.counts == {"field": 1, "email": 4000}
    assert ticks > 10, "the event loop must keep running while a large body is redacted"


async def test_worker_errors_fail_closed_with_their_reason() -> None:
    plan = Redactor(RedactionSettings(thread_threshold_bytes=16)).plan([], ["email"])
    assert plan is not None
    with pytest.raises(NotRedactable) as err:
        await plan.redact_body_async(b"\x89PNG" + b"\0" * 64, content_type="image/png", content_encoding=None)
    assert err.value.reason == "unsupported_content_type" and err.value.code == "response_not_redactable"


# -- audit hygiene ----------------------------------------------------------------------------
def test_scrub_text_removes_secrets_from_a_query_string() -> None:
    q = f"q=printer&access_token={JWT}&key={AWS_ID}&page=2"
    out = scrub_text(q)
    assert JWT not in out and AWS_ID not in out
    assert out == "q=printer&access_token=[REDACTED:jwt]&key=[REDACTED:aws_access_key]&page=2"
    assert scrub_text("page=2&sort=desc") == "page=2&sort=desc"
    assert scrub_text("") == ""
    assert scrub_text("to ann@example.com card 4111111111111111 ip 10.0.0.1") == \
        "to [REDACTED:email] card [REDACTED:payment_card] ip 10.0.0.1"


def test_scrub_value_walks_arguments_and_never_raises() -> None:
    args = {"query": "ssn 123-45-6789", "password": "hunter22", "nested": [{"auth": f"Bearer {JWT}"}], "n": 5}
    out = scrub_value(args)
    assert out == {"query": "ssn [REDACTED:us_ssn]", "password": "[REDACTED:api_key]",
                   "nested": [{"auth": "[REDACTED:api_key]"}], "n": 5}
    assert args["password"] == "hunter22"  # not mutated
    deep: Any = "x@example.com"
    for _ in range(10_000):
        deep = [deep]
    assert "x@example.com" not in json.dumps(scrub_value(deep))
