# Bench only (python -m bench, configuration redact-large): added to a copy of the example
# bundle in the bench's work directory, never to policies/.
#
# Routes "bulk" and "bulk-redact" both lead to the bench upstream and count as system "demo"
# (so the example grants apply: support may GET). Reads through "bulk-redact" are redacted
# with JSONPath fields and every detector; reads through "bulk" are not redacted at all, so
# the two differ only in redaction.
package agentgate

import rego.v1

bench_bulk_routes := {"bulk", "bulk-redact"}

system := "demo" if {
	route_mode
	input.route in bench_bulk_routes
}

bench_bulk_redacted if {
	input.route == "bulk-redact"
	method == "GET"
}

redact := {
	"fields": [
		"$.records[*].requester.email",
		"$.records[*].requester.phone",
		"$.records[*].payment.card_number",
		"$.records[*].payment.iban",
	],
	"detectors": ["all"],
} if bench_bulk_redacted

redaction_reasons contains "bench: bulk records are redacted (fields and all detectors)" if bench_bulk_redacted
