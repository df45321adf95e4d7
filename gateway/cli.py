"""The ``agentgate`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from gateway.admin_client import admin_call, print_table
from gateway.config import Config, ConfigError, load_config
from gateway.errors import ProxyStartError
from gateway.policy import PolicyError
from gateway.investigate import register_cli


def _config(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None))


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import serve_forever

    cfg = _config(args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop_factory = None
    if cfg.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve_forever(cfg))
    return 0


def cmd_token_mint(args: argparse.Namespace) -> int:
    from gateway.devkey import ensure_dev_key, mint_token, parse_ttl

    cfg = _config(args)
    if not cfg.identity.dev_signing_key:
        raise ConfigError("token mint signs with the dev key: set identity.dev_signing_key = true")
    if "EdDSA" not in cfg.identity.algorithms:
        raise ConfigError("token mint makes EdDSA tokens, but identity.algorithms does not allow EdDSA")
    roles = [r.strip() for r in (args.roles or "").split(",") if r.strip()]
    ttl = parse_ttl(args.ttl)
    if ttl > cfg.identity.max_token_lifetime_seconds:
        raise ConfigError(f"--ttl {args.ttl} is longer than identity.max_token_lifetime_seconds "
                          f"({cfg.identity.max_token_lifetime_seconds} s): the gateway would refuse the token")
    # An admin token is for the admin API's audience only; an agent token never carries it.
    audience = cfg.identity.admin_audience if args.admin else cfg.identity.audience
    token = mint_token(
        ensure_dev_key(cfg.dev_key_path), agent=args.agent, team=args.team, roles=roles,
        ttl_seconds=ttl, issuer=cfg.identity.issuer, audience=audience,
        team_claim=cfg.identity.team_claim, roles_claim=cfg.identity.roles_claim)
    print(token)
    return 0


def _extra_data(cfg: Config) -> dict[str, Any]:
    from gateway.registry import AgentRegistry

    registry = AgentRegistry.load(cfg.identity.registry_file) if cfg.identity.registry_file else None
    return {"agents": registry.as_data() if registry else {}}


def cmd_policy_test(args: argparse.Namespace) -> int:
    from gateway.policy.bundle import run_tests

    cfg = _config(args)
    bundle_dir = Path(args.dir) if args.dir else cfg.policy.dir
    results = run_tests(bundle_dir, _extra_data(cfg))
    failed = [r for r in results if not r.passed]
    for r in results:
        status = "PASS" if r.passed else "FAIL"
        detail = f" ({r.error})" if r.error else ""
        if args.verbose or not r.passed:
            print(f"{status} data.{r.package}.{r.name}{detail}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


def cmd_policy_eval(args: argparse.Namespace) -> int:
    from gateway.models import Decision
    from gateway.policy import make_engine

    cfg = _config(args)
    doc = json.loads(Path(args.input).read_text()) if args.input != "-" else json.load(sys.stdin)
    if isinstance(doc, dict) and set(doc) == {"input"}:
        doc = doc["input"]  # accept OPA's {"input": ...} wrapping too

    async def evaluate() -> Any:
        engine = make_engine(cfg.policy.model_copy(update={"hot_reload": False}), _extra_data(cfg))
        await engine.start()
        try:
            return await engine.evaluate(doc)
        finally:
            await engine.close()

    result = asyncio.run(evaluate())
    print(json.dumps(result, indent=2, sort_keys=True))
    try:
        Decision.model_validate(result)
    except ValueError as exc:
        print(f"warning: the result does not match the decision contract: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_audit_sql(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"sql": args.sql}
    if args.limit:
        payload["limit"] = args.limit
    result = admin_call(args, "/v1/audit/sql", payload)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result["columns"], result["rows"])
    return 0


def _print_json_or(args: argparse.Namespace, doc: Any, columns: list[str], rows: list[dict[str, Any]]) -> None:
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(columns, [[r.get(c) for c in columns] for r in rows])


def cmd_approvals_list(args: argparse.Namespace) -> int:
    query = f"?state={args.state}" if args.state != "all" else ""
    doc = admin_call(args, f"/v1/approvals{query}", method="GET")
    _print_json_or(args, doc, ["id", "state", "agent_id", "method", "host", "path", "approvers", "reasons"],
                   doc["approvals"])
    return 0


def cmd_approvals_decide(args: argparse.Namespace) -> int:
    verb = "approve" if args.approvals_command == "approve" else "deny"
    doc = admin_call(args, f"/v1/approvals/{args.id}/{verb}", {"reason": args.reason or ""})
    print(f"approval {doc['id']}: {doc['state']} by {doc['decided_by']}")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    target = "" if args.scope == "all" else args.target
    doc = admin_call(args, "/v1/killswitches", {"scope": args.scope, "target": target, "reason": args.reason})
    print(f"kill-switch {doc['id']} on {doc['scope']} {doc['target']}: {doc['reason']}")
    return 0


def cmd_killswitches(args: argparse.Namespace) -> int:
    doc = admin_call(args, "/v1/killswitches" + ("?all=1" if args.all else ""), method="GET")
    _print_json_or(args, doc, ["id", "scope", "target", "reason", "created_by", "active"], doc["killswitches"])
    return 0


def cmd_revive(args: argparse.Namespace) -> int:
    """Revoke one switch by id, or every active switch on an agent, a team or 'all'."""
    if args.what.startswith("ks_"):
        ids = [args.what]
    else:
        scope, target = args.what, (args.target or "")
        if scope not in ("agent", "team", "all"):
            raise SystemExit("agentgate: revive takes a kill-switch id, or agent ID, team T, all")
        active = admin_call(args, "/v1/killswitches", method="GET")["killswitches"]
        ids = [s["id"] for s in active if s["scope"] == scope and (scope == "all" or s["target"] == target)]
        if not ids:
            raise SystemExit(f"agentgate: no active kill-switch on {scope} {target}".rstrip())
    for switch_id in ids:
        doc = admin_call(args, f"/v1/killswitches/{switch_id}", method="DELETE")
        print(f"kill-switch {doc['id']} revoked ({doc['scope']} {doc['target']})")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Walk every gateway instance's hash chain; exit 1 when a row was deleted or altered."""
    query = f"?instance={urllib.parse.quote(args.instance)}" if args.instance else ""
    report = admin_call(args, f"/v1/audit/verify{query}", {})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for inst in report["instances"]:
            print(f"{inst['instance']}: {inst['rows']} rows, seq {inst['first_seq']}..{inst['last_seq']}, "
                  f"{inst['problems']} problem(s)")
        for p in report["problems"]:
            where = f"seq {p['seq']}" + (f"..{p['seq_end']}" if p.get("seq_end") else "")
            print(f"  {p['kind']}: {p['instance']} {where} {p['call_id']}: {p['detail']}")
        print("chain intact" if report["ok"] else f"TAMPERING: {report['problems_total']} problem(s)")
    return 0 if report["ok"] else 1


