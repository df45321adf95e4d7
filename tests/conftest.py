"""Shared fixtures: real keys, real upstreams on 127.0.0.1, real gateway processes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import tomli_w
import trustme
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

# The MCP SDK fixtures (mcp_venv, tls_server) for the MCP test modules.
pytest_plugins = ["tests.mcp_harness.fixtures"]

ROOT = Path(__file__).resolve().parent.parent
TEST_BUNDLE = ROOT / "tests" / "policy_bundle"
START_TIMEOUT = 60.0


# -- keys and tokens -------------------------------------------------------------------
@dataclass
class Keys:
    dir: Path
    ed_private: bytes
    rsa_private: bytes
    hmac_secret: str = "test-hmac-secret-that-is-long-enough-for-hs512-0123456789abcdefghijkl"
    issuer: str = "https://issuer.test"
    audience: str = "agentgate"
    admin_audience: str = "agentgate-admin"
    """The default identity.admin_audience: the test gateways do not set it."""

    @property
    def ed_public_file(self) -> Path:
        return self.dir / "ed.pub.pem"

    @property
    def rsa_public_file(self) -> Path:
        return self.dir / "rsa.pub.pem"

    @property
    def hmac_file(self) -> Path:
        return self.dir / "hmac.secret"

    def token(self, agent: str = "agent-1", *, roles: list[str] | None = None, team: str | None = "support",
              alg: str = "EdDSA", ttl: int = 600, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"sub": agent, "iat": now, "exp": now + ttl, "iss": self.issuer,
                                   "aud": self.audience, "roles": roles if roles is not None else ["reader"]}
        if team is not None:
            payload["team"] = team
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        key: Any = {"EdDSA": self.ed_private, "RS256": self.rsa_private, "HS256": self.hmac_secret}[alg]
        return jwt.encode(payload, key, algorithm=alg)

    def admin_token(self, actor: str = "admin-1", *, roles: list[str], team: str | None = None,
                    **kw: Any) -> str:
        """A token for the admin API: the admin audience instead of the agents' one."""
        return self.token(actor, roles=roles, team=team, aud=self.admin_audience, **kw)


def _pem_pair(private_key: Any) -> tuple[bytes, bytes]:
    priv = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    pub = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    ed_priv, ed_pub = _pem_pair(ed25519.Ed25519PrivateKey.generate())
    rsa_priv, rsa_pub = _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    k = Keys(dir=d, ed_private=ed_priv, rsa_private=rsa_priv)
    k.ed_public_file.write_bytes(ed_pub)
    k.rsa_public_file.write_bytes(rsa_pub)
    k.hmac_file.write_text(k.hmac_secret)
    return k


# -- upstreams ---------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """A real aiohttp server on 127.0.0.1 in its own thread, recording what reached it."""

    tls: trustme.CA | None = None
    raw: bool = False
    """Record request bodies as they arrived: a Content-Encoding is not inflated."""
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    ca_file: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


