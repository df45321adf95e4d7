# What the gateway strips from responses before the agent sees them.
package agentgate

import rego.v1

# Agents answer tickets; they do not need the customer's contact details to do it.
ticket_redaction := {
	"fields": [
		"$..requester.email",
		"$..requester.phone",
		"$.ticket.via.source.from.address",
		"$.tickets[*].via.source.from.address",
	],
	"detectors": ["email", "phone"],
}

default redact := {"fields": [], "detectors": []}

redact := ticket_redaction if ticket_read

redaction_reasons contains "customer contact details are redacted from ticket data" if ticket_read

# Zendesk: GET /api/v2/tickets...
ticket_read if {
	system == "zendesk"
	method == "GET"
	zendesk_tickets_path
}

# The quickstart upstream: GET /tickets...
ticket_read if {
	system == "demo"
	method == "GET"
	segments[0] == "tickets"
}
