"""Upstream calls for the route front end: one shared aiohttp client session, per-route TLS."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import yarl
from multidict import CIMultiDict

from gateway.config import Config, RouteConfig
from gateway.echo_guard import MIN_SECRET_BYTES, EchoGuard
from gateway.errors import UpstreamError
from gateway.models import Call
from gateway.pipeline import RANGE_HEADERS

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 hop-by-hop headers plus what the gateway itself sets.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})
_REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "content-length"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
# On a route whose credential the gateway injects, a session the upstream opens on its strength
# is that credential too: the agent neither receives it nor sends one of its own.
_CONNECTION = ("connection", "proxy-connection")
_SESSION_REQUEST, _SESSION_RESPONSE = frozenset({"cookie", "cookie2"}), frozenset({"set-cookie", "set-cookie2"})


def _nominated(values: Iterable[str]) -> set[str]:
    """Header names the Connection (or Proxy-Connection) header ``values`` list: hop-by-hop too."""
    return {token.strip().lower() for value in values for token in value.split(",")}


@dataclass(slots=True)
class _Route:
    base: str
    ssl: ssl.SSLContext | bool
    timeout: aiohttp.ClientTimeout
    credential: tuple[str, str] | None
    guard: EchoGuard | None


def _ssl_for(route: RouteConfig) -> ssl.SSLContext | bool:
    if not route.upstream.startswith("https://"):
        return True
    if not route.verify_tls:
        return False
    ctx = ssl.create_default_context(cafile=str(route.ca_file) if route.ca_file else None)
    return ctx


class RouteUpstream:
    """Forwards an admitted route call to its upstream and returns the client response.

    The agent's ``Authorization`` (its gateway JWT) is never forwarded; the route's own
    credential, if configured, is injected instead. Bodies pass through undecoded
    (``auto_decompress=False``) so ``Content-Encoding`` stays true.
    """

    def __init__(self, cfg: Config) -> None:
        self._routes: dict[str, _Route] = {}
        for name, r in cfg.routes.items():
            credential = (r.credential.header, r.credential.resolve()) if r.credential else None
            guard = None
            if credential is not None:
                guard = EchoGuard(credential[1], secret=credential[1][len(r.credential.prefix):],
                                  decode_limit=cfg.redaction.max_inspect_bytes)
                if not guard.active:
                    log.warning("route %s: its credential is shorter than %d bytes, too short to be "
                                "searched for in responses (an upstream echoing it would hand it to "
                                "the agent)", name, MIN_SECRET_BYTES)
            self._routes[name] = _Route(
                base=r.upstream,
                ssl=_ssl_for(r),
                # No total: streams (SSE, downloads) may last; an upstream silent for timeout_seconds is cut.
                timeout=aiohttp.ClientTimeout(total=None, connect=r.connect_timeout_seconds,
                                              sock_read=r.timeout_seconds),
                credential=credential,
                guard=guard,
            )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def target(self, route: str) -> tuple[str, str, int]:
        """The (scheme, host, port) a route forwards to: what policy sees as the request's host."""
        url = yarl.URL(self._routes[route].base)
        return url.scheme, url.host or "", url.port or 0

    def secrets(self) -> list[str]:
        """Injected credential values, so tests and log scrubbing can check they never leak."""
        return [r.credential[1] for r in self._routes.values() if r.credential]

    async def __call__(self, call: Call) -> aiohttp.ClientResponse:
        req = call.request
        assert req.route is not None and self._session is not None
        route = self._routes[req.route]
        url = route.base + call.canonical_path + (f"?{req.query}" if req.query else "")
        drop = _REQUEST_DROP | _nominated(v for k, v in req.headers if k.lower() in _CONNECTION)
        if route.credential:
            drop |= _SESSION_REQUEST
        if call.redaction is not None:
            drop |= RANGE_HEADERS  # the response must come back whole to be redacted
        headers = CIMultiDict((k, v) for k, v in req.headers if k.lower() not in drop)
        if route.credential:
            headers[route.credential[0]] = route.credential[1]
            headers["Accept-Encoding"] = "identity"  # so that an echo of it can be cut (gateway/echo_guard.py)
        try:
            return await self._session.request(
                req.method, yarl.URL(url, encoded=True), headers=headers,
                data=req.body or None, ssl=route.ssl, timeout=route.timeout,
                allow_redirects=False,
            )
        except TimeoutError:
            raise UpstreamError(f"upstream of route {req.route} timed out", code="upstream_timeout",
                                status=504) from None
        except aiohttp.ClientSSLError as exc:
            raise UpstreamError(f"TLS to the upstream of route {req.route} failed: {exc}",
                                code="upstream_tls_error") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"upstream of route {req.route} unreachable: {type(exc).__name__}",
                                code="upstream_unreachable") from None

    def injects_credential(self, route: str) -> bool:
        return self._routes[route].credential is not None

    def echo_guard(self, route: str | None) -> EchoGuard | None:
        """The search for the route's injected credential in responses (None: nothing injected)."""
        r = self._routes.get(route) if route is not None else None
        return r.guard if r is not None and r.guard is not None and r.guard.active else None


def response_headers(upstream: aiohttp.ClientResponse, *, session: bool = True) -> CIMultiDict[str]:
    """The upstream's headers the agent gets: not hop-by-hop ones, nor (``session=False``) cookies."""
    headers = upstream.headers
    drop = _RESPONSE_DROP | _nominated(headers.getall("Connection", []) + headers.getall("Proxy-Connection", []))
    if not session:
        drop |= _SESSION_RESPONSE
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)
