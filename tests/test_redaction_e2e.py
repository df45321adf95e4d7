"""Response redaction through a real gateway and a real upstream: every content type and
encoding, SSE with slow events, the fail-closed limits, and audit rows that carry paths and
counts, never values. The test bundle redacts responses under /pii."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlencode

import pytest
from aiohttp import web

from tests.conftest import Gateway, Keys, Upstream, http, start_upstream
from tests.codecs import DECODERS, ENCODERS

CALL_ID = "x-agentgate-call-id"
EMAIL = "ada.lovelace@example.com"
PHONE = "+1 415 555 0100"
SSN = "123-45-6789"
CARD = "4111 1111 1111 1111"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
ORDER_ID = "ORD-2024-000123"
SECRETS = (EMAIL, PHONE, SSN, CARD, AWS_KEY, "1234567890123456", "top-secret-value")

TICKET = {"ticket": {"id": 7, "order": ORDER_ID, "subject": f"Customer {EMAIL} called from {PHONE}",
                     "requester": {"email": EMAIL, "phone": PHONE}},
          "customer": {"ssn": SSN, "card": CARD, "note": "card ends 1111"},
          "debug": {"aws": AWS_KEY, "secret_field": "top-secret-value"}}


def body_for(kind: str) -> tuple[bytes, str]:
    if kind == "json":
        return json.dumps(TICKET).encode(), "application/json"
    if kind == "ndjson":
        return b"\n".join(json.dumps(t).encode() for t in (TICKET, {"email": EMAIL})) + b"\n", "application/x-ndjson"
    if kind == "text":
        return f"Call {PHONE} or write to {EMAIL}; SSN {SSN}; order {ORDER_ID}".encode(), "text/plain; charset=utf-8"
    if kind == "form":
        return urlencode({"email": EMAIL, "order": ORDER_ID}).encode(), "application/x-www-form-urlencoded"
    if kind == "png":
        return b"\x89PNG\r\n\x1a\n" + EMAIL.encode(), "image/png"
    if kind == "deep":
        return b"[" * 100_000 + b"]" * 100_000, "application/json"
    if kind == "badutf8":
        return b'{"email": "\xff\xfe' + EMAIL.encode() + b'"}', "application/json"
    raise ValueError(kind)


# Quick to send, slow to redact: ~8 KB on the wire, 90,000 emails (900 KB) once inflated.
MANY_EMAILS = 90_000
MANY_EMAILS_GZIP = gzip.compress(json.dumps(["a@b.co"] * MANY_EMAILS).encode())


async def pii(request: web.Request) -> web.StreamResponse:
    kind = request.query.get("kind", "json")
    enc = request.query.get("enc")
    if kind == "sse":
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            event = json.dumps({"n": i, "email": EMAIL, "order": ORDER_ID}).encode()
            # An event split across writes, arriving slowly.
            await resp.write(b"data: " + event[:10])
            await asyncio.sleep(0.05)
            await resp.write(event[10:] + b"\n\n")
        await resp.write_eof()
        return resp
    if kind == "bomb":
        body = gzip.compress(b"{" + b" " * (8 << 20) + b"}")
        return web.Response(body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    if kind == "huge":
        return web.Response(body=json.dumps({"email": EMAIL, "pad": "x" * (200 << 10)}).encode(),
                            content_type="application/json")
    if kind == "many":
        return web.Response(body=MANY_EMAILS_GZIP, headers={"Content-Type": "application/json",
                                                            "Content-Encoding": "gzip"})
    body, ctype = body_for(kind)
    headers = {"Content-Type": ctype}
    if enc:
        body = ENCODERS[enc](body)
        headers["Content-Encoding"] = enc
    return web.Response(body=body, headers=headers)


@pytest.fixture(scope="module")
def pii_upstream(tmp_path_factory) -> Upstream:
    up = Upstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", pii)
    stop = start_upstream(up, tmp_path_factory.mktemp("pii"), app)
    yield up
    stop()


@pytest.fixture(scope="module")
def gw(gateway_factory, pii_upstream: Upstream) -> Gateway:
    return gateway_factory({
        "redaction": {"max_inspect_bytes": 128 << 10, "max_decoded_bytes": 1 << 20},
        "routes": {"pii": {"upstream": pii_upstream.url},
                   "lenient": {"upstream": pii_upstream.url, "unredactable": "pass"}},
    }, name="redaction")


def fetch(gw: Gateway, keys: Keys, route: str, path: str, **query: str):
    url = gw.route_url(route, path) + ("?" + urlencode(query) if query else "")
    return http("GET", url, headers={"Authorization": f"Bearer {keys.token('reader-bot')}",
                                     "Accept-Encoding": "gzip, deflate, br, zstd"})


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked"


def test_json_fields_and_detectors(gw: Gateway, keys: Keys) -> None:
    resp = fetch(gw, keys, "pii", "/pii/ticket", kind="json")
    assert resp.status == 200
    doc = resp.json()
    assert_clean(resp.body.decode())
    assert doc["ticket"]["requester"]["email"] == "[REDACTED:email]"
    assert doc["customer"]["ssn"] == "[REDACTED:field]"
    assert doc["debug"]["secret_field"] == "[REDACTED:field]"
    assert doc["ticket"]["order"] == ORDER_ID, "order numbers are not cards"
    assert "[REDACTED:payment_card]" in json.dumps(doc)
    assert doc["ticket"]["id"] == 7
    row = gw.audit_row(resp.headers[CALL_ID])
    assert "$.customer.ssn" in row["redacted_paths"] and "$.ticket.requester.email" in row["redacted_paths"]
    assert row["redaction_counts"]["field"] == 2 and row["redaction_counts"]["email"] >= 2
    assert_clean(json.dumps(row))


def test_text_is_refused_where_field_paths_apply(gw: Gateway, keys: Keys) -> None:
    """/pii's decision names JSON fields, which a text body cannot be checked for."""
    resp = fetch(gw, keys, "pii", "/pii/x", kind="text")
    assert resp.status == 502 and resp.json()["error"]["code"] == "response_not_redactable"
    assert_clean(resp.body.decode())
    assert gw.audit_row(resp.headers[CALL_ID])["outcome"] == "redaction_failed"


