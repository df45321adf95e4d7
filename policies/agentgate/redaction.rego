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

redact := ticket_redaction if redacts_contacts

redaction_reasons contains "customer contact details are redacted from ticket data" if redacts_contacts

# Ticket reads, and MCP tools that return tickets (mcp.rego). (False rather than undefined
# otherwise: the embedded engine keeps a rule's value for the rest of the decision, but
# evaluates an undefined rule again wherever it is referenced.)
default redacts_contacts := false

redacts_contacts if ticket_read

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
	input.request.path_segments[0] == "tickets"
}
