# Test bundle for the gateway's end-to-end tests (not the shipped example).
package agentgate

import rego.v1

deny_reasons contains "admin paths are off limits" if startswith(input.request.path, "/admin")

deny_reasons contains sprintf("host %s is not allowed", [input.request.host]) if {
	not input.request.host in data.test.allowed_hosts
}

deny_reasons contains "writers only" if {
	input.request.method != "GET"
	not "writer" in input.agent.roles
}

deny_reasons contains "the body must not ask to drop tables" if {
	input.request.body.action == "drop_tables"
}

deny_reasons contains "readers only" if {
	not "reader" in input.agent.roles
	not "writer" in input.agent.roles
}

default decision := {"allow": false, "reasons": ["no decision"]}

decision := {
	"allow": count(deny_reasons) == 0,
	"reasons": reasons,
	"require_approval": false,
	"approvers": [],
	"redact": redact,
} if not needs_approval

reasons := sort(deny_reasons) if count(deny_reasons) > 0
reasons := [sprintf("%s may %s %s", [input.agent.id, input.request.method, input.request.path])] if count(deny_reasons) == 0

# Refunds need a human: a support lead.
needs_approval if {
	input.request.method == "POST"
	startswith(input.request.path, "/refunds")
}

decision := {
	"allow": count(deny_reasons) == 0,
	"reasons": array.concat(reasons, ["refunds need a support lead's approval"]),
	"require_approval": true,
	"approvers": ["support-lead"],
	"redact": redact,
} if needs_approval

# Responses under /pii are redacted before the agent sees them.
default redact := {"fields": [], "detectors": []}

redact := {
	"fields": ["$..secret_field", "$.customer.ssn"],
	"detectors": ["email", "phone", "us_ssn", "payment_card", "jwt", "aws_access_key"],
} if startswith(input.request.path, "/pii")

redact := {"fields": [], "detectors": ["no_such_detector"]} if startswith(input.request.path, "/badredact")
