"""Forward-proxy mode end to end: a real gateway process (embedded mitmproxy), real HTTP and
HTTPS upstreams on 127.0.0.1, driven by curl and by a Python client that honours HTTPS_PROXY."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Gateway, Keys, Upstream, basic_proxy_auth

CALL_ID = "x-agentgate-call-id"


@pytest.fixture(scope="module")
def gw(gateway_factory, tls_upstream: Upstream) -> Gateway:
    return gateway_factory({"proxy": {"upstream_ca_file": str(tls_upstream.ca_file)}}, name="forward")


@dataclass
class CurlResult:
    status: int
    connect_status: int
    headers: dict[str, str]
    body: bytes
    exit_code: int

    def json(self):
        return json.loads(self.body)


def curl(gw: Gateway, url: str, *, proxy_user_token: str | None = None, proxy_header: str | None = None,
         method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None,
         tmp: Path) -> CurlResult:
    head, body = tmp / "head.txt", tmp / "body.bin"
    proxy = f"http://{gw.proxy}"
    if proxy_user_token:
        proxy = f"http://agent:{proxy_user_token}@{gw.proxy}"
    cmd = ["curl", "-sS", "--max-time", "30", "-x", proxy, "--cacert", str(gw.ca_file), "-X", method,
           "-D", str(head), "-o", str(body), "-w", "%{http_code} %{http_connect}", "--noproxy", ""]
    if proxy_header:
        cmd += ["--proxy-header", proxy_header]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if data is not None:
        cmd += ["--data-binary", "@-"]
    proc = subprocess.run(cmd + [url], input=data, capture_output=True, timeout=60)
    code, connect = proc.stdout.decode().split()
    parsed: dict[str, str] = {}
    if head.exists():
        for line in head.read_text(errors="replace").splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                parsed[k.strip().lower()] = v.strip()
    return CurlResult(int(code), int(connect), parsed, body.read_bytes() if body.exists() else b"", proc.returncode)


def test_https_interception_allowed_call(gw: Gateway, keys: Keys, tls_upstream: Upstream, tmp_path: Path) -> None:
    token = keys.token("fwd-bot", roles=["reader"], team="ops")
    r = curl(gw, f"https://127.0.0.1:{tls_upstream.port}/tickets?x=1", proxy_user_token=token, tmp=tmp_path)
    assert r.status == 200, r
    assert r.json()["path"] == "/tickets"
    assert "proxy-authorization" not in r.json()["headers"]
    assert token not in r.body.decode()
    row = gw.audit_row(r.headers[CALL_ID])
    assert (row["agent_id"], row["team"], row["mode"], row["route"]) == ("fwd-bot", "ops", "forward", "")
    assert (row["scheme"], row["host"], row["port"], row["path"], row["query"]) == \
        ("https", "127.0.0.1", tls_upstream.port, "/tickets", "x=1")
    assert (row["status"], row["outcome"]) == (200, "allowed")
    assert row["response_bytes"] == len(r.body)


def test_plain_http_with_bearer_proxy_header(gw: Gateway, keys: Keys, upstream: Upstream, tmp_path: Path) -> None:
    token = keys.token("fwd-bot", roles=["reader"])
    r = curl(gw, f"{upstream.url}/plain", proxy_header=f"Proxy-Authorization: Bearer {token}", tmp=tmp_path)
    assert r.status == 200
    assert "proxy-authorization" not in r.json()["headers"]
    assert gw.audit_row(r.headers[CALL_ID])["scheme"] == "http"


def test_denied_call_never_reaches_upstream(gw: Gateway, keys: Keys, tls_upstream: Upstream, tmp_path: Path) -> None:
    before = len(tls_upstream.seen)
    r = curl(gw, f"https://127.0.0.1:{tls_upstream.port}/admin/settings", method="DELETE",
             proxy_user_token=keys.token(roles=["reader"]), tmp=tmp_path)
    assert r.status == 403
    err = r.json()["error"]
    assert err["code"] == "policy_denied" and err["call_id"] == r.headers[CALL_ID]
    assert len(tls_upstream.seen) == before
    row = gw.audit_row(err["call_id"])
    assert row["outcome"] == "denied" and row["method"] == "DELETE"
    assert row["reasons"] == ["admin paths are off limits", "writers only"]


def test_unknown_host_denied(gw: Gateway, keys: Keys, upstream: Upstream, tmp_path: Path) -> None:
    # "localhost" is allowed by the test bundle; the canonical form of LOCALHOST. is too.
    r = curl(gw, f"http://LOCALHOST.:{upstream.port}/ok", proxy_user_token=keys.token(), tmp=tmp_path)
    assert r.status == 200
    assert gw.audit_row(r.headers[CALL_ID])["host"] == "localhost"


def test_connect_without_token_is_407_and_audited(gw: Gateway, tls_upstream: Upstream, tmp_path: Path) -> None:
    r = curl(gw, f"https://127.0.0.1:{tls_upstream.port}/x", tmp=tmp_path)
    assert r.connect_status == 407
    assert r.exit_code != 0
    assert "proxy-authenticate" in r.headers
    rows = gw.sql("SELECT * FROM agentgate.calls WHERE method = 'CONNECT' AND error_code = 'missing_token'")
    assert rows and rows[-1]["outcome"] == "unauthenticated" and rows[-1]["mode"] == "forward"


def test_plain_http_without_token_is_407(gw: Gateway, upstream: Upstream, tmp_path: Path) -> None:
    r = curl(gw, f"{upstream.url}/x", tmp=tmp_path)
    assert r.status == 407
    assert r.json()["error"]["code"] == "missing_token"
    assert gw.audit_row(r.headers[CALL_ID])["outcome"] == "unauthenticated"


def test_bad_token_on_connect_is_407(gw: Gateway, keys: Keys, tls_upstream: Upstream, tmp_path: Path) -> None:
    expired = keys.token(ttl=-600)
    r = curl(gw, f"https://127.0.0.1:{tls_upstream.port}/x", proxy_user_token=expired, tmp=tmp_path)
    assert r.connect_status == 407
    rows = gw.sql("SELECT count() AS n FROM agentgate.calls WHERE method = 'CONNECT' AND error_code = 'token_expired'")
    assert rows[0]["n"] >= 1


def test_host_header_must_match_connect_target(gw: Gateway, keys: Keys, tls_upstream: Upstream,
                                               tmp_path: Path) -> None:
    before = len(tls_upstream.seen)
    r = curl(gw, f"https://127.0.0.1:{tls_upstream.port}/x", proxy_user_token=keys.token(),
             headers={"Host": "evil.example"}, tmp=tmp_path)
    assert r.status == 400
    assert r.json()["error"]["code"] == "host_mismatch"
    assert len(tls_upstream.seen) == before
    assert gw.audit_row(r.headers[CALL_ID])["outcome"] == "rejected"


def test_python_client_honouring_https_proxy(gw: Gateway, keys: Keys, tls_upstream: Upstream) -> None:
    """A stock urllib client configured only through HTTPS_PROXY and the gateway's CA."""
    token = keys.token("py-bot", roles=["writer"])
    script = textwrap.dedent(f"""
        import json, ssl, urllib.request
        ctx = ssl.create_default_context(cafile={str(gw.ca_file)!r})
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
        out = []
        for method, body in (("GET", None), ("POST", b'{{"n": 1}}')):
            req = urllib.request.Request("https://127.0.0.1:{tls_upstream.port}/py", data=body, method=method,
                                         headers={{"Content-Type": "application/json"}})
            with opener.open(req, timeout=30) as resp:
                out.append([resp.status, resp.headers["X-Agentgate-Call-Id"], json.load(resp)])
        print(json.dumps(out))
    """)
    env = {"HTTPS_PROXY": f"http://agent:{token}@{gw.proxy}", "PATH": "/usr/bin:/bin", "NO_PROXY": ""}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (s1, id1, echo1), (s2, id2, echo2) = json.loads(proc.stdout)
    assert (s1, s2) == (200, 200)
    assert echo2["body"] == '{"n": 1}'
    assert "proxy-authorization" not in echo1["headers"]
    # One tunnel, authenticated once, two calls attributed to the same agent.
    assert gw.audit_row(id1)["agent_id"] == gw.audit_row(id2)["agent_id"] == "py-bot"


def test_sse_is_relayed_through_the_tunnel(gw: Gateway, keys: Keys, tls_upstream: Upstream, tmp_path: Path) -> None:
    r = curl(gw, f"https://127.0.0.1:{tls_upstream.port}/sse", proxy_user_token=keys.token(), tmp=tmp_path)
    assert r.status == 200
    assert r.body == b"data: event 0\n\ndata: event 1\n\ndata: event 2\n\n"
    assert gw.audit_row(r.headers[CALL_ID])["response_bytes"] == len(r.body)


def test_basic_header_form_of_proxy_auth(gw: Gateway, keys: Keys, upstream: Upstream, tmp_path: Path) -> None:
    r = curl(gw, f"{upstream.url}/basic", proxy_header=f"Proxy-Authorization: {basic_proxy_auth(keys.token())}",
             tmp=tmp_path)
    assert r.status == 200
