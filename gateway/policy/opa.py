"""Decisions from an OPA server over its Data API, on one shared aiohttp session.

``opa-python-client``'s ``AsyncOpaClient`` is not used: its ``query_rule`` calls
``raise_for_status()`` and drops OPA's error body (``eval_conflict_error: ...``), it retries
5xx/connection errors with back-off sleeps (a decision would outlive ``timeout_seconds``), and
it takes host/port rather than a URL, so an OPA behind a path prefix cannot be reached.

Fail closed: every transport problem, non-200 answer, malformed body or undefined result is a
:class:`PolicyEvalError`. Inputs are never logged (they may carry credentials).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from gateway.policy import PolicyEvalError, PolicyLoadError, PolicyUndefinedError, decision_ref

if TYPE_CHECKING:
    from gateway.config import PolicyConfig

log = logging.getLogger("agentgate.policy")

MAX_RESPONSE_BYTES = 8 << 20
_PROBE_PATH = "agentgate_revision_probe"
"""An undefined document: ``GET`` on it with ``?provenance`` costs OPA nothing."""


def _provenance_revision(doc: Any) -> str | None:
    """``provenance.bundles.<name>.revision`` (several bundles: ``name:rev,...``)."""
    prov = doc.get("provenance") if isinstance(doc, dict) else None
    bundles = prov.get("bundles") if isinstance(prov, dict) else None
    if not isinstance(bundles, dict) or not bundles:
        return None
    revs = {name: b.get("revision") for name, b in bundles.items() if isinstance(b, dict)}
    revs = {k: v for k, v in revs.items() if isinstance(v, str) and v}
    if not revs:
        return None
    if len(revs) == 1:
        return next(iter(revs.values()))
    return ",".join(f"{k}:{v}" for k, v in sorted(revs.items()))


def _opa_error(status: int, body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and ("code" in doc or "message" in doc):
        text = f"{doc.get('code', 'error')}: {doc.get('message', '')}".strip()
        details = [e.get("message") for e in doc.get("errors") or [] if isinstance(e, dict)]
        if details:
            text += " (" + "; ".join(str(d) for d in details[:5]) + ")"
        return f"OPA answered HTTP {status}: {text}"
    return f"OPA answered HTTP {status}"


STARTUP_TIMEOUT = 10.0


class OpaEngine:
    """``PolicyEngine`` backed by ``POST {opa_url}/v1/data/<decision>``."""

    name = "opa"

    def __init__(self, cfg: PolicyConfig, extra_data: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.extra_data = dict(extra_data or {})
        self.base_url = cfg.opa_url.rstrip("/")
        self.decision = cfg.decision
        self.decision_url = f"{self.base_url}/v1/data/{self.decision}?provenance=true"
        self.revision = "opa"
        self.ready = False
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    def cache_status(self) -> dict[str, Any]:
        return {"enabled": False, "reason": "the OPA engine sends every input to the server"}

    async def data(self) -> dict[str, Any] | None:
        """``data.gateway`` and ``data.agents`` as OPA serves them (what it has of the two)."""
        out: dict[str, Any] = {}
        for key in ("gateway", "agents"):
            try:
                status, body = await self._request("GET", f"{self.base_url}/v1/data/{key}")
                doc = _loads(body) if status == 200 else None
            except PolicyEvalError as exc:
                log.warning("could not read data.%s from OPA: %s", key, exc)
                continue
            if isinstance(doc, dict) and "result" in doc:
                out[key] = doc["result"]
        return out or None

    async def start(self) -> None:
        """Check ``/health``, push ``extra_data`` into OPA's data, read the bundle revision.

        Raises :class:`PolicyLoadError` if OPA is unreachable, unhealthy or refuses the data.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, raise_for_status=False,
                headers={"Content-Type": "application/json"})
        try:
            # Start-up is not the request path: it gets a generous timeout of its own.
            status, _body = await self._request("GET", f"{self.base_url}/health", timeout=STARTUP_TIMEOUT)
            if status != 200:
                raise PolicyLoadError(f"OPA at {self.base_url} is not healthy (HTTP {status})")
            for key, value in self.extra_data.items():
                url = f"{self.base_url}/v1/data/{quote(key, safe='')}"
                status, body = await self._request("PUT", url, _dumps(value), timeout=STARTUP_TIMEOUT)
                if status not in (200, 204):
                    raise PolicyLoadError(
                        f"OPA refused data.{key}: {_opa_error(status, body)} (if a bundle owns that "
                        f"root, serve the data from the bundle instead)")
            status, body = await self._request(
                "GET", f"{self.base_url}/v1/data/{_PROBE_PATH}?provenance=true", timeout=STARTUP_TIMEOUT)
            if status == 200:
                self._note_revision(_loads(body))
        except PolicyEvalError as exc:
            raise PolicyLoadError(str(exc)) from None
        self.ready = True
        log.info("OPA policy engine at %s ready (revision %s)", self.base_url, self.revision)

    async def close(self) -> None:
        session, self._session = self._session, None
        self.ready = False
        if session is not None:
            await session.close()

    async def evaluate(self, input: dict[str, Any]) -> Any:
        where = decision_ref(self.decision)
        try:
            payload = _dumps({"input": input})
        except (TypeError, ValueError) as exc:
            raise PolicyEvalError(f"{where}: input not usable: {exc}") from None
        status, body = await self._request("POST", self.decision_url, payload)
        if status != 200:
            raise PolicyEvalError(f"{where}: {_opa_error(status, body)}")
        doc = _loads(body)
        if not isinstance(doc, dict):
            raise PolicyEvalError(f"{where}: OPA answered a {type(doc).__name__}, not an object")
        self._note_revision(doc)
        if "result" not in doc:
            raise PolicyUndefinedError(f"{where} is undefined")
        return doc["result"]

    def _note_revision(self, doc: Any) -> None:
        revision = _provenance_revision(doc)
        if revision is not None and revision != self.revision:
            if self.revision != "opa":
                log.info("OPA bundle revision %s -> %s", self.revision, revision)
            self.revision = revision

    async def _request(self, method: str, url: str, data: bytes | None = None,
                       timeout: float | None = None) -> tuple[int, bytes]:
        session = self._session
        if session is None or session.closed:
            raise PolicyEvalError("OPA policy engine is not started")
        limit = timeout or self.cfg.timeout_seconds
        try:
            async with session.request(method, url, data=data, timeout=aiohttp.ClientTimeout(total=limit)) as resp:
                body = await _read_bounded(resp)
                status = resp.status
        except (asyncio.TimeoutError, TimeoutError):
            self.ready = False
            raise PolicyEvalError(
                f"OPA at {self.base_url} did not answer within {limit}s") from None
        except aiohttp.ClientError as exc:
            self.ready = False
            raise PolicyEvalError(f"OPA at {self.base_url} unreachable: {exc}") from None
        self.ready = True
        return status, body


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PolicyEvalError(f"OPA answered invalid JSON: {exc}") from None


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 << 10):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise PolicyEvalError(f"OPA answer larger than {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
