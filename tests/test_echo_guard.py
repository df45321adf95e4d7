"""The search for a route's credential in what the upstream sends back (gateway/echo_guard.py)."""

from __future__ import annotations

import base64
import gzip

import pytest
from multidict import CIMultiDict

from gateway.echo_guard import REPLACEMENT, EchoGuard, secret_forms
from gateway.errors import GatewayError

TOKEN = "tok/EN+abc=12345"


def guard(value: str = f"Bearer {TOKEN}") -> EchoGuard:
    return EchoGuard(value, decode_limit=1 << 20)


def test_forms_of_a_bearer_token() -> None:
    assert set(secret_forms(f"Bearer {TOKEN}")) == {TOKEN, "tok\\/EN+abc=12345", "tok%2FEN%2Babc%3D12345"}


def test_a_basic_credential_gives_its_password_away_too() -> None:
    value = "Basic " + base64.b64encode(b"svc-user:correct-horse").decode()
    forms = secret_forms(value)
    assert "correct-horse" in forms and "svc-user:correct-horse" in forms


def test_short_values_are_not_searched_for() -> None:
    g = guard("abc123")
    assert not g.active and g.bytes(b"abc123") == (b"abc123", 0)


@pytest.mark.parametrize("cut", range(0, 40))
def test_a_stream_is_cut_wherever_its_chunks_split(cut: int) -> None:
    data = f"head {TOKEN} middle {TOKEN}".encode()
    scanner = guard().stream()
    out = scanner.feed(data[:cut]) + scanner.feed(data[cut:]) + scanner.close()
    assert out == b"head " + REPLACEMENT + b" middle " + REPLACEMENT and scanner.count == 2


def test_a_stream_holds_back_only_what_could_begin_the_credential() -> None:
    scanner = guard().stream()
    assert scanner.feed(b"data: hello\n\n") == b"data: hello\n\n"
    assert scanner.feed(b"data: tok/E") == b"data: "  # may be the credential: kept for the next chunk
    assert scanner.feed(b"ntirely different\n\n") == b"tok/Entirely different\n\n"


def test_every_value_of_a_repeated_header() -> None:
    headers = CIMultiDict([("X-Echo", f"Bearer {TOKEN}"), ("X-Echo", f"again {TOKEN}"), ("Other", "fine")])
    assert guard().headers(headers) == 2
    assert headers.getall("X-Echo") == [f"Bearer {REPLACEMENT.decode()}", f"again {REPLACEMENT.decode()}"]
    assert headers["Other"] == "fine"


def test_a_coded_body_is_checked_not_rewritten() -> None:
    g = guard()
    clean = gzip.compress(b"nothing")
    assert g.whole(clean, "gzip", []) == (clean, 0)
    reasons: list[str] = []
    with pytest.raises(GatewayError) as exc:
        g.whole(gzip.compress(TOKEN.encode()), "gzip", reasons)
    assert exc.value.code == "credential_echoed" and exc.value.status == 502 and reasons
    with pytest.raises(GatewayError) as exc:
        g.whole(b"not gzip at all", "gzip", [])
    assert exc.value.code == "response_not_checkable"
    with pytest.raises(GatewayError) as exc:
        g.whole(b"x", "compress", [])  # a coding the gateway cannot decode
    assert exc.value.code == "response_not_checkable"


def test_identity_coding_is_no_coding() -> None:
    assert guard().whole(TOKEN.encode(), "identity", []) == (REPLACEMENT, 1)


def test_the_bare_secret_behind_a_configured_prefix() -> None:
    """A prefix that is no auth scheme (``token=``): the bare value is searched for as well."""
    assert "s3cret-value-123" in secret_forms("token=s3cret-value-123", "s3cret-value-123")
