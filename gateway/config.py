"""Gateway configuration: one TOML file, validated by pydantic, overridable by environment.

Precedence (highest first): ``AGENTGATE_<SECTION>__<KEY>`` environment variables, the TOML
file, the defaults below. Unknown keys and bad values are start-up errors that name the key.
Relative paths in the file are resolved against the file's directory; the data dir defaults
to ``./.agentgate`` relative to the working directory.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.redaction.settings import RedactionSettings

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = PACKAGE_ROOT / "policies" / "agentgate.example.toml"
ENV_PREFIX = "AGENTGATE_"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class ListenConfig(_Section):
    """Where the three front ends listen (HOST:PORT; port 0 picks a free port)."""

    proxy: str = "127.0.0.1:8080"
    routes: str = "127.0.0.1:8090"
    admin: str = "127.0.0.1:8081"
    proxy_enabled: bool = True
    idle_seconds: float = Field(default=75, gt=0)
    """The route and admin listeners close a connection with no request in progress for this long:
    idle between keep-alive requests, or opened and its request head never finished. (The
    forward proxy's is ``proxy.connection_idle_seconds``.)"""
    body_timeout_seconds: float = Field(default=60, gt=0)
    """A route request whose body stops arriving for this long is refused (408
    ``request_timeout``) and audited, instead of holding its connection open."""

    _check = field_validator("proxy", "routes", "admin")(classmethod(lambda cls, v: _hostport(v)))


Algorithm = Literal[
    "HS256", "HS384", "HS512",
    "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512",
    "EdDSA",
]


class IdentityConfig(_Section):
    """How agent and admin JWTs are verified."""

    algorithms: list[Algorithm] = Field(default_factory=lambda: ["EdDSA"], min_length=1)
    issuer: str | None = None
    audience: str | None = None
    """Agent tokens' audience (``aud``), checked when set."""
    admin_audience: str = Field(default="agentgate-admin", min_length=1)
    """The audience the admin API requires, whatever ``audience`` says (RFC 9068, RFC 8707: a token
    is for one resource). Agent front ends refuse any token carrying it, so an agent token never
    reaches the admin API, whatever roles it claims (roles are policy data too), and an admin
    token never acts as an agent."""
    leeway_seconds: float = Field(default=30, ge=0, le=3600)
    max_token_lifetime_seconds: int = Field(default=86_400, gt=0)
    """Longest accepted lifetime: ``exp - iat``, or without ``iat`` ``exp - now`` (plus the leeway,
    as the issuer's clock may run ahead of ours). There is no "unlimited": a token that leaks must
    still expire soon; an identity provider issuing longer-lived tokens needs a larger number, set
    on purpose."""
    team_claim: str = "team"
    roles_claim: str = "roles"
    hmac_secret_env: str | None = None
    hmac_secret_file: Path | None = None
    public_key_files: list[Path] = Field(default_factory=list)
    jwks_url: str | None = None
    jwks_ca_file: Path | None = None
    jwks_cache_seconds: float = Field(default=300, gt=0)
    jwks_timeout_seconds: float = Field(default=5, gt=0)
    dev_signing_key: bool = True
    """Generate an Ed25519 key in the data dir on first run, trust it, and let `token mint` use it."""
    registry_file: Path | None = None
    require_registered_agents: bool = False

    @model_validator(mode="after")
    def _distinct_audiences(self) -> "IdentityConfig":
        # After validation, so that the default admin_audience is compared too.
        if self.admin_audience == self.audience:
            raise ValueError(f"identity.admin_audience and identity.audience are both {self.audience!r}: "
                             "they must differ, or agent tokens would be admin tokens")
        return self


class PolicyConfig(_Section):
    engine: Literal["embedded", "opa"] = "embedded"
    dir: Path = PACKAGE_ROOT / "policies"
    decision: str = "agentgate/decision"
    """Decision path: ``<package path>/<rule>``; data.agentgate.decision by default."""
    enforce: bool = True
    hot_reload: bool = True
    inspect_body_bytes: int = Field(default=1 << 20, ge=0)
    opa_url: str = "http://127.0.0.1:8181"
    timeout_seconds: float = Field(default=0.5, gt=0)
    decision_cache_size: int = Field(default=4096, ge=0)
    """Embedded engine: decisions kept for reuse on identical input (what the bundle reads of
    it); 0 turns the cache off. See policies/README.md, "The decision cache"."""

    @field_validator("decision")
    @classmethod
    def _decision_path(cls, v: str) -> str:
        parts = v.strip("/").split("/")
        if len(parts) < 2 or not all(p.replace("_", "a").isalnum() for p in parts):
            raise ValueError(f"expected a path like 'agentgate/decision', got {v!r}")
        return "/".join(parts)


class AuditConfig(_Section):
    dsn: str | None = None
    """``chdb:///path`` (embedded) or ``http(s)://user:pass@host:8123``; default: chDB in the data dir."""
    database: str = "agentgate"
    batch_size: int = Field(default=2000, ge=1)
    flush_interval_seconds: float = Field(default=0.2, gt=0)
    ttl_days: int = Field(default=90, ge=1)
    sql_row_limit: int = Field(default=10_000, ge=1)
    spool_max_bytes: int = Field(default=1 << 30, ge=1 << 16)
    """Disk quota of the write-ahead spool in <data_dir>/spool (backlog while ClickHouse is away)."""
    required: bool = False
    """True: refuse new calls (503 audit_unavailable) when the spool cannot take their record."""
    spool_fsync: Literal["before_forward", "interval", "off"] = "interval"
    """When a call's write-ahead record is fsync'd (storage.spool.SYNC_MODES): ``before_forward``
    (the call waits for the disk: survives a power loss), ``interval`` (written before the call
    goes upstream, fsync'd within ``spool_fsync_interval_seconds``: survives a gateway crash, and
    a power loss but for that last interval) or ``off`` (survives a gateway crash). ``true`` and
    ``false`` (the settings of earlier versions) mean ``before_forward`` and ``off``."""
    spool_fsync_interval_seconds: float = Field(default=0.02, gt=0, le=1)
    """``interval``: how long a written record may wait for its fsync."""

    @field_validator("spool_fsync", mode="before")
    @classmethod
    def _fsync_bool(cls, v: Any) -> Any:
        """The boolean of earlier versions (TOML, or "true"/"false" from the environment)."""
        if isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        if isinstance(v, bool):
            return "before_forward" if v else "off"
        return v
    chdb_process: bool = True
    """Embedded chDB runs in a child process (its memory, merges and crashes stay out of the
    proxy's); false: in the gateway process. Ignored for a ClickHouse server DSN."""


class CredentialConfig(_Section):
    """An upstream credential injected by the gateway; agents never hold it."""

    header: str = "Authorization"
    prefix: str = ""
    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "CredentialConfig":
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of 'env' or 'file'")
        return self

    def resolve(self) -> str:
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"credential env var {self.env} is not set")
        else:
            assert self.file is not None
            try:
                value = self.file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"credential file {self.file}: {exc.strerror}") from None
        return self.prefix + value


