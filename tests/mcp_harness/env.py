"""The MCP SDK's own virtualenv, ``<repo>/.venv-mcp``, built from ``requirements-mcp.lock``.

The ``mcp`` SDK needs h11>=0.16 while the gateway's mitmproxy pins h11<=0.14, so the SDK cannot
live in the gateway's environment: the harness runs it in subprocesses with this interpreter.

``mcp_python()`` builds the venv on first use and rebuilds it when the lock changes: the marker
``.venv-mcp/.installed`` holds the lock's SHA-256 and is written last, only after a complete
install. An exclusive ``flock`` serialises builders, so parallel test processes (xdist workers,
two pytest runs) never race. Standard library only: ``make`` runs this file directly
(``python3 tests/mcp_harness/env.py``) to build the venv during its install step.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = ROOT / "requirements-mcp.lock"
VENV = Path(os.environ.get("AGENTGATE_MCP_VENV", ROOT / ".venv-mcp"))
MARKER_NAME = ".installed"
INSTALL_TIMEOUT = 900.0


def lock_digest(lock_file: Path = LOCK_FILE) -> str:
    return hashlib.sha256(lock_file.read_bytes()).hexdigest()


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _ready(venv: Path, digest: str) -> bool:
    marker = venv / MARKER_NAME
    try:
        return marker.read_text().strip() == digest and _python(venv).exists()
    except OSError:
        return False


def _ignore_in_git(venv: Path) -> None:
    """A ``*`` .gitignore inside the venv (as virtualenv writes), so ``git add -A`` never takes it."""
    ignore = venv / ".gitignore"
    if venv.is_dir() and not ignore.exists():
        ignore.write_text("# created by tests/mcp_harness/env.py\n*\n")


def _base_python() -> str:
    """The interpreter to build from: the one running us, outside any venv it may be in."""
    return os.environ.get("AGENTGATE_MCP_BASE_PYTHON") or getattr(sys, "_base_executable", None) or sys.executable


def _build(venv: Path, lock_file: Path) -> None:
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT,
                   capture_output=True)
    proc = subprocess.run(
        [str(_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-input", "--require-hashes", "--no-deps", "--only-binary", ":all:", "-r", str(lock_file)],
        timeout=INSTALL_TIMEOUT, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise RuntimeError(f"installing {lock_file.name} into {venv} failed:\n{proc.stdout}\n{proc.stderr}")
    check = subprocess.run([str(_python(venv)), "-c", "import mcp, httpx2, uvicorn"],
                           capture_output=True, text=True, timeout=120)
    if check.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise RuntimeError(f"{venv} is broken after install:\n{check.stderr}")


def mcp_python(venv: Path = VENV, lock_file: Path = LOCK_FILE) -> Path:
    """The ``.venv-mcp`` interpreter, building or rebuilding the venv if the lock changed."""
    digest = lock_digest(lock_file)
    if _ready(venv, digest):
        _ignore_in_git(venv)
        return _python(venv)
    # The flock lives outside the venv, which a rebuild deletes.
    key = hashlib.sha256(str(venv.resolve()).encode()).hexdigest()[:16]
    guard = Path(tempfile.gettempdir()) / f"agentgate-venv-mcp-{key}.lock"
    with open(guard, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if not _ready(venv, digest):  # another process may have built it while we waited
                _build(venv, lock_file)
                _ignore_in_git(venv)
                (venv / MARKER_NAME).write_text(digest + "\n")
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return _python(venv)


if __name__ == "__main__":
    python = mcp_python()
    (VENV / MARKER_NAME).touch()  # keep make's timestamp check satisfied once the lock is current
    print(python)
