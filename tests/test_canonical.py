"""Canonicalisation: every spelling of a host or path that reaches the same resource maps to one
form, and spellings whose meaning differs between servers are refused."""

from __future__ import annotations

import pytest

from gateway.canonical import canonical_host, canonical_path, canonical_port, parse_query
from gateway.errors import BadRequest


def _rejects(fn, value, code: str) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        fn(value)
    assert info.value.code == code, info.value.message
    assert info.value.status == 400
    return info.value


# Host ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("api.example.com", "api.example.com"),
        ("API.EXAMPLE.COM.", "api.example.com"),
        ("Api.Example.Com", "api.example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example.", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),  # non-transitional UTS-46: ß is kept, not mapped to "ss"
        ("ＡＰＩ．example．com", "api.example.com"),  # fullwidth letters and dots (UTS-46 mapping)
        ("[::1]", "::1"),
        ("[2001:DB8:0:0::1]", "2001:db8::1"),
        ("::1", "::1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("10.1.", "10.0.0.1"),
        ("my_service", "my_service"),
        ("123abc.example", "123abc.example"),
        ("a" * 63 + ".example", "a" * 63 + ".example"),
    ],
)
def test_canonical_host(raw: str, expected: str) -> None:
    assert canonical_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "", ".", "..", "a..b", ".example.com", "example.com..",
        "exa mple.com", "user@example.com", "example.com/admin", "example.com\\x",
        "exa%6dple.com", "example.com\x00", "example.com\r\n", "\texample.com",
        "-example.com", "example-.com", "a" * 64 + ".example",
        ".".join(["a" * 63] * 4),  # 255 characters
        "xn--zz.example",  # not valid punycode
        "example.com:8080", "[::1", "[not-ipv6]", "[fe80::1%25eth0]",
        "256.0.0.1", "1.2.3.4.5", "0x100000000", "09.1.1.1",
        "a／b.example",  # fullwidth solidus maps to "/"
    ],
)
def test_bad_hosts_are_rejected(raw: str) -> None:
    _rejects(canonical_host, raw, "invalid_host")


def test_host_length_limit_is_253() -> None:
    ok = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(ok) == 253
    assert canonical_host(ok) == ok
    _rejects(canonical_host, ok + "d", "invalid_host")


# Port ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("scheme", "port", "expected"),
    [
        ("http", 80, None), ("https", 443, None), ("HTTPS", 443, None), ("http", None, None),
        ("http", 443, 443), ("https", 80, 80), ("https", 8443, 8443), ("http", "8080", 8080),
        ("https", "443", None),
    ],
)
def test_canonical_port(scheme: str, port: int | str | None, expected: int | None) -> None:
    assert canonical_port(scheme, port) == expected


@pytest.mark.parametrize("port", [0, 65536, -1, "x", "8o", "٣", True])
def test_bad_ports_are_rejected(port: object) -> None:
    with pytest.raises(BadRequest) as info:
        canonical_port("https", port)  # type: ignore[arg-type]
    assert info.value.code == "invalid_port"


# Path ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "path", "segments"),
    [
        # Encoded and plain dot-segments are resolved before policy sees the path.
        ("/api/%2e%2e/admin", "/admin", ["admin"]),
        ("/api/%2E%2E/admin", "/admin", ["admin"]),
        ("/api/.%2E/admin", "/admin", ["admin"]),
        ("/api/./x/../admin", "/api/admin", ["api", "admin"]),
        ("/api/%2e/admin", "/api/admin", ["api", "admin"]),
        ("/../../admin", "/admin", ["admin"]),
        ("/a/b/..", "/a/", ["a"]),
        ("/a/b/.", "/a/b/", ["a", "b"]),
        # Repeated slashes collapse (before dot resolution, as nginx's merge_slashes does).
        ("//admin", "/admin", ["admin"]),
        ("/a//b///c", "/a/b/c", ["a", "b", "c"]),
        ("/a//../b", "/b", ["b"]),
        ("/", "/", []),
        ("//", "/", []),
        ("/a/b/", "/a/b/", ["a", "b"]),
        # Unreserved characters are decoded; other escapes are kept, in upper case.
        ("/%61dmin", "/admin", ["admin"]),
        ("/%41%7a%30%2D%2e%5F%7E", "/Az0-._~", ["Az0-._~"]),
        ("/a%3fb%3Bc%20d", "/a%3Fb%3Bc%20d", ["a?b;c d"]),
        ("/caf%c3%a9", "/caf%C3%A9", ["café"]),
        ("/café", "/caf%C3%A9", ["café"]),
        ("/a b", "/a%20b", ["a b"]),
        ("/a:b@c;d=e,f+g!$&'()*", "/a:b@c;d=e,f+g!$&'()*", ["a:b@c;d=e,f+g!$&'()*"]),
        ("/100%25", "/100%25", ["100%"]),
        ("/v1/chat/completions", "/v1/chat/completions", ["v1", "chat", "completions"]),
    ],
)
def test_canonical_path(raw: str, path: str, segments: list[str]) -> None:
    assert canonical_path(raw) == (path, segments)


