# agentgate example policy: the decision the gateway enforces on every tool call.
#
# The gateway evaluates data.agentgate.decision with this input:
#
#   input.agent   = {id, team, roles: [string], claims}         from the verified token
#   input.request = {method, scheme, host, port, path,           canonical: host lower-cased,
#                    path_segments: [string],                    path dot-segments resolved,
#                    query: {name: [string]},                    segments percent-decoded
#                    headers: {lower-case name: string},         (credential headers removed)
#                    body,                                       parsed JSON, or null when empty
#                    body_size, body_truncated, body_error,      or not parsed (see body_error)
#                    content_type}
#   input.route   = route name (route mode), or null (forward-proxy mode)
#   input.tool    = {kind: "http"}
#   input.context = {time_ns, mode: "forward" | "route", client_ip, trace_id}
#
# data.gateway is policies/data.json (systems, roles, systems of record) and data.agents is
# the agent registry (agent id -> {owner, team, purpose, environment, systems}; may be empty).
#
# It must produce (and always does: anything no rule allows is denied):
#
#   {allow: bool, reasons: [string], require_approval: bool, approvers: [role],
#    redact: {fields: [JSONPath], detectors: [name]}}
#
# Reasons explain allowed calls too, so every audit row says why it went through.
package agentgate

import rego.v1

default decision := {
	"allow": false,
	"reasons": ["no rule allowed this request"],
	"require_approval": false,
	"approvers": [],
	"redact": {"fields": [], "detectors": []},
}

# Any deny reason wins over every grant.
decision := {
	"allow": false,
	"reasons": sorted(deny),
	"require_approval": false,
	"approvers": [],
	"redact": {"fields": [], "detectors": []},
} if {
	count(deny) > 0
}

decision := {
	"allow": true,
	"reasons": array.concat(sorted(grants), sorted(approval_reasons | redaction_reasons)),
	"require_approval": count(approvals) > 0,
	"approvers": sorted(approvers),
	"redact": redact,
} if {
	count(deny) == 0
	count(grants) > 0
}

# A set's members in order. (Sorting an array rather than the set itself keeps the result a
# true array under regopy 1.5.2, whose sort(set) does not compare equal to arrays.)
sorted(set_of_values) := sort([x | some x in set_of_values])
