# Shared test fixtures: example agents, requests, and one call per gateway mode.
#
# Tests set input one key at a time (`with input.agent as ...`, `with input.request as ...`)
# and pass fixtures to functions rather than naming them in `with ... as`: regopy 1.5.2
# (the embedded engine) crashes on `with input as {...}` over rules like these and ignores a
# bare rule name after `as`. Both forms are fine in OPA; these work in both.
package agentgate_test

import rego.v1

import data.agentgate

support_bot := {"id": "support-bot", "team": "support", "roles": ["support"], "claims": {}, "registration": null}

sales_bot := {"id": "sales-bot", "team": "sales", "roles": ["sales"], "claims": {}, "registration": null}

ops_bot := {"id": "ops-bot", "team": "ops", "roles": ["ops"], "claims": {}, "registration": null}

# A canonical request as the gateway builds it, without a body.
request(method, host, path) := {
	"method": method,
	"scheme": "https",
	"host": host,
	"port": 443,
	"path": path,
	"path_segments": [s | some s in split(path, "/"); s != ""],
	"query": {},
	"headers": {},
	"body": null,
	"body_size": 0,
	"body_truncated": false,
	"body_error": null,
	"content_type": "",
}

# The same with a parsed JSON body.
json_request(method, host, path, body) := object.union(
	request(method, host, path),
	{"body": body, "body_size": 1, "content_type": "application/json"},
)

# The decision for a forward-proxy call (the host names the system). Tests are hermetic:
# the agent is unregistered unless a test passes a registry (input.agent.registration is the
# agent's entry in it, as the gateway sets it).
forward(agent, req) := registered_forward(agent, req, {})

registered_forward(agent, req, registry) := d if {
	registered := object.union(agent, {"registration": object.get(registry, agent.id, null)})
	d := agentgate.decision with input.agent as registered
		with input.request as req
		with input.route as null
		with input.tool as {"kind": "http"}
		with input.context as {"mode": "forward", "client_ip": "127.0.0.1", "trace_id": "test"}
}

# The decision for a call through a named route (the route names the system).
routed(agent, route, req) := d if {
	d := agentgate.decision with input.agent as agent
		with input.request as req
		with input.route as route
		with input.tool as {"kind": "http"}
		with input.context as {"mode": "route", "client_ip": "127.0.0.1", "trace_id": "test"}
}

# The route front end's own address: in route mode the host says nothing about the system.
gateway_host := "127.0.0.1"
