# MCP tool calls on the quickstart's helpdesk MCP server (system demo, route support-mcp).
package agentgate_test

import rego.v1

import data.agentgate

# The input.tool the gateway builds for an MCP message.
mcp_tool(method) := {"kind": "mcp", "method": method, "server": "support-mcp", "jsonrpc_id": 1, "batch": false}

tool_call(name, arguments) := object.union(mcp_tool("tools/call"), {"name": name, "arguments": arguments})

resource_read(uri) := object.union(mcp_tool("resources/read"), {"uri": uri})

prompt_get(name) := object.union(mcp_tool("prompts/get"), {"name": name, "arguments": {}})

# The decision for an MCP message POSTed to /mcp through a route, or (route null) the forward proxy.
mcp_routed(agent, route, tool) := mcp_call(agent, route, mcp_post(gateway_host, tool), tool)

mcp_forward(agent, host, tool) := mcp_call(agent, null, mcp_post(host, tool), tool)

mcp_post(host, tool) := json_request("POST", host, "/mcp", {"jsonrpc": "2.0", "id": 1, "method": tool.method})

# The one place these tests evaluate the decision (each `with` site costs compile time).
mcp_call(agent, route, req, tool) := d if {
	d := agentgate.decision with input.agent as agent
		with input.request as req
		with input.route as route
		with input.tool as tool
		with input.context as {"mode": "test", "client_ip": "127.0.0.1", "trace_id": "test"}
}

test_mcp_granted_tool_is_allowed_and_says_why if {
	d := mcp_routed(support_bot, "support-mcp", tool_call("search_tickets", {"query": "refund"}))
	d.allow == true
	d.reasons == ["role support may POST demo", "role support may use demo tool search_tickets"]
	d.require_approval == false
}

test_mcp_ticket_reads_are_redacted if {
	d := mcp_routed(support_bot, "support-mcp", tool_call("get_ticket", {"id": 1001}))
	d.allow == true
	d.redact.detectors == ["email", "phone"]
	"$..requester.email" in d.redact.fields
	"customer contact details are redacted from ticket data" in d.reasons
}

test_mcp_refund_needs_approval if {
	d := mcp_routed(support_bot, "support-mcp", tool_call("refund_order", {"order_id": "A-17", "amount": 12.5}))
	d.allow == true
	d.require_approval == true
	d.approvers == ["support-lead"]
	d.reasons == [
		"role support may POST demo",
		"role support may use demo tool refund_order",
		"approval required (support-lead): refunds move money",
	]
}

test_mcp_argument_limit_denies if {
	d := mcp_routed(support_bot, "support-mcp", tool_call("refund_order", {"order_id": "A-17", "amount": 501}))
	d.allow == false
	d.reasons == ["demo tool refund_order: amount must be a number up to 500"]
}

test_mcp_argument_limit_fails_closed_on_non_numbers if {
	d := mcp_routed(support_bot, "support-mcp", tool_call("refund_order", {"order_id": "A-17", "amount": "12"}))
	d.allow == false
	d.reasons == ["demo tool refund_order: amount must be a number up to 500"]
}

# Listing asks about a call with empty arguments: a tool needing approval stays visible.
test_mcp_listing_shows_tools_needing_approval if {
	d := mcp_routed(support_bot, "support-mcp", tool_call("refund_order", {}))
	d.allow == true
	d.require_approval == true
}

test_mcp_forbidden_tool_is_denied_whatever_the_roles if {
	every agent in [support_bot, {"id": "root", "team": "ops", "roles": ["support", "ops", "sales"], "claims": {}}] {
		d := mcp_routed(agent, "support-mcp", tool_call("delete_customer", {"customer_id": "c-42"}))
		d.allow == false
		d.reasons == ["demo tool delete_customer is never allowed: it deletes a customer and all their data, irreversibly"]
	}
}

test_mcp_tool_outside_the_catalogue_is_denied if {
	d := mcp_routed(support_bot, "support-mcp", tool_call("drop_database", {}))
	d.allow == false
	d.reasons == ["role support may not use demo tool drop_database"]
}

test_mcp_role_without_tool_grant_is_denied if {
	d := mcp_routed(sales_bot, "support-mcp", tool_call("search_tickets", {"query": "x"}))
	d.allow == false
	d.reasons == ["role sales may not POST demo", "role sales may not use demo tool search_tickets"]
}

test_mcp_call_without_a_name_is_denied if {
	d := mcp_routed(support_bot, "support-mcp", object.union(mcp_tool("tools/call"), {"name": null, "arguments": {}}))
	d.allow == false
	d.reasons == ["tools/call does not name a tool"]
}

