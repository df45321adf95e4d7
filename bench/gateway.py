"""The gateway under test: keys, a generated configuration, the process, its admin API."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from bench import procs

ISSUER = "agentgate-bench"
AUDIENCE = "agentgate"
ADMIN_AUDIENCE = "agentgate-admin"
"""The default identity.admin_audience: admin API tokens are for it, agent tokens never."""
ROUTE = "demo"
"""The example bundle maps route ``demo`` (and host 127.0.0.1) to the system ``demo``."""
BULK_ROUTE, BULK_REDACT_ROUTE = "bulk", "bulk-redact"
"""Bench-only routes to the same upstream (bench/policy/bulk.rego): not redacted / redacted."""
OVERLAY = procs.ROOT / "bench" / "policy"


def policy_bundle(directory: Path) -> Path:
    """The example bundle (tests left out) plus the bench overlay's modules under ``bench/``."""
    shutil.copytree(procs.ROOT / "policies", directory, ignore=shutil.ignore_patterns("*_test.rego", ".*"),
                    dirs_exist_ok=True)
    (directory / "bench").mkdir(exist_ok=True)
    for module in sorted(OVERLAY.glob("*.rego")):
        shutil.copyfile(module, directory / "bench" / module.name)
    return directory


@dataclass
class Keys:
    private_pem: bytes
    public_file: Path

    @classmethod
    def create(cls, directory: Path) -> "Keys":
        key = ed25519.Ed25519PrivateKey.generate()
        priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        public_file = directory / "bench-ed25519.pub.pem"
        public_file.write_bytes(pub)
        return cls(priv, public_file)

    def token(self, agent: str, roles: list[str], team: str | None = None, ttl: int = 4 * 3600,
              audience: str = AUDIENCE) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": agent, "iat": now, "exp": now + ttl, "iss": ISSUER,
                                  "aud": audience, "roles": roles}
        if team:
            claims["team"] = team
        return jwt.encode(claims, self.private_pem, algorithm="EdDSA")


def config_doc(workdir: Path, keys: Keys, *, upstream_http: str, upstream_ca: Path,
               audit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full pipeline: EdDSA JWTs, embedded Rego with the example bundle (plus the bench
    overlay's two bulk routes), audit to chDB, TLS interception in forward mode with the upstream's
    private CA. Audit and redaction settings are the gateway's defaults."""
    upstream = {"upstream": f"http://{upstream_http}"}
    return {
        "data_dir": str(workdir / "data"),
        "log_level": "warning",
        "listen": {"proxy": "127.0.0.1:0", "routes": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "identity": {"algorithms": ["EdDSA"], "issuer": ISSUER, "audience": AUDIENCE,
                     "public_key_files": [str(keys.public_file)], "dev_signing_key": False},
        "policy": {"engine": "embedded", "dir": str(policy_bundle(workdir / "policy")), "hot_reload": False},
        "proxy": {"upstream_ca_file": str(upstream_ca)},
        "routes": {ROUTE: upstream, BULK_ROUTE: dict(upstream), BULK_REDACT_ROUTE: dict(upstream)},
        "audit": dict(audit or {}),
    }


@dataclass
class GatewayProcess:
    child: procs.Child
    data_dir: Path
    proxy: str
    routes: str
    admin: str
    admin_token: str
    store_pid: int | None = None
    """The embedded-ClickHouse (chDB) child process, if any."""

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca" / "mitmproxy-ca-cert.pem"

    def route_url(self, path: str, route: str = ROUTE) -> str:
        return f"http://{self.routes}/r/{route}{path}"

    async def sql(self, session: aiohttp.ClientSession, query: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        async with session.post(f"http://{self.admin}/v1/audit/sql", json={"sql": query},
                                headers={"Authorization": f"Bearer {self.admin_token}"},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"audit SQL failed ({resp.status}): {body[:300]!r}")
        doc = json.loads(body)
        return [dict(zip(doc["columns"], row)) for row in doc["rows"]]

    async def spool_counts(self, session: aiohttp.ClientSession) -> tuple[int, int]:
        """(write-ahead records, fsyncs) of the audit spool so far, from /readyz."""
        async with session.get(f"http://{self.admin}/readyz") as resp:
            audit = (await resp.json())["audit"]
        return audit["begins"], audit["fsyncs"]

    def stop(self) -> None:
        self.child.stop()


def start_gateway(workdir: Path, keys: Keys, *, upstream_http: str, upstream_ca: Path,
                  cpus: set[int] | None, store_cpus: set[int] | None,
                  audit: dict[str, Any] | None = None) -> GatewayProcess:
    """Start the gateway on ``cpus``; its store process (chDB), like a ClickHouse server would
    be, goes to ``store_cpus``. ``audit``: settings over the defaults (route-fsync)."""
    workdir.mkdir(parents=True, exist_ok=True)
    doc = config_doc(workdir, keys, upstream_http=upstream_http, upstream_ca=upstream_ca, audit=audit)
    config = workdir / "agentgate.toml"
    config.write_text(tomli_w.dumps(doc))
    child = procs.start("gateway", [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
                        ready_prefix="agentgate listening:", log=workdir / "gateway.log", cpus=cpus)
    parts = dict(p.split("=", 1) for p in child.ready_line.split(":", 1)[1].split())
    store_pid = procs.store_process(child.pid)
    if store_pid is not None and store_cpus:
        procs.pin_process(store_pid, store_cpus)
    return GatewayProcess(child=child, data_dir=Path(doc["data_dir"]), proxy=parts["proxy"],
                          routes=parts["routes"], admin=parts["admin"],
                          admin_token=keys.token("bench-responder", ["responder"], audience=ADMIN_AUDIENCE),
                          store_pid=store_pid)
