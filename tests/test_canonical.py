"""Canonicalisation: every spelling of a host or path that reaches the same resource maps to one
form, and spellings whose meaning differs between servers are refused."""

from __future__ import annotations

import pytest

from gateway.canonical import canonical_host, canonical_path, canonical_port, check_query, parse_query
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
        "exa\x85mple.com", "example.com\x9f", "exa%C2%85mple.com",  # C1 controls, raw or encoded
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
        ("/a%3fb%23c%20d", "/a%3Fb%23c%20d", ["a?b#c d"]),
        ("/caf%c3%a9", "/caf%C3%A9", ["café"]),
        ("/café", "/caf%C3%A9", ["café"]),
        ("/a b", "/a%20b", ["a b"]),
        ("/a:b@c=d,e+f!$&'()*", "/a:b@c=d,e+f!$&'()*", ["a:b@c=d,e+f!$&'()*"]),
        # Non-ASCII text is kept, NFKC-changing or not, unless it normalises to a separator or
        # dot-segment (below); "。" (U+3002) is a dot only in host names (IDNA), not in paths.
        ("/日本語/ページ", "/%E6%97%A5%E6%9C%AC%E8%AA%9E/%E3%83%9A%E3%83%BC%E3%82%B8", ["日本語", "ページ"]),
        ("/ｆｕｌｌ/100％/½/a．b/．．x", "/%EF%BD%86%EF%BD%95%EF%BD%8C%EF%BD%8C/100%EF%BC%85/%C2%BD/a%EF%BC%8Eb/"
         "%EF%BC%8E%EF%BC%8Ex", ["ｆｕｌｌ", "100％", "½", "a．b", "．．x"]),
        ("/。。/x", "/%E3%80%82%E3%80%82/x", ["。。", "x"]),
        ("/a；b", "/a%EF%BC%9Bb", ["a；b"]),  # parameters are stripped from the raw path, not the NFKC form
        ("/a/b;c/../d", "/a/d", ["a", "d"]),  # the ';' segment is resolved away: not forwarded
        ("/100%25", "/100%25", ["100%"]),
        # Next to the C1 controls (refused below) but not one: U+00A0, U+00C5 ("\xc3\x85").
        ("/a%C2%A0b/%c3%85", "/a%C2%A0b/%C3%85", ["a\xa0b", "\xc5"]),
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
    "raw",
    [
        "/a%0Ab", "/a%7F", "/a%1b",  # C0 and DEL
        # C1 (U+0080..U+009F in UTF-8): U+0085 NEL is a line break for some parsers.
        "/a%C2%85b", "/a%c2%85b", "/%C2%80", "/x/%C2%9F/y", "/a%C2%8d%C2%8a",
        "/a%25C2%2585b", "/a%25c2%25%38%35b",  # double-encoded
    ],
)
def test_encoded_control_characters_are_rejected(raw: str) -> None:
    """Encoded C1 controls are refused as encoded C0 ones are, on either ';' setting."""
    err = _rejects(canonical_path, raw, "ambiguous_path")
    assert "encoded control character" in err.message
    with pytest.raises(BadRequest, match="encoded control character"):
        canonical_path(raw, literal_semicolons=True)


@pytest.mark.parametrize(
    "raw",
    [
        "/admin;x=1/users", "/admin;/users", "/api/v1;jsessionid=ABC", "/;x/admin", "/x/admin;",
        "/admin%3Bx=1/users", "/admin%3bx=1/users", "/admin%253Bx=1/users",  # decoded before stripping
    ],
)
def test_path_parameters_are_rejected(raw: str) -> None:
    """Tomcat, Jetty and Spring strip ';params': /admin;x=1/users is /admin/users to them."""
    err = _rejects(canonical_path, raw, "ambiguous_path")
    assert "';' in segment" in err.message


def test_literal_semicolons_keep_path_parameters_as_text() -> None:
    """For an upstream that reads ';' as an ordinary character: the segment as it reads it."""
    assert canonical_path("/admin;x=1/users", literal_semicolons=True) == \
        ("/admin;x=1/users", ["admin;x=1", "users"])
    assert canonical_path("/a%3bb", literal_semicolons=True) == ("/a%3Bb", ["a;b"])
    for raw in ("/api/..;/admin", "/api/．．;x/admin"):  # a dot-segment stays refused
        with pytest.raises(BadRequest, match="normalises|dot-segment"):
            canonical_path(raw, literal_semicolons=True)
    _rejects(canonical_path, "/admin;x=1/users", "ambiguous_path")  # the memo serves both settings