test_mcp_resources_and_prompts_follow_the_catalogue if {
	mcp_routed(support_bot, "support-mcp", resource_read("helpdesk://policies/refunds")).allow == true
	other := mcp_routed(support_bot, "support-mcp", resource_read("file:///etc/passwd"))
	other.allow == false
	other.reasons == ["role support may not use demo resource file:///etc/passwd"]
	prompt := mcp_routed(support_bot, "support-mcp", prompt_get("summarize_ticket"))
	prompt.reasons == ["role support may POST demo", "role support may use demo prompt summarize_ticket"]
}

# initialize, tools/list, notifications ... need only the HTTP grant.
test_mcp_protocol_methods_need_the_http_grant if {
	every method in ["initialize", "tools/list", "notifications/initialized", "ping"] {
		d := mcp_routed(support_bot, "support-mcp", mcp_tool(method))
		d.allow == true
		d.reasons == ["role support may POST demo"]
	}
	mcp_routed(sales_bot, "support-mcp", mcp_tool("tools/list")).allow == false
}

test_mcp_endpoint_takes_only_json_rpc if {
	req := object.union(request("POST", gateway_host, "/mcp"), {"body_error": "too_large", "body_truncated": true})
	d := mcp_call(support_bot, "support-mcp", req, {"kind": "http"})
	d.allow == false
	d.reasons == ["POST to the demo MCP endpoint is not a JSON-RPC message the gateway could inspect"]
}

test_mcp_session_end_is_allowed_but_not_other_deletes if {
	with_session := object.union(request("DELETE", gateway_host, "/mcp"), {"headers": {"mcp-session-id": "abc"}})
	d := mcp_call(support_bot, "support-mcp", with_session, mcp_tool(null))
	d.allow == true
	d.reasons == ["role support may end demo MCP sessions"]
	without := mcp_call(support_bot, "support-mcp", request("DELETE", gateway_host, "/mcp"), {"kind": "http"})
	without.allow == false
}

test_mcp_system_without_catalogue_denies_tool_calls if {
	d := mcp_routed(support_bot, "zendesk", tool_call("get_ticket", {"id": 1}))
	d.allow == false
	d.reasons == ["role support may not use zendesk tool get_ticket"]
}

test_mcp_forward_mode_attributes_by_host if {
	d := mcp_forward(support_bot, "127.0.0.1", tool_call("get_ticket", {"id": 1}))
	d.allow == true
	mcp_forward(support_bot, "localhost", tool_call("delete_customer", {"customer_id": "x"})).allow == false
}

# A tools/call through the support-mcp route to a tool whose catalogue entry is `entry`.
catalogued_call(entry, arguments) := d if {
	tool := tool_call("custom_tool", arguments)
	agent := support_bot # (regopy ignores a bare rule name after `as`)
	d := agentgate.decision with input.agent as agent
		with input.request as mcp_post(gateway_host, tool)
		with input.route as "support-mcp"
		with input.tool as tool
		with input.context as {"mode": "test", "client_ip": "127.0.0.1", "trace_id": "test"}
		with data.gateway.mcp.demo.tools.custom_tool as entry
}

# A catalogue mark of the wrong type (a typo in data.json) still restricts: it must never
# fall back to the role's plain HTTP grant.
test_mcp_never_that_is_not_text_still_denies if {
	every never in [true, 1, null, {"why": "x"}] {
		d := catalogued_call({"roles": ["support"], "never": never}, {})
		d.allow == false
		d.reasons == ["demo tool custom_tool is never allowed: its catalogue entry says never"]
	}
	catalogued_call({"roles": ["support"], "never": false}, {}).allow == true
}

test_mcp_limit_that_is_not_a_number_denies if {
	d := catalogued_call({"roles": ["support"], "max": {"amount": "500"}}, {"amount": 1})
	d.allow == false
	d.reasons == ["demo tool custom_tool: amount must be a number up to a limit the catalogue does not give as a number"]
	limits := catalogued_call({"roles": ["support"], "max": 500}, {"amount": 1})
	limits.allow == false
	limits.reasons == ["demo tool custom_tool: its argument limits are not an object"]
}

test_mcp_malformed_approval_still_holds_the_call if {
	every approval in [true, {"approvers": ["support-lead"]}, {"why": "money"}, null] {
		d := catalogued_call({"roles": ["support"], "approval": approval}, {})
		d.allow == true
		d.require_approval == true
		d.approvers == []
		"approval required (): its catalogue entry asks for approval in a form the policy cannot read" in d.reasons
	}
	catalogued_call({"roles": ["support"], "approval": false}, {}).require_approval == false
}

test_mcp_redact_contacts_that_is_not_a_boolean_still_redacts if {
	every mark in ["yes", 1, null] {
		d := catalogued_call({"roles": ["support"], "redact_contacts": mark}, {})
		d.redact.detectors == ["email", "phone"]
	}
	catalogued_call({"roles": ["support"], "redact_contacts": false}, {}).redact.detectors == []
}
