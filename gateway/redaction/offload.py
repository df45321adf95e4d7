"""Redaction of large bodies in a worker process.

Redaction is pure Python: in a thread it still holds the GIL and stalls the event loop (the
benchmark measured small calls' p99 x6 while two 1 MB bodies were redacted). A separate
process keeps the loop free; the body crosses a pipe once each way, which costs far less than
the redaction itself. The worker is started with ``spawn`` (the gateway process has threads:
chDB, mitmproxy); the gateway starts it in the background at start-up (:func:`prestart`), as
started lazily the first large body waited ~1 s for a Python process to import its library.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .report import RedactionReport
from .settings import RedactionSettings

log = logging.getLogger("agentgate.redaction")

_pool: ProcessPoolExecutor | None = None
_worker_redactors: dict[str, Any] = {}


def _pool_instance() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_exit_with_parent, initargs=(os.getpid(),))
    return _pool


def _exit_with_parent(parent: int) -> None:
    """Worker initializer. A gateway killed outright (OOM killer, kill -9) cannot stop its worker,
    which would otherwise wait on its queue forever, holding its memory: it leaves within a second."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="agentgate-parent-watch", daemon=True).start()


def prestart() -> None:
    """Start the worker now without waiting for it: it imports the library while the gateway
    serves, and the first large body finds it ready."""
    pool = _pool_instance()
    try:
        pool.submit(_ready)
    except Exception as exc:  # noqa: BLE001 - only a head start: the first large body tries again
        log.warning("redaction worker not started ahead: %s", exc)
        _discard(pool)


def _ready() -> None:
    importlib.import_module(f"{__package__}.plan")  # what the first redaction imports


def shutdown() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


atexit.register(shutdown)


def _redact_in_worker(settings_json: str, fields: tuple[str, ...], detectors: tuple[str, ...], body: bytes,
                      content_type: str, content_encoding: str | None) -> tuple[bytes, RedactionReport]:
    from .plan import Redactor  # the worker process imports the library on first use

    redactor = _worker_redactors.get(settings_json)
    if redactor is None:
        redactor = _worker_redactors[settings_json] = Redactor(RedactionSettings.model_validate_json(settings_json))
    plan = redactor.plan(fields, detectors)
    assert plan is not None
    return plan.redact_body(body, content_type=content_type, content_encoding=content_encoding)


async def redact_in_process(settings: RedactionSettings, fields: tuple[str, ...], detectors: tuple[str, ...],
                            body: bytes, content_type: str, content_encoding: str | None) -> tuple[bytes, RedactionReport]:
    loop = asyncio.get_running_loop()
    args = (settings.model_dump_json(), fields, detectors, body, content_type, content_encoding)
    pool = _pool_instance()
    try:
        return await loop.run_in_executor(pool, _redact_in_worker, *args)
    except BrokenProcessPool:
        # The worker died (killed from outside, or crashed on this body). Start a new one and try
        # once more; if that one dies too, the caller refuses the response.
        log.error("redaction worker died; starting a new one")
        _discard(pool)
        return await loop.run_in_executor(_pool_instance(), _redact_in_worker, *args)


def _discard(pool: ProcessPoolExecutor) -> None:
    global _pool
    if _pool is pool:
        _pool = None
    pool.shutdown(wait=False, cancel_futures=True)
