"""Test harness running the real ``mcp`` SDK (server and agent) in its own venv, via subprocesses.

``server.py`` and ``client.py`` run under ``.venv-mcp`` (``env.mcp_python()``); ``harness.py``
holds the pytest-side helpers that start and drive them.
"""
