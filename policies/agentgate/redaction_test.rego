# Customer contact details are stripped from ticket data before the agent sees it.
package agentgate_test

import rego.v1

ticket_redaction := {
	"fields": [
		"$..requester.email",
		"$..requester.phone",
		"$.ticket.via.source.from.address",
		"$.tickets[*].via.source.from.address",
	],
	"detectors": ["email", "phone"],
}

test_zendesk_ticket_read_is_redacted if {
	d := forward(support_bot, request("GET", "acme.zendesk.com", "/api/v2/tickets/42.json"))
	d.allow == true
	d.redact == ticket_redaction
	d.reasons == ["role support may GET zendesk", "customer contact details are redacted from ticket data"]
}

test_zendesk_ticket_list_is_redacted if {
	d := routed(support_bot, "zendesk", request("GET", gateway_host, "/api/v2/tickets.json"))
	d.redact == ticket_redaction
}

test_zendesk_ticket_comments_are_redacted if {
	d := forward(support_bot, request("GET", "acme.zendesk.com", "/api/v2/tickets/42/comments.json"))
	d.redact == ticket_redaction
}

test_other_zendesk_reads_are_not_redacted if {
	d := forward(support_bot, request("GET", "acme.zendesk.com", "/api/v2/macros.json"))
	d.allow == true
	d.redact == {"fields": [], "detectors": []}
}

test_ticket_writes_are_not_redacted if {
	d := forward(support_bot, json_request("PUT", "acme.zendesk.com", "/api/v2/tickets/42.json", {"ticket": {"status": "open"}}))
	d.redact == {"fields": [], "detectors": []}
}

test_demo_ticket_read_is_redacted if {
	d := routed(support_bot, "demo", request("GET", gateway_host, "/tickets/1"))
	d.allow == true
	d.redact == ticket_redaction
}

test_denied_ticket_read_is_not_redacted if {
	d := forward(sales_bot, request("GET", "acme.zendesk.com", "/api/v2/tickets/42.json"))
	d.allow == false
	d.redact == {"fields": [], "detectors": []}
}
