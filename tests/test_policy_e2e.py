"""Policy through a real gateway: the OPA REST engine (against the OPA test fixture), fail
closed on engine errors and timeouts, fail-open routes, contract violations, hot reload."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import TEST_BUNDLE, Gateway, Keys, LoopThread, Upstream, http, wait_until
from tests.opa_fixture import OpaFixture

CALL_ID = "x-agentgate-call-id"


@pytest.fixture(scope="module")
def opa() -> OpaFixture:
    loop = LoopThread()
    fixture = OpaFixture(TEST_BUNDLE)
    loop.run(fixture.start())
    yield fixture
    fixture.mode = "ok"
    loop.run(fixture.stop())
    loop.close()


@pytest.fixture(scope="module")
def opa_gw(gateway_factory, upstream: Upstream, opa: OpaFixture) -> Gateway:
    return gateway_factory({
        "policy": {"engine": "opa", "opa_url": opa.url, "timeout_seconds": 2},
        "routes": {"plain": {"upstream": upstream.url},
                   "lenient": {"upstream": upstream.url, "fail_open": True}},
    }, name="opa")


def call(gw: Gateway, keys: Keys, route: str, path: str, method: str = "GET", **tok):
    return http(method, gw.route_url(route, path), headers={"Authorization": f"Bearer {keys.token(**tok)}"})


def test_opa_engine_allows_and_denies(opa_gw: Gateway, keys: Keys, opa: OpaFixture) -> None:
    opa.mode = "ok"
    ok = call(opa_gw, keys, "plain", "/fine")
    assert ok.status == 200
    row = opa_gw.audit_row(ok.headers[CALL_ID])
    assert row["engine"] == "opa" and row["outcome"] == "allowed"
    denied = call(opa_gw, keys, "plain", "/admin/x")
    assert denied.status == 403
    assert denied.json()["error"]["code"] == "policy_denied"
    assert opa_gw.audit_row(denied.headers[CALL_ID])["reasons"] == ["admin paths are off limits"]
    assert any(path.startswith("/v1/data/agentgate/decision") for _, path in opa.requests)


@pytest.mark.parametrize("mode", ["error", "hang", "garbage"])
def test_engine_failure_fails_closed(opa_gw: Gateway, keys: Keys, opa: OpaFixture, upstream: Upstream,
                                     mode: str) -> None:
    opa.mode = mode
    try:
        before = len(upstream.seen)
        resp = call(opa_gw, keys, "plain", "/fine")
    finally:
        opa.mode = "ok"
    assert resp.status == 403
    err = resp.json()["error"]
    assert err["code"] == "policy_error"
    if mode == "hang":
        assert "did not answer" in err["message"] or "timed out" in err["message"]
    assert len(upstream.seen) == before
    row = opa_gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] == "denied" and row["reasons"][0] == "policy_error" and row["fail_open"] == 0


def test_fail_open_route_passes_and_is_flagged(opa_gw: Gateway, keys: Keys, opa: OpaFixture) -> None:
    opa.mode = "error"
    try:
        resp = call(opa_gw, keys, "lenient", "/fine")
    finally:
        opa.mode = "ok"
    assert resp.status == 200
    row = opa_gw.audit_row(resp.headers[CALL_ID])
    assert row["outcome"] == "fail_open" and row["fail_open"] == 1 and row["reasons"][0] == "policy_error"
    metrics = http("GET", f"http://{opa_gw.admin}/metrics").body.decode()
    assert 'agentgate_fail_open_total{mode="route"} 1.0' in metrics


BROKEN_CONTRACT = """package agentgate
import rego.v1
decision := {"allow": "yes", "reasons": []}
"""


def test_decision_not_matching_contract_fails_closed(gateway_factory, keys: Keys, upstream: Upstream,
                                                     tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "agentgate").mkdir(parents=True)
    (bundle / "agentgate" / "decision.rego").write_text(BROKEN_CONTRACT)
    gw = gateway_factory({"policy": {"dir": str(bundle)}, "routes": {"plain": {"upstream": upstream.url}}},
                         name="contract")
    resp = call(gw, keys, "plain", "/x")
    assert resp.status == 403
    assert resp.json()["error"]["code"] == "policy_error"
    assert "contract" in resp.json()["error"]["message"]


def test_hot_reload_under_concurrent_requests(gateway_factory, keys: Keys, upstream: Upstream,
                                              tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(TEST_BUNDLE, bundle)
    gw = gateway_factory({"policy": {"dir": str(bundle), "hot_reload": True},
                          "routes": {"plain": {"upstream": upstream.url}}}, name="reload")
    token = keys.token("reload-bot")

    def revision() -> str:
        return http("GET", f"http://{gw.admin}/readyz").json()["policy_revision"]

    def one(i: int) -> int:
        return http("GET", gw.route_url("plain", f"/r{i}"), headers={"Authorization": f"Bearer {token}"}).status

    first = revision()
    assert one(0) == 200
    rego = bundle / "agentgate" / "decision.rego"
    original = rego.read_text()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(300)]
        # Mid-flight: every GET becomes denied.
        rego.write_text(original + '\ndeny_reasons contains "reads are paused" if input.request.method == "GET"\n')
        statuses = [f.result() for f in futures]
    assert set(statuses) <= {200, 403}, "no request may fail or be dropped during a reload"
    wait_until(lambda: revision() != first, what="the policy reload")
    paused = http("GET", gw.route_url("plain", "/after"), headers={"Authorization": f"Bearer {token}"})
    assert paused.status == 403 and "reads are paused" in paused.json()["error"]["message"]
    row = gw.audit_row(paused.headers[CALL_ID])
    assert row["policy_revision"] == revision() != first

    # A broken edit is refused: the last good bundle and its revision stay.
    good = revision()
    rego.write_text(original + "\nthis is not rego {\n")
    wait_until(lambda: "refused, keeping revision" in gw.logs(),
               what="the refused reload to be logged")
    assert revision() == good
    still = http("GET", gw.route_url("plain", "/after"), headers={"Authorization": f"Bearer {token}"})
    assert still.status == 403 and "reads are paused" in still.json()["error"]["message"]
    rego.write_text(original)
    wait_until(lambda: revision() == first, what="the reload back to the original bundle")
    assert one(1) == 200
    json.dumps(statuses)
