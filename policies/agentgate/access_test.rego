# Attribution, role grants, systems of record and the agent registry.
package agentgate_test

import rego.v1

import data.agentgate

test_role_grant_allows_and_says_why if {
	d := forward(support_bot, request("GET", "acme.zendesk.com", "/api/v2/users/7.json"))
	d.allow == true
	d.reasons == ["role support may GET zendesk"]
	d.require_approval == false
	d.approvers == []
}

test_unknown_host_is_denied if {
	d := forward(support_bot, request("GET", "api.unknown.example", "/v1/things"))
	d.allow == false
	d.reasons == ["host api.unknown.example is not an approved system"]
}

test_unknown_route_is_denied if {
	d := routed(support_bot, "pastebin", request("GET", gateway_host, "/"))
	d.allow == false
	d.reasons == ["route pastebin is not mapped to an approved system"]
}

# In route mode the route decides, even when the host belongs to another system (demo's).
test_route_mode_attributes_by_route if {
	d := routed(sales_bot, "salesforce", request("GET", "127.0.0.1", "/services/data/v60.0/sobjects/Account"))
	d.allow == true
	d.reasons == ["role sales may GET salesforce"]
}

# In forward mode the destination host decides.
test_forward_mode_attributes_by_host if {
	d := forward(sales_bot, request("GET", "acme.zendesk.com", "/api/v2/tickets.json"))
	d.allow == false
	d.reasons == ["role sales may not GET zendesk"]
}

test_method_not_granted_is_denied if {
	d := forward(support_bot, request("PATCH", "acme.my.salesforce.com", "/services/data/v60.0/sobjects/Account/1"))
	d.allow == false
	d.reasons == ["role support may not PATCH salesforce"]
}

test_grant_for_method_allows if {
	d := forward(sales_bot, request("PATCH", "acme.my.salesforce.com", "/services/data/v60.0/sobjects/Account/1"))
	d.allow == true
	d.reasons == ["role sales may PATCH salesforce"]
}

# Methods match exactly: a lower-case spelling matches no grant.
test_method_case_is_not_folded if {
	d := forward(support_bot, request("get", "acme.zendesk.com", "/api/v2/users/7.json"))
	d.allow == false
	d.reasons == ["role support may not get zendesk"]
}

test_any_granting_role_allows if {
	agent := {"id": "helper", "team": "support", "roles": ["sales", "support"], "claims": {}}
	d := forward(agent, request("POST", "acme.atlassian.net", "/rest/api/3/issue"))
	d.allow == true
	d.reasons == ["role support may POST jira"]
}

test_every_role_is_named_when_none_grants if {
	agent := {"id": "helper", "team": "support", "roles": ["sales", "support"], "claims": {}}
	d := forward(agent, request("POST", "api.stripe.com", "/v1/customers"))
	d.allow == false
	d.reasons == ["role sales may not POST stripe", "role support may not POST stripe"]
}

test_agent_without_roles_is_denied if {
	agent := {"id": "nobody", "team": "support", "roles": [], "claims": {}}
	d := forward(agent, request("GET", "slack.com", "/api/conversations.history"))
	d.allow == false
	d.reasons == ["agent nobody has no roles"]
}

test_unknown_role_is_denied if {
	agent := {"id": "intruder", "team": "support", "roles": ["admin"], "claims": {}}
	d := forward(agent, request("GET", "slack.com", "/api/conversations.history"))
	d.allow == false
	d.reasons == ["role admin may not GET slack"]
}

test_delete_on_every_system_of_record_is_denied if {
	every system, host in {"salesforce": "acme.my.salesforce.com", "zendesk": "acme.zendesk.com", "jira": "acme.atlassian.net"} {
		d := forward(ops_bot, request("DELETE", host, "/records/1"))
		d.allow == false
		concat(" ", ["DELETE on", system, "is never allowed: it is a system of record"]) in d.reasons
	}
}

# Even a role granted DELETE cannot delete from a system of record.
test_delete_on_system_of_record_overrides_grants if {
	d := forward(sales_bot, request("DELETE", "acme.my.salesforce.com", "/services/data/v60.0/sobjects/Account/1"))
		with data.gateway.roles.sales.grants.salesforce as ["GET", "DELETE"]
	d.allow == false
	d.reasons == ["DELETE on salesforce is never allowed: it is a system of record"]
}

# ... while DELETE elsewhere is an ordinary grant.
test_delete_elsewhere_follows_grants if {
	d := forward(ops_bot, request("DELETE", "slack.com", "/api/files.delete"))
		with data.gateway.roles.ops.grants.slack as ["GET", "DELETE"]
	d.allow == true
	d.reasons == ["role ops may DELETE slack"]
}

registry := {"support-bot": {"owner": "alice@example.com", "team": "support", "systems": ["zendesk", "slack"]}}

test_registered_agent_outside_its_systems_is_denied if {
	d := registered_forward(support_bot, request("GET", "acme.atlassian.net", "/rest/api/3/issue/OPS-1"), registry)
	d.allow == false
	d.reasons == ["agent support-bot is not registered for jira"]
}

test_registered_agent_within_its_systems_is_allowed if {
	d := registered_forward(support_bot, request("GET", "slack.com", "/api/conversations.history"), registry)
	d.allow == true
}

# The registry narrows registered agents only; an empty registry narrows nobody.
test_unregistered_agent_is_judged_by_roles_alone if {
	d := registered_forward(support_bot, request("GET", "acme.atlassian.net", "/rest/api/3/issue/OPS-1"), {})
	d.allow == true
	d.reasons == ["role support may GET jira"]
}

test_other_tool_kinds_are_denied if {
	d := agentgate.decision with input.agent as {"id": "support-bot", "roles": ["support"]}
		with input.request as {"method": "POST", "host": "acme.zendesk.com", "path_segments": []}
		with input.route as null
		with input.tool as {"kind": "grpc", "name": "create_ticket"}
	d.allow == false
	d.reasons == ["this policy covers HTTP and MCP tool calls only"]
}

# With nothing to judge, the decision is still defined: a deny.
test_decision_defaults_to_deny if {
	d := agentgate.decision with input.tool as {"kind": "http"}
	d == {
		"allow": false,
		"reasons": ["no rule allowed this request"],
		"require_approval": false,
		"approvers": [],
		"redact": {"fields": [], "detectors": []},
	}
}

# Denied calls carry no approval or redaction work.
test_denied_call_has_no_obligations if {
	d := forward(support_bot, request("POST", "api.sendgrid.com", "/v3/mail/send"))
	d.allow == false
	d.require_approval == false
	d.approvers == []
	d.redact == {"fields": [], "detectors": []}
}
