"""pytest fixtures shared by the MCP test modules (loaded through ``pytest_plugins`` in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mcp_harness.env import mcp_python
from tests.mcp_harness.harness import McpServer, start_tls_mcp_server


@pytest.fixture(scope="module")
def mcp_venv() -> Path:
    """The MCP SDK's own venv (built once per lock file; cached builds take milliseconds)."""
    return mcp_python()


@pytest.fixture(scope="module")
def tls_server(mcp_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[McpServer, Path]]:
    """An SSE MCP server over HTTPS with its own CA; yields it and the CA file."""
    server, ca_file = start_tls_mcp_server(tmp_path_factory.mktemp("mcp-tls"))
    yield server, ca_file
    server.stop()
