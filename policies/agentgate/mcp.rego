# MCP (Model Context Protocol) calls: which tools, resources and prompts of an MCP server each
# role may use, which need a human's approval, which are never allowed, and argument limits.
#
# The gateway recognises JSON-RPC 2.0 bodies and sets, for every MCP message:
#
#   input.tool = {kind: "mcp", method, server, jsonrpc_id, batch,
#                 name, arguments}   tools/call, prompts/get
#                 uri                resources/read, resources/subscribe, resources/unsubscribe
#
# The HTTP rules still apply (the route or host names the system; a role must grant POST on
# it). data.gateway.mcp.<system> is that system's MCP catalogue:
#
#   {"endpoints": ["/mcp"],
#    "tools":     {name: {"roles": [role], "approval": {"why", "approvers"},
#                         "max": {argument: number}, "never": why, "redact_contacts": bool}},
#    "resources": {uri: {"roles": [role]}},
#    "prompts":   {name: {"roles": [role]}}}
#
# Whatever the catalogue does not grant is denied. The gateway also asks this policy, item by
# item, what to show in tools/list (resources/list, prompts/list): it evaluates a tools/call
# with empty arguments for each listed tool and hides those that would be denied.
#
# Written as one rule that reads the call and functions of plain values: regopy compiles every
# `with input...` in the bundle's tests against the rules that depend on input, so keeping those
# few keeps the bundle quick to compile.
package agentgate

import rego.v1

# The MCP part of the decision.
mcp := mcp_judge(input.tool, input.request, system, agent_roles)

deny contains reason if some reason in mcp.deny

grants contains reason if some reason in mcp.grants

approvals contains approval if some approval in mcp.approvals

# Tool results that carry customer contact details are redacted like HTTP ticket reads.
redact := ticket_redaction if mcp.redact_contacts

redaction_reasons contains "customer contact details are redacted from ticket data" if mcp.redact_contacts

# Name-bearing methods: [catalogue part, label, the member naming the item].
mcp_uses := {
	"tools/call": ["tools", "tool", "name"],
	"prompts/get": ["prompts", "prompt", "name"],
	"resources/read": ["resources", "resource", "uri"],
	"resources/subscribe": ["resources", "resource", "uri"],
	"resources/unsubscribe": ["resources", "resource", "uri"],
}

mcp_judge(tool, req, sys, roles) := {
	"deny": union({mcp_item_denials(use), mcp_endpoint_denials(tool, req, sys)}),
	"grants": union({{g | some role in use.granted; g := concat(" ", ["role", role, "may use", sys, use.label, use.item])},
		mcp_session_grants(req, sys, roles)}),
	"approvals": {{"why": use.entry.approval.why, "approvers": use.entry.approval.approvers} |
		count(use.granted) > 0
		use.entry.approval
	},
	"redact_contacts": mcp_redacts(use),
} if {
	use := mcp_use(tool, sys, roles)
}

# What a name-bearing message uses, and which of the agent's roles may use it.
mcp_use(tool, sys, roles) := use if {
	tool.kind == "mcp"
	[part, label, key] := mcp_uses[tool.method]
	item := object.get(tool, key, null)
	entry := object.get(data.gateway, ["mcp", sys, part, item], {})
	use := {
		"tool": tool, "system": sys, "part": part, "label": label, "item": item, "entry": entry, "roles": roles,
		"granted": {role | some role in roles; role in object.get(entry, "roles", []); not entry.never},
	}
} else := {"item": null, "entry": {}, "granted": set(), "part": null}

# Why a call is denied: no name, never allowed, no role grants it (or it is not in the
# catalogue, or the system has none), or an argument over its limit.
mcp_item_denials(use) := {reason |
	use.part != null
	some reason in mcp_item_reasons(use)
}

mcp_item_reasons(use) := [concat(" ", [use.tool.method, "does not name a", use.label])] if not is_string(use.item)

mcp_item_reasons(use) := [concat("", [use.system, " ", use.label, " ", use.item, " is never allowed: ", use.entry.never])] if {
	is_string(use.item)
	use.entry.never
}

mcp_item_reasons(use) := [concat(" ", ["role", role, "may not use", use.system, use.label, use.item]) | some role in use.roles] if {
	is_string(use.item)
	not use.entry.never
	count(use.granted) == 0
}

mcp_item_reasons(use) := [concat("", [use.system, " tool ", use.item, ": ", name, " must be a number up to ", format_int(limit, 10)]) |
	some name
	limit := use.entry.max[name]
	not mcp_within(object.get(use.tool.arguments, name, 0), limit)
] if {
	is_string(use.item)
	count(use.granted) > 0
}

mcp_redacts(use) := true if {
	count(use.granted) > 0
	use.entry.redact_contacts == true
} else := false

mcp_within(value, limit) if {
	is_number(value)
	value <= limit
}

# Everything posted to an MCP endpoint must be a JSON-RPC message the gateway could read
# (a body too large to inspect, or not JSON, would otherwise pass on the HTTP grant alone).
mcp_endpoint_denials(tool, req, sys) := {concat(" ", ["POST to the", sys, "MCP endpoint is not a JSON-RPC message the gateway could inspect"]) |
	req.method == "POST"
	req.path in object.get(data.gateway, ["mcp", sys, "endpoints"], [])
	not tool.kind == "mcp"
}

# Ending an MCP session (DELETE with Mcp-Session-Id) is protocol, not a deletion: whoever may
# POST to the server may end its sessions.
mcp_session_grants(req, sys, roles) := {concat(" ", ["role", role, "may end", sys, "MCP sessions"]) |
	req.method == "DELETE"
	req.path in object.get(data.gateway, ["mcp", sys, "endpoints"], [])
	req.headers["mcp-session-id"]
	some role in roles
	"POST" in data.gateway.roles[role].grants[sys]
}
