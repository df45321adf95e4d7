# Calls that are allowed only after a human approves them.
package agentgate_test

import rego.v1

test_customer_email_needs_approval if {
	d := forward(sales_bot, json_request("POST", "api.sendgrid.com", "/v3/mail/send", {"personalizations": []}))
	d.allow == true
	d.require_approval == true
	d.approvers == ["sales-lead"]
	d.reasons == ["role sales may POST sendgrid", "approval required (sales-lead): sends customer email"]
}

test_other_sendgrid_calls_need_no_approval if {
	d := forward(sales_bot, json_request("POST", "api.sendgrid.com", "/v3/templates", {"name": "renewal"}))
	d.allow == true
	d.require_approval == false
	d.approvers == []
}

# Zendesk comments are public unless they say otherwise.
test_ticket_reply_is_public_by_default if {
	d := forward(support_bot, json_request("PUT", "acme.zendesk.com", "/api/v2/tickets/42.json", {"ticket": {"comment": {"body": "Fixed!"}}}))
	d.allow == true
	d.require_approval == true
	d.approvers == ["support-lead"]
	"approval required (support-lead): posts a public reply to a customer" in d.reasons
}

test_explicit_public_reply_needs_approval if {
	d := forward(support_bot, json_request("POST", "acme.zendesk.com", "/api/v2/tickets", {"ticket": {"subject": "Hi", "comment": {"body": "Hello", "public": true}}}))
	d.require_approval == true
	d.approvers == ["support-lead"]
}

test_internal_note_needs_no_approval if {
	d := forward(support_bot, json_request("PUT", "acme.zendesk.com", "/api/v2/tickets/42.json", {"ticket": {"comment": {"body": "Customer is on the beta plan", "public": false}}}))
	d.allow == true
	d.require_approval == false
	d.reasons == ["role support may PUT zendesk"]
}

test_ticket_update_without_comment_needs_no_approval if {
	d := forward(support_bot, json_request("PUT", "acme.zendesk.com", "/api/v2/tickets/42.json", {"ticket": {"status": "solved"}}))
	d.allow == true
	d.require_approval == false
}

test_bulk_update_with_a_public_reply_needs_approval if {
	body := {"tickets": [
		{"id": 1, "status": "solved"},
		{"id": 2, "comment": {"body": "Closing this, thanks!"}},
	]}
	d := forward(support_bot, json_request("PUT", "acme.zendesk.com", "/api/v2/tickets/update_many.json", body))
	d.require_approval == true
	d.approvers == ["support-lead"]
}

# A body the gateway could not parse might hold a public reply: ask first.
test_uninspectable_ticket_write_needs_approval if {
	req := object.union(
		request("PUT", "acme.zendesk.com", "/api/v2/tickets/42.json"),
		{"body_size": 2000000, "body_truncated": true, "body_error": "too_large"},
	)
	d := forward(support_bot, req)
	d.allow == true
	d.require_approval == true
	d.reasons == ["role support may PUT zendesk", "approval required (support-lead): writes a ticket the gateway could not inspect"]
}

test_slack_post_needs_approval if {
	d := forward(support_bot, json_request("POST", "slack.com", "/api/chat.postMessage", {"channel": "C123", "text": "Deploy done"}))
	d.allow == true
	d.require_approval == true
	d.approvers == ["security"]
	d.reasons == ["role support may POST slack", "approval required (security): posts to a Slack channel"]
}

# Slack's Web API accepts GET with query parameters for the same method.
test_slack_post_by_get_needs_approval if {
	d := forward(support_bot, request("GET", "slack.com", "/api/chat.postMessage"))
	d.allow == true
	d.require_approval == true
}

test_slack_read_needs_no_approval if {
	d := routed(ops_bot, "slack", request("GET", gateway_host, "/api/conversations.history"))
	d.allow == true
	d.require_approval == false
}

test_refund_needs_approval if {
	d := forward(ops_bot, json_request("POST", "api.stripe.com", "/v1/refunds", {"charge": "ch_123"}))
	d.allow == true
	d.require_approval == true
	d.approvers == ["finance"]
	d.reasons == ["role ops may POST stripe", "approval required (finance): issues a refund"]
}

test_listing_refunds_needs_no_approval if {
	d := forward(ops_bot, request("GET", "api.stripe.com", "/v1/refunds"))
	d.allow == true
	d.require_approval == false
}

# A trailing slash or doubled slash does not dodge the rule: policy matches path segments.
test_refund_path_spelling_does_not_matter if {
	d := forward(ops_bot, json_request("POST", "api.stripe.com", "/v1/refunds/", {"charge": "ch_123"}))
	d.require_approval == true
}

test_scheduled_slack_post_needs_approval if {
	d := forward(support_bot, json_request("POST", "slack.com", "/api/chat.scheduleMessage", {"channel": "C123", "text": "Reminder", "post_at": 1767225600}))
	d.require_approval == true
	d.approvers == ["security"]
}