def test_canonical_path_is_idempotent() -> None:
    for raw in ("/api/%2e%2e/admin", "/a//b/%7euser/caf%c3%a9/x%3a", "/a/b/./", "/%41/"):
        once, segments = canonical_path(raw)
        assert canonical_path(once) == (once, segments)


@pytest.mark.parametrize(
    "raw",
    [
        "/api/..%2Fadmin", "/api/..%2fadmin", "/a%2Fb", "/files/a%2fb/c",
        "/a%5Cb", "/a%5c..%5cadmin", "/a\\b", "/api\\..\\admin",
        "/a%00", "/admin%00.json", "/a%0d%0aSet-Cookie:x",
        "/api/..;/admin", "/api/..;jsessionid=1/admin", "/api/.;/admin",
        "/api/%252e%252e/admin", "/api/%25252e%25252e/admin", "/a%252Fb", "/a%255Cb", "/a%2500",
        "/api/.. /admin", "/api/..%20/admin", "/api/.../admin",
        "/a/%" + "25" * 9 + "41",  # nested ten deep: refused rather than decoded on and on
    ],
)
def test_ambiguous_paths_are_rejected(raw: str) -> None:
    err = _rejects(canonical_path, raw, "ambiguous_path")
    assert "ambiguous path" in err.message


@pytest.mark.parametrize(
    "raw", ["", "*", "admin", "api/x", "http://example.com/x", "/a%", "/a%2", "/a%zz", "/a%g0",
            "/a\x00b", "/a\tb", "/a\x7fb", "/%ff", "/a/%c3",
            "/a\udcffb",  # an undecodable byte passed on as a surrogate escape
            "/a\ud800b"],
)
def test_invalid_paths_are_rejected(raw: str) -> None:
    _rejects(canonical_path, raw, "invalid_path")


def test_bypass_spellings_all_reach_one_form() -> None:
    spellings = ["/admin", "//admin", "/api/../admin", "/api/%2e%2e/admin", "/api/%2E%2E/admin",
                 "/x/./../admin", "/%61dmin", "/%61%64%6D%69%6E", "///admin"]
    assert [canonical_path(s) for s in spellings] == [("/admin", ["admin"])] * len(spellings)


# Query --------------------------------------------------------------------------------------

def test_parse_query() -> None:
    assert parse_query("") == {}
    assert parse_query("a=1&a=2&b&c=&d=x+y%20z&e=%26%3D") == {
        "a": ["1", "2"], "b": [""], "c": [""], "d": ["x y z"], "e": ["&="],
    }
    assert parse_query("k%20ey=v&&caf%C3%A9=1") == {"k ey": ["v"], "café": ["1"]}
    assert parse_query("a=1;b=2") == {"a": ["1;b=2"]}  # only "&" separates, as in Go


def test_parse_query_refuses_non_utf8() -> None:
    _rejects(parse_query, "a=%ff", "invalid_query")
    _rejects(parse_query, "a=1\r\nb=2", "invalid_query")


def test_memoised_answers_are_the_computed_ones_and_private() -> None:
    """canonical_host/path remember short inputs: a repeat gives the same answer, a refusal is
    refused every time, and a caller changing its segment list changes nobody else's."""
    from gateway import canonical as c
    for host in ("EXAMPLE.com.", "0x7f.1", "[::FFFF:127.0.0.1]", "Bücher.example"):
        assert canonical_host(host) == canonical_host(host) == c._canonical_host(host)
    first = canonical_path("/a/./b/%7Euser/")
    first[1].append("poison")
    assert canonical_path("/a/./b/%7Euser/") == ("/a/b/~user/", ["a", "b", "~user"])
    for _ in range(2):
        with pytest.raises(BadRequest):
            canonical_path("/a/%2F/b")
        with pytest.raises(BadRequest):
            canonical_host("a b")
    long = "/" + "x" * (c._MEMO_MAX_LEN + 10)
    assert canonical_path(long) == (long, ["x" * (c._MEMO_MAX_LEN + 10)])
    assert c._path_memo.cache_info().currsize <= c._MEMO_ENTRIES
