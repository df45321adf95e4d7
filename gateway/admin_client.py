"""The CLI's side of the admin API: authenticated requests, refusals as messages, tables.

Shared by gateway/cli.py and the ``agentgate audit`` questions in gateway/investigate.py (which
cli.py imports, so these cannot live in cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from http.client import HTTPResponse
from typing import Any

from gateway.config import ConfigError, load_config


def admin_open(args: argparse.Namespace, path: str, payload: dict[str, Any] | None = None,
               method: str = "GET") -> HTTPResponse:
    """Send ``payload`` (JSON) to ``path`` with the admin token from ``--token`` or
    ``$AGENTGATE_TOKEN``; the open response. A refusal or an unreachable API exits with a message."""
    token = args.token or os.environ.get("AGENTGATE_TOKEN")
    if not token:
        raise ConfigError("an admin token is needed: pass --token or set AGENTGATE_TOKEN")
    base = args.admin_url or load_config(getattr(args, "config", None)).admin_url
    req = urllib.request.Request(
        base.rstrip("/") + path, data=json.dumps(payload).encode() if payload is not None else None,
        method=method, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=args.timeout)
    except urllib.error.HTTPError as exc:
        try:
            err = json.load(exc)["error"]
            message = f"{err['code']}: {err['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        else:
            if err["code"] == "wrong_audience":  # most likely an agent token
                message += (" (the admin API takes admin tokens only, for identity.admin_audience; "
                            "with the dev key: agentgate token mint --admin ...)")
        raise SystemExit(f"agentgate: admin API refused: {message}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"agentgate: cannot reach the admin API at {base}: {exc.reason}") from None


def admin_call(args: argparse.Namespace, path: str, payload: dict[str, Any] | None = None,
               method: str = "POST") -> Any:
    """:func:`admin_open`, and the JSON answer."""
    with admin_open(args, path, payload, method) as resp:
        return json.load(resp)


def print_table(columns: list[str], rows: list[list[Any]]) -> None:
    cells = [[("" if v is None else v if isinstance(v, str) else json.dumps(v)) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
