"""The forward proxy's addon refuses a flow when a bug raises inside one of its hooks. mitmproxy
itself logs an exception from an addon hook and carries on with the flow: the request would go
upstream unjudged, the response reach the agent unredacted.

The flows are mitmproxy's own (``mitmproxy.test.tflow``). ``_BuggyPipeline`` stands in for the
core pipeline with a bug at one step: no real input makes the real pipeline raise there today
(the end-to-end behaviour of the addon is in test_forward_e2e.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from mitmproxy.test import tflow

from addons.gateway_addon import CALL_KEY, AgentGate
from gateway.errors import GatewayError
from gateway.models import Call, GatewayRequest

EMAIL = "ada.lovelace@example.com"


class _BuggyPipeline:
    def __init__(self, bug_at: str) -> None:
        self.bug_at = bug_at
        self.failed: list[tuple[Call, str]] = []
        self.streams = SimpleNamespace(discard=lambda call: None)

    @property
    def cfg(self) -> Any:
        if self.bug_at == "config":
            raise RuntimeError("bug")
        return SimpleNamespace(policy=SimpleNamespace(inspect_body_bytes=64 << 10))

    async def redact(self, call: Call, body: bytes, **_: Any) -> bytes:
        raise RuntimeError("bug")

    def fail(self, call: Call, err: GatewayError) -> None:
        self.failed.append((call, err.code))


def _error_code(flow: Any) -> str:
    return json.loads(flow.response.content)["error"]["code"]


async def test_a_bug_while_judging_a_request_refuses_it() -> None:
    pipeline = _BuggyPipeline("config")
    flow = tflow.tflow()
    await AgentGate(pipeline).request(flow)  # type: ignore[arg-type]
    assert flow.response is not None and flow.response.status_code == 500  # not sent upstream
    assert _error_code(flow) == "internal_error"
    assert [code for _, code in pipeline.failed] == ["internal_error"], "the refusal is audited"


async def test_a_bug_while_redacting_a_response_replaces_it() -> None:
    pipeline = _BuggyPipeline("redact")
    flow = tflow.tflow(resp=True)
    flow.response.content = json.dumps({"requester": {"email": EMAIL}}).encode()
    call = Call(request=GatewayRequest(mode="forward", method="GET", scheme="https", host="example.com",
                                       port=443, path="/", query="", headers=[], body=b""))
    call.redaction = object()  # type: ignore[assignment] # the decision asked for redaction
    flow.metadata[CALL_KEY] = call
    await AgentGate(pipeline).response(flow)  # type: ignore[arg-type]
    assert flow.response.status_code == 500 and EMAIL.encode() not in flow.response.content
    assert _error_code(flow) == "internal_error"
    assert pipeline.failed == [(call, "internal_error")]