class RouteConfig(_Section):
    upstream: str
    verify_tls: bool = True
    ca_file: Path | None = None
    connect_timeout_seconds: float = Field(default=5, gt=0)
    timeout_seconds: float = Field(default=60, gt=0)
    credential: CredentialConfig | None = None
    enforce: bool | None = None
    """Overrides policy.enforce for this route (False = shadow mode)."""
    fail_open: bool = False
    unredactable: Literal["refuse", "pass"] = "refuse"
    """A response that must be redacted but cannot be (too large, undecodable, unsupported type):
    refuse it (502 response_not_redactable) or pass it unredacted (audited as such)."""
    query_semicolons: Literal["refuse", "literal"] = "refuse"
    """An unencoded ';' in the query: refused (400 ambiguous_query), as Rack, older Go and Python
    split parameters on it and policy does not; ``literal`` only for an upstream that splits on
    '&' alone (policy then sees ``a=1;b=2`` as ``a`` = ``1;b=2``, as that upstream does)."""
    path_semicolons: Literal["refuse", "literal"] = "refuse"
    """A ';' in a path segment, raw or percent-encoded: refused (400 ambiguous_path), as Tomcat,
    Jetty and Spring strip ';parameters' (``/admin;x=1/users`` routes as ``/admin/users``);
    ``literal`` only for an upstream that reads ';' as an ordinary character (policy then sees
    the segment ``admin;x=1``)."""

    @field_validator("upstream")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v.rstrip("/")


class WebhookConfig(_Section):
    """Where new pending approvals are announced (POST, retried, never blocking a call)."""

    url: str
    format: Literal["json", "slack"] = "json"
    timeout_seconds: float = Field(default=5, gt=0)
    retries: int = Field(default=3, ge=0, le=10)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v


