"""TEST FIXTURE, not an OPA: a loopback aiohttp server speaking the parts of OPA's REST API the
gateway uses, evaluating with regopy against a bundle directory.

Implements ``GET /health``, ``POST``/``GET /v1/data/{path}`` (``{"input": ...}`` ->
``{"result": ...}``, no ``result`` when undefined, HTTP 500 with OPA's error shape on evaluation
errors, ``?provenance`` -> ``provenance.bundles.fixture.revision``) and ``PUT /v1/data/{path}``.
``mode`` makes it misbehave for fail-closed tests: ``"error"`` (HTTP 500), ``"hang"`` (never answers
until the fixture stops), ``"garbage"`` (invalid JSON), ``"unhealthy"`` (``/health`` -> 500).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from gateway.policy import PolicyError, PolicyUndefinedError
from gateway.policy.bundle import LoadedBundle, load_bundle
from gateway.policy.embedded import CompiledPolicy, compile_bundle

Mode = Literal["ok", "error", "hang", "garbage", "unhealthy"]


class OpaFixture:
    def __init__(self, bundle_dir: Path, extra_data: dict[str, Any] | None = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.extra_data = dict(extra_data or {})
        self.mode: Mode = "ok"
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        """``(method, path_qs)`` of every request received."""
        self.pushed: dict[str, Any] = {}
        self.hanging = 0
        self._release = asyncio.Event()
        self._hang_started = asyncio.Event()
        self._compiled: dict[str, CompiledPolicy] = {}
        self._loaded: LoadedBundle = load_bundle(self.bundle_dir, self.extra_data)
        self._runner: web.AppRunner | None = None

    @property
    def revision(self) -> str:
        return self._loaded.revision

    async def wait_hanging(self) -> None:
        """Return once a request is being held in ``hang`` mode."""
        await self._hang_started.wait()

    # -- server -------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/v1/data/{path:.*}", self._data)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers -----------------------------------------------------------------------

    async def _misbehave(self) -> web.StreamResponse | None:
        if self.mode == "error":
            return web.json_response({"code": "internal_error", "message": "fixture told to fail"},
                                     status=500)
        if self.mode == "garbage":
            return web.Response(body=b'{"result": {"allow": tru', content_type="application/json")
        if self.mode == "hang":
            self.hanging += 1
            self._hang_started.set()
            await self._release.wait()
            return web.json_response({"result": {"allow": True}})
        return None

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if self.mode == "unhealthy":
            return web.json_response({"error": "not ready"}, status=500)
        return web.json_response({})

    async def _data(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        bad = await self._misbehave()
        if bad is not None:
            return bad
        path = request.match_info["path"].strip("/")
        if request.method == "PUT":
            return await self._put(path, request)
        if request.method not in ("GET", "POST"):
            return web.json_response({"code": "method_not_allowed"}, status=405)
        input_doc: Any = {}
        if request.method == "POST" and request.can_read_body:
            try:
                body = json.loads(await request.read())
            except ValueError as exc:
                return web.json_response({"code": "invalid_parameter", "message": str(exc)},
                                         status=400)
            input_doc = body.get("input", {}) if isinstance(body, dict) else {}
        answer: dict[str, Any] = {}
        if "provenance" in request.query:
            answer["provenance"] = {"version": "agentgate-test-fixture",
                                    "bundles": {"fixture": {"revision": self.revision}}}
        if not path:
            answer["result"] = self._loaded.data
            return web.json_response(answer)
        try:
            answer["result"] = self._policy(path).evaluate(path, input_doc)
        except PolicyUndefinedError:
            pass
        except PolicyError as exc:
            return web.json_response({"code": "internal_error", "message": str(exc)}, status=500)
        return web.json_response(answer)

    async def _put(self, path: str, request: web.Request) -> web.StreamResponse:
        if "/" in path or not path:
            return web.json_response({"code": "invalid_parameter",
                                      "message": "fixture: PUT only top-level documents"}, status=400)
        self.pushed[path] = json.loads(await request.read())
        self._loaded = load_bundle(self.bundle_dir, {**self.extra_data, **self.pushed})
        self._compiled.clear()
        return web.Response(status=204)

    def _policy(self, entrypoint: str) -> CompiledPolicy:
        policy = self._compiled.get(entrypoint)
        if policy is None:
            policy = self._compiled[entrypoint] = compile_bundle(self._loaded, [entrypoint])
        return policy


@asynccontextmanager
async def start_opa_fixture(bundle_dir: Path,
                            extra_data: dict[str, Any] | None = None) -> AsyncIterator[OpaFixture]:
    """Run an :class:`OpaFixture` on 127.0.0.1 for the duration of the block."""
    fixture = OpaFixture(bundle_dir, extra_data)
    await fixture.start()
    try:
        yield fixture
    finally:
        await fixture.stop()
