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
# Anything the catalogue does not grant is denied. The gateway also asks this policy, tool by
# tool, what to show in tools/list (resources/list, prompts/list): it evaluates a tools/call
# with empty arguments for each listed tool and hides the ones that would be denied.
package agentgate

import rego.v1

mcp_method := input.tool.method if input.tool.kind == "mcp"

mcp_catalogue := data.gateway.mcp[system]

# Name-bearing methods and the part of the catalogue they use.
mcp_uses := {
	"tools/call": "tools",
	"prompts/get": "prompts",
	"resources/read": "resources",
	"resources/subscribe": "resources",
	"resources/unsubscribe": "resources",
}

mcp_labels := {"tools": "tool", "prompts": "prompt", "resources": "resource"}

mcp_part := mcp_uses[mcp_method]

mcp_label := mcp_labels[mcp_part]

# The tool (prompt) name, or the resource URI.
mcp_item := input.tool.uri if mcp_part == "resources"

mcp_item := input.tool.name if {
	mcp_part
	mcp_part != "resources"
}

mcp_entry := mcp_catalogue[mcp_part][mcp_item] if is_string(mcp_item)

mcp_granted if {
	some role in agent_roles
	role in mcp_entry.roles
}

grants contains concat(" ", ["role", role, "may use", system, mcp_label, mcp_item]) if {
	not mcp_entry.never
	some role in agent_roles
	role in mcp_entry.roles
}

# No role grants this tool (or it is not in the catalogue at all): say what each role lacks.
deny contains concat(" ", ["role", role, "may not use", system, mcp_label, mcp_item]) if {
	mcp_catalogue
	is_string(mcp_item)
	not mcp_entry.never
	not mcp_granted
	some role in agent_roles
}

deny contains concat("", [system, " ", mcp_label, " ", mcp_item, " is never allowed: ", mcp_entry.never]) if {
	is_string(mcp_entry.never)
}

# Fail closed on calls that do not say what they use.
deny contains concat(" ", [mcp_method, "does not name a", mcp_label]) if {
	mcp_part
	not is_string(mcp_item)
}

deny contains concat(" ", ["system", system, "has no MCP catalogue:", mcp_method, "is not allowed"]) if {
	mcp_part
	system
	not mcp_catalogue
}

# Argument limits, checked on the arguments of the call itself.
deny contains concat("", [system, " tool ", mcp_item, ": ", name, " must be a number up to ", format_int(limit, 10)]) if {
	mcp_part == "tools"
	some name, limit in mcp_entry.max
	value := input.tool.arguments[name]
	not mcp_within(value, limit)
}

mcp_within(value, limit) if {
	is_number(value)
	value <= limit
}

approvals contains {"why": mcp_entry.approval.why, "approvers": mcp_entry.approval.approvers} if {
	mcp_granted
	mcp_entry.approval
}

# Everything posted to an MCP endpoint must be a JSON-RPC message the gateway could read
# (a body too large to inspect, or not JSON, would otherwise pass on the HTTP grant alone).
deny contains concat(" ", ["POST to the", system, "MCP endpoint is not a JSON-RPC message the gateway could inspect"]) if {
	input.request.method == "POST"
	input.request.path in mcp_catalogue.endpoints
	not mcp_method
}

# Ending an MCP session (DELETE with Mcp-Session-Id) is protocol, not a deletion: whoever may
# POST to the server may end its sessions.
grants contains concat(" ", ["role", role, "may end", system, "MCP sessions"]) if {
	input.request.method == "DELETE"
	input.request.path in mcp_catalogue.endpoints
	input.request.headers["mcp-session-id"]
	some role in agent_roles
	"POST" in data.gateway.roles[role].grants[system]
}

# Tool results that carry customer contact details are redacted like HTTP ticket reads.
redact := ticket_redaction if mcp_redacts_contacts

redaction_reasons contains "customer contact details are redacted from ticket data" if mcp_redacts_contacts

mcp_redacts_contacts if {
	mcp_part == "tools"
	mcp_granted
	mcp_entry.redact_contacts == true
}