class ApprovalConfig(_Section):
    hold_seconds: float = Field(default=30, ge=0, le=3600)
    """How long a held call waits on its open connection for a decision."""
    ttl_seconds: float = Field(default=900, gt=0)
    """How long an approval stays open (and, once approved, usable by a retry)."""
    allow_self_approval: bool = False
    """Let an agent's registry owner approve its calls."""
    approver_teams_claim: str = "approver_teams"
    """Admin JWT claim limiting an approver to the listed teams (absent: all teams)."""
    webhooks: list[WebhookConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _hold_within_ttl(self) -> "ApprovalConfig":
        # A call held past its approval's lifetime would wait on an approval that is gone.
        if self.hold_seconds > self.ttl_seconds:
            raise ValueError(f"hold_seconds ({self.hold_seconds:g}) must not exceed ttl_seconds "
                             f"({self.ttl_seconds:g}): a held call would outlive its approval")
        return self


class StateConfig(_Section):
    poll_seconds: float = Field(default=0.25, gt=0, le=5)
    """How often a replica reads kill-switches and approvals changed by other replicas."""


class ProxyConfig(_Section):
    """Forward-proxy (mitmproxy) settings."""

    upstream_ca_file: Path | None = None
    """Extra CA bundle trusted for upstream TLS (in addition to the system store)."""
    verify_upstream_tls: bool = True
    enforce: bool | None = None
    fail_open: bool = False
    unredactable: Literal["refuse", "pass"] = "refuse"
    query_semicolons: Literal["refuse", "literal"] = "refuse"
    """As for a route (RouteConfig.query_semicolons), for every forward-proxy call."""
    path_semicolons: Literal["refuse", "literal"] = "refuse"
    """As for a route (RouteConfig.path_semicolons), for every forward-proxy call."""
    connection_idle_seconds: float = Field(default=300, gt=0)
    max_body_bytes: int = Field(default=64 << 20, ge=1 << 20)
    """Forward mode reads bodies whole before it judges them: larger requests are refused (413)
    and so are larger responses (502), streamed or not. Raise it for large downloads."""


class Config(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Path(".agentgate")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """uvloop (libuv) serves the same calls with ~12% less CPU than asyncio's own loop (bench,
    route mode); ``asyncio`` is there to rule the loop out when chasing a problem."""
    listen: ListenConfig = ListenConfig()
    identity: IdentityConfig = IdentityConfig()
    policy: PolicyConfig = PolicyConfig()
    audit: AuditConfig = AuditConfig()
    proxy: ProxyConfig = ProxyConfig()
    approval: ApprovalConfig = ApprovalConfig()
    redaction: RedactionSettings = RedactionSettings()
    state: StateConfig = StateConfig()
    routes: dict[str, RouteConfig] = Field(default_factory=dict)

    @field_validator("routes")
    @classmethod
    def _route_names(cls, v: dict[str, RouteConfig]) -> dict[str, RouteConfig]:
        for name in v:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"route name {name!r}: use letters, digits, '-' and '_'")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # File values arrive as init kwargs; the environment overrides them.
        return (env_settings, init_settings)

    # Derived locations -------------------------------------------------------------
    @property
    def audit_dsn(self) -> str:
        return self.audit.dsn or f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def ca_cert_path(self) -> Path:
        return self.ca_dir / "mitmproxy-ca-cert.pem"

    @property
    def dev_key_path(self) -> Path:
        return self.data_dir / "dev-signing-key.pem"

    @property
    def admin_url(self) -> str:
        return f"http://{self.listen.admin}"


def _resolve_paths(raw: Any, base: Path) -> Any:
    """Make relative path-valued keys in a TOML document relative to the file's directory."""
    path_keys = {"dir", "file", "ca_file", "hmac_secret_file", "jwks_ca_file", "registry_file",
                 "upstream_ca_file", "data_dir", "pseudonym_key_file"}
    if isinstance(raw, dict):
        out = {}
        for key, value in raw.items():
            if key in path_keys and isinstance(value, str) and value and not os.path.isabs(value):
                out[key] = str(base / value)
            elif key == "public_key_files" and isinstance(value, list):
                out[key] = [str(base / v) if isinstance(v, str) and not os.path.isabs(v) else v
                            for v in value]
            else:
                out[key] = _resolve_paths(value, base)
        return out
    return raw


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, *, use_example: bool = True) -> Config:
    """Load the configuration from ``path``, ``$AGENTGATE_CONFIG`` or the shipped example.

    The example keeps its data dir relative to the working directory (``./.agentgate``),
    as the README promises; every other relative path resolves against the file.
    """
    chosen = path or os.environ.get("AGENTGATE_CONFIG")
    raw: dict[str, Any] = {}
    source = "defaults and environment"
    if chosen or use_example:
        file = Path(chosen) if chosen else EXAMPLE_CONFIG
        source = str(file)
        try:
            raw = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        data_dir = raw.pop("data_dir", None)
        raw = _resolve_paths(raw, file.resolve().parent)
        if data_dir is not None:
            raw["data_dir"] = data_dir if chosen is None else _resolve_paths(
                {"data_dir": data_dir}, file.resolve().parent)["data_dir"]
    try:
        return Config(**raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None

