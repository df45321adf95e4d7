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
# Whatever the catalogue does not grant is denied. A mark of the wrong type still restricts
# ("never": true denies, a malformed approval holds the call with nobody able to approve it, a
# limit that is not a number denies, any "redact_contacts" but false redacts). The gateway also asks this policy, item by
# item, what to show in tools/list (resources/list, prompts/list): it evaluates a tools/call
# with empty arguments for each listed tool and hides those that would be denied.
#
# Most calls are HTTP calls: every rule here that adds to grants, deny, approvals or
# redacts_contacts starts with mcp_use[0] (or the HTTP method), which rules it out at once.
package agentgate

import rego.v1

# What an MCP message uses, as [catalogue part, label, the member naming the item]; [] for
# HTTP calls and for MCP messages that name nothing (initialize, tools/list ...). Undefined
# for other tool kinds, which this bundle does not judge (access.rego denies them).
mcp_use := [] if {
	input.tool.kind == "http"
} else := ["tools", "tool", "name"] if {
	tool := input.tool
	tool.kind == "mcp"
	tool.method == "tools/call"
} else := ["prompts", "prompt", "name"] if {
	tool := input.tool
	tool.kind == "mcp"
	tool.method == "prompts/get"
} else := ["resources", "resource", "uri"] if {
	tool := input.tool
	tool.kind == "mcp"
	{"resources/read", "resources/subscribe", "resources/unsubscribe"}[tool.method]
} else := [] if {
	input.tool.kind == "mcp"
}

# A name-bearing MCP message on a system, worked out once: whether any of the agent's roles
# may use the item it names, whether it names anything at all (a string), the item's
# catalogue entry ({} if the catalogue, or the system, has none), its label ("tool",
# "prompt", "resource"), the item (null if none) and the roles that may use it (none when it
# is never allowed). One rule that the others read rather than many small ones: that keeps
# the tests quick to compile (see ../README.md).
mcp_call := {"usable": usable, "named": is_string(item), "entry": entry, "label": use[1], "item": item, "granted": granted} if {
	use := mcp_use
	key := use[2]
	item := object.get(input.tool, key, null)
	present(input.request.method)
	entry := object.get(data.gateway, ["mcp", system, use[0], item], {})
	granted := {role | some role in input.agent.roles; mcp_may_use(entry, role)}
	usable := granted != set()
}

mcp_may_use(entry, role) if {
	not entry.never
	role in object.get(entry, "roles", [])
}

grants contains reason if {
	mcp_use[0]
	call := mcp_call
	some role in call.granted
	reason := concat(" ", ["role", role, "may use", system, call.label, call.item])
}

deny contains reason if {
	mcp_use[0]
	some reason in mcp_denials
}

# Why a call is denied: no name, never allowed, no role grants it (or it is not in the
# catalogue, or the system has none), or an argument over its limit.
mcp_denials contains concat(" ", [input.tool.method, "does not name a", call.label]) if {
	call := mcp_call
	not call.named
}

mcp_denials contains concat("", [system, " ", call.label, " ", call.item, " is never allowed: ", never_why(call.entry.never)]) if {
	call := mcp_call
	call.named
	call.entry.never
}

# A catalogue mark of the wrong type (a typo in the data) must still restrict, never leave the
# call to the role's plain HTTP grant: any "never" but false denies, and so on below.
never_why(why) := why if is_string(why)
else := "its catalogue entry says never"

mcp_denials contains concat(" ", ["role", role, "may not use", system, call.label, call.item]) if {
	call := mcp_call
	call.named
	not call.entry.never
	not call.usable
	some role in input.agent.roles
}

mcp_denials contains concat("", [system, " tool ", call.item, ": ", name, " must be a number up to ", limit_text(limit)]) if {
	call := mcp_call
	call.usable
	some name
	limit := call.entry.max[name]
	not mcp_within(object.get(input.tool.arguments, name, 0), limit)
}

mcp_denials contains concat("", [system, " tool ", call.item, ": its argument limits are not an object"]) if {
	call := mcp_call
	call.usable
	limits := call.entry.max
	not is_object(limits)
}

mcp_within(value, limit) if {
	is_number(value)
	is_number(limit)
	value <= limit
}

limit_text(limit) := format_int(limit, 10) if is_number(limit)
else := "a limit the catalogue does not give as a number"

approvals contains approval if {
	mcp_use[0]
	call := mcp_call
	call.usable
	call.entry.approval
	approval := mcp_approval(call.entry.approval)
}

# An approval the policy cannot read still holds the call: with no approvers named, nobody
# can approve it and it is denied when the hold times out.
mcp_approval(spec) := {"why": spec.why, "approvers": spec.approvers} if {
	is_string(spec.why)
	is_array(spec.approvers)
} else := {"why": "its catalogue entry asks for approval in a form the policy cannot read", "approvers": []}

# Tool results that carry customer contact details are redacted like HTTP ticket reads.
redacts_contacts if {
	mcp_use[0]
	call := mcp_call
	call.usable
	call.entry.redact_contacts
}

# Everything posted to an MCP endpoint must be a JSON-RPC message the gateway could read
# (a body too large to inspect, or not JSON, would otherwise pass on the HTTP grant alone).
deny contains reason if {
	method == "POST"
	not mcp_use[0] # tools/call and the like are JSON-RPC messages: no need to look further
	sys := system
	input.request.path in data.gateway.mcp[sys].endpoints
	reason := mcp_endpoint_denial(input.tool, sys)
}

mcp_endpoint_denial(tool, sys) := concat(" ", ["POST to the", sys, "MCP endpoint is not a JSON-RPC message the gateway could inspect"]) if {
	not tool.kind == "mcp"
}

# Ending an MCP session (DELETE with Mcp-Session-Id) is protocol, not a deletion: whoever may
# POST to the server may end its sessions.
grants contains reason if {
	method == "DELETE"
	present(input.tool)
	sys := system
	input.request.path in data.gateway.mcp[sys].endpoints
	input.request.headers["mcp-session-id"]
	some role in input.agent.roles
	"POST" in data.gateway.roles[role].grants[sys]
	reason := concat(" ", ["role", role, "may end", sys, "MCP sessions"])
}

# True for any value, false and null included (and undefined when the value is): the MCP
# rules judge calls that come with input.tool and input.request, as every gateway call does.
present(_) := true
