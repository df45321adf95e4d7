# agentgate example policy: the decision the gateway enforces on every tool call.
#
# The gateway evaluates data.agentgate.decision with this input:
#
#   input.agent   = {id, team, roles: [string], claims,         from the verified token;
#                    registration}                               the agent's registry entry, or null
#   input.request = {method, scheme, host, port, path,           canonical: host lower-cased,
#                    path_segments: [string],                    path dot-segments resolved,
#                    query: {name: [string]},                    segments percent-decoded
#                    headers: {lower-case name: string},         (credential headers removed)
#                    body,                                       parsed JSON, or null when empty
#                    body_size, body_truncated, body_error,      or not parsed (see body_error)
#                    content_type}
#   input.route   = route name (route mode), or null (forward-proxy mode)
#   input.tool    = {kind: "http"}, or for an MCP message {kind: "mcp", ...} (see mcp.rego)
#   input.context = {time_ns, mode: "forward" | "route", client_ip, trace_id}
#
# data.gateway is policies/data.json (systems, roles, systems of record) and data.agents is
# the agent registry (agent id -> {owner, team, purpose, environment, systems}; may be empty);
# input.agent.registration is the calling agent's entry in it.
#
# It must produce (and always does: anything no rule allows is denied):
#
#   {allow: bool, reasons: [string], require_approval: bool, approvers: [role],
#    redact: {fields: [JSONPath], detectors: [name]}}
#
# Reasons explain allowed calls too, so every audit row says why it went through.
#
# The gateway's embedded engine (regopy) evaluates every rule the decision refers to, on
# every call: the rules are written to be cheap for it. See "Writing fast policies for the
# embedded engine" in ../README.md before restructuring them.
package agentgate

import rego.v1

default decision := {
	"allow": false,
	"reasons": ["no rule allowed this request"],
	"require_approval": false,
	"approvers": [],
	"redact": {"fields": [], "detectors": []},
}

# The common case first: nothing denies the call, a role grants it, and there is nothing to
# approve or redact. (Approvers and approval reasons come from approvals: a rule that needs
# a human adds to approvals. A rule that redacts adds to redact and redaction_reasons.)
decision := {
	"allow": true,
	"reasons": sorted(grants),
	"require_approval": false,
	"approvers": [],
	"redact": redact,
} if {
	deny == set()
	not grants == set()
	approvals == set()
	redaction_reasons == set()
} else := {
	# Any deny reason wins over every grant.
	"allow": false,
	"reasons": sorted(deny),
	"require_approval": false,
	"approvers": [],
	"redact": {"fields": [], "detectors": []},
} if {
	not deny == set()
} else := {
	# Allowed, with its response redacted (ticket reads) but nothing to approve.
	"allow": true,
	"reasons": array.concat(sorted(grants), sorted(redaction_reasons)),
	"require_approval": false,
	"approvers": [],
	"redact": redact,
} if {
	not grants == set()
	approvals == set()
} else := {
	# Allowed once a human approves (there are approvals: see above). Reasons list the
	# grants, then what the call must go through.
	"allow": true,
	"reasons": array.concat(sorted(grants), sorted(approval_reasons | redaction_reasons)),
	"require_approval": true,
	"approvers": sorted(approvers),
	"redact": redact,
} if {
	not grants == set()
}

# A set's members in order. (Sorting an array rather than the set itself keeps the result a
# true array under regopy 1.5.2, whose sort(set) does not compare equal to arrays.)
sorted(set_of_values) := values if {
	values := [x | some x in set_of_values]
	not values[1] # at most one member: already in order
} else := sort([x | some x in set_of_values])
