"""Pipeline.redact fails closed on a failure nobody foresaw (a redactor bug, a worker that dies
twice): the response is refused, never passed on unredacted, in either front end.

``_BrokenPlan`` is a stand-in for such a bug: no real input makes the redactor raise anything
but ``NotRedactable`` today (that path is covered end to end in test_redaction_e2e.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import Config
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.models import Call, GatewayRequest
from gateway.pipeline import Pipeline

EMAIL = "ada.lovelace@example.com"


class _BrokenPlan:
    async def redact_body_async(self, body: bytes, *, content_type: str, content_encoding: str | None) -> Any:
        raise RuntimeError(f"a message quoting the body: {body.decode()}")


def _pipeline(unredactable: str) -> Pipeline:
    cfg = Config(routes={"tickets": {"upstream": "http://127.0.0.1:9", "unredactable": unredactable}},
                 proxy={"unredactable": unredactable})
    return Pipeline(cfg, verifier=None, engine=SimpleNamespace(name="embedded"), audit=None,  # type: ignore[arg-type]
                    metrics=Metrics(), instance="test", killswitches=None, approvals=None,  # type: ignore[arg-type]
                    streams=None, redactor=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("unredactable", ["refuse", "pass"])
@pytest.mark.parametrize("route", ["tickets", None])
async def test_an_unexpected_redaction_failure_refuses_the_response(
        unredactable: str, route: str | None, caplog: pytest.LogCaptureFixture) -> None:
    """Even where unredactable content may pass: that setting is about content the redactor
    cannot read (too large, not JSON ...), not about the redactor failing."""
    call = Call(request=GatewayRequest(mode="route" if route else "forward", method="GET", scheme="http",
                                       host="127.0.0.1", port=9, path="/t", query="", headers=[], body=b"",
                                       route=route))
    call.redaction = _BrokenPlan()  # type: ignore[assignment]
    body = f'{{"email": "{EMAIL}"}}'.encode()
    with caplog.at_level(logging.DEBUG), pytest.raises(GatewayError) as info:
        await _pipeline(unredactable).redact(call, body, content_type="application/json", content_encoding=None)
    assert (info.value.status, info.value.code, info.value.outcome) == (
        502, "response_not_redactable", "redaction_failed")
    assert call.reasons == ["redaction failed: RuntimeError"]
    assert "RuntimeError" in caplog.text and EMAIL not in caplog.text, "the log names the failure, not the body"
