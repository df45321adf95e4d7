"""The agent registry: which agents exist, who owns them and what they are for.

Loaded from a TOML file of ``[agents.<agent-id>]`` tables. With
``identity.require_registered_agents`` on, a valid token of an agent absent from it is refused.
Policies see the calling agent's entry as ``input.agent.registration`` and the whole registry as
``data.agents`` (indexing that per call is slow in the embedded engine: policies/README.md,
"Writing fast policies for the embedded engine").
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import ConfigError


class AgentRecord(BaseModel):
    """One registered agent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    owner: str = Field(min_length=1)
    team: str | None = None
    purpose: str = ""
    environment: str | None = None
    systems: tuple[str, ...] = ()


class _RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agents: dict[str, AgentRecord] = Field(default_factory=dict)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid agent registry ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


class AgentRegistry:
    """An immutable set of registered agents, keyed by agent id (the token's ``sub``)."""

    def __init__(self, agents: Mapping[str, AgentRecord] | None = None, *, source: str = "") -> None:
        self._agents: dict[str, AgentRecord] = dict(agents or {})
        self._data = {agent_id: rec.model_dump(mode="json") for agent_id, rec in self._agents.items()}
        self.source = source
        self._folded = {agent_id.casefold(): agent_id for agent_id in self._agents}
        self._teams = {agent_id.casefold(): frozenset({record.team.casefold()})
                       for agent_id, record in self._agents.items() if record.team}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "<dict>") -> AgentRegistry:
        """Validate a parsed document (``{"agents": {...}}``); errors name the offending key."""
        try:
            parsed = _RegistryFile.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, source)) from None
        seen: dict[str, str] = {}
        for agent_id in parsed.agents:
            if not agent_id.strip():
                raise ConfigError(f"invalid agent registry ({source}): agents: empty agent id")
            if (other := seen.setdefault(agent_id.casefold(), agent_id)) != agent_id:
                raise ConfigError(f"invalid agent registry ({source}): agents {other!r} and {agent_id!r} differ "
                                  "only in case (kill-switches match agent ids case-insensitively)")
        return cls(parsed.agents, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AgentRegistry:
        file = Path(path)
        try:
            raw = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"agent registry file not found: {file}") from None
        except OSError as exc:
            raise ConfigError(f"agent registry file {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        return cls.from_dict(raw, source=str(file))

    def get(self, agent_id: str) -> AgentRecord | None:
        return self._agents.get(agent_id)

    def listed_as(self, agent_id: str) -> str | None:
        """The listed id that ``agent_id`` matches case-insensitively, or None."""
        return self._folded.get(agent_id.casefold())

    def teams(self, agent_id: str) -> frozenset[str]:
        """The teams (casefolded) the registry gives ``agent_id``, matched case-insensitively, in
        one dict lookup: for kill-switches, which err towards stopping too much."""
        return self._teams.get(agent_id.casefold(), frozenset())

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __len__(self) -> int:
        return len(self._agents)

    def __iter__(self) -> Iterator[str]:
        return iter(self._agents)

    def as_data(self) -> dict[str, dict[str, Any]]:
        """JSON-able view for Rego's ``data.agents``."""
        return {agent_id: dict(entry) for agent_id, entry in self._data.items()}

    def entry(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's entry as policy input (``input.agent.registration``); shared: read only."""
        return self._data.get(agent_id)
