"""Targets, completeness checks and the JSON / markdown output of a run."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

DESCRIPTIONS = {
    "direct": "load generator → upstream over HTTP (the limit of route mode)",
    "direct-tls": "built-in generator → upstream over HTTPS (the limit of forward mode)",
    "route": "`/r/demo/...`: JWT, embedded Rego (example bundle), audit to chDB, redaction off; the same "
             "request over and over, so decisions after the first come from the decision cache",
    "route-new": "route mode, every request to a path never sent before (`/items/<n>`, `/echo/<n>`): "
                 "every decision is evaluated by rego-cpp (and the decision cache churns)",
    "route-fsync": "as `route`, on a gateway with `audit.spool_fsync = \"before_forward\"`: each call's "
                   "write-ahead record is fsync'd before the upstream call (it survives a power loss; the default, "
                   "`interval`, syncs within 20 ms): the price of that fsync",
    "redact": "route mode, `GET /r/demo/tickets/1`: the policy returns redact fields and detectors",
    "forward": "forward proxy, CONNECT + JWT, TLS interception, HTTPS upstream with its own CA",
    "mitm": "bare mitmproxy (core, proxyserver, next_layer, tlsconfig only), same options",
}


def find(report: dict[str, Any], config: str, workload: str) -> dict[str, Any] | None:
    return next((r for r in report["results"] if r["config"] == config and r["workload"] == workload
                 and "loaded" in r), None)


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _added(report: dict[str, Any], config: str, stat: str) -> float | None:
    route, direct = find(report, config, "get"), find(report, "direct", "get")
    mine, base = _get(route, "single", stat), _get(direct, "single", stat)
    return (mine - base) / 1000 if mine is not None and base is not None else None


def _lag_seconds(report: dict[str, Any]) -> float | None:
    lag = report.get("lag") or {}
    return lag["lag_max_ms"] / 1000 if lag.get("lag_max_ms") is not None else None


def _decision_p99_ms(report: dict[str, Any], config: str) -> float | None:
    v = _get(find(report, config, "get"), "audit_single", "decision_p99_us")
    return v / 1000 if v is not None else None


Target = tuple[str, Callable[[dict[str, Any]], float | None], str, float, str]
TARGETS: tuple[Target, ...] = (
    ("route mode, full pipeline, req/s at 32 connections (same request: cached decision)",
     lambda r: _get(find(r, "route", "get"), "loaded", "rps"), ">=", 4000, "req/s"),
    ("route mode, full pipeline, req/s at 32 connections (new path each request: evaluated)",
     lambda r: _get(find(r, "route-new", "get"), "loaded", "rps"), ">=", 4000, "req/s"),
    ("route mode added latency over direct, p50 at 1 connection", lambda r: _added(r, "route", "p50_us"), "<=", 0.5, "ms"),
    ("route mode added latency over direct, p99 at 1 connection", lambda r: _added(r, "route", "p99_us"), "<=", 2.0, "ms"),
    ("the same, new path each request, p50", lambda r: _added(r, "route-new", "p50_us"), "<=", 0.5, "ms"),
    ("the same, new path each request, p99", lambda r: _added(r, "route-new", "p99_us"), "<=", 2.0, "ms"),
    ("the same, `audit.spool_fsync = \"before_forward\"` (fsync before forwarding), p50",
     lambda r: _added(r, "route-fsync", "p50_us"), "<=", 0.5, "ms"),
    ("the same, `audit.spool_fsync = \"before_forward\"`, p99", lambda r: _added(r, "route-fsync", "p99_us"),
     "<=", 2.0, "ms"),
    ("forward mode with TLS interception, req/s at 32 connections",
     lambda r: _get(find(r, "forward", "get"), "loaded", "rps"), ">=", 1500, "req/s"),
    ("decision latency p99, evaluated (audit decision_us, route GET to new paths, 1 connection)",
     lambda r: _decision_p99_ms(r, "route-new"), "<=", 0.3, "ms"),
    ("decision latency p99, cached (audit decision_us, route GET, 1 connection)",
     lambda r: _decision_p99_ms(r, "route"), "<=", 0.3, "ms"),
    ("audit lag (max of samples) at a sustained 1,000 req/s", _lag_seconds, "<=", 1.0, "s"),
)


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, value_of, op, bound, unit in TARGETS:
        value = value_of(report)
        if value is None:
            verdict = "not measured"
        else:
            ok = value >= bound if op == ">=" else value <= bound
            verdict = "PASS" if ok else "FAIL"
        out.append({"target": name, "value": None if value is None else round(value, 3), "op": op,
                    "bound": bound, "unit": unit, "verdict": verdict})
    lag = report.get("lag")
    if lag and lag["rate_achieved"] < 0.95 * lag["rate_target"]:
        out[-1]["note"] = f"only {lag['rate_achieved']} req/s were sustained, not {lag['rate_target']}"
        if out[-1]["verdict"] == "PASS":
            out[-1]["verdict"] = "INCONCLUSIVE"
    return out


def problems(report: dict[str, Any], only: tuple[str, ...], leak: bool, leak_only: bool) -> list[str]:
    """Why the run did not produce numbers for everything it was asked for (empty: it did)."""
    found: list[str] = []
    for config in () if leak_only else only:
        if config == "redact-large":
            found += _large_problems(report.get("redact_large"))
            continue
        if config == "lag":
            lag = report.get("lag")
            if not lag or not lag.get("visible") or lag.get("load", {}).get("requests", 0) == 0:
                found.append("lag: no audit-lag numbers")
            continue
        rows = [r for r in report["results"] if r["config"] == config]
        if not rows:
            found.append(f"{config}: did not run")
        for r in rows:
            for phase in ("loaded", "single"):
                if not _get(r, phase, "requests") or not math.isfinite(_get(r, phase, "p50_us") or math.nan):
                    found.append(f"{config}/{r['workload']}: no {phase} numbers")
            if r.get("error"):
                found.append(f"{config}/{r['workload']}: {r['error']}")
    if leak and not (report.get("leak") or {}).get("requests_total"):
        found.append("leak: no numbers")
    found += [f"{e['what']}: {e['error']}" for e in report.get("errors", [])]
    return found


def _large_problems(rl: dict[str, Any] | None) -> list[str]:
    if not rl:
        return ["redact-large: no numbers"]
    if rl.get("error"):
        return [f"redact-large: {rl['error']}"]
    values = [_get(rl, "plain", "p50_us"), _get(rl, "redacted", "p50_us"),
              _get(rl, "small_alone", "load", "p99_us"), _get(rl, "small_during", "load", "p99_us")]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return ["redact-large: some latencies are missing"]
    return []


def _ms(us: float | None) -> str:
    return "–" if us is None else f"{us / 1000:.2f}"


def _num(v: Any, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def _pair(a: Any, b: Any) -> str:
    return "–" if a is None and b is None else f"{_num(a)} / {_num(b)}"


def _spool(r: dict[str, Any]) -> str:
    spool = r.get("spool_loaded")
    if not spool:
        return "–"
    return "no fsync" if not spool["fsyncs"] else _num(spool["begins_per_fsync"], "{:.2f}")


def table(report: dict[str, Any]) -> str:
    head = ("| configuration | workload | generator | req/s @32 | × limit | p50 @1 ms | p99 @1 ms | p50 @32 ms "
            "| p99 @32 ms | CPU µs/req | peak RSS MB | store CPU µs/req | store peak RSS MB "
            "| decision p50/p99 µs @1 | decision p50/p99 µs @32 | calls per fsync @32 | other load @32/@1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["results"]:
        if "loaded" not in r:
            lines.append(f"| {r['config']} | {r['workload']} | – | error: {r.get('error', '?')[:80]} |"
                         + " |" * 13)
            continue
        lo, si = r["loaded"], r["single"]
        lines.append(" ".join([
            f"| {r['config']} | {r['workload']} | {r['generator']} | {_num(lo['rps'])}",
            f"| {_num(r.get('ratio_to_baseline'), '{:.3f}')} | {_ms(si['p50_us'])} | {_ms(si['p99_us'])}",
            f"| {_ms(lo['p50_us'])} | {_ms(lo['p99_us'])} | {_num(r.get('cpu_us_per_request'))}",
            f"| {_num(r.get('peak_rss_mb'))}",
            f"| {_num(r.get('store_cpu_us_per_request'))} | {_num(r.get('store_peak_rss_mb'))}",
            f"| {_pair(_get(r, 'audit_single', 'decision_p50_us'), _get(r, 'audit_single', 'decision_p99_us'))}",
            f"| {_pair(_get(r, 'audit_loaded', 'decision_p50_us'), _get(r, 'audit_loaded', 'decision_p99_us'))}",
            f"| {_spool(r)}",
            f"| {_num(r.get('foreign_load_cores'), '{:.2f}')} / {_num(r.get('foreign_load_cores_single'), '{:.2f}')} |",
        ]))
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    o = m["options"]
    out = [f"# agentgate benchmark ({m['date']}, commit {m.get('commit') or '?'})", "",
           f"{m['cpus']} × {m['cpu_model']}, Python {m['python']}, mitmproxy {m['versions']['mitmproxy']}, "
           f"aiohttp {m['versions']['aiohttp']}, regopy {m['versions']['regopy']}, chDB {m['versions']['chdb']}; "
           f"wrk: {m['wrk'] or 'not installed'}.",
           f"Pinning: {m['pinning']}. Load generators: {m['load_generator']}.",
           f"Each phase: at most {o['duration']} s and {o['requests']:,} requests"
           f"{' (smoke run)' if o['smoke'] else ''}; load average {m.get('loadavg_start')} at start, "
           f"{m.get('loadavg_end')} at the end; {m.get('elapsed_s')} s in all.", ""]
    if report["results"]:
        out += [table(report), ""]
        out += [f"- **{k}**: {v}" for k, v in DESCRIPTIONS.items()
                if any(r["config"] == k for r in report["results"])]
        out += ["", "× limit: req/s over the same workload's `direct` (route, redact) or `direct-tls` (forward, "
                "mitm). CPU: utime+stime of the gateway (or mitmproxy) process over the 32-connection phase, "
                "its audit spool and the hand-off of rows to the store included. Store: the gateway's child "
                "process that runs embedded ClickHouse (chDB), pinned with the load like a ClickHouse server "
                "elsewhere would be; its CPU is the inserts' (and state polling's) cost per request. Peak RSS: "
                "VmHWM since the process started. Calls per fsync: write-ahead records per spool fsync (one "
                "per group commit in `route-fsync`; at most one per 20 ms otherwise). Decision: the audit "
                "column `decision_us`; at 32 connections it includes the wait for the event loop. Other load: "
                "CPU (in cores) the machine spent on work that was not the bench's during the phase.", ""]
    targets = report.get("targets") or []
    if targets:
        out += ["## Targets", ""]
        for t in targets:
            value = "–" if t["value"] is None else f"{t['value']:,} {t['unit']}"
            note = f" ({t['note']})" if t.get("note") else ""
            out.append(f"- {t['verdict']}: {t['target']}: {value} (target {t['op']} {t['bound']:,} {t['unit']}){note}")
        out.append("")
    if report.get("lag"):
        lag = report["lag"]
        out += ["## Audit lag", "",
                f"{lag['rate_achieved']} req/s sustained in route mode (target {lag['rate_target']}, "
                f"{lag['connections']} connections, gateway CPU {lag['gateway_cpu_utilisation']}, other load "
                f"{lag.get('foreign_load_cores')} cores); "
                f"{lag['visible']}/{lag['samples']} sampled calls visible: p50 {lag['lag_p50_ms']} ms, "
                f"p99 {lag['lag_p99_ms']} ms, max {lag['lag_max_ms']} ms (at most {lag['polls_max']} polls). "
                "The admin SQL API flushes the audit writer before each query, so this is the lag seen by "
                "someone asking about a call.", ""]
    if report.get("redaction"):
        red = report["redaction"]
        reasons = "; ".join((red.get("audit") or {}).get("reasons") or [])
        out += ["## Redaction", "",
                f"Ticket retrieval through route `demo`: HTTP {red['status']}, redaction applied: "
                f"{'yes' if red['redaction_applied'] else 'no (the customer email reached the agent)'}; "
                f"audited reasons: {reasons or '–'}.", ""]
    if report.get("redact_large"):
        out += large_section(report["redact_large"])
    if report.get("leak"):
        lk = report["leak"]
        out += ["## Leak check", "",
                f"{lk['config']} GET, {lk['generator']}: RSS {lk['rss_after_first_mb']} MB after {lk['requests_first']:,} "
                f"requests, {lk['rss_after_total_mb']} MB after {lk['requests_total']:,} (×{lk['rss_ratio']}, "
                f"{lk['growth_mb']} MB, {lk['growth_bytes_per_request']} bytes/request over the last nine tenths)"
                f"{'' if lk['complete'] else ' — stopped by the time bound before N'}.", ""]
    if report.get("profile"):
        p = report["profile"]
        out += [f"## Where the gateway's time goes (py-spy, {p.get('config', 'route GET')})", "",
                f"{p['samples']} samples over {p['seconds']} s at {p['rps_during']} req/s:", ""]
        out += [f"- {c['pct']}% {c['name']}" for c in p["components"] if c["pct"] >= 0.5]
        out += ["", "Top self frames: " + "; ".join(f"{s['name']} {s['pct']}%" for s in p["self"][:8]), ""]
    if report.get("problems"):
        out += ["## Problems", ""] + [f"- {p}" for p in report["problems"]] + [""]
    return "\n".join(out)


def large_section(rl: dict[str, Any]) -> list[str]:
    """Markdown of the ``redact-large`` configuration."""
    out = ["## Redaction of a large response", ""]
    if "redacted" not in rl:
        return out + [f"No numbers: {rl.get('error') or 'the phase did not finish'}.", ""]
    probe, plain, red = rl["probe"], rl["plain"], rl["redacted"]
    counts = (probe.get("audit_redacted") or {}).get("redaction_counts") or {}
    out += [f"{rl['body_bytes']:,} bytes of JSON ({probe['plain'].get('records', '?')} ticket records with emails, "
            "phones, card numbers, IBANs, SSNs, bearer tokens, AWS keys, JWTs, IPs) from the same upstream path "
            "through two routes of the same gateway: `bulk` (no redaction) and `bulk-redact` (JSONPath fields + "
            "`detectors: [\"all\"]`, bench/policy/bulk.rego). Sequential, one keep-alive connection, the two "
            "alternating.", "",
            "| call | n | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for name, r in (("without redaction", plain), ("with redaction", red)):
        out.append(f"| {name} | {r['requests']} | {_ms(r['p50_us'])} | {_ms(r['p99_us'])} | {_ms(r['max_us'])} |")
    added = rl["added_ms"]
    out += [f"| added by redaction | | {_num(added['p50'], '{:.2f}')} | {_num(added['p99'], '{:.2f}')} | |", "",
            f"Redaction throughput: **{_num(rl['mb_per_s'], '{:.2f}')} MB/s** (body size over the added p50; "
            f"MB = 10^6 bytes). Redactions on one call (audit): "
            f"{', '.join(f'{k} {v:,}' for k, v in sorted(counts.items())) or '–'}; "
            f"{probe['redacted']['bytes']:,} bytes after redaction.", ""]
    alone, during, bg = rl["small_alone"], rl["small_during"], rl["background"]
    out += [f"| small GET `/r/demo/items/42`, {rl['small_connections']} connections ({rl['generator_small']}) "
            "| req/s | p50 ms | p99 ms | max ms | decision p99 µs | gateway CPU | other load |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in (("alone", alone), (f"while {bg['clients']} large redacted calls run", during)):
        lo = r["load"]
        out.append(f"| {name} | {_num(lo['rps'])} | {_ms(lo['p50_us'])} | {_ms(lo['p99_us'])} | {_ms(lo['max_us'])} "
                   f"| {_num(_get(r, 'audit', 'decision_p99_us'))} "
                   f"| {_num(r.get('gateway_cpu_utilisation'), '{:.2f}')} "
                   f"| {_num(r.get('foreign_load_cores'), '{:.2f}')} |")
    out += [f"| ratio (while / alone) | | {_num(rl['small_p50_ratio'], '{:.2f}')} "
            f"| **{_num(rl['small_p99_ratio'], '{:.2f}')}** | | | | |", "",
            f"Background: {bg['overlapping']} large redacted calls overlapped the small-GET phase (at least one in "
            f"flight {_num(None if bg['coverage'] is None else bg['coverage'] * 100, '{:.0f}')}% of it); "
            f"{bg['completed']} ended in it, p50 {_num(bg['p50_ms'], '{:.1f}')} ms, "
            f"{_num(bg['mb_per_s'], '{:.2f}')} MB/s redacted. Decision p99 is the audit column `decision_us`, "
            "which includes waiting for the gateway's event loop. The redactions and the small GETs share the "
            "gateway's core(s) (see Pinning): some slowdown is their fair share of CPU, the rest is waiting.", ""]
    return out


def write(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "latest.json", out_dir / "latest.md"
    js.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md.write_text(markdown(report))
    return js, md
