# The quickstart upstream: every role may read it, support may write, nobody may delete.
package agentgate_test

import rego.v1

test_demo_read_is_allowed_for_every_role if {
	every agent in [support_bot, sales_bot, ops_bot] {
		d := routed(agent, "demo", request("GET", gateway_host, "/tickets/1"))
		d.allow == true
	}
}

test_demo_write_is_allowed_for_support if {
	d := routed(support_bot, "demo", json_request("POST", gateway_host, "/tickets", {"subject": "Printer on fire"}))
	d.allow == true
	d.reasons == ["role support may POST demo"]
	d.require_approval == false
}

test_demo_write_is_denied_for_sales if {
	d := routed(sales_bot, "demo", json_request("POST", gateway_host, "/tickets", {"subject": "Printer on fire"}))
	d.allow == false
	d.reasons == ["role sales may not POST demo"]
}

test_demo_delete_is_denied if {
	d := routed(support_bot, "demo", request("DELETE", gateway_host, "/tickets/1"))
	d.allow == false
	d.reasons == ["role support may not DELETE demo"]
}

# Through the forward proxy, the quickstart upstream is reached by its loopback address.
test_demo_by_host_in_forward_mode if {
	every host in ["127.0.0.1", "localhost"] {
		d := forward(support_bot, request("GET", host, "/tickets/1"))
		d.reasons == ["role support may GET demo", "customer contact details are redacted from ticket data"]
	}
}