def cmd_ca_path(args: argparse.Namespace) -> int:
    from mitmproxy import certs

    cfg = _config(args)
    cfg.ca_dir.mkdir(parents=True, exist_ok=True)
    certs.CertStore.from_store(str(cfg.ca_dir), "mitmproxy", 2048)  # creates the CA on first use
    print(cfg.ca_cert_path.resolve())
    return 0


def cmd_demo_upstream(args: argparse.Namespace) -> int:
    from gateway.demo_upstream import serve

    serve(args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentgate", description="Security proxy for AI agents' tool calls.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML configuration (default: $AGENTGATE_CONFIG, else the shipped example)")
        return p

    def with_admin(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument("--admin-url", help="admin API base URL (default: from the configuration)")
        p.add_argument("--token", help="admin JWT (default: $AGENTGATE_TOKEN)")
        p.add_argument("--timeout", type=float, default=30.0)
        return p

    with_config(sub.add_parser("run", help="start the gateway")).set_defaults(func=cmd_run)

    token = sub.add_parser("token", help="dev tokens").add_subparsers(dest="token_command", required=True)
    mint = with_config(token.add_parser("mint", help="mint a token signed with the dev key"))
    mint.add_argument("--agent", required=True, help="agent id (the sub claim)")
    mint.add_argument("--team")
    mint.add_argument("--roles", help="comma-separated roles")
    mint.add_argument("--ttl", default="1h",
                      help="lifetime, e.g. 30m, 1h, 2d (default 1h; at most identity.max_token_lifetime_seconds)")
    mint.add_argument("--admin", action="store_true",
                      help="an admin API token (audience identity.admin_audience), not an agent token")
    mint.set_defaults(func=cmd_token_mint)

    policy = sub.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command", required=True)
    ptest = with_config(policy.add_parser("test", help="run the bundle's Rego test_ rules"))
    ptest.add_argument("--dir", help="bundle directory (default: policy.dir)")
    ptest.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    ptest.set_defaults(func=cmd_policy_test)
    peval = with_config(policy.add_parser("eval", help="print the decision for an input document"))
    peval.add_argument("--input", required=True, help="JSON file with the input document ('-' for stdin)")
    peval.set_defaults(func=cmd_policy_eval)

    audit = sub.add_parser("audit", help="audit queries").add_subparsers(dest="audit_command", required=True)
    sql = with_admin(audit.add_parser("sql", help="read-only SQL over the audit store"))
    sql.add_argument("sql")
    sql.add_argument("--limit", type=int)
    sql.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sql.set_defaults(func=cmd_audit_sql)
    register_cli(audit, with_admin)
    verify = with_admin(audit.add_parser("verify", help="check the audit hash chain for deleted or altered rows"))
    verify.add_argument("--instance", help="one gateway instance (default: all)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=cmd_audit_verify)

    approvals = sub.add_parser("approvals", help="approval holds").add_subparsers(dest="approvals_command",
                                                                                required=True)
    alist = with_admin(approvals.add_parser("list", help="list approvals"))
    alist.add_argument("--state", default="pending",
                       choices=["pending", "approved", "denied", "consumed", "expired", "all"])
    alist.add_argument("--json", action="store_true")
    alist.set_defaults(func=cmd_approvals_list)
    for verb in ("approve", "deny"):
        p = with_admin(approvals.add_parser(verb, help=f"{verb} a pending approval"))
        p.add_argument("id")
        p.add_argument("--reason", required=verb == "deny")
        p.set_defaults(func=cmd_approvals_decide)

    kill = sub.add_parser("kill", help="flip a kill-switch").add_subparsers(dest="scope", required=True)
    for scope in ("agent", "team", "all"):
        p = with_admin(kill.add_parser(scope, help=f"suspend {'every agent' if scope == 'all' else 'one ' + scope}"))
        if scope != "all":
            p.add_argument("target")
        p.add_argument("--reason", default="kill-switch flipped from the agentgate CLI")
        p.set_defaults(func=cmd_kill)
    kls = with_admin(sub.add_parser("killswitches", help="list kill-switches"))
    kls.add_argument("--all", action="store_true", help="include revoked ones")
    kls.add_argument("--json", action="store_true")
    kls.set_defaults(func=cmd_killswitches)
    revive = with_admin(sub.add_parser("revive", help="revoke kill-switches: ID | agent ID | team T | all"))
    revive.add_argument("what")
    revive.add_argument("target", nargs="?")
    revive.set_defaults(func=cmd_revive)

    ca = sub.add_parser("ca", help="interception CA").add_subparsers(dest="ca_command", required=True)
    with_config(ca.add_parser("path", help="print the CA certificate's path")).set_defaults(func=cmd_ca_path)

    demo = sub.add_parser("demo-upstream", help="serve the quickstart's local stand-in API")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=9999)
    demo.set_defaults(func=cmd_demo_upstream)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"agentgate: {exc}", file=sys.stderr)
        return 2
    except (PolicyError, ProxyStartError) as exc:
        print(f"agentgate: cannot start: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a listen address already in use
        print(f"agentgate: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
