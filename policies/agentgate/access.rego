# Which system a call reaches, and whether the agent's roles may call it that way.
#
# Reasons are built with concat rather than sprintf: regopy 1.5.2's sprintf wraps strings
# that came from other builtins in quotes. Rules that build a reason do it in their last
# line, after the checks (see "Writing fast policies for the embedded engine" in ../README.md).
package agentgate

import rego.v1

# Grants list methods in upper case and match exactly: "delete" matches no grant.
method := input.request.method

segments := input.request.path_segments

default route_mode := false

route_mode if is_string(input.route)

# The system the call reaches: in route mode the route name decides (the gateway picked the
# upstream), in forward-proxy mode the destination host. Undefined when no system matches.
system := name if {
	name := route_attribution[0]
} else := name if {
	not route_mode
	name := host_attribution[0]
}

# The system whose routes list the route, as [name], or [] (so that it is worked out once
# even for calls no system matches). Routes are usually named after their system, so that
# system is looked at first.
#
# The searches go through a comprehension, which reads data.gateway.systems as it is
# (`some name, sys in data.gateway.systems` in a rule body makes the embedded engine copy the
# whole object first). These two rules read only input and data, calling no other rule and
# no builtin, so the engine shares them between tests instead of copying them for every
# `with` and call path: it keeps `agentgate policy test` quick to compile.
route_attribution := [route] if {
	route := input.route
	data.gateway.systems[route].routes[_] == route
} else := [name] if {
	route := input.route
	not route == null
	some name in [n | sys := data.gateway.systems[n]; sys.routes[_] == route]
} else := []

# The system whose hosts list the destination host, as [name], or [].
host_attribution := [name] if {
	host := input.request.host
	some name in [n | sys := data.gateway.systems[n]; sys.hosts[_] == host]
} else := []

# An allow reason per role that grants this method on this system.
grants contains reason if {
	sys := system
	some role in input.agent.roles
	method in data.gateway.roles[role].grants[sys]
	reason := concat(" ", ["role", role, "may", method, sys])
}

# No grant: say why. (A call that reaches no system has no grant either.)
deny contains reason if {
	grants == set()
	some reason in ungranted
}

ungranted contains unattributed if not system

unattributed := concat(" ", ["route", input.route, "is not mapped to an approved system"]) if route_mode
else := concat(" ", ["host", input.request.host, "is not an approved system"])

# What each of the agent's roles lacks.
ungranted contains concat(" ", ["role", role, "may not", method, system]) if {
	some role in input.agent.roles
}

ungranted contains concat(" ", ["agent", input.agent.id, "has no roles"]) if {
	system
	not any_role
}

any_role if some _ in input.agent.roles

# Records in these systems are evidence: agents may change them, never delete them.
deny contains reason if {
	method == "DELETE"
	sys := system
	sys in data.gateway.systems_of_record
	reason := concat(" ", ["DELETE on", sys, "is never allowed: it is a system of record"])
}

# A registered agent stays within the systems it was registered for. (The gateway puts the
# agent's registry entry in the input, null for agents it does not list: looking the agent up
# in data.agents would cost the embedded engine ~0.4 µs per agent listed before it.)
deny contains reason if {
	registered_systems := input.agent.registration.systems
	sys := system
	not sys in registered_systems
	reason := concat(" ", ["agent", input.agent.id, "is not registered for", sys])
}

# This bundle knows HTTP and MCP calls; other tool kinds need their own rules first.
# (mcp_use, in mcp.rego, is defined for exactly those two kinds.)
deny contains "this policy covers HTTP and MCP tool calls only" if not mcp_use