@pytest.mark.parametrize(
    "raw",
    [
        "/api/．．/admin", "/api/%EF%BC%8E%EF%BC%8E/admin", "/api/%ef%bc%8e./admin", "/．/admin",
        "/api/‥/admin", "/api/…/admin", "/api/﹒﹒/admin", "/api/︰/admin",  # U+2025, U+2026, U+FE52, U+FE30
        "/api/．．；x/admin", "/api/．． /admin", "/api/..\u00a0/admin", "/api/．．\u3000/admin",
        "/api/a／b", "/api/a%EF%BC%8Fb", "/api/a＼b", "/api/a﹨b", "/api/℅",  # "／" "＼" "﹨", "c/o"
        "/api/％２Ｅ％２Ｅ/admin", "/api/％２ｆ", "/api/%EF%BC%85%EF%BC%95%EF%BC%A3",  # "%2E%2E", "%2f", "%5C"
        "/api/％００",
        "/api/%25EF%25BC%258E%25EF%25BC%258E/admin",  # double-encoded "．．"
    ],
)
def test_unicode_that_normalises_to_a_dot_segment_or_separator_is_rejected(raw: str) -> None:
    """IIS/.NET and some Java and Python frameworks apply NFKC: "．．" is ".." there."""
    err = _rejects(canonical_path, raw, "ambiguous_path")
    assert "NFKC" in err.message


def test_ascii_segments_never_pay_for_unicode_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import canonical as c

    class NoUnicode:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"unicodedata.{name} called on an ASCII path")

    monkeypatch.setattr(c, "unicodedata", NoUnicode())
    assert c._canonical_path("/v1/chat/%63ompletions/a%20b/%2e/") == \
        ("/v1/chat/completions/a%20b/", ("v1", "chat", "completions", "a b"), None)


@pytest.mark.parametrize(
    "raw", ["", "*", "admin", "api/x", "http://example.com/x", "/a%", "/a%2", "/a%zz", "/a%g0",
            "/a\x00b", "/a\tb", "/a\x7fb", "/%ff", "/a/%c3",
            "/a\x85b", "/a\x80", "/\x9f/b",  # raw C1 controls, as raw C0 ones
            "/a\udcc2\udc85b",  # the UTF-8 of U+0085 passed on as surrogate escapes
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


@pytest.mark.parametrize("qs", ["a=1;b=2", ";", "a=1&b=2;c", "q=select;drop", "a;b"])
def test_semicolon_in_query_is_refused(qs: str) -> None:
    """Rack, older Go and Python split on ';' as well as '&': a=1;b=2 is two parameters there."""
    err = _rejects(check_query, qs, "ambiguous_query")
    assert "%3B" in err.message
    check_query(qs, literal_semicolons=True)  # an upstream that splits on '&' alone


@pytest.mark.parametrize("qs", ["", "a=1&b=2", "a=1%3Bb=2", "a=%3b", "k=v%253B"])
def test_query_without_a_raw_semicolon_passes(qs: str) -> None:
    check_query(qs)


def test_parse_query_refuses_non_utf8() -> None:
    _rejects(parse_query, "a=%ff", "invalid_query")
    _rejects(parse_query, "a=1\r\nb=2", "invalid_query")


def test_query_controls_raw_refused_encoded_kept_c0_and_c1_alike() -> None:
    """Unlike a path segment, a query value may hold an encoded line break: it is data, C0 or C1."""
    for qs in ("a=\x85", "a=\x9f", "a=\x0b"):
        _rejects(parse_query, qs, "invalid_query")
    assert parse_query("a=%0A&b=%C2%85") == {"a": ["\n"], "b": ["\x85"]}


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
            canonical_path("/a/．．/b")
        with pytest.raises(BadRequest):
            canonical_host("a b")
    long = "/" + "x" * (c._MEMO_MAX_LEN + 10)
    assert canonical_path(long) == (long, ["x" * (c._MEMO_MAX_LEN + 10)])
    assert c._path_memo.cache_info().currsize <= c._MEMO_ENTRIES