@pytest.mark.parametrize("kind", ["ndjson", "form"])
def test_other_content_types(gw: Gateway, keys: Keys, kind: str) -> None:
    resp = fetch(gw, keys, "pii", "/pii/x", kind=kind)
    assert resp.status == 200
    text = resp.body.decode()
    assert_clean(text)
    assert ORDER_ID in text
    if kind == "ndjson":
        lines = [json.loads(line) for line in text.splitlines() if line]
        assert len(lines) == 2 and lines[1]["email"] == "[REDACTED:email]"
    assert sum(gw.audit_row(resp.headers[CALL_ID])["redaction_counts"].values()) >= 1


@pytest.mark.parametrize("enc", sorted(ENCODERS))
def test_compressed_bodies_are_redacted_and_reencoded(gw: Gateway, keys: Keys, enc: str) -> None:
    resp = fetch(gw, keys, "pii", "/pii/x", kind="json", enc=enc)
    assert resp.status == 200
    assert resp.headers["content-encoding"] == enc
    assert int(resp.headers["content-length"]) == len(resp.body)
    plain = DECODERS[enc](resp.body).decode()
    assert_clean(plain)
    assert json.loads(plain)["ticket"]["order"] == ORDER_ID


def test_sse_is_redacted_event_by_event(gw: Gateway, keys: Keys) -> None:
    host, port = gw.routes.split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/r/pii/pii/stream?kind=sse", headers={"Authorization": f"Bearer {keys.token()}"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()  # the first event arrives before the stream ends
    assert first.startswith(b"data: ") and b"[REDACTED:email]" in first
    rest = resp.read()
    conn.close()
    events = [json.loads(line[6:]) for line in (first + rest).splitlines() if line.startswith(b"data: ")]
    assert [e["n"] for e in events] == [0, 1, 2]
    assert all(e["email"] == "[REDACTED:email]" and e["order"] == ORDER_ID for e in events)
    call_id = resp.headers[CALL_ID]
    assert gw.audit_row(call_id)["redaction_counts"] == {"email": 3}


@pytest.mark.parametrize("kind, reason", [("png", "unsupported_content_type"), ("bomb", "decompression_limit"),
                                          ("huge", "too_large"), ("deep", "json_too_deep"),
                                          ("badutf8", "invalid_utf8")])
def test_unredactable_responses_fail_closed(gw: Gateway, keys: Keys, kind: str, reason: str) -> None:
    resp = fetch(gw, keys, "pii", "/pii/x", kind=kind)
    assert resp.status == 502, resp.body[:200]
    err = resp.json()["error"]
    assert err["code"] == "response_not_redactable"
    assert EMAIL not in resp.body.decode("utf-8", "replace")
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] == "redaction_failed" and row["error_code"] == "response_not_redactable"


def test_route_may_pass_unredactable_responses_audited(gw: Gateway, keys: Keys) -> None:
    resp = fetch(gw, keys, "lenient", "/pii/x", kind="png")
    assert resp.status == 200 and EMAIL.encode() in resp.body
    row = gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] == "allowed" and row["redaction_counts"] == {"unredacted": 1}
    assert any("passed unredacted" in r for r in row["reasons"])


def test_bad_redaction_in_decision_fails_closed_before_upstream(gw: Gateway, keys: Keys,
                                                                pii_upstream: Upstream) -> None:
    resp = fetch(gw, keys, "pii", "/badredact")
    assert resp.status == 403
    assert resp.json()["error"]["code"] == "policy_error"
    assert "no_such_detector" in resp.json()["error"]["message"]


@pytest.fixture(scope="module")
def gw_defaults(gateway_factory, pii_upstream: Upstream) -> Gateway:
    """A gateway with the default redaction limits (8 MiB inspected, large bodies in a worker)."""
    return gateway_factory({"routes": {"pii": {"upstream": pii_upstream.url}}}, name="redaction-defaults")