UPSTREAM = web.AppKey("upstream", Upstream)


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    up: Upstream = request.app[UPSTREAM]
    up.seen.append(Seen(request.method, request.raw_path.partition("?")[0], request.query_string,
                        {k.lower(): v for k, v in request.headers.items()}, body))
    if request.path.endswith("/sse"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: event {i}\n\n".encode())
        await resp.write_eof()
        return resp
    if request.path.endswith("/sse-slow"):
        # A long-lived stream (bounded: 200 events, 10 s) for kill-switch tests.
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(200):
            await resp.write(f"data: tick {i}\n\n".encode())
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp
    if request.path.endswith("/slow"):
        await asyncio.sleep(2)  # longer than the route timeout the test configures
        return web.json_response({"slow": True})
    if request.path.endswith("/big"):
        return web.Response(body=b"x" * (3 << 20), content_type="application/octet-stream")
    return web.json_response({
        "method": request.method, "path": request.raw_path.partition("?")[0], "query": request.query_string,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body": body.decode("utf-8", "replace"),
    }, headers={"X-Upstream": "yes"})


def start_upstream(up: Upstream, cert_dir: Path, app: web.Application | None = None) -> Callable[[], None]:
    """Serve ``app`` (default: the recording echo app) on 127.0.0.1 in a thread; returns stop()."""
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    state: dict[str, Any] = {}

    async def main() -> None:
        served = app
        if served is None:
            served = web.Application()
            served[UPSTREAM] = up
            served.router.add_route("*", "/{tail:.*}", _echo)
        runner = web.AppRunner(served, access_log=None, auto_decompress=not up.raw)
        await runner.setup()
        ctx = None
        if up.tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            up.tls.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
            up.ca_file = cert_dir / "upstream-ca.pem"
            up.tls.cert_pem.write_to_path(str(up.ca_file))
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        up.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        state["runner"] = runner
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(main(), loop).result(timeout=10)
    ready.wait(10)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return stop


@contextlib.contextmanager
def serving(app: web.Application | None, cert_dir: Path, up: Upstream | None = None) -> Iterator[Upstream]:
    """``up`` (default: a plain HTTP one) serving ``app`` (default: the recording echo app)
    for the length of the block."""
    up = up if up is not None else Upstream()
    stop = start_upstream(up, cert_dir, app)
    try:
        yield up
    finally:
        stop()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with serving(None, tmp_path_factory.mktemp("up")) as up:
        yield up


@pytest.fixture(scope="session")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with serving(None, tmp_path_factory.mktemp("tlsup"), Upstream(tls=trustme.CA())) as up:
        yield up


# -- gateway processes -------------------------------------------------------------------
def toml_dump(doc: dict[str, Any]) -> str:
    """``doc`` as TOML (paths written as strings)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return tomli_w.dumps(plain(doc))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None,
         timeout: float = 30) -> Response:
    """A plain HTTP call (no proxy) that returns error statuses instead of raising."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    config: Path
    data_dir: Path
    proxy: str
    routes: str
    admin: str
    admin_token: str
    log: Path

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca" / "mitmproxy-ca-cert.pem"

    def route_url(self, route: str, path: str = "/") -> str:
        return f"http://{self.routes}/r/{route}{path}"

    def call_admin(self, method: str, path: str, token: str | None = None,
                   body: dict[str, Any] | None = None) -> Response:
        """The admin API at ``path`` with ``token`` as bearer (none: unauthenticated) and ``body`` as JSON."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return http(method, f"http://{self.admin}{path}", headers=headers,
                    body=json.dumps(body).encode() if body is not None else None)

    def sql(self, query: str) -> list[dict[str, Any]]:
        resp = self.call_admin("POST", "/v1/audit/sql", self.admin_token, {"sql": query})
        assert resp.status == 200, resp.body
        doc = resp.json()
        return [dict(zip(doc["columns"], row)) for row in doc["rows"]]

    def audit_row(self, call_id: str) -> dict[str, Any]:
        """The call's row. The audit is shipped asynchronously (the admin SQL endpoint only
        waits briefly for freshness), so a busy machine may need a moment more."""
        query = f"SELECT * FROM agentgate.calls FINAL WHERE call_id = '{call_id}'"
        found: list[dict[str, Any]] = []
        wait_until(lambda: bool(found.extend(self.sql(query)) or found), timeout=15,
                   what=f"the audit row of {call_id}")
        assert len(found) == 1, f"expected one audit row for {call_id}, got {found}"
        return found[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_gateway(tmp: Path, keys: Keys, overrides: dict[str, Any] | None = None,
                  env: dict[str, str] | None = None) -> Gateway:
    tmp.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
        "data_dir": str(tmp / "data"),
        "listen": {"proxy": "127.0.0.1:0", "routes": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "identity": {
            "algorithms": ["EdDSA", "RS256", "HS256"],
            "issuer": keys.issuer, "audience": keys.audience,
            "public_key_files": [str(keys.ed_public_file), str(keys.rsa_public_file)],
            "hmac_secret_file": str(keys.hmac_file),
            "dev_signing_key": False,
        },
        "policy": {"dir": str(TEST_BUNDLE), "hot_reload": False},
        "audit": {"flush_interval_seconds": 0.05},
    }
    doc = deep_merge(base, overrides or {})
    config = tmp / "agentgate.toml"
    config.write_text(toml_dump(doc))
    log = tmp / "gateway.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    full_env["PYTHONOPTIMIZE"] = "1"  # as shipped (docker/Dockerfile, make run)
    full_env.update(env or {})
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
                            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=out, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("agentgate listening:"):
            break
    if not line.startswith("agentgate listening:"):
        proc.kill()
        raise AssertionError(f"gateway did not start:\n{log.read_text()}")
    # Keep draining stdout so the gateway never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    parts = dict(p.split("=", 1) for p in line.split(":", 1)[1].split())
    return Gateway(proc=proc, config=config, data_dir=Path(doc["data_dir"]), proxy=parts["proxy"],
                   routes=parts["routes"], admin=parts["admin"],
                   admin_token=keys.admin_token("responder-1", roles=["responder"]), log=log)


@pytest.fixture(scope="session")
def gateway_factory(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def factory(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                name: str = "gw") -> Gateway:
        gw = start_gateway(tmp_path_factory.mktemp(name), keys, overrides, env)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        gw.stop()


def basic_proxy_auth(token: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{token}".encode()).decode()


class LoopThread:
    """An asyncio loop in a daemon thread, for async servers used by synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll a condition the system under test will make true, with a hard deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def pending_approvals(gw: Gateway, token: str, agent: str) -> list[dict[str, Any]]:
    """The pending approvals of ``agent``, as ``gw``'s admin API lists them."""
    listed = gw.call_admin("GET", "/v1/approvals?state=pending", token).json()["approvals"]
    return [a for a in listed if a["agent_id"] == agent]


def hold_refund(pool: ThreadPoolExecutor, gw: Gateway, token: str, *, agent: str, lead: str, body: bytes,
                seen_on: Gateway | None = None, timeout: float = 20.0) -> tuple[Future, dict[str, Any]]:
    """POST ``/r/plain/refunds`` (held for approval by the test policy) from ``pool``; return the
    pending call and its approval once ``seen_on`` (default: ``gw``) lists it."""
    held = pool.submit(lambda: http("POST", gw.route_url("plain", "/refunds"), body=body,
                                    headers={"Authorization": f"Bearer {token}",
                                             "Content-Type": "application/json"}))
    watcher = seen_on or gw
    wait_until(lambda: bool(pending_approvals(watcher, lead, agent)), timeout=timeout,
               what=f"the approval held for {agent}")
    (approval,) = pending_approvals(watcher, lead, agent)
    return held, approval
