"""A kill-switch engages while the shared store is down (found by review: it answered a plain-text
500 and the agent kept going), and is stored for the other replicas once the store is back."""
from __future__ import annotations

from tests.clickhouse_fixture import ClickHouseFixture
from tests.conftest import Keys, Upstream, http, wait_until


def test_killswitch_during_store_outage(gateway_factory, upstream: Upstream, keys: Keys, tmp_path_factory) -> None:
    ch = ClickHouseFixture(tmp_path_factory.mktemp("ch-out") / "data")
    ch.start()
    try:
        gw = gateway_factory({"audit": {"dsn": ch.dsn}, "routes": {"plain": {"upstream": upstream.url}}},
                             name="killswitch-outage")
        operator = keys.admin_token("oncall", roles=["operator"])
        agent = {"Authorization": f"Bearer {keys.token('outage-bot')}"}
        assert http("GET", gw.route_url("plain", "/x"), headers=agent).status == 200
        ch.kill()
        resp = gw.call_admin("POST", "/v1/killswitches", operator,
                             {"scope": "agent", "target": "outage-bot", "reason": "stop now"})
        assert resp.status == 201 and resp.json()["stored"] is False, resp.body[:200]
        assert http("GET", gw.route_url("plain", "/x"), headers=agent).status == 403
        ch.start()  # the store is back: the switch is stored at the next state refresh
        wait_until(lambda: gw.sql(f"SELECT count() AS n FROM agentgate.killswitches "
                                  f"WHERE id = '{resp.json()['id']}'")[0]["n"] == 1,
                   what="the kill-switch stored once the store is back")
    finally:
        ch.stop()
