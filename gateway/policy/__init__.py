"""Policy engines: Rego evaluated in-process (regopy) or by an OPA server, behind one interface.

Submodules are imported lazily by :func:`make_engine`, so an OPA deployment never loads the
regopy shared library and the embedded engine never needs an HTTP client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gateway.config import PolicyConfig


class PolicyError(Exception):
    """Base class for policy failures; the gateway fails closed on every one of them."""


class PolicyLoadError(PolicyError):
    """The bundle cannot be loaded or compiled (message: the compiler's / loader's words)."""


class PolicyEvalError(PolicyError):
    """A decision could not be produced: runtime error, transport failure, or undefined."""


class PolicyUndefinedError(PolicyEvalError):
    """The decision document is undefined for this input (no rule produced a value)."""


@runtime_checkable
class PolicyEngine(Protocol):
    name: str
    """``embedded`` or ``opa``."""
    revision: str
    """Identifies the loaded bundle (embedded: short sha256 of file names and contents)."""
    ready: bool

    async def start(self) -> None: ...

    async def evaluate(self, input: dict[str, Any]) -> Any: ...

    def cache_status(self) -> dict[str, Any]:
        """For /readyz: ``{"enabled": bool, ...}``, whether decisions are reused and why not."""
        ...

    async def data(self) -> dict[str, Any] | None:
        """The data document the policy decides with (at least ``gateway`` and ``agents``
        where it has them), for reports such as granted-versus-used; None if unavailable."""
        ...

    async def close(self) -> None: ...


def decision_ref(decision: str) -> str:
    """``agentgate/decision`` -> ``data.agentgate.decision`` (for messages)."""
    return "data." + ".".join(decision.strip("/").split("/"))


def make_engine(cfg: PolicyConfig, extra_data: dict[str, Any] | None = None) -> PolicyEngine:
    """Build the engine ``cfg.engine`` names; ``extra_data`` is merged into ``data``."""
    if cfg.engine == "embedded":
        from gateway.policy.embedded import EmbeddedEngine

        return EmbeddedEngine(cfg, extra_data)
    if cfg.engine == "opa":
        from gateway.policy.opa import OpaEngine

        return OpaEngine(cfg, extra_data)
    raise ValueError(f"unknown policy engine {cfg.engine!r}")


__all__ = [
    "PolicyEngine",
    "PolicyError",
    "PolicyEvalError",
    "PolicyLoadError",
    "PolicyUndefinedError",
    "decision_ref",
    "make_engine",
]