def _children(pid: int) -> list[tuple[int, str]]:
    """``pid``'s child processes: (pid, command line)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    found.append((int(entry), f.read().replace(b"\0", b" ").decode()))
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone meanwhile
    return found


def _redaction_workers(gw: Gateway) -> list[int]:
    return [pid for pid, cmd in _children(gw.proc.pid) if "multiprocessing.spawn" in cmd]


def test_redaction_worker_starts_with_the_gateway(gw_defaults: Gateway) -> None:
    """Started on the first large body, the worker made that call wait ~1 s for a Python
    process to start and import the redaction library."""
    deadline = time.monotonic() + 60
    while not _redaction_workers(gw_defaults):
        assert time.monotonic() < deadline, _children(gw_defaults.proc.pid)
        time.sleep(0.05)  # polling for the process to appear, bounded by the deadline


def test_the_worker_leaves_with_a_gateway_killed_outright(gateway_factory, pii_upstream: Upstream) -> None:
    """kill -9 (or the OOM killer) gives the gateway no chance to stop its worker: the worker
    notices and leaves, rather than holding its memory for ever."""
    gw = gateway_factory({"routes": {"pii": {"upstream": pii_upstream.url}}}, name="redaction-killed")
    deadline = time.monotonic() + 60
    while not (workers := _redaction_workers(gw)):
        assert time.monotonic() < deadline, "no redaction worker started"
        time.sleep(0.05)  # polling for the process to appear, bounded by the deadline
    gw.proc.kill()
    gw.proc.wait()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{workers[0]}") and _state(workers[0]) != "Z":
        assert time.monotonic() < deadline, f"redaction worker {workers[0]} outlived its gateway"
        time.sleep(0.05)  # polling for the process to go, bounded by the deadline


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_redaction_worker_that_died_is_replaced(gw_defaults: Gateway, keys: Keys) -> None:
    """A worker killed from outside (the OOM killer) must not leave every later large body
    unredactable until the gateway restarts."""
    first = fetch(gw_defaults, keys, "pii", "/pii/huge", kind="huge")
    assert first.status == 200 and EMAIL not in first.body.decode()
    (worker,) = _redaction_workers(gw_defaults)
    os.kill(worker, signal.SIGKILL)
    for _ in range(2):  # the call that finds the pool broken, and the next
        resp = fetch(gw_defaults, keys, "pii", "/pii/huge", kind="huge")
        assert resp.status == 200, resp.body
        assert EMAIL not in resp.body.decode() and "[REDACTED:email]" in resp.body.decode()
    assert _redaction_workers(gw_defaults) not in ([], [worker])


def test_redaction_counts_as_gateway_time_not_upstream_time(gw_defaults: Gateway, keys: Keys) -> None:
    """The audit's upstream_ms stops when the upstream's body is in hand: an incident responder
    reading a slow call must not blame the upstream for the gateway's redaction."""
    resp = fetch(gw_defaults, keys, "pii", "/pii/many", kind="many")
    assert resp.status == 200 and b"a@b.co" not in gzip.decompress(resp.body)
    row = gw_defaults.audit_row(resp.headers[CALL_ID])
    assert row["redaction_counts"]["email"] == MANY_EMAILS
    # 8 KB from a loopback upstream vs 900 KB inflated, 90,000 matches rewritten, deflated again.
    assert row["gateway_ms"] > row["upstream_ms"], (row["gateway_ms"], row["upstream_ms"])


def test_redaction_does_not_block_other_requests(gw: Gateway, keys: Keys) -> None:
    """Large bodies are redacted off the event loop: small calls keep flowing meanwhile."""
    with ThreadPoolExecutor(6) as pool:
        big = [pool.submit(fetch, gw, keys, "pii", "/pii/big", kind="json") for _ in range(3)]
        small = [pool.submit(fetch, gw, keys, "pii", "/plain") for _ in range(20)]
        assert all(f.result().status == 200 for f in big + small)


def test_forward_mode_redacts_too(gw: Gateway, keys: Keys, pii_upstream: Upstream, tmp_path: Path) -> None:
    import subprocess

    token = keys.token("fwd-reader")
    out = subprocess.run(["curl", "-sS", "--max-time", "30", "--noproxy", "", "-x", f"http://agent:{token}@{gw.proxy}",
                          "-D", str(tmp_path / "h"), f"{pii_upstream.url}/pii/t?kind=json&enc=gzip", "--compressed"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert_clean(out.stdout.decode())
    assert doc["ticket"]["order"] == ORDER_ID
    sse = subprocess.run(["curl", "-sS", "-N", "--max-time", "30", "--noproxy", "", "-x",
                          f"http://agent:{token}@{gw.proxy}", f"{pii_upstream.url}/pii/s?kind=sse"],
                         capture_output=True, timeout=60)
    assert sse.stdout.count(b"[REDACTED:email]") == 3
    assert_clean(sse.stdout.decode())
    png = subprocess.run(["curl", "-sS", "--max-time", "30", "--noproxy", "", "-x", f"http://agent:{token}@{gw.proxy}",
                          "-o", "/dev/null", "-w", "%{http_code}", f"{pii_upstream.url}/pii/p?kind=png"],
                         capture_output=True, timeout=60)
    assert png.stdout == b"502"
