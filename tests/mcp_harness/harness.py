"""Pytest-side helpers: start ``server.py`` and run ``client.py`` under the ``.venv-mcp`` interpreter.

These run in the gateway's venv and only use the standard library; the SDK itself stays in
subprocesses (see env.py for why).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.mcp_harness.env import mcp_python

HERE = Path(__file__).resolve().parent
SERVER = HERE / "server.py"
CLIENT = HERE / "client.py"
START_TIMEOUT = 30.0
BEARER_ENV = "MCP_HARNESS_BEARER"
PROXY_BEARER_ENV = "MCP_HARNESS_PROXY_BEARER"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class McpServer:
    proc: subprocess.Popen[str]
    base_url: str
    log: Path
    http_log: Path
    stderr: Path

    @property
    def url(self) -> str:
        """The MCP endpoint (``/mcp``)."""
        return self.base_url + "/mcp"

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def calls(self) -> list[dict[str, Any]]:
        """Every tools/call the server received: ``{"tool": name, "arguments": {...}}``."""
        return _read_jsonl(self.log)

    def http_requests(self) -> list[dict[str, Any]]:
        """Every HTTP request the server received (method, path, headers redacted, body)."""
        return _read_jsonl(self.http_log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mcp_server(tmp: Path, *, response: Literal["sse", "json"] = "sse", stateless: bool = False,
                     certfile: Path | None = None, keyfile: Path | None = None) -> McpServer:
    """Start server.py on 127.0.0.1:0 and wait (bounded) for its ``listening`` line."""
    tmp.mkdir(parents=True, exist_ok=True)
    log, http_log, stderr = tmp / "tools.jsonl", tmp / "http.jsonl", tmp / "server.stderr"
    cmd = [str(mcp_python()), str(SERVER), "--port", "0", "--log", str(log), "--http-log", str(http_log),
           f"--{response}"]
    if stateless:
        cmd.append("--stateless")
    if certfile is not None and keyfile is not None:
        cmd += ["--certfile", str(certfile), "--keyfile", str(keyfile)]
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:  # also keeps draining stdout so the server never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT)
    except queue.Empty:
        line = ""
    prefix = "mcp-server listening on "
    if not line.startswith(prefix):
        proc.kill()
        proc.wait()
        raise AssertionError(f"mcp server did not start: {line!r}\n{stderr.read_text()}")
    scheme = "https" if certfile else "http"
    return McpServer(proc, f"{scheme}://{line[len(prefix):].strip()}", log, http_log, stderr)


def _client_cmd(url: str, *, headers: dict[str, str] | None, bearer: str | None, proxy: str | None,
                proxy_bearer: str | None, ca: Path | None, timeout: float) -> tuple[list[str], dict[str, str]]:
    cmd = [str(mcp_python()), str(CLIENT), "--url", url, "--timeout", str(timeout)]
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}}
    for k, v in (headers or {}).items():
        cmd += ["--header", f"{k}:{v}"]
    if bearer is not None:  # tokens go through the environment, never argv
        env[BEARER_ENV] = bearer
        cmd += ["--bearer-env", BEARER_ENV]
    if proxy is not None:
        cmd += ["--proxy", proxy]
    if proxy_bearer is not None:
        env[PROXY_BEARER_ENV] = proxy_bearer
        cmd += ["--proxy-bearer-env", PROXY_BEARER_ENV]
    if ca is not None:
        cmd += ["--ca", str(ca)]
    return cmd, env


def _run(cmd: list[str], env: dict[str, str], deadline: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=deadline)
    assert proc.returncode == 0, f"client.py failed ({proc.returncode}):\n{proc.stderr}"
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"client.py printed no JSON:\n{proc.stdout}\n{proc.stderr}") from None


def run_mcp_client(url: str, steps: list[dict[str, Any]], *, mode: str = "auto",
                   headers: dict[str, str] | None = None, bearer: str | None = None, proxy: str | None = None,
                   proxy_bearer: str | None = None, ca: Path | None = None, timeout: float = 15.0) -> dict[str, Any]:
    """Run client.py's script mode (the SDK's ``Client``) and return its JSON document."""
    cmd, env = _client_cmd(url, headers=headers, bearer=bearer, proxy=proxy, proxy_bearer=proxy_bearer,
                           ca=ca, timeout=timeout)
    cmd += ["--mode", mode, "--script", json.dumps(steps)]
    return _run(cmd, env, timeout * (len(steps) + 3))


def run_mcp_raw(url: str, payload: Any, tmp: Path, *, init: bool = True, headers: dict[str, str] | None = None,
                bearer: str | None = None, proxy: str | None = None, proxy_bearer: str | None = None,
                ca: Path | None = None, timeout: float = 15.0) -> dict[str, Any]:
    """POST ``payload`` (e.g. a JSON-RPC batch) as is, after an initialize handshake unless ``init=False``."""
    tmp.mkdir(parents=True, exist_ok=True)
    body = tmp / "raw.json"
    body.write_text(json.dumps(payload))
    cmd, env = _client_cmd(url, headers=headers, bearer=bearer, proxy=proxy, proxy_bearer=proxy_bearer,
                           ca=ca, timeout=timeout)
    cmd += ["--raw-batch", str(body)] + ([] if init else ["--no-init"])
    return _run(cmd, env, timeout * 4)


def step_ok(doc: dict[str, Any], i: int) -> dict[str, Any]:
    """The result of step ``i``, failing with the whole document when it errored."""
    assert doc["connected"], doc
    step = doc["steps"][i]
    assert step["ok"], step
    return step["result"]


def start_tls_mcp_server(directory: Path) -> tuple["McpServer", Path]:
    """An SSE MCP server over HTTPS with its own CA (trustme); returns it and the CA file."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    server = start_mcp_server(directory / "srv", response="sse", certfile=directory / "cert.pem",
                              keyfile=directory / "key.pem")
    return server, directory / "ca.pem"
