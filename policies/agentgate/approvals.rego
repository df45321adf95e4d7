# Allowed calls that a human must approve first: anything that speaks to customers,
# broadcasts to colleagues, or moves money.
#
# Each rule starts with the check that rules it out for most calls (the system) and builds
# its approval in its last line: the embedded engine computes a constant rule value before
# the checks, a value bound in the body only when they pass.
package agentgate

import rego.v1

# Sending customer email.
approvals contains approval if {
	system == "sendgrid"
	method == "POST"
	segments == ["v3", "mail", "send"]
	approval := {"why": "sends customer email", "approvers": ["sales-lead"]}
}

# Ticket writes that may reach the customer (below).
approvals contains approval if {
	zendesk_ticket_write
	approval := zendesk_write_approval
}

# A public ticket comment is emailed to the customer. Zendesk makes comments public
# unless they say "public": false.
zendesk_write_approval := {"why": "posts a public reply to a customer", "approvers": ["support-lead"]} if {
	some comment in ticket_comments
	not comment.public == false
} else := {"why": "writes a ticket the gateway could not inspect", "approvers": ["support-lead"]} if {
	# Fail closed: a ticket write whose body the gateway could not parse may hold a reply.
	# (Comments are only found in a parsed body, so the two cases never overlap.)
	not body_inspected
}

# Posting to Slack channels. Slack's Web API also takes GET, so the method does not matter.
approvals contains approval if {
	system == "slack"
	segments in {["api", "chat.postMessage"], ["api", "chat.scheduleMessage"]}
	approval := {"why": "posts to a Slack channel", "approvers": ["security"]}
}

# Refunds move money.
approvals contains approval if {
	system == "stripe"
	method == "POST"
	segments == ["v1", "refunds"]
	approval := {"why": "issues a refund", "approvers": ["finance"]}
}

approvers contains role if {
	some approval in approvals
	some role in approval.approvers
}

approval_reasons contains concat("", ["approval required (", concat(", ", approval.approvers), "): ", approval.why]) if {
	some approval in approvals
}

zendesk_ticket_write if {
	system == "zendesk"
	method in {"POST", "PUT", "PATCH"}
	zendesk_tickets_path
}

# /api/v2/tickets, /api/v2/tickets.json, /api/v2/tickets/123.json, /api/v2/tickets/update_many.json ...
zendesk_tickets_path if {
	segments[0] == "api"
	segments[1] == "v2"
	trim_suffix(segments[2], ".json") == "tickets"
}

# The body is null when it was too large, not JSON, or unparsable (see body_error).
body_inspected if is_object(input.request.body)

# A single-ticket write carries "ticket"; update_many carries "tickets".
ticket_comments contains input.request.body.ticket.comment

ticket_comments contains comment if {
	some ticket in input.request.body.tickets
	comment := ticket.comment
}
