# Which system a call reaches, and whether the agent's roles may call it that way.
#
# Reasons are built with concat rather than sprintf: regopy 1.5.2's sprintf wraps strings
# that came from other builtins in quotes.
package agentgate

import rego.v1

# Grants list methods in upper case and match exactly: "delete" matches no grant.
method := input.request.method

segments := input.request.path_segments

route_mode if is_string(input.route)

# Route mode: the route name decides the system (the gateway picked the upstream).
system := name if {
	route_mode
	some name, sys in data.gateway.systems
	input.route in sys.routes
}

# Forward-proxy mode: the destination host decides.
system := name if {
	not route_mode
	some name, sys in data.gateway.systems
	input.request.host in sys.hosts
}

agent_roles := {role | some role in input.agent.roles}

# An allow reason per role that grants this method on this system.
grants contains concat(" ", ["role", role, "may", method, system]) if {
	some role in agent_roles
	method in data.gateway.roles[role].grants[system]
}

deny contains concat(" ", ["route", input.route, "is not mapped to an approved system"]) if {
	route_mode
	not system
}

deny contains concat(" ", ["host", input.request.host, "is not an approved system"]) if {
	not route_mode
	not system
}

# No grant: say what each of the agent's roles lacks.
deny contains concat(" ", ["role", role, "may not", method, system]) if {
	count(grants) == 0
	some role in agent_roles
}

deny contains concat(" ", ["agent", input.agent.id, "has no roles"]) if {
	system
	count(agent_roles) == 0
}

# Records in these systems are evidence: agents may change them, never delete them.
deny contains concat(" ", ["DELETE on", system, "is never allowed: it is a system of record"]) if {
	method == "DELETE"
	system in data.gateway.systems_of_record
}

# A registered agent stays within the systems it was registered for.
deny contains concat(" ", ["agent", input.agent.id, "is not registered for", system]) if {
	registered := data.agents[input.agent.id]
	not system in registered.systems
}

# This bundle knows HTTP and MCP calls (mcp.rego); other tool kinds need their own rules first.
deny contains "this policy covers HTTP and MCP tool calls only" if not input.tool.kind in {"http", "mcp"}
